"""Compact store tiers (schema 3): int8 hidden states, packed errors, float16 sketches, old stores, ``index convert``.

Each tier is held against the float64 reference computed on its own stored (dequantized, rounded) values.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import assert_close, assert_one_line_error, cli, exact_scores, in_order, write_jsonl

from forvalue.api import build_index, run_query
from forvalue.engine.scan import audit_scan
from forvalue.engine.validation import encode_validation
from forvalue.indexer.convert import convert_store
from forvalue.indexer.data import iter_samples
from forvalue.maintenance import check_store
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import ManifestMismatchError
from forvalue.schemas.hidden_codec import dequantize, quantize, resolve_block
from forvalue.schemas.manifest import MANIFEST_FILE
from forvalue.schemas.tables import samples_schema
from forvalue.storage.store import Store
from tools.reference import dense_scores

Q = dict(progress=False, device="cpu")
REPO = Path(__file__).resolve().parents[1]


def _rows(n: int) -> list[dict]:
    words = ["the quick brown fox", "reverse the words", "solve the math problem", "cats and dogs"]
    return [
        {"id": f"s{i}", "prompt": f"{words[i % 4]} {i} ->", "response": f" answer {i * 7}", "label": f"c{i % 2}"}
        for i in range(n)
    ]


def _build(tmp: Path, model_dir, encode: EncodeConfig, rows: list[dict], name: str = "store") -> Path:
    train = write_jsonl(tmp / "train.jsonl", rows)
    cfg = BuildConfig(model=ModelConfig(path=str(model_dir), device="cpu"), encode=encode, progress=False)
    build_index([train], tmp / name, cfg)
    return tmp / name


_scores, _in_order, _close = exact_scores, in_order, assert_close


# -- the codec ---------------------------------------------------------------------------------
def test_int8_codec_bounds_and_zero_blocks():
    rng = np.random.default_rng(0)
    h = (rng.standard_normal((50, 64)) * rng.uniform(0.01, 30, (50, 1))).astype(np.float32)
    h[3] = 0.0
    h[4, :16] = 0.0
    for block in (64, 16):
        q, s = quantize(h, block)
        assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (50, 64 // block)
        back = dequantize(q, s)
        step = np.repeat(s.astype(np.float32), block, axis=1)
        assert np.all(np.abs(back - h) <= 0.5 * step * (1 + 1e-3) + 1e-3 * np.abs(h))  # half a step (+ scale rounding)
        assert np.all(back[3] == 0) and np.abs(q).max() <= 127
    assert resolve_block(0, 576) == 576 and resolve_block(64, 576) == 64 and resolve_block(1000, 576) == 576
    with pytest.raises(ValueError, match="divide"):
        resolve_block(100, 576)


# -- int8 stores against the float64 reference on their dequantized values -------------------------
@pytest.fixture(scope="module")
def int8_setting(tmp_path_factory, tiny_model_dir, tiny_runner):
    tmp = tmp_path_factory.mktemp("int8")
    rows = _rows(12)
    val_rows = [dict(r, id=f"v{j}") for j, r in enumerate(_rows(16)[12:])]
    val = write_jsonl(tmp / "val.jsonl", val_rows)
    stores = {}
    for name, enc in {
        "f16": EncodeConfig(top_m=4, hidden_dtype="float16"),
        "int8-token": EncodeConfig(top_m=4, hidden_dtype="int8", int8_block=0),
        "int8-b8": EncodeConfig(top_m=4, hidden_dtype="int8", int8_block=8),
    }.items():
        stores[name] = _build(tmp, tiny_model_dir, enc, rows, name)
    train_samples = list(iter_samples([tmp / "train.jsonl"], DataConfig()))
    val_samples = list(iter_samples([val], DataConfig()))
    return dict(
        tmp=tmp, val=val, stores=stores, train=train_samples, val_samples=val_samples, ids=[r["id"] for r in rows]
    )


@pytest.mark.parametrize("name,block", [("int8-token", 0), ("int8-b8", 8)])
def test_int8_store_scores_equal_the_reference_on_its_dequantized_values(int8_setting, tiny_runner, name, block):
    s = int8_setting
    store = Store.open(s["stores"][name])
    schema = store.schema()
    assert schema.field("hidden").type == pa.list_(pa.int8()) and "hidden_scale" in schema.names
    assert store.manifest.hidden_block == resolve_block(block, store.manifest.hidden_size)
    assert store.manifest.ids_dtype == "uint16" and schema.field("topk_ids").type == pa.list_(pa.uint16())
    scores, ids = _scores(store.path, s["val"], tiny_runner)
    scores = _in_order(scores, ids, s["ids"])
    model, tok = tiny_runner.model, tiny_runner.tokenizer
    ref = dense_scores(
        model, tok, s["train"], s["val_samples"], top_m=4, hidden_dtype="int8", int8_block=block, probs_dtype="float16"
    )
    _close(scores, ref, 2e-5)
    # and it is not the float16 store's score (the test can tell the tiers apart)
    f16 = dense_scores(model, tok, s["train"], s["val_samples"], top_m=4, hidden_dtype="float16", probs_dtype="float16")
    assert np.abs(scores - f16).max() > 10 * 2e-5 * np.abs(f16).max()
    # cosine: the stored sq_norm is the self score of the stored values, so |cos| <= 1
    self_ref = dense_scores(
        model, tok, s["train"], s["train"], top_m=4, hidden_dtype="int8", int8_block=block, probs_dtype="float16"
    )
    sq = np.array([r["sq_norm"] for b in store.scan(["id", "sq_norm"]) for r in b.to_pylist()])
    stored_ids = [r["id"] for b in store.scan(["id"]) for r in b.to_pylist()]
    by_id = dict(zip(stored_ids, sq))
    # the reference's self score rounds both sides; the store's only the stored side (probabilities)
    np.testing.assert_allclose([by_id[i] for i in s["ids"]], np.diag(self_ref), rtol=2e-3)
    cos, _ = _scores(store.path, s["val"], tiny_runner, normalize="cosine")
    assert np.abs(cos).max() <= 1.0 + 1e-6


def test_int8_gform_audit_explain_and_prefilter_read_int8_natively(int8_setting, tiny_runner):
    from forvalue.engine.explain import Explainer

    s = int8_setting
    store = Store.open(s["stores"]["int8-b8"])
    per_sample, ids = _scores(store.path, s["val"], tiny_runner)
    val = encode_validation(tiny_runner, s["val_samples"], store.manifest, DataConfig())
    labels = [v.label for v in s["val_samples"]]
    groups = sorted(set(labels))
    for form in ("gform", "token"):
        scan = audit_scan(store, val, labels, groups, "cpu", form=form, read_rows=5)
        assert scan.ids == ids
        _close(scan.mean, per_sample.mean(axis=0), 1e-5)
    explainer = Explainer(store, tiny_runner, s["val_samples"])
    for e, sid in zip(explainer.explain_many(ids[:4], 0), ids[:4]):
        np.testing.assert_allclose(e.score, per_sample[0, ids.index(sid)], rtol=1e-5, atol=1e-6)
    top = run_query(store.path, [s["val"]], QueryConfig(**Q, top_k=3, candidates=6), runner=tiny_runner)
    for row in top.top.to_pylist():  # the exact rerank of the candidates gives the exact scores
        j = [v.id for v in s["val_samples"]].index(row["validation_id"])
        np.testing.assert_allclose(row["score"], per_sample[j, ids.index(row["train_id"])], rtol=1e-6)


def test_int8_build_refuses_other_storage_settings_and_bad_blocks(int8_setting, tiny_model_dir, tmp_path):
    s = int8_setting
    cfg = BuildConfig(
        model=ModelConfig(path=str(tiny_model_dir), device="cpu"),
        encode=EncodeConfig(top_m=4, hidden_dtype="float16"),
        progress=False,
    )
    with pytest.raises(ManifestMismatchError, match="hidden_dtype"):
        build_index([s["tmp"] / "train.jsonl"], s["stores"]["int8-b8"], cfg)
    res = cli(
        "index", "build", s["tmp"] / "train.jsonl", "--store", s["stores"]["int8-b8"], "--model", tiny_model_dir,
        "--top-m", "4", "--hidden-dtype", "int8", "--int8-block", "0", "--quiet",
    )  # fmt: skip
    assert_one_line_error(res, "hidden_block")
    # a resumed build without flags on a float16 store (int8 is the default now): one line naming the dtype only
    res = cli(
        "index", "build", s["tmp"] / "train.jsonl", "--store", s["stores"]["f16"], "--model", tiny_model_dir,
        "--top-m", "4", "--quiet",
    )  # fmt: skip
    err = assert_one_line_error(res, "hidden_dtype: store has 'float16', you have 'int8'")
    assert "hidden_block" not in err  # (follows from the dtype: no option of its own to give)
    res = cli(
        "index", "build", s["tmp"] / "train.jsonl", "--store", tmp_path / "new", "--model", tiny_model_dir,
        "--hidden-dtype", "int8", "--int8-block", "5", "--quiet",
    )  # fmt: skip
    assert_one_line_error(res, "--int8-block", "divide")
    # index add takes the store's settings: rows added to an int8 store are int8 with its block
    more = write_jsonl(tmp_path / "more.jsonl", [dict(r, id=f"x{r['id']}") for r in _rows(3)])
    shutil.copytree(s["stores"]["int8-b8"], tmp_path / "copy")
    res = cli("index", "add", more, "--store", tmp_path / "copy", "--quiet")
    assert res.exit_code == 0, res.output
    assert check_store(tmp_path / "copy").clean
    assert Store.open(tmp_path / "copy").count() == 15


# -- stores of schema version 2 (int32 ids, float32 probabilities and sketches) keep working --------------
def _as_version_2(new: Path, old: Path) -> None:
    """Rewrite a schema-3 float16 store the way forvalue wrote stores before the compact encodings."""
    store = Store.open(new)
    table = store.take(list(range(store.count())), store.schema().names)
    schema = samples_schema("float16", store.manifest.sketch_dim)  # the version-2 defaults
    old.mkdir()
    lancedb.connect(str(old)).create_table("samples", table.select(schema.names).cast(schema))
    manifest = json.loads((new / MANIFEST_FILE).read_text())
    for key in ("hidden_block", "ids_dtype", "probs_dtype", "sketch_dtype"):
        del manifest[key]
    manifest["schema_version"] = 2
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    if (new / "sketch_basis.npy").exists():
        shutil.copy(new / "sketch_basis.npy", old / "sketch_basis.npy")


def test_version_2_store_opens_scores_checks_and_grows_as_before(int8_setting, tiny_runner, tmp_path):
    s = int8_setting
    old = tmp_path / "old"
    _as_version_2(s["stores"]["f16"], old)
    store = Store.open(old)
    assert store.manifest.schema_version == 2 and store.manifest.ids_dtype == "int32"
    assert store.schema().field("topk_probs").type == pa.list_(pa.float32())
    new_scores, new_ids = _scores(s["stores"]["f16"], s["val"], tiny_runner)
    old_scores, old_ids = _scores(old, s["val"], tiny_runner)
    assert old_ids == new_ids
    np.testing.assert_array_equal(old_scores, new_scores)  # the same values, stored wider
    assert check_store(old).clean
    more = write_jsonl(tmp_path / "more.jsonl", [dict(r, id=f"x{r['id']}") for r in _rows(2)])
    res = cli("index", "add", more, "--store", old, "--quiet")
    assert res.exit_code == 0, res.output
    grown = Store.open(old)
    assert grown.count() == 14 and grown.manifest.schema_version == 2
    assert grown.schema().field("topk_ids").type == pa.list_(pa.int32())
    assert check_store(old).clean


# -- index convert ------------------------------------------------------------------------------
def test_convert_to_int8_equals_an_int8_build_and_index_check_covers_it(int8_setting, tiny_runner, tmp_path):
    s = int8_setting
    old = tmp_path / "old"
    _as_version_2(s["stores"]["f16"], old)
    res = cli("index", "convert", "--store", old, "--out", tmp_path / "c8", "--hidden-dtype", "int8",
              "--int8-block", "8", "--quiet", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["written"] == 12 and report["out_bytes_per_token"] < report["source_bytes_per_token"]
    converted, built = Store.open(tmp_path / "c8"), Store.open(s["stores"]["int8-b8"])
    cols = ["id", "hidden", "hidden_scale", "topk_ids", "topk_probs", "target_ids", "sq_norm"]
    a = converted.take(list(range(12)), cols).to_pylist()
    b = {r["id"]: r for r in built.take(list(range(12)), cols).to_pylist()}
    for row in a:  # a float16 store converted to int8 holds exactly what an int8 build writes
        other = b[row["id"]]
        for col in cols[1:-1]:
            assert row[col] == other[col], col
        np.testing.assert_allclose(row["sq_norm"], other["sq_norm"], rtol=1e-9)
    got, ids = _scores(tmp_path / "c8", s["val"], tiny_runner)
    ref, ref_ids = _scores(s["stores"]["int8-b8"], s["val"], tiny_runner)
    np.testing.assert_allclose(_in_order(got, ids, s["ids"]), _in_order(ref, ref_ids, s["ids"]), rtol=1e-9)
    # index check understands the new encodings, and finds a damaged scale column
    assert check_store(tmp_path / "c8").clean
    manifest = json.loads((tmp_path / "c8" / MANIFEST_FILE).read_text())
    manifest["hidden_block"] = 4  # now the table's scales disagree with the manifest
    (tmp_path / "c8" / MANIFEST_FILE).write_text(json.dumps(manifest))
    report = check_store(tmp_path / "c8")
    assert not report.clean and "hidden_scale" in " ".join(report.problems)


def test_convert_top_m_moves_the_dropped_mass_to_the_tail(int8_setting, tiny_runner, tiny_model_dir, tmp_path):
    s = int8_setting
    report = convert_store(s["stores"]["f16"], tmp_path / "m2", top_m=2, progress=False)
    assert report.written == 12
    src, dst = Store.open(s["stores"]["f16"]), Store.open(tmp_path / "m2")
    assert dst.manifest.top_m == 2
    cols = ["id", "topk_ids", "topk_probs", "target_ids", "target_probs", "tail_mass", "n_scored"]
    a = {r["id"]: r for r in src.take(list(range(12)), cols).to_pylist()}
    for row in dst.take(list(range(12)), cols).to_pylist():
        full = a[row["id"]]
        n = row["n_scored"]
        ids4, p4 = np.reshape(full["topk_ids"], (n, 4)), np.reshape(full["topk_probs"], (n, 4))
        assert row["topk_ids"] == ids4[:, :2].ravel().tolist()
        dropped = np.where(ids4[:, 2:] == np.array(full["target_ids"])[:, None], 0, p4[:, 2:]).sum(axis=1)
        np.testing.assert_allclose(row["tail_mass"], np.array(full["tail_mass"]) + dropped, rtol=2e-3, atol=1e-6)
    # the converted store scores as a top-2 build of the same rows (the reference, restricted to top 2)
    got, ids = _scores(tmp_path / "m2", s["val"], tiny_runner)
    ref = dense_scores(
        tiny_runner.model, tiny_runner.tokenizer, s["train"], s["val_samples"], top_m=2, hidden_dtype="float16",
        probs_dtype="float16",
    )  # fmt: skip
    _close(_in_order(got, ids, s["ids"]), ref, 2e-4)


def test_convert_refuses_bad_outputs_and_settings(int8_setting, tmp_path):
    src = int8_setting["stores"]["f16"]
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    before = sorted(p.name for p in copy.rglob("*"))
    cases = [
        (["--out", copy], "is the source store"),
        (["--out", copy / "inner"], "is inside the store"),
        (["--out", tmp_path], "holds the source store"),
        (["--out", REPO / "tests"], "not empty and not a forvalue store"),
        (["--out", tmp_path / "x", "--top-m", "9"], "--top-m"),
        (["--out", tmp_path / "y", "--hidden-dtype", "int8", "--int8-block", "5"], "--int8-block"),
    ]
    for args, needle in cases:
        assert_one_line_error(cli("index", "convert", "--store", copy, *args, "--quiet"), needle)
    (tmp_path / "file").write_text("x")
    assert_one_line_error(cli("index", "convert", "--store", copy, "--out", tmp_path / "file"), "not a folder")
    assert_one_line_error(cli("index", "convert", "--store", tmp_path / "none", "--out", tmp_path / "z"), "none")
    assert sorted(p.name for p in copy.rglob("*")) == before  # the source is untouched
    # an existing store that is not this conversion is refused, as is the same output with other settings
    assert_one_line_error(cli("index", "convert", "--store", copy, "--out", src), "did not write")
    assert cli("index", "convert", "--store", copy, "--out", tmp_path / "c", "--quiet").exit_code == 0
    res = cli("index", "convert", "--store", copy, "--out", tmp_path / "c", "--hidden-dtype", "int8", "--quiet")
    assert_one_line_error(res, "other settings")
    again = cli("index", "convert", "--store", copy, "--out", tmp_path / "c", "--quiet", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["written"] == 0


def test_convert_refused_for_its_source_leaves_no_output(int8_setting, tmp_path):
    """A convert refused for what the source holds (no samples: a build killed before its first commit; a lost
    sketch basis) stops before the output exists: no half-made store blocks the corrected re-run."""
    empty = tmp_path / "empty"
    Store.create(empty, Store.open(int8_setting["stores"]["f16"]).manifest)
    out = tmp_path / "out"
    for args in ([], ["--hidden-dtype", "int8"], ["--hidden-rank", "8"]):
        res = cli("index", "convert", "--store", empty, "--out", out, *args)
        assert_one_line_error(res, str(empty), "no samples")
        assert not out.exists()
    lost = tmp_path / "lost"
    shutil.copytree(int8_setting["stores"]["f16"], lost)
    (lost / "sketch_basis.npy").unlink()
    assert_one_line_error(cli("index", "convert", "--store", lost, "--out", out), "sketch basis", "--rebuild")
    assert not out.exists()


@pytest.mark.parametrize("killed_after", ["the lease", "the manifest"])
def test_convert_killed_while_creating_its_output_resumes(int8_setting, tmp_path, monkeypatch, killed_after):
    """A kill while the output's first files are written leaves a folder the re-run resumes, never one it
    refuses as a store 'index convert' did not write."""
    src, out = int8_setting["stores"]["f16"], tmp_path / "out"
    create = Store.create

    def killed(cls, path, manifest):
        if killed_after == "the manifest":
            create(path, manifest)
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "create", classmethod(killed))
    with pytest.raises(KeyboardInterrupt):
        convert_store(src, out, hidden_dtype="int8", progress=False)
    monkeypatch.undo()
    report = convert_store(src, out, hidden_dtype="int8", progress=False)
    assert (report.written, report.already_converted) == (12, 0)
    assert check_store(out).clean


def test_a_second_convert_into_an_output_being_created_is_told_another_writer_holds_it(int8_setting, tmp_path):
    from forvalue.indexer.convert import target_manifest
    from forvalue.storage.store import WriterLease

    src, out = int8_setting["stores"]["f16"], tmp_path / "out"
    out.mkdir()
    with WriterLease.acquire(out):  # a convert that started first holds the output and has written its manifest
        Store.create(out, target_manifest(Store.open(src).manifest, "int8"))
        res = cli("index", "convert", "--store", src, "--out", out, "--hidden-dtype", "int8", "--quiet")
        err = assert_one_line_error(res, f"writing to {out}", "wait for it")
        assert "--shard" not in err  # (a build's advice: convert has no --shard)
    assert convert_store(src, out, hidden_dtype="int8", progress=False).written == 12


def test_convert_resumes_into_an_output_whose_sketch_was_rebuilt(int8_setting, tmp_path, monkeypatch):
    """'index sketch' on a partly converted output, then the convert re-run: it was refused with 'give the store's
    values, or use index add' (convert has no sketch options); the resumed rows now take the output's sketch."""
    src, out = int8_setting["stores"]["f16"], tmp_path / "out"
    append, calls = Store.append, {"n": 0}

    def killed_after_first(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return append(self, rows)

    monkeypatch.setattr(Store, "append", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        convert_store(src, out, hidden_dtype="int8", block_rows=5, progress=False)
    monkeypatch.undo()
    shape = ["--sketch-vocab-buckets", "64", "--sketch-hidden-cols", "8", "--sketch-basis", "gaussian"]
    res = cli("index", "sketch", "--store", out, "--rebuild", *shape)
    assert res.exit_code == 0, res.output
    res = cli("index", "convert", "--store", src, "--out", out, "--hidden-dtype", "int8", "--json")
    assert res.exit_code == 0, res.output
    assert (json.loads(res.stdout)["written"], Store.open(out).count()) == (7, 12) and check_store(out).clean
    m = Store.open(out).manifest
    assert (m.sketch_vocab_buckets, m.sketch_hidden_cols, m.sketch_basis) == (64, 8, "gaussian")
    # every row's sketch is what 'index sketch' computes from the stored values with the output's spec
    sketches = {r["id"]: r["sketch"] for b in Store.open(out).scan(["id", "sketch"]) for r in b.to_pylist()}
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert cli("index", "sketch", "--store", again, "--rebuild").exit_code == 0
    for b in Store.open(again).scan(["id", "sketch"]):
        for r in b.to_pylist():
            np.testing.assert_allclose(sketches[r["id"]], r["sketch"], rtol=1e-3, atol=1e-3)


def test_int8_block_without_int8_is_refused_not_ignored(int8_setting, tmp_path):
    """'--int8-block' with hidden states that are not int8 was silently dropped (a float16 store came out)."""
    src = int8_setting["stores"]["f16"]
    res = cli("index", "convert", "--store", src, "--out", tmp_path / "c", "--int8-block", "8")
    assert_one_line_error(res, "--int8-block", "--hidden-dtype int8")
    assert not (tmp_path / "c").exists()
    train = int8_setting["tmp"] / "train.jsonl"
    build = ["index", "build", train, "--store", tmp_path / "b", "--model", tmp_path / "no-model"]
    assert_one_line_error(cli(*build, "--hidden-dtype", "float16", "--int8-block", "8"), "--int8-block", "int8")
    assert not (tmp_path / "b").exists()


def test_ctrl_c_during_convert_ends_with_its_one_error_line(int8_setting, tmp_path, monkeypatch):
    """The progress bar was closed after the interruption's error line, so the bar, not the error, was the
    last thing on the terminal."""
    append = Store.append
    calls = {"n": 0}

    def ctrl_c_at_second(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return append(self, rows)

    monkeypatch.setattr(Store, "append", ctrl_c_at_second)
    src, out = int8_setting["stores"]["f16"], tmp_path / "out"
    res = cli("index", "convert", "--store", src, "--out", out, "--hidden-dtype", "int8", "--write-every", "5")
    assert res.exit_code == 130
    last = res.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("error: interrupted;") and "convert resumes" in last, res.stderr[-300:]
    monkeypatch.undo()
    assert Store.open(out).count() == 5 and check_store(out).clean


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_m": "4"},
        {"top_m": 2.5},
        {"top_m": True},
        {"hidden_dtype": "int8", "int8_block": "x"},
        {"hidden_dtype": "int8", "int8_block": -3},
        {"block_rows": 0},
        {"hidden_rank": 8.0},
    ],
)
def test_convert_api_refuses_values_that_are_not_whole_numbers_before_any_write(int8_setting, tmp_path, kwargs):
    """The Python API takes what the CLI's option types refuse: a string or fractional top-m, a negative int8
    block, 0 rows per commit gave a TypeError (or a store error blaming the source) after making the output."""
    from forvalue.schemas.errors import ConfigError

    out = tmp_path / "out"
    with pytest.raises(ConfigError):
        convert_store(int8_setting["stores"]["f16"], out, progress=False, **kwargs)
    assert not out.exists()


def test_convert_killed_with_sigkill_resumes_without_loss_or_duplicates(tiny_model_dir, tmp_path):
    rows = [
        {"id": f"k{i}", "prompt": f"reverse the words {i}: the quick brown fox jumps ->", "response": " jumps fox"}
        for i in range(300)
    ]
    src = _build(tmp_path, tiny_model_dir, EncodeConfig(top_m=4), rows)
    out = tmp_path / "out"
    args = ["index", "convert", "--store", str(src), "--out", str(out), "--hidden-dtype", "int8", "--write-every", "3"]
    script = Path(os.sys.executable).with_name("forvalue")
    command = [str(script)] if script.exists() else [os.sys.executable, "-m", "forvalue.cli"]
    log = tmp_path / "convert.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(command + args + ["--quiet"], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and _count(out) == 0:
            assert time.monotonic() < deadline, "no batch was committed in time"
            time.sleep(0.02)
        assert proc.poll() is None, f"the convert ended before it could be killed: {log.read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = Store.open(out).count()
    assert 0 < partial < 300 and partial % 3 == 0  # whole commits only
    res = cli(*args, "--quiet", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert (report["written"], report["already_converted"]) == (300 - partial, partial)
    ids = [r["id"] for b in Store.open(out).scan(["id"]) for r in b.to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # nothing lost, nothing twice
    assert check_store(out).clean


def _count(path: Path) -> int:
    try:
        return Store.open(path).count()
    except Exception:  # noqa: BLE001 - not created yet, or caught mid-creation: poll again
        return 0


# -- float16 sketches --------------------------------------------------------------------------
def test_float16_sketch_prefilter_is_exact_on_the_stored_sketches(int8_setting):
    from forvalue.storage import faiss_index

    store = Store.open(int8_setting["stores"]["int8-b8"])
    assert store.schema().field("sketch").type.value_type == pa.float16()
    pre = faiss_index.ensure(store, persist=False)
    assert pre.meta["factory"] == "SQfp16"
    z = np.concatenate([b.column(0).flatten().to_numpy().reshape(b.num_rows, -1) for b in store.scan(["sketch"])])
    queries = torch.randn(3, z.shape[1]).numpy()
    scores, rows = pre.search(queries, 5)
    exact = queries @ z.astype(np.float32).T
    np.testing.assert_allclose(scores, np.sort(exact, axis=1)[:, ::-1][:, :5], rtol=1e-4, atol=1e-4)


def test_batched_self_scores_equal_pair_score():
    from forvalue.indexer.convert import self_scores
    from forvalue.indexer.sparse_errors import pair_score

    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 30, size=40)
    n, d = int(lengths.sum()), 24
    h = rng.standard_normal((n, d)).astype(np.float32)
    ids = rng.integers(0, 200, (n, 5))
    values = rng.standard_normal((n, 5)).astype(np.float32)
    ends = np.cumsum(lengths)
    ref = [pair_score(h[e - k : e], ids[e - k : e], values[e - k : e], h[e - k : e], ids[e - k : e], values[e - k : e])
           for k, e in zip(lengths, ends)]  # fmt: skip
    for budget in (1 << 24, 500):  # one chunk, or a chunk per row
        np.testing.assert_allclose(self_scores(h, ids, values, lengths, budget=budget), ref, rtol=1e-12)
