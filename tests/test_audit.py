"""Audits: scores, the validation cache (no forward pass when unchanged), flags, compare, select, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error, cli, make_model_dir, write_jsonl

import forvalue.session as session_mod
from forvalue.api import build_index, run_query
from forvalue.audit import (
    AuditConfig,
    compare_audits,
    load_audit,
    run_audit,
    select_subset,
    write_audit_report,
    write_compare_report,
)
from forvalue.schemas.config import BuildConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import ForValueError, ManifestMismatchError
from forvalue.storage.store import Store


@pytest.fixture
def audited_store(tmp_path, tiny_model_dir, toy_rows):
    write_jsonl(tmp_path / "train.jsonl", toy_rows)
    write_jsonl(tmp_path / "val.jsonl", toy_rows[:3])
    build_index(
        [tmp_path / "train.jsonl"],
        tmp_path / "store",
        BuildConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False),
    )
    return tmp_path


def test_module_functions_take_a_forvalue_open_handle(audited_store, tiny_runner):
    """The module-level functions take a path, a storage Store or the handle users hold from forvalue.open: a
    handle used to be opened as a path ('no such store')."""
    import forvalue

    store = audited_store / "store"
    run_audit(store, [audited_store / "val.jsonl"], "a", AuditConfig(progress=False, device="cpu"), runner=tiny_runner)
    handle = forvalue.open(store)
    by_path, by_handle = load_audit(store, "a")[0], load_audit(handle, "a")[0]
    assert by_handle.equals(by_path)
    run_audit(handle, [audited_store / "val.jsonl"], "b", AuditConfig(progress=False, device="cpu"), runner=tiny_runner)
    assert compare_audits(handle, "a", "b").spearman == pytest.approx(1.0)
    assert [r["id"] for r in select_subset(handle, "a", top="2").rows()] == [
        r["id"] for r in select_subset(store, "a", top="2").rows()
    ]


def test_audit_scores_match_query(audited_store, tiny_runner):
    store = audited_store / "store"
    version = Store.open(store).version()
    run_audit(store, [audited_store / "val.jsonl"], "a", AuditConfig(progress=False, device="cpu"), runner=tiny_runner)
    table, meta = load_audit(store, "a")
    res = run_query(
        store,
        [audited_store / "val.jsonl"],
        QueryConfig(progress=False, device="cpu"),
        runner=tiny_runner,
        keep_scores=True,
    )
    by_id = dict(zip(res.train_ids, res.scores.T))
    # the token form's mean is the per-sample scores' mean (same arithmetic); the G-form's (the cost model's choice
    # for these 3 samples of a tiny model) is Eq. 1 through a float32 table
    rtol = 1e-9 if meta["scan_form"] == "token" else 1e-6
    for row in table.to_pylist():
        np.testing.assert_allclose(row["score_mean"], by_id[row["id"]].mean(), rtol=rtol)
        if meta["scan_form"] == "token":  # (the G-form has no per-sample scores: no max unless flagged by it)
            np.testing.assert_allclose(row["score_max"], by_id[row["id"]].max(), rtol=1e-9)
        else:
            assert row["score_max"] is None
    means = table.column("score_mean").to_numpy()
    assert sorted(table.column("rank").to_pylist()) == list(range(1, len(means) + 1))
    assert table.column("rank").to_numpy()[np.argmax(means)] == 1
    flagged = table.column("flagged").to_numpy(zero_copy_only=False)
    assert flagged.sum() == round(0.1 * len(means)) and means[flagged].max() <= means[~flagged].min()
    assert {"mean_vs_label:reverse", "mean_vs_label:math"} <= set(table.column_names)
    for flag_by, column in (("max", "score_max"), ("label", None)):
        run_audit(
            store,
            [audited_store / "val.jsonl"],
            flag_by,
            AuditConfig(progress=False, device="cpu", flag_by=flag_by, flag_fraction=0.25),
            runner=tiny_runner,
        )
        t = load_audit(store, flag_by)[0].to_pylist()
        score = [r[column] if column else r[f"mean_vs_label:{r['label']}"] for r in t]
        assert [r["flag_score"] for r in t] == score
        cut = sorted(score)[2]
        assert {r["id"] for r in t if r["flagged"]} == {r["id"] for r, s_ in zip(t, score) if s_ <= cut} and sum(
            r["flagged"] for r in t
        ) == 3
    # audits never touch the training table
    assert Store.open(store).version() == version and Store.open(store).count() == len(means)


def test_cached_set_in_one_read_equals_the_encoded_set(audited_store, tiny_runner, toy_rows):
    """A fully cached validation set is read in one take in sample order (ValidationCache.get_all): equal to the set
    encoded afresh, whatever the order of the samples and with a sample repeated; one uncached sample gives None
    (then the per-key path encodes only it)."""
    from forvalue.engine.validation import cache_key, encode_validation, encode_validation_cached
    from forvalue.indexer.data import iter_samples
    from forvalue.schemas.config import DataConfig
    from forvalue.storage.audits import ValidationCache

    st = Store.open(audited_store / "store")
    write_jsonl(audited_store / "more.jsonl", toy_rows[:5])
    samples = list(iter_samples([audited_store / "more.jsonl"], DataConfig()))
    cache = ValidationCache(st)
    encode_validation_cached(samples[:3], st.manifest, DataConfig(), lambda: tiny_runner, cache)
    assert cache.get_all([cache_key(s, st.manifest) for s in samples]) is None  # two not cached
    val, encoded = encode_validation_cached(samples, st.manifest, DataConfig(), lambda: tiny_runner, cache)
    assert encoded == 2
    order = [samples[j] for j in (4, 0, 2, 0, 1, 3)]  # shuffled, one repeated
    cached, encoded = encode_validation_cached(order, st.manifest, DataConfig(), lambda: None, cache)
    fresh = encode_validation(tiny_runner, order, st.manifest, DataConfig())
    assert encoded == 0
    for name in ("hidden", "ids", "values", "lengths", "sq_norms"):
        np.testing.assert_allclose(getattr(cached, name), getattr(fresh, name), rtol=1e-6, atol=1e-6, err_msg=name)
    assert [s.id for s in cached.samples] == [s.id for s in order]
    # writable arrays: torch warns on (and must not write into) read-only Arrow memory
    assert all(getattr(cached, name).flags.writeable for name in ("hidden", "ids", "values"))


def test_unchanged_validation_runs_no_forward_pass(audited_store, toy_rows, monkeypatch):
    store = audited_store / "store"
    first = run_audit(store, [audited_store / "val.jsonl"], "a", AuditConfig(progress=False, device="cpu"))
    assert first.encoded_now == 3
    scores1 = load_audit(store, "a")[0].column("score_mean").to_numpy()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a cached validation set")

    monkeypatch.setattr(session_mod, "load_store_runner", no_model)
    second = run_audit(store, [audited_store / "val.jsonl"], "a", AuditConfig(progress=False, device="cpu"))
    assert second.encoded_now == 0 and second.version == first.version + 1
    np.testing.assert_array_equal(load_audit(store, "a")[0].column("score_mean").to_numpy(), scores1)
    monkeypatch.undo()
    edited = [dict(toy_rows[0], response=" the fox quick"), toy_rows[1], toy_rows[2]]
    write_jsonl(audited_store / "val2.jsonl", edited)
    third = run_audit(store, [audited_store / "val2.jsonl"], "b", AuditConfig(progress=False, device="cpu"))
    assert third.encoded_now == 1


def test_compare_select_and_report(audited_store, toy_rows, tiny_runner, tmp_path):
    store = audited_store / "store"
    cfg = AuditConfig(progress=False, device="cpu")
    run_audit(store, [audited_store / "val.jsonl"], "a", cfg, runner=tiny_runner)
    run_audit(store, [audited_store / "val.jsonl"], "same", cfg, runner=tiny_runner)
    write_jsonl(audited_store / "math.jsonl", [r for r in toy_rows if r["label"] == "math"][:2])
    run_audit(store, [audited_store / "math.jsonl"], "m", cfg, runner=tiny_runner)
    assert compare_audits(store, "a", "same").spearman == pytest.approx(1.0)
    c = compare_audits(store, "a", "m")
    assert c.spearman < 1.0 and len(c.moved) > 0
    table, meta = load_audit(store, "a")
    ranked = sorted(table.to_pylist(), key=lambda r: r["rank"])
    top = select_subset(store, "a", top="25%").rows()
    assert [r["id"] for r in top] == [r["id"] for r in ranked[:3]]
    assert set(top[0]) == {"id", "prompt", "response", "label"}
    kept = select_subset(store, "a", drop_bottom="2").rows()
    assert [r["id"] for r in kept] == [r["id"] for r in ranked[:-2]]
    # --drop-flagged keeps the rows the audit did not flag, best first (by label: --drop-bottom dropped the lowest
    # means and kept flagged rows; hostile pass); dropping every row is refused (an empty file, exit 0, before)
    run_audit(
        store,
        [audited_store / "val.jsonl"],
        "lab",
        AuditConfig(progress=False, device="cpu", flag_by="label"),
        runner=tiny_runner,
    )
    lab = sorted(load_audit(store, "lab")[0].to_pylist(), key=lambda r: r["rank"])
    clean = select_subset(store, "lab", drop_flagged=True).rows()
    assert any(r["flagged"] for r in lab) and [r["id"] for r in clean] == [r["id"] for r in lab if not r["flagged"]]
    for kw in (dict(drop_bottom="100%"), dict(drop_bottom=str(len(ranked))), dict(top="1", drop_flagged=True)):
        with pytest.raises(ForValueError, match="drops every sample|exactly one of"):
            select_subset(store, "a", **kw)
    out = tmp_path / "clean.jsonl"
    r = cli("select", "--store", store, "--audit", "lab", "--drop-flagged", "-o", out)
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [c["id"] for c in clean]
    page = write_audit_report(store, "a", tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and ranked[0]["id"] in page
    assert "data:image/png;base64," in write_compare_report(c, tmp_path / "c.html").read_text()


def test_audit_errors(audited_store, tmp_path, tiny_runner):
    store = audited_store / "store"
    with pytest.raises(ForValueError, match="no audit named 'nope'"):
        load_audit(store, "nope")
    write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ForValueError, match="validation set is empty"):
        run_audit(store, [tmp_path / "empty.jsonl"], "x", AuditConfig(progress=False), runner=tiny_runner)
    other = make_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(ManifestMismatchError, match="model_weights_sha256"):
        run_audit(
            store,
            [audited_store / "val.jsonl"],
            "x",
            AuditConfig(progress=False, device="cpu"),
            model=ModelConfig(path=str(other)),
        )
    with pytest.raises(ForValueError, match="not valid"):
        run_audit(store, [audited_store / "val.jsonl"], "../bad", AuditConfig(progress=False), runner=tiny_runner)


def test_audit_cli(audited_store, tmp_path):
    from forvalue.cli import main

    store = str(audited_store / "store")
    cli = CliRunner()
    run = cli.invoke(
        main,
        [
            "audit",
            "run",
            "--store",
            store,
            "-v",
            str(audited_store / "val.jsonl"),
            "--name",
            "a",
            "--device",
            "cpu",
            "--quiet",
            "--report",
            str(tmp_path / "a.html"),
        ],
    )
    assert run.exit_code == 0, run.output
    assert (tmp_path / "a.html").exists()
    listed = cli.invoke(main, ["audit", "list", "--store", store])
    assert listed.exit_code == 0, listed.output
    name, version = listed.output.split()[:2]
    assert (name, version) == ("a", "v1") and "train 12" in listed.output and "validation 3" in listed.output
    shown = cli.invoke(main, ["audit", "show", "--store", store, "a"])
    assert shown.exit_code == 0, shown.output
    assert "12 training vs 3 validation samples" in shown.output
    flagged = int(shown.output.split(" flagged")[0].rsplit(",", 1)[1])
    assert flagged >= 1 and shown.output.count("FLAGGED") == min(flagged, 5)  # flagged rank last; 5 bottom rows shown
    compared = cli.invoke(main, ["audit", "compare", "--store", store, "a", "a"])
    assert compared.exit_code == 0, compared.output
    assert compared.output.startswith("12 common samples; Spearman rank correlation 1.0000")
    out = tmp_path / "subset.jsonl"
    res = cli.invoke(main, ["select", "--store", store, "--audit", "a", "--top", "50%", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 6 and "prompt" in json.loads(out.read_text().splitlines()[0])
    bad = cli.invoke(main, ["audit", "show", "--store", store, "missing"])
    assert bad.exit_code == 2 and "no audit named 'missing'" in bad.output


def test_validation_hash_of_mixed_text_and_prompt_response_rows():
    from forvalue.audit import validation_hash
    from forvalue.indexer.data import Sample

    text = Sample(id="t", prompt=None, response=None, text="plain text", label=None, source="v.jsonl:1")
    pair = Sample(id="p", prompt="question", response=" answer", text=None, label="a", source="v.jsonl:2")
    other = Sample(id="p", prompt="question", response=" other answer", text=None, label="a", source="v.jsonl:2")
    assert validation_hash([text, pair]) == validation_hash([pair, text])  # order does not matter
    assert validation_hash([text, pair]) != validation_hash([text, other])  # content does


def test_select_refuses_outputs_it_would_destroy_and_amounts_that_select_nothing(audited_store, tmp_path, tiny_runner):
    import os

    from conftest import assert_one_line_error, cli

    store = str(audited_store / "store")
    run_audit(store, [audited_store / "val.jsonl"], "a", AuditConfig(progress=False), runner=tiny_runner)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    assert_one_line_error(
        cli("select", "--store", store, "--audit", "a", "--top", "5", "-o", fifo), "not a regular file"
    )
    assert fifo.is_fifo()  # still the pipe, not replaced by a file
    assert_one_line_error(
        cli("select", "--store", store, "--audit", "a", "--top", "5", "-o", store), store, "is the store"
    )
    assert_one_line_error(
        cli("select", "--store", store, "--audit", "a", "--top", "5", "-o", tmp_path / "x.txt"), "unknown output format"
    )
    for amount, needle in (("150%", "more than 100%"), ("0", "selects no sample"), ("-3", "negative")):
        assert_one_line_error(
            cli("select", "--store", store, "--audit", "a", "--top", amount, "-o", tmp_path / "s.jsonl"),
            f"--top '{amount}'",
            needle,
        )
    assert not (tmp_path / "s.jsonl").exists()


def test_audit_list_show_and_compare_say_what_a_user_needs(audited_store, toy_rows, tiny_runner, tmp_path):
    """Hostile-pass nits: an empty list said nothing; compare of an audit with itself listed ten 'moved' rows of
    no move; show --data without --group-column was ignored; show said nothing of rows added after the audit;
    the flag-by label note called unlabelled rows the label 'None'."""
    store = audited_store / "store"
    r = cli("audit", "list", "--store", store)
    assert r.exit_code == 0 and "no audits in" in r.output
    rows = [dict(r, label=None) if i == 0 else r for i, r in enumerate(toy_rows[:3])]
    val = write_jsonl(tmp_path / "val_math.jsonl", [r for r in toy_rows if r["label"] == "math"][:2])
    cfg = AuditConfig(progress=False, device="cpu", flag_by="label")
    run_audit(store, [val], "a", cfg, runner=tiny_runner)
    r = cli("audit", "compare", "--store", store, "a", "a")
    assert r.exit_code == 0 and r.output.rstrip().endswith("moved most (rank a -> rank b):")
    assert_one_line_error(cli("audit", "show", "--store", store, "a", "--data", tmp_path / "x.jsonl"), "--group-column")
    extra = write_jsonl(tmp_path / "more.jsonl", [dict(r, id=f"new{i}") for i, r in enumerate(rows)])
    build_index([extra], store, BuildConfig(progress=False), runner=tiny_runner)
    r = cli("audit", "show", "--store", store, "a")
    assert (
        r.exit_code == 0
        and f"holds {len(toy_rows) + 3} training samples, this audit scored {len(toy_rows)}" in r.output
    )
    run_audit(store, [val], "b", cfg, runner=tiny_runner)
    unjudged = load_audit(store, "b")[1]["unjudged_labels"]
    assert unjudged == {"(no label)": 1, "reverse": sum(r["label"] == "reverse" for r in toy_rows + rows)}


def test_select_with_data_keeps_the_rows_shape(tmp_path, tiny_model_dir, tiny_runner):
    """select --audit --data: a conversation keeps its turns (the store holds only its rendered text, which
    select wrote before, so fine-tuning trained on every token; hostile pass); ids the files lack are refused."""
    chat = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ],
            "label": "ab"[i % 2],
        }
        for i in range(6)
    ]
    train = write_jsonl(tmp_path / "chat.jsonl", chat)
    build_index(
        [train],
        tmp_path / "store",
        BuildConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False),
    )
    run_audit(
        tmp_path / "store",
        [write_jsonl(tmp_path / "v.jsonl", chat[:2])],
        "a",
        AuditConfig(progress=False, device="cpu"),
        runner=tiny_runner,
    )
    ranked = [r["id"] for r in sorted(load_audit(tmp_path / "store", "a")[0].to_pylist(), key=lambda r: r["rank"])]
    out = tmp_path / "sel.jsonl"
    r = cli("select", "--store", tmp_path / "store", "--audit", "a", "--top", "3", "--data", train, "-o", out)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {c["id"]: c for c in chat}
    assert [r["id"] for r in rows] == ranked[:3]
    assert all(r["messages"] == by_id[r["id"]]["messages"] and "text" not in r for r in rows)
    flat = select_subset(tmp_path / "store", "a", top="3").rows()  # without the files: the store's text
    assert [r["id"] for r in flat] == ranked[:3] and all("text" in r and "messages" not in r for r in flat)
    write_jsonl(tmp_path / "part.jsonl", chat[:1])
    assert_one_line_error(
        cli(
            "select",
            "--store",
            tmp_path / "store",
            "--audit",
            "a",
            "--top",
            "3",
            "--data",
            tmp_path / "part.jsonl",
            "-o",
            out,
        ),
        "not in the data files",
        "the store was built from",
    )


def test_percentages_count_exactly_with_halves_rounded_up():
    """N% of a total: exact decimal arithmetic, a half rounded up (round() sent halves to the even neighbour:
    3.75% and 6.25% of 40 were both 2, 5% of 10 selected nothing; hostile pass)."""
    from forvalue.schemas.amounts import parse_share

    cases = {("3.75%", 40): 2, ("6.25%", 40): 3, ("18.75%", 40): 8, ("5%", 10): 1, ("25%", 12): 3, ("0.1%", 7): 0}
    for (text, total), n in cases.items():
        assert parse_share(text, total, "--top")[1] == n, (text, total)
    assert parse_share("14.285714285714%", 7, "--top")[1] == 1 and parse_share("100%", 7, "--top")[1] == 7


def test_audit_name_is_checked_before_the_model_loads(audited_store, monkeypatch):
    from conftest import assert_one_line_error, cli

    import forvalue.session

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the audit name was checked")

    monkeypatch.setattr(forvalue.session, "load_store_runner", no_model)
    res = cli(
        "audit", "run", "--store", audited_store / "store", "-v", audited_store / "val.jsonl", "--name", "../evil"
    )
    assert_one_line_error(res, "audit name '../evil' is not valid")
    # the rule, all of it: '-x' uses only allowed characters and was told to use them (hostile pass)
    res = cli("audit", "run", "--store", audited_store / "store", "-v", audited_store / "val.jsonl", "--name=-x")
    assert_one_line_error(res, "audit name '-x' is not valid", "starting with a letter or digit")


def test_an_audit_imports_no_lancedb(audited_store):
    """Audit tables and the validation cache are read and written with pylance: `audit run` (and a cached
    re-run) never pays lancedb's import (2-5 s)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from forvalue.audit import run_audit\n"
        "from forvalue.schemas.config import AuditConfig\n"
        f"for name in ('x', 'y'):\n"
        f"    run_audit({str(audited_store / 'store')!r}, [{str(audited_store / 'val.jsonl')!r}], name, "
        "AuditConfig(progress=False, device='cpu'))\n"
        "print('lancedb' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("ids", "ids outside the vocabulary"),
        ("nan", "values that are not finite"),
        ("width", "hidden states 3 wide"),
        ("deleted", "cannot read the validation cache"),
        ("entries", "ids but"),  # (a traceback in the scorer)
        (
            "negative",
            "negative squared norms",
        ),  # (NaN cosine scores, exit 0)  # (was: "the store may be damaged; run index check",
    ],  # which found the store clean)
)
def test_a_damaged_validation_cache_is_one_line_naming_it(audited_store, damage, needle):
    """A cached audit read its encodings as they were: an id beyond the vocabulary crashed the scorer (or, with the
    look-up tables, asked for a table of that size), a NaN made every score NaN (NaN ranks sort anywhere). Now the
    read refuses a damaged cache in one line that names it and says what to do; removing it re-encodes."""
    import lance
    import pyarrow as pa
    import pyarrow.compute as pc

    from forvalue.storage.audits import CACHE_TABLE

    store = audited_store / "store"
    run = ("audit", "run", "--store", store, "-v", audited_store / "val.jsonl", "--quiet", "--name")
    assert cli(*run, "a").exit_code == 0
    uri = store / f"{CACHE_TABLE}.lance"
    table = lance.dataset(str(uri)).to_table()
    if damage == "ids":
        ids = table.column("ids").combine_chunks()
        bad = pa.ListArray.from_arrays(ids.offsets, pc.add(ids.flatten(), 10**9).cast(ids.type.value_type))
        table = table.set_column(table.schema.get_field_index("ids"), table.schema.field("ids"), bad)
    elif damage == "deleted":
        table = None
        for data_file in (uri / "data").glob("*.lance"):
            data_file.unlink()
    elif damage == "entries":  # one value fewer than ids a token
        n = table.column("n_scored").combine_chunks().to_pylist()
        values = table.column("values").combine_chunks()
        rows, at, flat = [], 0, values.flatten().to_pylist()
        for k, length in zip(n, [len(v) for v in values.to_pylist()]):
            width = length // max(k, 1)
            rows.append([x for t in range(k) for x in flat[at + t * width : at + (t + 1) * width - 1]])
            at += length
        fewer = pa.array(rows, table.schema.field("values").type)
        table = table.set_column(table.schema.get_field_index("values"), table.schema.field("values"), fewer)
    elif damage == "negative":
        sq = pa.array([-1.0] * table.num_rows, table.schema.field("sq_norm").type)
        table = table.set_column(table.schema.get_field_index("sq_norm"), table.schema.field("sq_norm"), sq)
    elif damage == "nan":
        sq = pa.array([float("nan")] * table.num_rows, table.schema.field("sq_norm").type)
        table = table.set_column(table.schema.get_field_index("sq_norm"), table.schema.field("sq_norm"), sq)
    else:  # hidden states of another width: the token counts say 3 values a token
        n = table.column("n_scored").combine_chunks()
        rows = [[0.5] * (3 * int(k)) for k in n.to_pylist()]
        hidden = pa.array(rows, table.schema.field("hidden").type)
        table = table.set_column(table.schema.get_field_index("hidden"), table.schema.field("hidden"), hidden)
    if table is not None:
        lance.write_dataset(table, str(uri), mode="overwrite")
    assert_one_line_error(cli(*run, "b"), str(uri), needle, "remove that folder")
    with pytest.raises(ForValueError):
        load_audit(store, "b")  # nothing written
    import shutil

    shutil.rmtree(uri)  # what the message says: the next audit encodes again
    assert cli(*run, "b").exit_code == 0
    assert load_audit(store, "b")[0].num_rows == load_audit(store, "a")[0].num_rows


def test_flag_by_label_never_flags_a_label_the_validation_set_lacks(audited_store, toy_rows):
    """--flag-by label compares a training sample with the validation samples of its own label. A sample whose label
    no validation sample has took its overall mean instead, a lower scale than own-label means, so whole such labels
    were flagged first (hostile pass: 60 of 90 flags on the real store were the two labels val_100 lacks). Now such
    a row has no flag score (null), is never flagged, the fraction applies to the rows that can be judged, and the
    command says which labels; a validation set without labels is refused before the model loads."""
    import json as json_mod

    store = audited_store / "store"
    only_math = [r for r in toy_rows if r["label"] == "math"][:3]
    write_jsonl(audited_store / "val_math.jsonl", only_math)
    args = ["audit", "run", "--store", store, "-v", audited_store / "val_math.jsonl", "--flag-by", "label"]
    result = cli(*args, "--name", "lab", "--flag-fraction", "0.5", "--quiet")
    assert result.exit_code == 0, result.output
    assert "note: 6 training samples are not flagged: no validation sample has their label (1 labels: reverse)" in (
        result.stderr
    )
    table, meta = load_audit(store, "lab")
    rows = table.to_pylist()
    rev = [r for r in rows if r["label"] == "reverse"]
    math = [r for r in rows if r["label"] == "math"]
    assert all(r["flag_score"] is None and not r["flagged"] for r in rev)
    assert all(r["flag_score"] == r["mean_vs_label:math"] for r in math)
    assert sum(r["flagged"] for r in math) == 3 == meta["flagged"]  # half of the 6 math rows
    cut = sorted(r["flag_score"] for r in math)[2]
    assert {r["id"] for r in math if r["flagged"]} == {r["id"] for r in math if r["flag_score"] <= cut}
    assert meta["unjudged_labels"] == {"reverse": 6}
    shown = cli("audit", "show", "--store", store, "lab")
    assert shown.exit_code == 0 and "6 training samples are not flagged: no validation sample has their label" in (
        shown.output
    )
    json_mod.dumps(meta)  # (the record stays JSON)
    # a threshold never flags an unjudged row either
    result = cli(*args, "--name", "thr", "--flag-fraction", "0", "--flag-threshold", "1e30", "--quiet")
    assert result.exit_code == 0, result.output
    flagged = {r["id"] for r in load_audit(store, "thr")[0].to_pylist() if r["flagged"]}
    assert flagged == {r["id"] for r in math}
    # validation samples without labels: refused in one line, nothing written
    write_jsonl(audited_store / "val_nolabel.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in only_math])
    nolabel = ["audit", "run", "--store", store, "-v", audited_store / "val_nolabel.jsonl", "--flag-by", "label"]
    assert_one_line_error(cli(*nolabel, "--name", "none"), "--flag-by", "none of the 3 validation samples has a label")
    with pytest.raises(ForValueError):
        load_audit(store, "none")
