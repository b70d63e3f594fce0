"""Distilled value models (forvalue distill / estimate / select --values) and data pricing, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, cli, make_model_dir, write_jsonl

from forvalue.audit import load_audit, run_audit
from forvalue.distill import distill_value_model, evaluate_value_model
from forvalue.estimates import estimate, select_by_values
from forvalue.indexer.build import build_index
from forvalue.indexer.sample_ids import content_id
from forvalue.metrics import agreement, spearman
from forvalue.metrics import top_overlap as top_precision
from forvalue.pricing import audit_pricing, price
from forvalue.ridge import Design, fit_ridge
from forvalue.schemas.config import AuditConfig, BuildConfig, DistillConfig, EncodeConfig, PricingConfig
from forvalue.schemas.errors import ConfigError, ForValueError
from forvalue.storage.audits import write_audit
from forvalue.storage.store import Store
from forvalue.value_features import load_embedding_table
from forvalue.value_model import NgramFeatures, ValueModel, ValueModelError, token_ids

WORDS = "the quick brown fox jumps over lazy dog cats and dogs are friends in garden numbers".split()
SOURCES = ("acme", "globex", "initech")


def _rows(n: int, seed: int = 0, with_ids: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 12)))
        half = len(words) // 2
        row = {
            "prompt": " ".join(words[:half]) + " ->",
            "response": " " + " ".join(words[half:]),
            "label": f"c{i % 3}",
            "source": SOURCES[i % 3],
        }
        if with_ids:
            row["id"] = f"s{seed}-{i}"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_runner):
    """A tiny-model store of 90 samples with an audit 'v1' (labelled validation set) and a distilled model."""
    tmp = tmp_path_factory.mktemp("distill")
    train = write_jsonl(tmp / "train.jsonl", _rows(90))
    val = write_jsonl(tmp / "val.jsonl", [{k: v for k, v in r.items() if k != "source"} for r in _rows(6, seed=1)])
    build_index([train], tmp / "store", BuildConfig(progress=False), runner=tiny_runner)
    run_audit(tmp / "store", [val], "v1", AuditConfig(progress=False, device="cpu"), runner=tiny_runner)
    report = distill_value_model(tmp / "store", "v1", tmp / "vm", DistillConfig(fraction=0.5, student="ngram"))
    return {"tmp": tmp, "train": train, "val": val, "store": tmp / "store", "vm": tmp / "vm", "report": report}


# -- metrics and the fit ----------------------------------------------------------------------------------
def test_metrics_on_known_cases():
    x = np.arange(20.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert top_precision(x, x) == 1.0
    assert top_precision(x, -x) == 0.0
    assert agreement(x, x)["r2"] == pytest.approx(1.0)


def test_ridge_recovers_a_dense_linear_target():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12))
    w, b = rng.normal(size=(12, 2)), np.array([5.0, -3.0])
    Y = X @ w + b + 1e-3 * rng.normal(size=(300, 2))
    fit = fit_ridge(Design(300, 12, dense=X), Y)
    np.testing.assert_allclose(fit.weight, w, atol=0.02)
    np.testing.assert_allclose(fit.bias, b, atol=0.02)
    assert fit.loo["spearman"] > 0.99


def test_ridge_dual_and_primal_cg_agree(monkeypatch):
    """The conjugate-gradient path (many labelled rows) gives the closed form's weights at the same lambda."""
    import forvalue.ridge as d

    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 8))
    Y = X @ rng.normal(size=(8, 1)) + 0.5 * rng.normal(size=(120, 1))
    exact = fit_ridge(Design(120, 8, dense=X), Y)
    monkeypatch.setattr(d, "MAX_DUAL", 119)
    monkeypatch.setattr(d, "_loo_choose", lambda K, Z: (exact.lam, exact.lam_relative, None, exact.loo, exact.grid))
    cg = fit_ridge(Design(120, 8, dense=X), Y)
    np.testing.assert_allclose(cg.weight, exact.weight, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cg.bias, exact.bias, rtol=1e-4, atol=1e-6)


def test_ngram_student_recovers_a_target_it_can_represent():
    """y = <x_i, w> with w in the span of the training rows' features: held-out rows are predicted almost exactly."""
    feats = NgramFeatures(dim=1 << 14)
    texts = [r["prompt"] + r["response"] for r in _rows(160, seed=3)]
    X = Design(160, feats.n_features, csr=feats.rows(texts))
    train, held = np.arange(120), np.arange(120, 160)
    c = np.random.default_rng(0).normal(size=(120, 1))
    w_true = X.take(train).rmatmul(c)
    y = X.matmul(w_true)[:, 0] + 7.0
    fit = fit_ridge(X.take(train), y[train, None])
    pred = X.take(held).matmul(fit.weight)[:, 0] + fit.bias[0]
    assert spearman(pred, y[held]) > 0.99
    assert agreement(pred, y[held])["r2"] > 0.98


def test_embed_student_recovers_a_per_token_target(setup):
    """A target that sums a value per token (the structure of the For-Value score) is what the embed student learns."""
    st = Store.open(setup["store"])
    table, meta = load_audit(st, "v1")
    tokenizer, emb = load_embedding_table(st)
    texts = {}
    for batch in st.scan(["id", "prompt", "response", "text"]):
        for r in batch.to_pylist():
            texts[r["id"]] = r["text"] if r["text"] is not None else r["prompt"] + r["response"]
    ids = table.column("id").to_pylist()
    per_token = emb @ np.random.default_rng(0).normal(size=emb.shape[1])
    synthetic = np.array([per_token[t].sum() for t in token_ids(tokenizer, [texts[i] for i in ids])]) + 100.0
    synth = table.select(["id", "label"]).append_column("score_mean", pa.array(synthetic))
    write_audit(st, "synthetic", synth, {**meta, "name": "synthetic"})
    r = distill_value_model(st, "synthetic", setup["tmp"] / "vm_synth", DistillConfig(student="embed", fraction=0.7))
    assert r.student == "embed" and r.n_labelled == 63
    assert r.heldout["spearman"] > 0.99 and r.heldout["r2"] > 0.98


def test_embed_student_values_a_text_on_the_tokens_the_store_keeps(setup):
    """The store valued each sample on its first max_length tokens; the embed student sees the same: a text twice
    as long past that point gets the same value (it was summed whole: a 10 MB text came out at 4e8 where the
    audit's values span 3e4, hostile pass)."""
    st = Store.open(setup["store"])
    path = setup["tmp"] / "vm_embed_len"
    distill_value_model(st, "v1", path, DistillConfig(student="embed", fraction=0.7))
    vm = ValueModel.load(path)
    assert vm.meta["features"]["max_tokens"] == st.manifest.max_length
    base = "the quick brown fox jumps over the lazy dog. "
    long, longer = base * (st.manifest.max_length // 4), base * (st.manifest.max_length // 2)
    assert len(token_ids(vm.tokenizer, [long])[0]) > st.manifest.max_length
    np.testing.assert_array_equal(vm.predict([long]), vm.predict([longer]))
    assert not np.array_equal(vm.predict([long]), vm.predict([base]))


# -- the value model on disk ----------------------------------------------------------------------------------
def test_distill_records_identity_and_metrics(setup):
    r = setup["report"]
    assert (r.n_audited, r.n_labelled, r.n_heldout) == (90, 45, 45)
    assert r.targets[0] == "score_mean" and all(t.startswith("mean_vs_label:") for t in r.targets[1:])
    meta = json.loads((setup["vm"] / "value_model.json").read_text())
    store = Store.open(setup["store"])
    _, audit_meta = load_audit(store, "v1")
    assert meta["store"]["model_weights_sha256"] == store.manifest.model_weights_sha256
    assert meta["audit"]["validation_sha256"] == audit_meta["validation_sha256"]
    assert meta["fit"]["n_labelled"] == 45 and "heldout" in meta["fit"] and meta["features"]["dim"] == 1 << 18
    assert not list(setup["vm"].glob("*.pkl")) and (setup["vm"] / meta["files"]["weights"]["name"]).is_file()


@pytest.mark.parametrize("student", ["ngram", "embed"])
def test_value_model_round_trips_through_disk(setup, student):
    path = setup["tmp"] / f"vm_rt_{student}"
    distill_value_model(setup["store"], "v1", path, DistillConfig(student=student, max_samples=60))
    vm = ValueModel.load(path)
    again = ValueModel.load(vm.save(setup["tmp"] / f"vm_rt2_{student}"))
    texts = ["the quick brown fox ->", " jumps over", "cats and dogs are friends"]
    np.testing.assert_array_equal(vm.predict(texts), again.predict(texts))
    assert vm.output_columns[0] == "value" and vm.output_columns[1].startswith("value_vs_label:")
    for k in vm.arrays:
        np.testing.assert_array_equal(vm.arrays[k], again.arrays[k])


def test_estimate_matches_the_models_predictions_and_the_build_ids(setup):
    tmp = setup["tmp"]
    rows = _rows(30, seed=5, with_ids=False)
    data = write_jsonl(tmp / "new.jsonl", rows)
    rep = estimate([data], setup["vm"], tmp / "values.parquet", group_column="source")
    assert rep.n == 30 and rep.samples_per_s > 0 and rep.build_samples_per_s and rep.speedup
    out = pq.read_table(tmp / "values.parquet")
    assert out.column_names[:2] == ["id", "value"] and "source" in out.column_names
    assert out.column("id").to_pylist() == [content_id(r["prompt"], r["response"], None) for r in rows]
    vm = ValueModel.load(setup["vm"])
    expected = vm.predict([r["prompt"] + r["response"] for r in rows])[:, 0]
    np.testing.assert_allclose(out.column("value").to_numpy(), expected)
    in_memory = estimate([data], vm)  # no output: the table comes back
    np.testing.assert_allclose(in_memory.table.column("value").to_numpy(), out.column("value").to_numpy())


def test_evaluate_compares_with_the_exact_audit_on_held_out_rows(setup):
    ev = evaluate_value_model(setup["vm"], setup["store"], "v1")
    assert ev.heldout["n"] == 45 and ev.all["n"] == 90
    assert int(np.sum(ev.to_arrow().column("labelled").to_numpy(zero_copy_only=False))) == 45
    assert ev.heldout["spearman"] == pytest.approx(setup["report"].heldout["spearman"])
    assert repr(ev).startswith("ValueModelEvaluation(held-out Spearman")


# -- refusals ----------------------------------------------------------------------------------------------------
def test_value_model_manifest_is_strict_json_when_a_metric_is_not_a_number(setup):
    """One held-out row has no Spearman: the manifest says null (it wrote a bare NaN, which strict JSON readers
    refuse; hostile pass) and the model loads."""
    path = setup["tmp"] / "vm_one_heldout"
    distill_value_model(setup["store"], "v1", path, DistillConfig(student="ngram", max_samples=89))
    text = (path / "value_model.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert "null" in text and ValueModel.load(path).predict(["the quick fox"]).shape == (1, 4)


def test_a_load_waits_for_a_save_in_progress(setup, tmp_path):
    """A load takes the folder's lock shared, so a save (exclusive) never removes files under it: a re-distil
    beside an estimate made the healthy model read as damaged (2 loads of ~3,500; hostile pass)."""
    import fcntl
    import os
    import shutil
    import threading

    folder = shutil.copytree(setup["vm"], tmp_path / "vm")
    fd = os.open(folder / ".value_model.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a save holding the folder
    loaded = threading.Event()
    reader = threading.Thread(target=lambda: ValueModel.load(folder) and loaded.set())
    reader.start()
    try:
        assert not loaded.wait(0.5)  # the load waits for the save
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    reader.join(30)
    assert loaded.is_set()


def test_value_model_refuses_another_store(setup, tmp_path, tiny_runner):
    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.config import ModelConfig

    other = load_runner(ModelConfig(path=str(make_model_dir(tmp_path / "other-model", seed=1)), device="cpu"))
    build_index([setup["train"]], tmp_path / "store2", BuildConfig(progress=False), runner=other)
    run_audit(tmp_path / "store2", [setup["val"]], "v1", AuditConfig(progress=False, device="cpu"), runner=other)
    with pytest.raises(ValueModelError, match="trained on store"):
        evaluate_value_model(setup["vm"], tmp_path / "store2", "v1")
    res = cli("estimate", "--value-model", setup["vm"], "--store", tmp_path / "store2", "--audit", "v1")
    assert_one_line_error(res, "trained on store", "model_weights_sha256", "distil one for this store")
    # the same model, other encoding settings: the refusal names the setting (it printed the same weights hash
    # twice; hostile pass)
    build_index(
        [setup["train"]], tmp_path / "m8", BuildConfig(progress=False, encode=EncodeConfig(top_m=8)), runner=tiny_runner
    )
    run_audit(tmp_path / "m8", [setup["val"]], "v1", AuditConfig(progress=False, device="cpu"), runner=tiny_runner)
    res = cli("estimate", "--value-model", setup["vm"], "--store", tmp_path / "m8", "--audit", "v1")
    assert_one_line_error(res, "top_m 32 there, 8 here", "distil one for this store")


def test_value_model_refuses_another_audit(setup, tiny_runner):
    val2 = write_jsonl(setup["tmp"] / "val2.jsonl", _rows(4, seed=9))
    run_audit(setup["store"], [val2], "other", AuditConfig(progress=False, device="cpu"), runner=tiny_runner)
    with pytest.raises(ValueModelError, match="trained on audit 'v1'"):
        evaluate_value_model(setup["vm"], setup["store"], "other")
    res = cli("estimate", "--value-model", setup["vm"], "--store", setup["store"], "--audit", "other")
    assert_one_line_error(res, "trained on audit 'v1'", "'other'")


# -- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_distill_estimate_select(setup):
    tmp = setup["tmp"]
    res = cli(
        "distill",
        "--store",
        setup["store"],
        "--audit",
        "v1",
        "--out",
        tmp / "vm_cli",
        "--fraction",
        "0.5",
        "--student",
        "auto",
    )
    assert res.exit_code == 0, res.output
    assert "held-out Spearman" in res.output and "ngram" in res.output and "embed" in res.output
    res = cli(
        "estimate",
        setup["train"],
        "--value-model",
        tmp / "vm_cli",
        "-o",
        tmp / "v.csv",
        "--quiet",
        "--group-column",
        "source",
        "--report",
        tmp / "price.html",
    )
    assert res.exit_code == 0, res.output
    assert "samples/s" in res.output and "x faster" in res.output and "initech" in res.output
    assert "Value per provider group" in (tmp / "price.html").read_text()
    res = cli("select", "--values", tmp / "v.csv", "--data", setup["train"], "--top", "10%", "-o", tmp / "sub.jsonl")
    assert res.exit_code == 0, res.output
    chosen = [json.loads(line) for line in (tmp / "sub.jsonl").read_text().splitlines()]
    values = pa.csv.read_csv(tmp / "v.csv", convert_options=pa.csv.ConvertOptions(column_types={"id": pa.string()}))
    best = [values.column("id")[int(j)].as_py() for j in np.argsort(-values.column("value").to_numpy())[:9]]
    assert [r["id"] for r in chosen] == best and {"prompt", "response", "label"} <= set(chosen[0])
    res = cli("select", "--store", setup["store"], "--audit", "v1", "--top", "5", "-o", tmp / "sub2.jsonl")
    assert res.exit_code == 0 and len((tmp / "sub2.jsonl").read_text().splitlines()) == 5


def test_cli_audit_show_prices_groups(setup):
    report = setup["tmp"] / "audit.html"
    res = cli(
        "audit",
        "show",
        "--store",
        setup["store"],
        "v1",
        "--group-column",
        "source",
        "--data",
        setup["train"],
        "--report",
        report,
        "--bootstrap",
        "200",
    )
    assert res.exit_code == 0, res.output
    assert "value per group" in res.output and all(s in res.output for s in SOURCES)
    assert "Value per provider group" in report.read_text()


def _garbage(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing_model",
        "damaged_manifest",
        "missing_data",
        "bad_format",
        "bad_output",
        "missing_group",
        "no_output",
        "fraction_zero",
        "fraction_and_max",
        "too_few",
        "select_values_without_data",
        "values_without_column",
        "select_missing_ids",
        "distill_into_other_folder",
        "data_and_store",
        "report_without_group",
        "compare_with_report",
        "compare_with_group",
        "empty_data",
        "values_big_int",
        "values_list_id",
    ],
)
def test_bad_inputs_are_one_line_errors(setup, tmp_path, case):
    vm, train, store = setup["vm"], setup["train"], setup["store"]
    out = tmp_path / "v.parquet"

    def select_values(values):
        return ["select", "--values", values, "--data", train, "--top", "1", "-o", tmp_path / "s.jsonl"]

    args, needles = {
        "missing_model": (["estimate", train, "--value-model", tmp_path / "nope", "-o", out], ["not a value model"]),
        "damaged_manifest": (
            ["estimate", train, "--value-model", _damaged(tmp_path, vm), "-o", out],
            ["not valid JSON"],
        ),
        "missing_data": (["estimate", tmp_path / "nope.jsonl", "--value-model", vm, "-o", out], ["no such file"]),
        "bad_format": (
            ["estimate", _garbage(tmp_path / "x.txt", "hi"), "--value-model", vm, "-o", out],
            ["unknown format"],
        ),
        "bad_output": (["estimate", train, "--value-model", vm, "-o", tmp_path / "v.xlsx"], ["unknown output format"]),
        "missing_group": (
            ["estimate", train, "--value-model", vm, "-o", out, "--group-column", "provider"],
            ["train.jsonl:1", "provider", "missing column"],
        ),
        "no_output": (["estimate", train, "--value-model", vm], ["--output"]),
        "fraction_zero": (
            ["distill", "--store", store, "--audit", "v1", "--out", tmp_path / "m", "--fraction", "0"],
            ["--fraction", "(0, 1]"],
        ),
        "fraction_and_max": (
            [
                "distill",
                "--store",
                store,
                "--audit",
                "v1",
                "--out",
                tmp_path / "m",
                "--fraction",
                "0.5",
                "--max-samples",
                "10",
            ],
            ["exclude each other"],
        ),
        "too_few": (
            ["distill", "--store", store, "--audit", "v1", "--out", tmp_path / "m", "--fraction", "0.01"],
            ["at least 3"],
        ),
        "select_values_without_data": (
            ["select", "--values", out, "--top", "3", "-o", tmp_path / "s.jsonl"],
            ["--data"],
        ),
        "values_without_column": (
            ["select", "--values", _write_parquet(tmp_path), "--data", train, "--top", "3", "-o", tmp_path / "s.jsonl"],
            ["field 'value'", "missing column"],
        ),
        "select_missing_ids": (
            [
                "select",
                "--values",
                _write_parquet(tmp_path, value=True),
                "--data",
                train,
                "--top",
                "3",
                "-o",
                tmp_path / "s.jsonl",
            ],
            ["not in the data files"],
        ),
        "distill_into_other_folder": (
            ["distill", "--store", store, "--audit", "v1", "--out", _other_folder(tmp_path)],
            ["not a value model folder"],
        ),
        # a value beyond int64 and a list id: tracebacks before (hostile pass)
        "values_big_int": (
            select_values(_garbage(tmp_path / "big.jsonl", '{"id": "s0-1", "value": 9223372036854775808}\n')),
            ["big.jsonl", "not a readable jsonl values file"],
        ),
        "values_list_id": (
            select_values(_garbage(tmp_path / "lid.jsonl", '{"id": ["a"], "value": 3}\n')),
            ["lid.jsonl", "field 'id'", "expected text ids"],
        ),
        "data_and_store": (["estimate", train, "--value-model", vm, "--store", store, "--audit", "v1"], ["not both"]),
        # an empty file printed "0 values ... 0x faster" and exit 0, where build and query refuse it (hostile pass)
        "empty_data": (["estimate", _garbage(tmp_path / "e.jsonl", ""), "--value-model", vm, "-o", out], ["no rows"]),
        # --report is written only per group: without --group-column (or when comparing with an audit) it was
        # silently ignored, exit 0 and no page (hostile pass)
        "report_without_group": (
            ["estimate", train, "--value-model", vm, "-o", out, "--report", tmp_path / "r.html"],
            ["--report", "--group-column"],
        ),
        "compare_with_report": (
            ["estimate", "--value-model", vm, "--store", store, "--audit", "v1", "--report", tmp_path / "r.html"],
            ["--report"],
        ),
        "compare_with_group": (
            ["estimate", "--value-model", vm, "--store", store, "--audit", "v1", "--group-column", "source"],
            ["--group-column"],
        ),
    }[case]
    assert_one_line_error(cli(*args), *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    "files",
    [
        {"tokenizer.json": '{"my": "tokenizer"}', "weights.safetensors": "x"},  # another tool's model folder
        {"value_model.json": '{"other tool": 1}', "tokenizer.json": "tk", "notes.txt": "keep"},
    ],
    ids=["legacy-names", "foreign-manifest"],
)
def test_a_save_never_touches_a_folder_that_is_not_a_value_model(setup, tmp_path, files):
    """``distill --out`` and ``ValueModel.save`` into a folder of other files refuse it, before any work and
    before any file is written there; the files stay (they were replaced or deleted, exit 0: hostile pass)."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    r = cli("distill", "--store", setup["store"], "--audit", "v1", "--out", folder, "--student", "ngram")
    assert_one_line_error(r, str(folder), "not a value model folder")
    with pytest.raises(ValueModelError, match="not a value model folder"):
        ValueModel.load(setup["vm"]).save(folder)
    with pytest.raises(ValueModelError, match="not a value model folder"):
        ValueModel.load(setup["vm"]).save(setup["store"])
    assert {p.name: p.read_text() for p in folder.iterdir()} == files
    assert not (setup["store"] / ".value_model.lock").exists()
    # a killed first save's files (content-named data, the lock) and an empty folder are taken
    ValueModel.load(setup["vm"]).save(tmp_path / "empty")
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "weights-0123456789abcdef.safetensors").write_text("half")
    (killed / ".value_model.lock").write_text("")
    ValueModel.load(ValueModel.load(setup["vm"]).save(killed))
    assert not (killed / "weights-0123456789abcdef.safetensors").exists()


def test_estimate_values_a_repeated_id_once_as_the_build_keeps_it(setup, tmp_path):
    """Rows repeating an earlier row's id are skipped (the first valued) and counted: the values file had both
    rows and ``select --values`` then refused it as holding a duplicate id (hostile pass)."""
    rows = [{"id": "a", "text": "one two"}, {"id": "a", "text": "three four five"}, {"id": "b", "text": "six"}]
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    r = estimate([data], setup["vm"], output=tmp_path / "v.parquet")
    assert r.n == 2 and r.duplicate_ids == 1
    assert pq.read_table(tmp_path / "v.parquet").column("id").to_pylist() == ["a", "b"]
    vm = ValueModel.load(setup["vm"])
    np.testing.assert_array_equal(
        pq.read_table(tmp_path / "v.parquet").column("value").to_numpy()[0], vm.predict(["one two"])[0, 0]
    )
    # one path as a string is one input, as build / query / audit take it (it was iterated by character)
    assert estimate(str(data), str(setup["vm"]), output=tmp_path / "v1.parquet").n == 2
    assert len(select_by_values(tmp_path / "v1.parquet", str(data), top="1")) == 1
    res = cli("estimate", data, "--value-model", setup["vm"], "-o", tmp_path / "v2.parquet")
    assert res.exit_code == 0 and "1 rows repeat an earlier row's id" in res.output
    sel = cli("select", "--values", tmp_path / "v2.parquet", "--data", data, "--top", "1", "-o", tmp_path / "s.jsonl")
    assert sel.exit_code == 0, sel.output


def _damaged(tmp_path: Path, vm: Path) -> Path:
    import shutil

    copy = shutil.copytree(vm, tmp_path / "damaged")
    (copy / "value_model.json").write_text("{not json")
    return copy


def _write_parquet(tmp_path: Path, value: bool = False) -> Path:
    path = tmp_path / ("vals.parquet" if value else "novalue.parquet")
    cols = {"id": ["x1", "x2", "x3", "x4"], ("value" if value else "score"): [1.0, 2.0, 3.0, 4.0]}
    pq.write_table(pa.table(cols), path)
    return path


def _other_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


def test_config_checks():
    with pytest.raises(ConfigError):
        DistillConfig(fraction=1.5)
    with pytest.raises(ConfigError):
        PricingConfig(confidence=1.0)
    with pytest.raises(ForValueError):
        select_by_values("nope.parquet", [], top="1")


# -- pricing -----------------------------------------------------------------------------------------------------
def test_build_throughput_leaves_out_the_gap_before_a_later_index_add():
    """A build (one commit of 40 rows, 10 s) and an ``index add`` of 5 rows 20 minutes later: 4 samples/s, not the
    0.04 that the median rule gave with two commit pairs (hostile pass: "16921x faster" printed and stored)."""
    from datetime import datetime, timedelta

    from forvalue.value_features import build_throughput

    t0 = datetime(2026, 1, 1)

    class Versions:  # what a Store's Lance dataset reports: version, timestamp, rows after the commit
        @staticmethod
        def versions():
            return [
                {"version": v, "timestamp": t0 + timedelta(seconds=t), "metadata": {"total_rows": str(rows)}}
                for v, t, rows in ((1, 0, 0), (2, 10, 40), (3, 1210, 45))
            ]

    class FakeStore:
        _dataset = staticmethod(Versions)

    assert build_throughput(FakeStore()) == pytest.approx(4.0)


def test_pricing_totals_shares_and_intervals():
    rng = np.random.default_rng(0)
    groups = ["a"] * 200 + ["b"] * 100 + ["c"] * 50 + ["d"] * 30
    values = np.concatenate(
        [rng.normal(2.0, 1.0, 200), rng.normal(5.0, 2.0, 100), rng.normal(1.0, 3.0, 50), rng.normal(-4.0, 1.0, 30)]
    )
    rows = price(values, groups, PricingConfig(bootstrap=500, bootstrap_seed=1)).rows()
    by = {r["group"]: r for r in rows}
    assert sum(r["n"] for r in rows) == len(values)
    assert sum(r["total"] for r in rows) == pytest.approx(values.sum())
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert by["d"]["share"] == 0.0 and by["d"]["total"] < 0  # a net-negative provider earns nothing
    positive = {g: max(by[g]["total"], 0.0) for g in by}
    for g, r in by.items():
        assert r["mean"] == pytest.approx(r["total"] / r["n"])
        assert r["share"] == pytest.approx(positive[g] / sum(positive.values()))
        assert r["total_low"] <= r["total"] <= r["total_high"]
        assert r["share_low"] <= r["share"] <= r["share_high"]
        assert r["mean_low"] <= r["mean"] <= r["mean_high"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert [r["total"] for r in rows] == sorted((r["total"] for r in rows), reverse=True)
    again = price(values, groups, PricingConfig(bootstrap=500, bootstrap_seed=1)).rows()
    assert again == rows  # seeded


def test_pricing_draws_resamples_in_bounded_chunks_with_the_same_intervals(monkeypatch):
    """The bootstrap draws at most _BOOT_CHUNK indices at once (it drew bootstrap x group size: ~17 GB for a
    1M-sample group at the default 1,000, and the option's maximum was killed; hostile pass); the chunks give
    the intervals of one draw (the same random stream)."""
    import forvalue.pricing as pricing

    rng = np.random.default_rng(3)
    values, groups = rng.normal(1.0, 2.0, 700), [f"g{i % 3}" for i in range(700)]
    cfg = PricingConfig(bootstrap=301, bootstrap_seed=2)
    whole = price(values, groups, cfg).rows()
    sizes, default_rng = [], np.random.default_rng

    class Recording:  # the seeded generator, recording how many indices each draw asks for
        def __init__(self, seed):
            self.rng = default_rng(seed)

        def integers(self, *a, size, **k):
            sizes.append(int(np.prod(size)))
            return self.rng.integers(*a, size=size, **k)

    monkeypatch.setattr(pricing, "_BOOT_CHUNK", 1000)
    monkeypatch.setattr(pricing.np.random, "default_rng", Recording)
    assert price(values, groups, cfg).rows() == whole
    assert len(sizes) > 3 and max(sizes) <= 1000


def test_pricing_refuses_bad_values():
    with pytest.raises(ForValueError):
        price(np.array([1.0, np.nan]), ["a", "b"])
    with pytest.raises(ForValueError):
        price(np.array([1.0, 2.0]), ["a"])


def test_audit_pricing_matches_the_audit(setup):
    rows = audit_pricing(setup["store"], "v1", [setup["train"]], PricingConfig(group_column="source", bootstrap=100))
    table, _ = load_audit(setup["store"], "v1")
    assert sum(r["total"] for r in rows) == pytest.approx(float(table.column("score_mean").to_numpy().sum()))
    assert {r["group"]: r["n"] for r in rows} == {s: 30 for s in SOURCES}
    partial = write_jsonl(setup["tmp"] / "part.jsonl", _rows(90)[:50])
    with pytest.raises(ForValueError, match="not in the data files"):
        audit_pricing(setup["store"], "v1", [partial], PricingConfig(group_column="source", bootstrap=10))
