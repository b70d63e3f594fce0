"""The low-rank tier (``--hidden-rank R``): hidden states stored as R coordinates in a fitted basis.

Every scoring path is held against the float64 reference of the projected definition
(``tools.reference.dense_scores(hidden_basis=U)``: training side ``float32(h) @ U`` rounded / quantized as
stored, validation side ``float32(h) @ U``); R = d is exact against the unprojected store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close, assert_one_line_error, cli, exact_scores, in_order, write_jsonl

from forvalue.api import build_index, run_query
from forvalue.engine.scan import audit_scan
from forvalue.engine.validation import encode_validation, store_hidden_basis
from forvalue.indexer.convert import convert_store
from forvalue.indexer.data import iter_samples
from forvalue.indexer.low_rank import fit_hidden_basis
from forvalue.maintenance import check_store, store_info
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import ConfigError, ManifestMismatchError
from forvalue.storage.hidden_basis import HIDDEN_BASIS_FILE, load_hidden_basis
from forvalue.storage.store import Store
from tools.reference import dense_scores

Q = dict(progress=False, device="cpu")


def _rows(n: int) -> list[dict]:
    words = ["the quick brown fox", "reverse the words", "solve the math problem", "cats and dogs"]
    return [
        {"id": f"s{i}", "prompt": f"{words[i % 4]} {i} ->", "response": f" answer {i * 7}", "label": f"c{i % 2}"}
        for i in range(n)
    ]


def _build(tmp: Path, model_dir, encode: EncodeConfig, name: str) -> Path:
    cfg = BuildConfig(model=ModelConfig(path=str(model_dir), device="cpu"), encode=encode, progress=False)
    build_index([tmp / "train.jsonl"], tmp / name, cfg)
    return tmp / name


_scores, _in_order, _close = exact_scores, in_order, assert_close


@pytest.fixture(scope="module")
def low_rank(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("low-rank")
    rows = _rows(12)
    write_jsonl(tmp / "train.jsonl", rows)
    val = write_jsonl(tmp / "val.jsonl", [dict(r, id=f"v{j}") for j, r in enumerate(_rows(16)[12:])])
    stores = {
        name: _build(tmp, tiny_model_dir, enc, name)
        for name, enc in {
            "f16": EncodeConfig(top_m=4, hidden_dtype="float16"),
            "f16-r8": EncodeConfig(top_m=4, hidden_dtype="float16", hidden_rank=8),
            "int8-r16": EncodeConfig(top_m=4, hidden_dtype="int8", int8_block=8, hidden_rank=16),
            "f32": EncodeConfig(top_m=4, hidden_dtype="float32"),
            "f32-rd": EncodeConfig(top_m=4, hidden_dtype="float32", hidden_rank=32),
        }.items()
    }
    return dict(
        tmp=tmp,
        val=val,
        stores=stores,
        train=list(iter_samples([tmp / "train.jsonl"], DataConfig())),
        val_samples=list(iter_samples([val], DataConfig())),
        ids=[r["id"] for r in rows],
    )


@pytest.mark.parametrize("name,dtype,block,rank", [("f16-r8", "float16", 0, 8), ("int8-r16", "int8", 8, 16)])
def test_low_rank_scores_equal_the_reference_of_the_projected_values(low_rank, tiny_runner, name, dtype, block, rank):
    s = low_rank
    store = Store.open(s["stores"][name])
    m = store.manifest
    assert (m.hidden_rank, m.stored_width, m.hidden_size) == (rank, rank, 32)
    basis, energy = load_hidden_basis(store.path, m)
    assert basis.shape == (32, rank) and np.allclose(basis.T @ basis, np.eye(rank), atol=1e-5)
    assert 0 < energy[0] <= energy[-1] <= 1 and np.all(np.diff(energy) >= 0)
    hidden = np.concatenate([b.column(0).flatten().to_numpy() for b in store.scan(["hidden"])])
    assert hidden.size == rank * sum(b.column(0).to_numpy().sum() for b in store.scan(["n_scored"]))
    scores, ids = _scores(store.path, s["val"], tiny_runner)
    scores = _in_order(scores, ids, s["ids"])
    model, tok = tiny_runner.model, tiny_runner.tokenizer
    kw = dict(top_m=4, hidden_dtype=dtype, int8_block=block, probs_dtype="float16")
    ref = dense_scores(model, tok, s["train"], s["val_samples"], hidden_basis=basis, **kw)
    _close(scores, ref, 2e-5)
    full = dense_scores(model, tok, s["train"], s["val_samples"], **kw)  # the test tells projected from full
    assert np.abs(scores - full).max() > 10 * 2e-5 * np.abs(full).max()
    # cosine uses the stored sq_norm (the self score of the projected values) and the projected validation norm
    cos, _ = _scores(store.path, s["val"], tiny_runner, normalize="cosine")
    assert np.abs(cos).max() <= 1.0 + 1e-6
    self_ref = dense_scores(model, tok, s["train"], s["train"], hidden_basis=basis, **kw)
    sq = {r["id"]: r["sq_norm"] for b in store.scan(["id", "sq_norm"]) for r in b.to_pylist()}
    # (the reference's self score projects one side as a validation sample: unrounded)
    np.testing.assert_allclose([sq[i] for i in s["ids"]], np.diag(self_ref), rtol=3e-3)


def test_rank_d_is_exact_against_the_unprojected_store(low_rank, tiny_runner):
    s = low_rank
    full, ids_a = _scores(s["stores"]["f32"], s["val"], tiny_runner)
    rotated, ids_b = _scores(s["stores"]["f32-rd"], s["val"], tiny_runner)
    _close(_in_order(rotated, ids_b, s["ids"]), _in_order(full, ids_a, s["ids"]), 1e-5)
    _, energy = load_hidden_basis(s["stores"]["f32-rd"], Store.open(s["stores"]["f32-rd"]).manifest)
    assert energy[-1] == pytest.approx(1.0, abs=1e-6)


def test_every_scoring_path_reads_the_low_rank_store(low_rank, tiny_runner):
    from forvalue.engine.explain import Explainer

    s = low_rank
    store = Store.open(s["stores"]["int8-r16"])
    per_sample, ids = _scores(store.path, s["val"], tiny_runner)
    val = encode_validation(
        tiny_runner, s["val_samples"], store.manifest, DataConfig(), basis=store_hidden_basis(store)
    )
    assert val.hidden.shape[1] == 16
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
    for row in top.top.to_pylist():  # the prefilter's exact rerank gives the exact scores of the projected values
        j = [v.id for v in s["val_samples"]].index(row["validation_id"])
        np.testing.assert_allclose(row["score"], per_sample[j, ids.index(row["train_id"])], rtol=1e-6)
    # the audit (validation cache: full-width encodings, projected after) and its explanation pages
    copy = s["tmp"] / "audited"
    shutil.copytree(store.path, copy)
    res = cli("audit", "run", "--store", copy, "--validation", s["val"], "--name", "a", "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    from forvalue.storage.audits import read_audit

    table, _ = read_audit(Store.open(copy), "a")
    got = dict(zip(table.column("id").to_pylist(), table.column("score_mean").to_pylist()))
    np.testing.assert_allclose([got[i] for i in ids], per_sample.mean(axis=0), rtol=1e-5, atol=1e-6)
    again = cli("audit", "run", "--store", copy, "--validation", s["val"], "--name", "b", "--device", "cpu", "--quiet")
    assert again.exit_code == 0, again.output  # from the cache this time
    table_b, _ = read_audit(Store.open(copy), "b")
    assert table_b.column("score_mean").to_pylist() == [got[i] for i in table_b.column("id").to_pylist()]


@pytest.mark.ray
def test_ray_build_and_scans_on_the_low_rank_tier(low_rank, tiny_runner, tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    from forvalue.engine.ray_scan import ray_audit_scan
    from forvalue.schemas.config import EngineConfig

    s = low_rank
    engine = EngineConfig(engine="ray", workers=1)
    store = Store.open(s["stores"]["int8-r16"])
    per_sample, ids = _scores(store.path, s["val"], tiny_runner)
    basis = store_hidden_basis(store)
    val = encode_validation(tiny_runner, s["val_samples"], store.manifest, DataConfig(), basis=basis)
    labels = [v.label for v in s["val_samples"]]
    scan = ray_audit_scan(store, val, labels, sorted(set(labels)), "cpu", engine)
    by_id = dict(zip(scan.ids, scan.mean))
    np.testing.assert_allclose([by_id[i] for i in ids], per_sample.mean(axis=0), rtol=1e-5, atol=1e-6)
    # a Ray build fits the basis from its first chunk (here every row, as the local build's first write batch)
    cfg = BuildConfig(
        model=ModelConfig(path=str(tiny_model_dir), device="cpu"),
        encode=EncodeConfig(top_m=4, hidden_dtype="int8", int8_block=8, hidden_rank=16),
        progress=False,
    )
    build_index([s["tmp"] / "train.jsonl"], tmp_path / "ray", cfg, engine=engine)
    np.testing.assert_allclose(store_hidden_basis(Store.open(tmp_path / "ray")), basis, atol=1e-5)
    got, got_ids = _scores(tmp_path / "ray", s["val"], tiny_runner)
    _close(_in_order(got, got_ids, s["ids"]), _in_order(per_sample, ids, s["ids"]), 1e-4)
    assert check_store(tmp_path / "ray").clean


def test_convert_to_low_rank_equals_a_low_rank_build(low_rank, tiny_runner, tmp_path):
    s = low_rank
    res = cli("index", "convert", "--store", s["stores"]["f16"], "--out", tmp_path / "c", "--hidden-dtype", "int8",
              "--int8-block", "8", "--hidden-rank", "16", "--quiet", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["written"] == 12 and report["hidden_rank"] == 16 and 0 < report["energy_kept"] <= 1
    converted, built = Store.open(tmp_path / "c"), Store.open(s["stores"]["int8-r16"])
    # the same tokens fit the same basis (the build's first write batch holds every row, in the stored order)
    np.testing.assert_array_equal(store_hidden_basis(converted), store_hidden_basis(built))
    cols = ["id", "hidden", "hidden_scale", "topk_ids", "sketch", "sq_norm"]
    b = {r["id"]: r for r in built.take(list(range(12)), cols).to_pylist()}
    for row in converted.take(list(range(12)), cols).to_pylist():
        for col in cols[1:-2]:
            assert row[col] == b[row["id"]][col], col
        np.testing.assert_allclose(row["sketch"], b[row["id"]]["sketch"], rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(row["sq_norm"], b[row["id"]]["sq_norm"], rtol=1e-9)
    assert check_store(tmp_path / "c").clean
    info = store_info(tmp_path / "c")
    assert "rank 16 of 32" in info.hidden_states and "energy" in info.hidden_states
    text = cli("index", "info", "--store", tmp_path / "c")
    assert text.exit_code == 0 and "rank 16 of 32" in text.output
    # a low-rank store converts to another dtype at its own rank (its basis copied); never to another rank
    assert convert_store(tmp_path / "c", tmp_path / "c16", hidden_dtype="float16", progress=False).written == 12
    np.testing.assert_array_equal(store_hidden_basis(Store.open(tmp_path / "c16")), store_hidden_basis(converted))
    for rank in (8, 0):
        res = cli("index", "convert", "--store", tmp_path / "c", "--out", tmp_path / f"r{rank}", "--hidden-rank", rank)
        assert_one_line_error(res, "--hidden-rank", "rank 16")


def test_convert_to_low_rank_resumes_after_a_crash_with_the_published_basis(low_rank, tmp_path, monkeypatch):
    s = low_rank
    one_shot = convert_store(s["stores"]["f16"], tmp_path / "one", hidden_rank=8, block_rows=5, progress=False)
    calls = {"n": 0}
    original = Store.append

    def crash_after_first(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed between two commits
        return original(self, rows)

    monkeypatch.setattr(Store, "append", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        convert_store(s["stores"]["f16"], tmp_path / "two", hidden_rank=8, block_rows=5, progress=False)
    monkeypatch.setattr(Store, "append", original)
    assert Store.open(tmp_path / "two").count() == 5
    resumed = convert_store(s["stores"]["f16"], tmp_path / "two", hidden_rank=8, block_rows=5, progress=False)
    assert (resumed.written, resumed.already_converted) == (7, 5) and one_shot.written == 12
    cols = ["id", "hidden", "sq_norm"]
    a = sorted(Store.open(tmp_path / "one").take(list(range(12)), cols).to_pylist(), key=lambda r: r["id"])
    b = sorted(Store.open(tmp_path / "two").take(list(range(12)), cols).to_pylist(), key=lambda r: r["id"])
    assert a == b
    # resuming with another rank is another conversion: refused
    res = cli("index", "convert", "--store", s["stores"]["f16"], "--out", tmp_path / "two", "--hidden-rank", "4")
    assert_one_line_error(res, "other settings")


def test_hostile_ranks_and_outputs_are_refused(low_rank, tiny_model_dir, tmp_path):
    s = low_rank
    train = s["tmp"] / "train.jsonl"
    build = ["index", "build", train, "--model", tiny_model_dir, "--top-m", "4", "--quiet"]
    for rank, needle in (("-1", "--hidden-rank"), ("2.5", "--hidden-rank"), ("x", "--hidden-rank")):
        res = cli(*build, "--store", tmp_path / "bad", "--hidden-rank", rank)
        assert res.exit_code == 2 and "hidden-rank" in res.output, res.output
    assert_one_line_error(cli(*build, "--store", tmp_path / "big", "--hidden-rank", "33"), "--hidden-rank", "32")
    assert_one_line_error(
        cli(*build, "--store", tmp_path / "cols", "--hidden-rank", "2", "--sketch-hidden-cols", "4"), "--hidden-rank"
    )
    assert_one_line_error(
        cli(*build, "--store", tmp_path / "blk", "--hidden-rank", "12", "--hidden-dtype", "int8", "--int8-block", "8"),
        "--int8-block",
        "12",
        "--hidden-rank",  # (the width a block divides is the rank: the line once said 'the hidden size 12')
    )
    # fewer tokens to fit from than directions asked
    tiny = write_jsonl(tmp_path / "one.jsonl", [{"id": "a", "text": "a b c"}])
    res = cli("index", "build", tiny, "--store", tmp_path / "few", "--model", tiny_model_dir, "--hidden-rank", "32",
              "--quiet")  # fmt: skip
    assert_one_line_error(res, "--hidden-rank", "needs at least 32")
    with pytest.raises(ConfigError, match="needs at least 8"):
        fit_hidden_basis(np.ones((3, 32), np.float32), 8)
    with pytest.raises(ConfigError, match="whole number"):
        EncodeConfig(hidden_rank=2.5)
    assert EncodeConfig(hidden_rank=0).hidden_rank == 0  # 0 = full width (the default)
    # index add / build with another rank than the store's is refused
    with pytest.raises(ManifestMismatchError, match="hidden_rank"):
        _build(s["tmp"], tiny_model_dir, EncodeConfig(top_m=4, hidden_dtype="float16", hidden_rank=4), "f16-r8")
    with pytest.raises(ManifestMismatchError, match="hidden_rank"):
        _build(s["tmp"], tiny_model_dir, EncodeConfig(top_m=4, hidden_dtype="float16"), "f16-r8")
    # convert onto itself or into the source, with a rank
    src = s["stores"]["f16"]
    for out, needle in ((src, "is the source store"), (src / "inner", "inside the store")):
        assert_one_line_error(cli("index", "convert", "--store", src, "--out", out, "--hidden-rank", "8"), needle)
    assert_one_line_error(cli("index", "convert", "--store", src, "--out", tmp_path / "o", "--hidden-rank", "64"), "32")
    assert not (src / HIDDEN_BASIS_FILE).exists()


def test_convert_refused_for_its_rank_leaves_no_output(low_rank, tmp_path):
    """More directions than the source has tokens to fit from, or fewer than the source's sketch columns: one
    line naming what to change in this command, and no output folder left to block the corrected re-run."""
    import lance

    one = tmp_path / "one"
    shutil.copytree(low_rank["stores"]["f16"], one)
    lance.dataset(str(one / "samples.lance")).delete("id != 's0'")  # a single sample: fewer than 32 tokens
    out = tmp_path / "out"
    res = cli("index", "convert", "--store", one, "--out", out, "--hidden-rank", "32")
    assert_one_line_error(res, "--hidden-rank", "needs at least 32")
    assert not out.exists()
    res = cli("index", "convert", "--store", one, "--out", out, "--hidden-rank", "2")
    err = assert_one_line_error(res, "raise --hidden-rank")
    assert "lower --sketch-hidden-cols" not in err  # index convert has no such option
    assert not out.exists()
    res = cli("index", "convert", "--store", one, "--out", out, "--hidden-rank", "4", "--quiet")
    assert res.exit_code == 0, res.output
    assert Store.open(out).count() == 1 and check_store(out).clean


def test_a_low_rank_store_killed_before_its_first_row_checks_clean_and_resumes(low_rank, tmp_path):
    """A build or convert killed after the manifest and before the basis (published with the first rows) leaves
    an empty low-rank store without hidden_basis.npz: nothing is lost, so 'index check' is clean (it said the
    rows 'cannot be scored without it: restore the file'), and the re-run fits and publishes the basis."""
    from forvalue.indexer.convert import target_manifest

    src = low_rank["stores"]["f16"]
    out = tmp_path / "out"
    Store.create(out, target_manifest(Store.open(src).manifest, hidden_rank=8))
    report = check_store(out)
    assert report.clean, report.problems
    assert convert_store(src, out, hidden_rank=8, progress=False).written == 12
    assert (out / HIDDEN_BASIS_FILE).exists() and check_store(out).clean


def test_index_add_projects_new_rows_and_a_lost_basis_is_one_line(low_rank, tiny_runner, tmp_path):
    s = low_rank
    copy = tmp_path / "copy"
    shutil.copytree(s["stores"]["f16-r8"], copy)
    more = write_jsonl(tmp_path / "more.jsonl", [dict(r, id=f"x{r['id']}") for r in _rows(3)])
    res = cli("index", "add", more, "--store", copy, "--quiet")
    assert res.exit_code == 0, res.output
    grown = Store.open(copy)
    assert grown.count() == 15 and check_store(copy).clean
    np.testing.assert_array_equal(store_hidden_basis(grown), store_hidden_basis(Store.open(s["stores"]["f16-r8"])))
    scores, ids = _scores(copy, s["val"], tiny_runner)
    basis = store_hidden_basis(grown)
    added = list(iter_samples([more], DataConfig()))
    ref = dense_scores(tiny_runner.model, tiny_runner.tokenizer, added, s["val_samples"], top_m=4,
                       hidden_dtype="float16", probs_dtype="float16", hidden_basis=basis)  # fmt: skip
    _close(_in_order(scores, ids, [a.id for a in added]), ref, 2e-5)
    (copy / HIDDEN_BASIS_FILE).unlink()
    report = check_store(copy)
    assert not report.clean and HIDDEN_BASIS_FILE in " ".join(report.problems)
    res = cli("query", "--store", copy, "--validation", s["val"], "--device", "cpu", "--quiet")
    assert_one_line_error(res, HIDDEN_BASIS_FILE, "missing")
    # adding rows would fit a new basis from them and score the stored rows in it (exit 0, 'index check' clean
    # after; hostile pass): refused, nothing written
    more2 = write_jsonl(tmp_path / "more2.jsonl", [dict(r, id=f"y{r['id']}") for r in _rows(3)])
    assert_one_line_error(cli("index", "add", more2, "--store", copy, "--quiet"), HIDDEN_BASIS_FILE, "restore")
    assert Store.open(copy).count() == 15 and not (copy / HIDDEN_BASIS_FILE).exists()
