"""The prefilter: sketch estimates For-Value scores, FAISS index stays consistent, prefilter + rerank recall."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_sketched, write_jsonl

import forvalue
from forvalue.api import build_index, run_query
from forvalue.indexer.sketch import Sketcher, SketchSpec
from forvalue.indexer.sparse_errors import error_entries, pair_score
from forvalue.schemas.config import BuildConfig, EncodeConfig, ModelConfig, QueryConfig
from forvalue.storage import faiss_index
from forvalue.storage.sketch_basis import fit_basis, load_basis, publish_basis
from forvalue.storage.store import Store


def _random_samples(rng, n_samples=24, vocab=500, d=32, m=8):
    """Random sparse errors + hidden states with shared structure (so scores vary a lot)."""
    lengths = rng.integers(3, 9, n_samples)
    n = int(lengths.sum())
    topic = np.repeat(rng.integers(0, 4, n_samples), lengths)
    centres = rng.standard_normal((4, d)) * 2
    hidden = (centres[topic] + rng.standard_normal((n, d)) + 1.0).astype(np.float32)
    topk_ids = np.stack([rng.choice(np.arange(t * 40, t * 40 + 60), m, replace=False) for t in topic]).astype(np.int32)
    probs = np.sort(rng.dirichlet(np.ones(m + 1), n)[:, :m], axis=1)[:, ::-1].astype(np.float32)
    target = np.where(rng.random(n) < 0.7, topk_ids[:, 0], rng.integers(0, vocab, n)).astype(np.int32)
    tprob = np.where(target == topk_ids[:, 0], probs[:, 0], 0.01).astype(np.float32)
    ids, values = error_entries(topk_ids, np.ascontiguousarray(probs), target, tprob)
    return hidden, ids, values, lengths


def _exact_matrix(hidden, ids, values, lengths):
    off = np.concatenate([[0], np.cumsum(lengths)])
    parts = [(hidden[a:b], ids[a:b], values[a:b]) for a, b in zip(off[:-1], off[1:])]
    return np.array([[pair_score(*p, *q) for q in parts] for p in parts])


@pytest.mark.parametrize("buckets,cols", [(1, 1), (1, 4), (4, 4)])
def test_sketch_inner_product_is_unbiased_and_accurate(buckets, cols):
    rng = np.random.default_rng(0)
    hidden, ids, values, lengths = _random_samples(rng)
    exact = _exact_matrix(hidden, ids, values, lengths)
    off = np.triu_indices(len(lengths), 1)

    def estimate(seed, dim, flip=False):
        spec = SketchSpec(dim, buckets, cols, seed, 500, 32)
        z_store = Sketcher(spec).sketch(hidden, ids, values, lengths)
        z_query = Sketcher(spec, flip_signs=True).sketch(hidden, ids, values, lengths) if flip else z_store
        return z_query.astype(np.float64) @ z_store.T.astype(np.float64)

    # unbiased: the mean over independent seeds converges to the exact scores
    mean = np.mean([estimate(seed, 512) for seed in range(200)], axis=0)
    scale = np.abs(exact).max()
    assert np.abs(mean - exact).max() < 0.06 * scale
    # accurate: one large sketch ranks pairs like the exact score
    one = estimate(7, 4096)
    assert np.corrcoef(one[off], exact[off])[0, 1] > 0.75
    # a sketch whose query-side hash signs disagree with the store's is useless
    wrong = estimate(7, 4096, flip=True)
    assert abs(np.corrcoef(wrong[off], exact[off])[0, 1]) < 0.3
    # and another seed on one side (a seed not taken from the manifest) too
    spec_a, spec_b = SketchSpec(4096, buckets, cols, 1, 500, 32), SketchSpec(4096, buckets, cols, 2, 500, 32)
    cross = (
        Sketcher(spec_a).sketch(hidden, ids, values, lengths) @ Sketcher(spec_b).sketch(hidden, ids, values, lengths).T
    )
    assert abs(np.corrcoef(cross[off], exact[off])[0, 1]) < 0.3


def test_sketch_is_deterministic_and_linear():
    rng = np.random.default_rng(1)
    hidden, ids, values, lengths = _random_samples(rng, n_samples=6)
    spec = SketchSpec(256, 1, 4, 3, 500, 32)
    a = Sketcher(spec).sketch(hidden, ids, values, lengths)
    b = Sketcher(spec).sketch(hidden, ids, values, lengths)
    np.testing.assert_array_equal(a, b)
    whole = Sketcher(spec).sketch(hidden, ids, values, np.array([lengths.sum()]))
    np.testing.assert_allclose(whole[0], a.sum(0), rtol=1e-4, atol=1e-3)


def _task_rows(n_train, n_test, seed=0):
    from forvalue.tasks.text import generate_task

    train, test = generate_task("sentence_transformations", n_train=n_train, n_test=n_test, seed=seed)
    return [{k: r[k] for k in ("id", "prompt", "response", "label")} for r in train], [
        {k: r[k] for k in ("id", "prompt", "response", "label")} for r in test
    ]


def test_fit_basis_is_orthonormal_and_starts_with_the_mean_direction():
    rng = np.random.default_rng(2)
    hidden, *_ = _random_samples(rng, n_samples=40)
    u = fit_basis(hidden, 6)
    assert u.shape == (32, 6) and u.dtype == np.float32
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-5)
    mean = hidden.mean(0) / np.linalg.norm(hidden.mean(0))
    np.testing.assert_allclose(u[:, 0], mean, atol=1e-5)
    # the next column is the top principal direction once the mean direction is removed
    rest = hidden - np.outer(hidden @ mean, mean)
    rest = rest - rest.mean(0)
    top = np.linalg.eigh(rest.T @ rest)[1][:, -1]
    assert abs(float(u[:, 1] @ top)) > 0.999


def test_fitted_sketch_equals_its_dense_definition():
    """z(G) = C G U: the token-by-token sketch against the dense |V| x d matrices."""
    rng = np.random.default_rng(3)
    hidden, ids, values, lengths = _random_samples(rng, n_samples=8)
    basis = fit_basis(hidden, 4)
    spec = SketchSpec(2 * 64 * 4, 64, 4, 5, 500, 32, "fitted")  # two blocks of 64 buckets x 4 columns
    sk = Sketcher(spec, basis=basis)
    z = sk.sketch(hidden, ids, values, lengths).astype(np.float64)
    off = np.concatenate([[0], np.cumsum(lengths)])
    table = sk.table.numpy().astype(np.float64)  # (|V|, T * R): one +-1 per block and vocabulary id
    for j in range(len(lengths)):
        g = np.zeros((500, 32))
        for k in range(off[j], off[j + 1]):
            np.add.at(g, ids[k], values[k][:, None] * hidden[k][None, :].astype(np.float64))
        blocks = [table[:, t * 64 : (t + 1) * 64].T @ g @ basis for t in range(2)]  # (R, c) each
        want = np.concatenate([b.ravel() for b in blocks]) / np.sqrt(2)
        np.testing.assert_allclose(z[j], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # a fitted sketch refuses a missing or misshaped basis
    with pytest.raises(Exception, match="basis"):
        Sketcher(spec)
    with pytest.raises(Exception, match="basis"):
        Sketcher(spec, basis=basis[:, :2])


def test_basis_is_published_once(tmp_path):
    a, b = np.eye(8, 2, dtype=np.float32), np.eye(8, 2, k=-1, dtype=np.float32)
    assert load_basis(tmp_path) is None
    np.testing.assert_array_equal(publish_basis(tmp_path, a), a)
    np.testing.assert_array_equal(publish_basis(tmp_path, b), a)  # a second worker gets the first one's
    np.testing.assert_array_equal(publish_basis(tmp_path, b, replace=True), b)  # index sketch --rebuild
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def sketched_store(tmp_path_factory, tiny_model_dir, tiny_runner):
    tmp = tmp_path_factory.mktemp("prefilter")
    train, test = _task_rows(12, 2)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "val.jsonl", test)
    build_sketched(tmp / "train.jsonl", tmp / "store", tiny_model_dir, tiny_runner)
    return tmp, train, test


def _top_ids(res, k):
    out = {}
    for row in res.top.to_pylist():
        out.setdefault(row["validation_id"], []).append(row["train_id"])
    return {v: ids[:k] for v, ids in out.items()}


def _recall(exact, approx):
    return float(np.mean([len(set(exact[v]) & set(approx[v])) / len(exact[v]) for v in exact]))


def test_prefilter_recall_matches_exact_and_wrong_sketch_breaks_it(sketched_store, tiny_runner, monkeypatch):
    tmp, train, test = sketched_store
    store = Store.open(tmp / "store")
    assert store.count() == len(train) and store.has_column("sketch")
    pre = faiss_index.load(store)
    assert (
        pre is not None and pre.rows == len(train) and pre.meta["factory"] == "SQfp16"
    )  # float16 sketches: exact, half of Flat's bytes
    k, cand = 10, len(train) // 5
    exact = run_query(
        tmp / "store", [tmp / "val.jsonl"], QueryConfig(top_k=k, progress=False, exact=True), runner=tiny_runner
    )
    approx = run_query(
        tmp / "store", [tmp / "val.jsonl"], QueryConfig(top_k=k, progress=False, candidates=cand), runner=tiny_runner
    )
    assert not exact.prefiltered and approx.prefiltered
    e, a = _top_ids(exact, k), _top_ids(approx, k)
    # each validation sample reranks its own candidates only (as a query of it alone would)
    assert _recall(e, a) >= 0.85
    # scores of the rows both return are the exact ones
    es = {(r["validation_id"], r["train_id"]): r["score"] for r in exact.top.to_pylist()}
    for r in approx.top.to_pylist():
        if (r["validation_id"], r["train_id"]) in es:
            assert r["score"] == pytest.approx(es[(r["validation_id"], r["train_id"])], rel=1e-9)
    # aggregated queries: same top-k when the candidates cover it
    em = run_query(
        tmp / "store",
        [tmp / "val.jsonl"],
        QueryConfig(top_k=k, aggregate="mean", progress=False, exact=True),
        runner=tiny_runner,
    )
    am = run_query(
        tmp / "store",
        [tmp / "val.jsonl"],
        QueryConfig(top_k=k, aggregate="mean", progress=False, candidates=cand),
        runner=tiny_runner,
    )
    assert _recall(_top_ids(em, k), _top_ids(am, k)) >= 0.9

    # a query-side sketch with other hash tables (a seed not taken from the manifest): recall
    # collapses to about chance (cand / rows)
    import dataclasses

    import forvalue.engine.prefilter as qp

    monkeypatch.setattr(
        qp,
        "get_sketcher",
        lambda spec, basis=None, heavy_ids=None: Sketcher(dataclasses.replace(spec, seed=spec.seed + 1), basis=basis),
    )
    fixed = QueryConfig(top_k=k, progress=False, candidates=cand, max_candidates=cand)
    # the second stage ranks every row here (its pool is the whole small store): the broken sketch does not matter
    # (recall far above the chance of cand / rows = 0.2; its own loss on this tiny random model: ~0.8)
    staged = run_query(tmp / "store", [tmp / "val.jsonl"], fixed, runner=tiny_runner)
    assert _recall(e, _top_ids(staged, k)) >= 0.7 and staged.candidates == [cand] * len(test)
    monkeypatch.setattr(qp, "second_stage_of", lambda index: None)  # the sketch's order alone
    broken = run_query(tmp / "store", [tmp / "val.jsonl"], fixed, runner=tiny_runner)
    assert _recall(e, _top_ids(broken, k)) < 0.6 and broken.candidates == [cand] * len(test)
    # adaptive candidates (the default): the broken sketch's top-k keeps reaching into its last candidates, so
    # they double until the top-k is clear of them (here: up to every row)
    rescued = run_query(
        tmp / "store", [tmp / "val.jsonl"], QueryConfig(top_k=k, progress=False, candidates=cand), runner=tiny_runner
    )
    assert _recall(e, _top_ids(rescued, k)) >= 0.9 and max(rescued.candidates) > cand


def test_batched_query_equals_one_query_per_sample(sketched_store, tiny_runner):
    """A query of many validation samples reads the union of their candidates once, in row order, and scores each
    sample on its own candidates: its result is exactly the one of that sample queried alone, and every returned
    score is the exact scan's score of that row. Few candidates and a small read block, so the samples' candidates
    differ and fall across several reads."""
    import forvalue.engine.prefilter as qp
    from forvalue.engine.prefilter import prefilter_topk, validation_sketches
    from forvalue.engine.validation import encode_validation, load_validation_samples
    from forvalue.schemas.config import DataConfig

    tmp, train, test = sketched_store
    k, cand = 4, len(train) // 6
    cfg = QueryConfig(top_k=k, progress=False, candidates=cand, max_candidates=cand, read_rows=7)  # a fixed count
    store = Store.open(tmp / "store")
    val = encode_validation(
        tiny_runner, load_validation_samples([tmp / "val.jsonl"], DataConfig()), store.manifest, DataConfig(), 8
    )
    assert len(val) >= 6
    timings: dict = {}
    together = prefilter_topk(store, val, cfg, "cpu", timings=timings)
    scores, rows = together.result()
    for j in range(len(val)):  # bit for bit what the same encoded sample gets alone
        s1, r1 = prefilter_topk(store, val.subset([j]), cfg, "cpu").result()
        assert r1[0].tolist() == rows[j].tolist() and s1[0].tolist() == scores[j].tolist()
    spec = SketchSpec.from_manifest(store.manifest)
    index = faiss_index.ensure(store)
    _, pools = index.search(
        validation_sketches(val, spec, basis=load_basis(store.path)), qp.pool_size(len(train), cand)
    )
    found = np.stack(
        [
            f[np.argsort(-qp._second_stage(index.rerank, val, j, f, "none"), kind="stable")][:cand]
            for j, f in enumerate(pools)
        ]
    )
    assert timings["rows_read"] == np.unique(found).size < len(val) * cand  # the union, read once
    for j in range(len(val)):
        assert set(rows[j]) <= set(found[j])  # never a row of another sample's candidates

    # through the API: the same rows as one query per sample (whose validation encoding, alone rather than in a
    # batch, differs in float rounding only), and the exact scan's scores
    batch = run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner).top.to_pylist()
    full = QueryConfig(top_k=len(train), progress=False, exact=True)
    exact = run_query(tmp / "store", [tmp / "val.jsonl"], full, runner=tiny_runner)
    es = {(r["validation_id"], r["train_id"]): r["score"] for r in exact.top.to_pylist()}
    for r in batch:
        assert r["score"] == pytest.approx(es[(r["validation_id"], r["train_id"])], rel=1e-9)
    for j, sample in enumerate(test[:3]):
        write_jsonl(tmp / f"one{j}.jsonl", [sample])
        alone = run_query(tmp / "store", [tmp / f"one{j}.jsonl"], cfg, runner=tiny_runner).top.to_pylist()
        mine = [r for r in batch if r["validation_id"] == sample["id"]]
        assert [r["train_id"] for r in mine] == [r["train_id"] for r in alone]
        assert [r["score"] for r in mine] == pytest.approx([r["score"] for r in alone], rel=1e-6)


def test_faiss_index_follows_appends_and_recovers(sketched_store, tiny_model_dir, tiny_runner):
    tmp, train, _ = sketched_store
    more, _ = _task_rows(2, 1, seed=5)
    more = [dict(r, id="extra-" + r["id"]) for r in more]
    write_jsonl(tmp / "more.jsonl", more)
    cfg = BuildConfig(
        model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False, encode=EncodeConfig(sketch_dim=2048)
    )
    build_index([tmp / "more.jsonl"], tmp / "store", cfg, runner=tiny_runner)
    store = Store.open(tmp / "store")
    total = store.count()
    assert total == len(train) + len(more)
    assert faiss_index.load(store).rows == total
    # an index left behind (e.g. a build killed after its last commit): extended on next use
    meta_path = tmp / "store" / faiss_index.INDEX_DIR / faiss_index.META_FILE
    stale = faiss_index.build(store)
    stale.index.remove_ids(np.arange(total - 5, total))
    stale.meta["rows"] = total - 5
    faiss_index.save(store, stale)
    assert json.loads(meta_path.read_text())["rows"] == total - 5
    fresh = faiss_index.ensure(store)
    assert fresh.rows == total and faiss_index.load(store).rows == total
    # the extended index equals a rebuilt one
    q = np.random.default_rng(0).standard_normal((3, store.manifest.sketch_dim)).astype(np.float32)
    np.testing.assert_array_equal(fresh.search(q, 7)[1], faiss_index.build(store).search(q, 7)[1])
    # the exact index of float16 sketches keeps no copy of them: it is made from the sketch column
    assert json.loads(meta_path.read_text())["from_column"]
    assert not list((tmp / "store" / faiss_index.INDEX_DIR).glob("*.faiss"))
    # a damaged index file (an index type that has one) is rebuilt
    faiss_index.ensure(store, kind="hnsw")
    (tmp / "store" / faiss_index.INDEX_DIR / json.loads(meta_path.read_text())["file"]).write_bytes(b"junk")
    assert faiss_index.load(store) is None
    assert faiss_index.ensure(store).rows == total
    faiss_index.ensure(store, kind="auto", rebuild=True)  # (the damaged hnsw index is rebuilt as hnsw)


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: [],
        lambda meta: "x",
        lambda meta: dict(meta, file=None),
        lambda meta: dict(meta, rows="abc"),
        lambda meta: dict(meta, from_column=True, dim=None),
    ],
)
def test_a_damaged_prefilter_record_is_one_line_in_check_and_rebuilt_by_a_query(sketched_store, tiny_runner, damage):
    """prefilter.json that is JSON but not the record save() writes: 'index info' and 'index check' name it (no
    traceback), a prefiltered query rebuilds the index."""
    from conftest import assert_one_line_error, cli

    tmp, _, _ = sketched_store
    store = Store.open(tmp / "store")
    faiss_index.ensure(store, kind="pq", rebuild=True)
    meta_path = tmp / "store" / faiss_index.INDEX_DIR / faiss_index.META_FILE
    meta_path.write_text(json.dumps(damage(json.loads(meta_path.read_text()))))
    assert faiss_index.describe(store) is None and faiss_index.load(store) is None
    assert cli("index", "info", "--store", tmp / "store").exit_code == 0
    assert_one_line_error(cli("index", "check", "--store", tmp / "store"), "prefilter.json is damaged")
    res = run_query(
        tmp / "store", [tmp / "val.jsonl"], QueryConfig(progress=False, device="cpu", candidates=4), runner=tiny_runner
    )
    assert res.prefiltered and faiss_index.load(store).rows == store.count()
    faiss_index.ensure(store, kind="auto", rebuild=True)


def test_a_rebuild_keeps_the_kind_the_user_chose(sketched_store):
    """An unreadable index file (bytes changed in place) is named by 'index check'; the rebuild ('--repair', or a
    query's) is of the kind saved, not auto's."""
    from conftest import cli

    tmp, _, _ = sketched_store
    store = Store.open(tmp / "store")
    faiss_index.ensure(store, kind="pq", rebuild=True)
    meta = faiss_index.describe(store)
    path = tmp / "store" / faiss_index.INDEX_DIR / meta["file"]
    data = bytearray(path.read_bytes())
    data[:16] = bytes(b ^ 0xA5 for b in data[:16])
    path.write_bytes(bytes(data))
    assert faiss_index.load(store) is None
    check = cli("index", "check", "--store", tmp / "store")
    assert check.exit_code == 2 and "does not load" in check.stderr, check.output
    assert cli("index", "check", "--store", tmp / "store", "--repair").exit_code == 0
    assert faiss_index.describe(store)["factory"] == faiss_index.pq_factory(store.manifest.sketch_dim)
    assert faiss_index.ensure(store, rebuild=True).meta["kind"] == "pq"
    faiss_index.ensure(store, kind="auto", rebuild=True)


def test_pq_index_finds_the_flat_candidates_and_keeps_its_refine_factor(sketched_store):
    """The ``pq`` kind (4-bit product codes scanned, re-ranked by 8-bit codes) against the exact inner products of
    the same sketches: most of the flat index's candidates, saved and loaded with its re-rank factor."""
    import faiss

    tmp, train, _ = sketched_store
    store = Store.open(tmp / "store")
    flat = faiss_index.build(store, kind="flat")
    pq = faiss_index.build(store, kind="pq")
    assert pq.meta["factory"] == faiss_index.pq_factory(store.manifest.sketch_dim) and pq.rows == store.count()
    q = np.random.default_rng(0).standard_normal((8, store.manifest.sketch_dim)).astype(np.float32)
    c = max(4, store.count() // 5)
    want, got = flat.search(q, c)[1], pq.search(q, c)[1]
    overlap = np.mean([len(set(w) & set(g)) / c for w, g in zip(want.tolist(), got.tolist())])
    assert overlap >= 0.8, overlap
    faiss_index.save(store, pq)
    again = faiss_index.ensure(store)
    assert again.meta["factory"] == pq.meta["factory"]
    assert faiss.downcast_index(again.index).k_factor == faiss_index.REFINE_FACTOR
    np.testing.assert_array_equal(again.search(q, c)[1], got)
    faiss_index.ensure(store, kind="auto", rebuild=True)  # leave the fixture's index as it was


def test_an_index_auto_chose_before_is_replaced_when_auto_is_asked_again(sketched_store):
    """An index saved as ``auto`` when auto chose another type (IVF lists, before the pq index) keeps serving
    queries (no rebuild at query time), and ``index sketch --faiss-index auto`` replaces it with today's choice."""
    tmp, _, _ = sketched_store
    store = Store.open(tmp / "store")
    old = faiss_index.build(store, kind="IVF16,SQ8")
    old.meta["kind"] = "auto"  # as a build of an older version left it
    faiss_index.save(store, old)
    assert faiss_index.ensure(store).meta["factory"] == "IVF16,SQ8"
    forvalue.open(tmp / "store").sketch(faiss_index="auto")
    now = faiss_index.choose_factory(store.count(), "auto", store.manifest.sketch_dtype, store.manifest.sketch_dim)
    assert faiss_index.load(Store.open(tmp / "store")).meta["factory"] == now[0]


def test_small_store_indexes_train_without_faiss_warnings(sketched_store, capfd):
    """FAISS prints a line per clustering of few points (one per sub-vector of a pq index: 512 at D = 2048)."""
    tmp, _, _ = sketched_store
    store = Store.open(tmp / "store")
    for kind in ("pq", "IVF16,SQ8"):
        faiss_index.build(store, kind=kind)
    assert "WARNING" not in capfd.readouterr().err


def test_choose_factory():
    assert faiss_index.choose_factory(5000)[0] == "Flat"
    assert faiss_index.choose_factory(5000, "pq", dim=2048)[0] == "PQ512x4fs,Refine(SQ8)"
    assert faiss_index.choose_factory(1_000_000, dim=2048) == ("PQ512x4fs,Refine(SQ8)", None)
    factory, nprobe = faiss_index.choose_factory(1_000_000, "ivf")
    assert factory.startswith("IVF") and factory.endswith(",SQ8") and nprobe >= 1
    assert faiss_index.choose_factory(10, "hnsw")[0].startswith("HNSW")


def test_index_sketch_refuses_dim_0_and_more_columns_than_the_stored_width(sketched_store):
    """'--sketch-dim 0' (no sketch) was read as 'keep the store's' and rebuilt a sketch; more hidden columns than
    the values the store keeps per token said 'hidden size' without naming the store. Both: one line, and the
    store unchanged."""
    from conftest import assert_one_line_error, cli

    store = sketched_store[0] / "store"

    def files():
        return sorted((str(p), p.stat().st_size) for p in store.rglob("*") if p.is_file() and ".writer." not in p.name)

    before = files()
    res = cli("index", "sketch", "--store", store, "--rebuild", "--sketch-dim", "0")
    assert_one_line_error(res, str(store), "--sketch-dim")
    res = cli("index", "sketch", "--store", store, "--sketch-hidden-cols", "64", "--sketch-vocab-buckets", "8")
    assert_one_line_error(res, str(store), "--sketch-hidden-cols", "32")
    assert files() == before


@pytest.mark.parametrize(
    "kwargs", [{"dim": "x"}, {"dim": 2048.0}, {"seed": -1}, {"vocab_buckets": 0}, {"hidden_cols": 0}, {"dim": True}]
)
def test_sketch_api_refuses_values_that_are_not_whole_numbers_in_bounds(sketched_store, kwargs):
    """Through the API, a string D was a TypeError, a negative seed numpy's ValueError, and 0 buckets or columns
    were silently read as 'keep the store's'; each is a ConfigError before the store is touched."""
    import forvalue
    from forvalue.schemas.errors import ConfigError

    store = sketched_store[0] / "store"

    def files():
        return sorted((str(p), p.stat().st_size) for p in store.rglob("*") if p.is_file() and ".writer." not in p.name)

    before = files()
    with pytest.raises(ConfigError):
        forvalue.open(store).sketch(**kwargs)
    assert files() == before


@pytest.mark.parametrize("killed", ["after the basis", "after the column"])
def test_index_sketch_killed_mid_rebuild_is_named_by_check_and_query_and_a_rerun_repairs(
    sketched_store, tmp_path, monkeypatch, killed
):
    """'index sketch --rebuild' with a new shape publishes the basis, rewrites the column, then the manifest: a
    kill in between left a store whose prefiltered query failed ('needs its (32, 4) basis, got (32, 8)', or a
    bare AssertionError from FAISS) while 'index check' said 'damaged' or advised --repair, which does not help.
    Both now say to re-run 'index sketch --rebuild', and that re-run makes the store whole again."""
    import shutil

    from conftest import assert_one_line_error, cli

    import forvalue
    import forvalue.storage.store as store_module
    from forvalue.maintenance import check_store

    store = tmp_path / "store"
    shutil.copytree(sketched_store[0] / "store", store)

    def kill(*args, **kwargs):
        raise KeyboardInterrupt

    if killed == "after the basis":
        monkeypatch.setattr(Store, "set_column", kill)
    else:
        monkeypatch.setattr(store_module, "write_text", kill)  # the manifest, written after the column
    with pytest.raises(KeyboardInterrupt):
        forvalue.open(store).sketch(rebuild=True, dim=1024, vocab_buckets=64, hidden_cols=8)
    monkeypatch.undo()
    report = check_store(store)
    assert not report.clean and any("index sketch" in p and "--rebuild" in p for p in report.problems), report
    query = ["query", "--store", store, "-v", sketched_store[0] / "val.jsonl", "--device", "cpu", "--quiet"]
    assert_one_line_error(cli(*query, "--candidates", "5"), "index sketch", "--rebuild")
    assert cli("index", "sketch", "--store", store, "--rebuild").exit_code == 0
    assert check_store(store).clean
    assert cli(*query, "--candidates", "5").exit_code == 0


def test_cli_sketch_old_store_and_query_candidates(tmp_path, tiny_model_dir, tiny_runner, toy_rows):
    from click.testing import CliRunner

    from forvalue.cli import main

    write_jsonl(tmp_path / "train.jsonl", toy_rows)
    write_jsonl(tmp_path / "val.jsonl", toy_rows[:2])
    cfg = BuildConfig(
        model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False, encode=EncodeConfig(sketch_dim=0)
    )
    build_index([tmp_path / "train.jsonl"], tmp_path / "store", cfg, runner=tiny_runner)
    store = Store.open(tmp_path / "store")
    assert not store.has_column("sketch") and store.manifest.sketch_dim is None
    cli = CliRunner()
    res = cli.invoke(
        main,
        [
            "query",
            "--store",
            str(tmp_path / "store"),
            "-v",
            str(tmp_path / "val.jsonl"),
            "--candidates",
            "5",
            "--quiet",
        ],
    )
    assert res.exit_code == 2 and "index sketch" in res.output
    res = cli.invoke(
        main,
        [
            "index",
            "sketch",
            "--store",
            str(tmp_path / "store"),
            "--sketch-dim",
            "512",
            "--sketch-vocab-buckets",
            "128",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    assert report["sketched"] and report["faiss_rows"] == len(toy_rows)
    store = Store.open(tmp_path / "store")
    assert store.manifest.sketch_dim == 512 and store.has_column("sketch")
    assert (store.manifest.sketch_vocab_buckets, store.manifest.sketch_hidden_cols, store.manifest.sketch_basis) == (
        128,
        4,
        "fitted",
    )
    assert load_basis(store.path).shape == (store.manifest.hidden_size, 4)
    # the column equals what a build would have computed
    built = tmp_path / "built"
    build_index(
        [tmp_path / "train.jsonl"],
        built,
        BuildConfig(model=cfg.model, progress=False, encode=EncodeConfig(sketch_dim=512, sketch_vocab_buckets=128)),
        runner=tiny_runner,
    )
    np.testing.assert_allclose(load_basis(built), load_basis(store.path), atol=1e-5)
    a = {r["id"]: r["sketch"] for r in store.take(list(range(store.count())), ["id", "sketch"]).to_pylist()}
    b_store = Store.open(built)
    b = {r["id"]: r["sketch"] for r in b_store.take(list(range(b_store.count())), ["id", "sketch"]).to_pylist()}
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4)
    args = [
        "query",
        "--store",
        str(tmp_path / "store"),
        "-v",
        str(tmp_path / "val.jsonl"),
        "--top-k",
        "3",
        "--quiet",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
    ]
    exact = cli.invoke(main, args + ["--exact"])
    approx = cli.invoke(main, args + ["--candidates", str(len(toy_rows))])
    assert exact.exit_code == 0 and approx.exit_code == 0, approx.output
    assert [json.loads(x)["train_id"] for x in exact.output.splitlines()] == [
        json.loads(x)["train_id"] for x in approx.output.splitlines()
    ]
    bad = cli.invoke(main, args + ["--candidates", "3", "--exact"])
    assert bad.exit_code == 2
    # a batch of validation samples: the union of their candidates read once, said on stderr
    out = tmp_path / "top.jsonl"
    res = cli.invoke(main, args + ["--candidates", "3", "-o", str(out)])
    assert res.exit_code == 0 and out.exists(), res.output
    assert "candidate rows" in res.stderr and "read once for all" in res.stderr
    assert "the best by the second stage of" in res.stderr and "FAISS candidates" in res.stderr


def test_needs_more_asks_for_candidates_while_the_top_k_reaches_their_last_quarter():
    from forvalue.engine.prefilter import needs_more

    k = 100
    scored = np.arange(1000, dtype=np.float64)  # the top-100: scores 900..999
    clear = scored[::-1].copy()  # FAISS order = exact order: the top-k sits in the first tenth
    assert not needs_more(clear, scored, k)
    late = clear.copy()
    late[-5:], late[:5] = clear[:5], clear[-5:]  # 5 of the top-k last (more than 4% of k)
    assert needs_more(late, scored, k)
    late[-5] = clear[-5]  # 4 of them: no more
    assert not needs_more(late, scored, k)
    assert not needs_more(clear[:50], scored[:50], k)  # fewer scored rows than k: nothing to compare with
    assert not needs_more(np.zeros(0), scored, k)


def test_adaptive_candidates_batch_equals_alone_exact_scores_and_names_the_unsettled(
    sketched_store, tiny_runner, monkeypatch
):
    """Adaptive candidates: the rounds of a batch query give every sample the rows, candidate count and exact
    scores a query of it alone gets; a sample whose test still asks for more at the most is named unsettled."""
    import forvalue.engine.prefilter as qp
    from forvalue.engine.validation import encode_validation, load_validation_samples
    from forvalue.schemas.config import DataConfig

    tmp, train, _ = sketched_store
    store = Store.open(tmp / "store")
    val = encode_validation(
        tiny_runner, load_validation_samples([tmp / "val.jsonl"], DataConfig()), store.manifest, DataConfig(), 8
    )
    k = 10
    cfg = QueryConfig(top_k=k, progress=False, candidates=k, read_rows=7)  # the default most: 8 x 10 rows
    t: dict = {}
    scores, rows = qp.prefilter_topk(store, val, cfg, "cpu", timings=t).result()
    assert len(set(t["candidates"].tolist())) > 1 and max(t["candidates"]) > k  # some samples took more rounds
    assert t["rows_read"] <= int(sum(t["candidates"]))  # each round's union read once
    for j in range(len(val)):
        tj: dict = {}
        s1, r1 = qp.prefilter_topk(store, val.subset([j]), cfg, "cpu", timings=tj).result()
        assert r1[0].tolist() == rows[j].tolist() and s1[0].tolist() == scores[j].tolist()
        assert tj["candidates"].tolist() == [t["candidates"][j]] and tj["unsettled"] == (
            [0] if j in t["unsettled"] else []
        )
    exact = qp.prefilter_topk(store, val, cfg, "cpu", candidates=store.count()).result()
    full = dict(zip(exact[1][0].tolist(), exact[0][0].tolist()))
    assert all(full[r] == pytest.approx(s, rel=1e-12) for r, s in zip(rows[0].tolist(), scores[0].tolist()))

    # a test that always asks for more: every sample reaches the most and is named, in the API and on stderr
    monkeypatch.setattr(qp, "needs_more", lambda *a: True)
    cfg = QueryConfig(top_k=k, progress=False, candidates=k, max_candidates=2 * k + 1)
    res = run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner)
    assert res.candidates == [2 * k + 1] * len(val) and len(res.unsettled) == len(val)
    from click.testing import CliRunner

    from forvalue.cli import main

    args = ["query", "--store", str(tmp / "store"), "-v", str(tmp / "val.jsonl"), "--top-k", str(k), "--quiet"]
    out = CliRunner().invoke(main, args + ["--candidates", str(k), "--max-candidates", str(2 * k + 1)])
    assert out.exit_code == 0, out.output
    assert f"warning: {len(val)} validation sample(s)" in out.stderr and "--max-candidates" in out.stderr
    assert f"at {2 * k + 1} candidates" in out.stderr
    # a validation file that gives one sample twice: two columns, one name in the warning
    twice = tmp / "val_twice.jsonl"
    lines = (tmp / "val.jsonl").read_text().splitlines()
    twice.write_text("\n".join(lines + lines[:1]) + "\n")
    args[4] = str(twice)
    out = CliRunner().invoke(main, args + ["--candidates", str(k), "--max-candidates", str(2 * k + 1)])
    assert out.exit_code == 0, out.output
    assert f"warning: {len(val)} validation sample(s)" in out.stderr, out.stderr
    # every row a candidate: nothing left unread, so never unsettled
    res = run_query(
        tmp / "store",
        [tmp / "val.jsonl"],
        QueryConfig(top_k=k, progress=False, candidates=store.count()),
        runner=tiny_runner,
    )
    assert res.unsettled == [] and res.candidates == [store.count()] * len(val)


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"candidates": 10, "max_candidates": 9}, "--max-candidates (9) is below --candidates (10)"),
        ({"max_candidates": 9, "exact": True}, "--max-candidates and --exact"),
        ({"max_candidates": 0}, "max_candidates: must be >= 1"),
        # through the API, not whole numbers: 2.5 was kept and failed in FAISS (a TypeError after the model ran),
        # True passed as 1, "5" raised a TypeError
        ({"candidates": 2, "max_candidates": 2.5}, "max_candidates: must be a whole number, got 2.5"),
        ({"max_candidates": True}, "max_candidates: must be a whole number, got True"),
        ({"max_candidates": "5"}, "max_candidates: must be a whole number, got '5'"),
        ({"candidates": 1.5}, "candidates: must be a whole number, got 1.5"),
    ],
)
def test_max_candidates_refuses_what_cannot_hold(kwargs, flag):
    from forvalue.schemas.errors import ConfigError

    with pytest.raises(ConfigError, match=flag.replace("(", r"\(").replace(")", r"\)")):
        QueryConfig(**kwargs)


@pytest.mark.parametrize("name", ["candidates", "max_candidates"])
def test_ray_engine_refuses_prefilter_settings_before_any_work(tmp_path, name):
    from forvalue.schemas.config import EngineConfig
    from forvalue.schemas.errors import ConfigError

    with pytest.raises(ConfigError, match="--engine ray scores every stored sample"):
        run_query(
            tmp_path / "no-store", [tmp_path / "no.jsonl"], QueryConfig(**{name: 5}), engine=EngineConfig(engine="ray")
        )
    assert not (tmp_path / "no-store").exists()


def _encoded_val(tmp, store, tiny_runner):
    from forvalue.engine.validation import encode_validation, load_validation_samples
    from forvalue.schemas.config import DataConfig

    return encode_validation(
        tiny_runner, load_validation_samples([tmp / "val.jsonl"], DataConfig()), store.manifest, DataConfig(), 8
    )


def test_adaptive_candidates_grow_to_the_top_k_when_fewer_were_asked(sketched_store, tiny_runner):
    """--candidates below --top-k: the candidates may double (default most 8 x), so every sample gets its k rows,
    the exact top-k of the rows it scored; a fixed count below k cannot, and names the samples whose top-k it
    could not fill (it silently returned fewer than k rows and no warning)."""
    import forvalue.engine.prefilter as qp

    tmp, train, _ = sketched_store
    store = Store.open(tmp / "store")
    val = _encoded_val(tmp, store, tiny_runner)
    k = 5
    t: dict = {}
    scores, rows = qp.prefilter_topk(
        store, val, QueryConfig(top_k=k, progress=False, candidates=2), "cpu", timings=t
    ).result()
    assert rows.shape == (len(val), k) and (rows >= 0).all() and min(t["candidates"]) >= k
    fixed: dict = {}
    cfg = QueryConfig(top_k=k, progress=False, candidates=2, max_candidates=2)
    _, rows = qp.prefilter_topk(store, val, cfg, "cpu", timings=fixed).result()
    assert rows.shape == (len(val), 2) and fixed["unsettled"] == list(range(len(val)))


class _ShortLists:
    """A FAISS index that, like an IVF index whose probed lists hold few rows, returns only 2 rows (then -1
    padding) for one query."""

    def __init__(self, index, short):
        self.index, self.short = index, short
        self.rerank, self.rows = index.rerank, index.rows

    def search(self, queries, k, nprobe=None):
        d, r = self.index.search(queries, k, nprobe)
        for i, q in enumerate(queries):
            if np.array_equal(q, self.short):
                d[i, 2:], r[i, 2:] = -np.inf, -1
        return d, r

    def to_gpu(self):
        pass


def test_a_sample_faiss_returns_few_rows_for_neither_truncates_the_others_nor_passes_as_settled(
    sketched_store, tiny_runner, monkeypatch
):
    """FAISS padding (-1) for one validation sample (an IVF index's probed lists run out) cut every sample of the
    batch to that sample's row count (a batch result then differs from the sample alone), and that sample was taken
    as 'every row found': no more candidates and not named unsettled, though the store holds more rows."""
    import forvalue.engine.prefilter as qp

    tmp, train, test = sketched_store
    store = Store.open(tmp / "store")
    val = _encoded_val(tmp, store, tiny_runner)
    spec = SketchSpec.from_manifest(store.manifest)
    short = qp.validation_sketches(val, spec, basis=load_basis(store.path))[0]
    index = _ShortLists(faiss_index.ensure(store), short)
    k = 4
    cfg = QueryConfig(top_k=k, progress=False, candidates=8)
    t: dict = {}
    scores, rows = qp.prefilter_topk(store, val, cfg, "cpu", index=index, timings=t).result()
    assert t["unsettled"] == [0] and (rows[0, :2] >= 0).all() and (rows[0, 2:] < 0).all()
    for j in range(1, len(val)):
        s1, r1 = qp.prefilter_topk(store, val.subset([j]), cfg, "cpu", index=index).result()
        assert r1[0].tolist() == rows[j].tolist() and len(r1[0]) == k
    monkeypatch.setattr(qp.faiss_index, "ensure", lambda store, **kw: index)
    res = run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner)
    counts = [sum(r["validation_id"] == s["id"] for r in res.top.to_pylist()) for s in test]
    assert counts == [2] + [k] * (len(test) - 1) and res.unsettled == [test[0]["id"]]


@pytest.mark.parametrize("name", ["candidates", "max_candidates"])
def test_a_prefilter_setting_refused_with_all_scores_leaves_nothing_behind(sketched_store, tiny_runner, tmp_path, name):
    """--max-candidates (or --candidates) with --all-scores is refused, but the score file's writer was opened
    first: its folder and a '.s.parquet.<pid>.<hex>.tmp' file stayed behind."""
    from forvalue.schemas.errors import ForValueError

    tmp, _, _ = sketched_store
    out = tmp_path / "out"
    with pytest.raises(ForValueError, match="--all-scores"):
        run_query(
            tmp / "store",
            [tmp / "val.jsonl"],
            QueryConfig(progress=False, **{name: 5}),
            runner=tiny_runner,
            all_scores_path=out / "s.parquet",
        )
    assert not out.exists() or not any(out.iterdir())


def test_cli_summary_never_reranks_more_rows_than_the_store_holds(sketched_store, tiny_model_dir):
    """The adaptive rounds read each round's union once, so a row read for one sample in round 1 and for another in
    round 2 counted twice: 'reranked 105 FAISS candidate rows of 60 (read once for all ...)' on a 60-row store."""
    import re

    from click.testing import CliRunner

    from forvalue.cli import main

    tmp, _, _ = sketched_store
    args = ["query", "--store", str(tmp / "store"), "-v", str(tmp / "val.jsonl"), "--top-k", "5", "--quiet"]
    args += ["--model", str(tiny_model_dir), "--device", "cpu", "--candidates", "8", "-o", str(tmp / "top8.jsonl")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    reranked, total = map(int, re.search(r"reranked (\d+) candidate rows of (\d+)", res.stderr).groups())
    assert total == Store.open(tmp / "store").count() and reranked <= total  # (other tests append rows)


def test_heavy_ids_get_buckets_of_their_own_and_the_rest_is_unchanged_without_them():
    """--sketch-heavy-ids H: bucket j of every block holds id heavy[j] alone (sign +1), so the heavy ids' part of
    <z(G_v), z(G_i)> is their exact part; every other id is count-sketched into the other buckets. Without heavy
    ids the tables are those of before (stored sketches stay valid)."""
    from forvalue.indexer.sketch import fit_heavy_ids

    rng = np.random.default_rng(4)
    hidden, ids, values, lengths = _random_samples(rng, n_samples=8)
    basis = fit_basis(hidden, 2)
    plain = SketchSpec(2 * 64 * 2, 64, 2, 5, 500, 32, "fitted")
    base = Sketcher(plain, basis=basis).table.numpy()
    old_rng = np.random.default_rng([5, 1])  # the tables of before heavy ids existed
    buckets = old_rng.integers(0, 64, size=(500, 2))
    signs = old_rng.integers(0, 2, size=(500, 2), dtype=np.int8).astype(np.float32) * 2 - 1
    want = np.zeros((500, 128), np.float32)
    np.put_along_axis(want, buckets + np.arange(2) * 64, signs, axis=1)
    np.testing.assert_array_equal(base, want)

    heavy = fit_heavy_ids(hidden, ids, values, basis, 16, 500)
    along = np.abs(values * (hidden @ basis[:, :1]))
    mass = np.bincount(ids.ravel(), weights=along.ravel(), minlength=500)
    assert (
        heavy.tolist() == np.argsort(-mass, kind="stable")[:16].tolist()
        and mass[heavy].min() >= np.delete(mass, heavy).max()
    )
    spec = SketchSpec(2 * 64 * 2, 64, 2, 5, 500, 32, "fitted", heavy=16)
    sk = Sketcher(spec, basis=basis, heavy_ids=heavy)
    table = sk.table.numpy()
    for t in range(2):
        block = table[:, t * 64 : (t + 1) * 64]
        np.testing.assert_array_equal(block[:, :16], np.eye(500, dtype=np.float32)[:, heavy])  # one id each, +1
        rest = np.setdiff1d(np.arange(500), heavy)
        assert (np.abs(block[rest, 16:]).sum(1) == 1).all()  # every other id: one bucket of the others
    # the heavy buckets' share of the inner product is exact
    z = sk.sketch(hidden, ids, values, lengths).astype(np.float64)
    off = np.concatenate([[0], np.cumsum(lengths)])
    gs = []
    for j in range(2):
        g = np.zeros((500, 32))
        for k in range(off[j], off[j + 1]):
            np.add.at(g, ids[k], values[k][:, None] * hidden[k][None, :].astype(np.float64))
        gs.append(g @ basis)
    zz = z[:2].reshape(2, 2, 64, 2)[:, :, :16]  # (sample, block, heavy bucket, column)
    exact_heavy = float((gs[0][heavy] * gs[1][heavy]).sum())
    assert float((zz[0] * zz[1]).sum()) == pytest.approx(exact_heavy, rel=1e-4)  # blocks scaled 1/sqrt(T) each
    for bad in (None, heavy[:8], np.concatenate([heavy[:15], heavy[:1]]), heavy + 1000):
        with pytest.raises(Exception, match="heavy ids"):
            Sketcher(spec, basis=basis, heavy_ids=bad)
    with pytest.raises(Exception, match="fitted"):
        SketchSpec(128, 64, 2, 5, 500, 32, "gaussian", heavy=16)
    with pytest.raises(Exception, match="below the 64"):
        SketchSpec(128, 64, 2, 5, 500, 32, "fitted", heavy=64)


def test_a_store_with_heavy_ids_builds_sketches_queries_checks_and_converts(tmp_path, tiny_model_dir, tiny_runner):
    """A build with --sketch-heavy-ids publishes STORE/sketch_vocab.npy before its first sketched row; the column
    equals what 'index sketch' computes on a store built without it; queries find the exact top-k; a lost or
    garbled vocabulary is one line in check and query, repaired by 'index sketch --rebuild'; convert copies it."""
    from conftest import assert_one_line_error, cli

    import forvalue
    from forvalue.maintenance import check_store
    from forvalue.storage.sketch_basis import heavy_ids_path, load_heavy_ids

    train, test = _task_rows(6, 2)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", test)
    model = ModelConfig(path=str(tiny_model_dir), device="cpu")
    shape = dict(sketch_dim=256, sketch_vocab_buckets=128, sketch_hidden_cols=2)
    cfg = BuildConfig(model=model, progress=False, encode=EncodeConfig(**shape, sketch_heavy_ids=16))
    build_index([tmp_path / "train.jsonl"], tmp_path / "heavy", cfg, runner=tiny_runner)
    heavy_store = Store.open(tmp_path / "heavy")
    heavy = load_heavy_ids(heavy_store.path)
    assert heavy_store.manifest.sketch_heavy_ids == 16 and heavy.shape == (16,) and np.unique(heavy).size == 16
    assert check_store(heavy_store.path).clean
    # the same rows built without heavy ids, then sketched with them: the same ids and the same column
    plain = BuildConfig(model=model, progress=False, encode=EncodeConfig(**shape))
    build_index([tmp_path / "train.jsonl"], tmp_path / "plain", plain, runner=tiny_runner)
    assert load_heavy_ids(tmp_path / "plain") is None
    res = cli("index", "sketch", "--store", tmp_path / "plain", "--sketch-heavy-ids", "16", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["heavy_ids"] == 16
    np.testing.assert_array_equal(load_heavy_ids(tmp_path / "plain"), heavy)
    a = heavy_store.take(list(range(heavy_store.count())), ["id", "sketch"]).to_pylist()
    plain_store = Store.open(tmp_path / "plain")
    b = {r["id"]: r["sketch"] for r in plain_store.take(list(range(plain_store.count())), ["id", "sketch"]).to_pylist()}
    for r in a:
        np.testing.assert_allclose(r["sketch"], b[r["id"]], rtol=2e-3, atol=2e-3)
    # every row a candidate: the exact top-k
    k, n = 5, heavy_store.count()
    exact = run_query(
        tmp_path / "heavy",
        [tmp_path / "val.jsonl"],
        QueryConfig(top_k=k, progress=False, exact=True),
        runner=tiny_runner,
    )
    approx = run_query(
        tmp_path / "heavy",
        [tmp_path / "val.jsonl"],
        QueryConfig(top_k=k, progress=False, candidates=n),
        runner=tiny_runner,
    )
    assert _top_ids(exact, k) == _top_ids(approx, k)
    # the vocabulary lost, then garbled: check and a query name it; a rebuild repairs
    query = ["query", "--store", tmp_path / "heavy", "-v", tmp_path / "val.jsonl", "--device", "cpu", "--quiet"]
    for damage in (b"", b"not an npy file"):
        if damage:
            heavy_ids_path(tmp_path / "heavy").write_bytes(damage)
        else:
            heavy_ids_path(tmp_path / "heavy").unlink()
        report = check_store(tmp_path / "heavy")
        assert not report.clean and any("sketch_vocab" in p and "--rebuild" in p for p in report.problems), report
        assert_one_line_error(cli(*query, "--candidates", "5"), "sketch", "--rebuild")
        assert cli("index", "sketch", "--store", tmp_path / "heavy", "--rebuild").exit_code == 0
        assert check_store(tmp_path / "heavy").clean
        np.testing.assert_array_equal(load_heavy_ids(tmp_path / "heavy"), heavy)
    # convert (int8 hidden states) copies the vocabulary with the basis
    out = forvalue.open(tmp_path / "heavy").convert(tmp_path / "int8", hidden_dtype="int8", progress=False)
    assert out.manifest.sketch_heavy_ids == 16
    np.testing.assert_array_equal(load_heavy_ids(out.path), heavy)
    assert check_store(out.path).clean
    # refused before any work: more heavy ids than buckets, or with a random basis
    bad = cli("index", "sketch", "--store", tmp_path / "plain", "--sketch-heavy-ids", "200")
    assert_one_line_error(bad, "heavy")
    with pytest.raises(Exception, match="sketch_heavy_ids"):
        EncodeConfig(**shape, sketch_heavy_ids=128)
    with pytest.raises(Exception, match="fitted"):
        EncodeConfig(**shape, sketch_heavy_ids=8, sketch_basis="gaussian")


@pytest.fixture(scope="module")
def heavy_store(tmp_path_factory, tiny_model_dir, tiny_runner):
    """A tiny store with --sketch-heavy-ids 16 (6 rows), a second data file and a validation file; tests copy it."""
    tmp = tmp_path_factory.mktemp("heavy")
    train, test = _task_rows(10, 2)
    write_jsonl(tmp / "train.jsonl", train[:6])
    write_jsonl(tmp / "more.jsonl", train[6:9])
    write_jsonl(tmp / "val.jsonl", test)
    encode = EncodeConfig(sketch_dim=256, sketch_vocab_buckets=128, sketch_hidden_cols=2, sketch_heavy_ids=16)
    cfg = BuildConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False, encode=encode)
    build_index([tmp / "train.jsonl"], tmp / "store", cfg, runner=tiny_runner)
    return tmp


def _copy_heavy(heavy_store, tmp_path):
    import shutil

    shutil.copytree(heavy_store / "store", tmp_path / "store")
    return tmp_path / "store"


def _column_matches_manifest(path) -> bool:
    """The stored sketches are those the manifest's sketch (with the store's basis and heavy ids) computes."""
    from forvalue.engine.scorer import decode_block
    from forvalue.indexer.sketch import get_sketcher
    from forvalue.schemas.tables import SCORING_COLUMNS
    from forvalue.storage.sketch_basis import load_heavy_ids

    store = Store.open(path)
    spec = SketchSpec.from_manifest(store.manifest)
    sk = get_sketcher(spec, load_basis(path), heavy_ids=load_heavy_ids(path) if spec.heavy else None)
    for batch in store.scan(store.columns_for(SCORING_COLUMNS) + ["sketch"]):
        b = decode_block(batch, store.manifest.stored_width)
        z = sk.sketch(b.hidden, b.ids, b.values, b.lengths)
        col = np.array(batch.column("sketch").to_pylist(), np.float32)
        if not np.allclose(col, z, rtol=2e-3, atol=2e-3 * np.abs(z).max()):
            return False
    return True


def test_index_add_to_a_heavy_store_encodes_with_its_heavy_ids(heavy_store, tmp_path):
    """'index add' takes every encoding setting from the store, but left out sketch_heavy_ids: appending to any store
    built with --sketch-heavy-ids was refused ('sketch_heavy_ids: store has 16, you have 0; ... use forvalue index
    add', the very command run)."""
    from conftest import cli

    from forvalue.maintenance import check_store
    from forvalue.storage.sketch_basis import load_heavy_ids

    store = _copy_heavy(heavy_store, tmp_path)
    before = load_heavy_ids(store)
    res = cli("index", "add", heavy_store / "more.jsonl", "--store", store, "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    assert Store.open(store).count() == 9 and check_store(store).clean
    np.testing.assert_array_equal(load_heavy_ids(store), before)
    assert _column_matches_manifest(store)


def test_a_lost_sketch_vocab_is_not_refitted_from_the_rows_being_appended(heavy_store, tmp_path):
    """A store's sketch_vocab.npy (or sketch_basis.npy) lost, 'index add' fitted a new one from the appended rows
    and published it: the stored rows' sketches were computed with the old ids, 'index check' said clean and the
    prefilter's candidates were silently wrong. Refused now (one line, nothing written); --rebuild, then add."""
    from conftest import assert_one_line_error, cli

    from forvalue.maintenance import check_store
    from forvalue.storage.sketch_basis import basis_path, heavy_ids_path

    store = _copy_heavy(heavy_store, tmp_path)
    add = ["index", "add", heavy_store / "more.jsonl", "--store", store, "--device", "cpu", "--quiet"]
    for lost, name in ((heavy_ids_path(store), "sketch_vocab.npy"), (basis_path(store), "sketch_basis.npy")):
        lost.unlink()
        assert_one_line_error(cli(*add), name, "--rebuild")
        assert not lost.exists() and Store.open(store).count() == 6
        assert cli("index", "sketch", "--store", store, "--rebuild").exit_code == 0
    assert cli(*add).exit_code == 0 and Store.open(store).count() == 9
    assert check_store(store).clean and _column_matches_manifest(store)


def test_an_empty_sketch_file_is_one_line_and_index_sketch_rebuild_repairs_it(heavy_store, tmp_path):
    """An empty sketch_vocab.npy / sketch_basis.npy (a crash while it was written, a full disk) raised EOFError,
    which click turns into 'Aborted!' with exit 1, in check, in queries, and in 'index sketch --rebuild' itself
    (so the advertised repair could not run)."""
    from conftest import assert_one_line_error, cli

    from forvalue.maintenance import check_store
    from forvalue.storage.sketch_basis import basis_path, heavy_ids_path

    store = _copy_heavy(heavy_store, tmp_path)
    query = ["query", "--store", store, "-v", heavy_store / "val.jsonl", "--device", "cpu", "--quiet"]
    for empty in (heavy_ids_path(store), basis_path(store)):
        empty.write_bytes(b"")
        assert_one_line_error(cli("index", "check", "--store", store), empty.name, "--rebuild")
        assert_one_line_error(cli(*query, "--candidates", "3"), empty.name, "--rebuild")
        res = cli("index", "sketch", "--store", store, "--rebuild")
        assert res.exit_code == 0, res.output
        assert check_store(store).clean and _column_matches_manifest(store)


def test_a_stale_sketch_vocab_left_by_dropping_heavy_ids_is_not_read(heavy_store, tmp_path):
    """'index sketch --sketch-heavy-ids 0' leaves the old sketch_vocab.npy; queries read it even though the sketch
    has no heavy ids, so a damaged one failed every prefiltered query ('run index sketch --rebuild', which, keeping
    no heavy ids, never rewrites the file) while 'index check' said clean."""
    from conftest import cli

    from forvalue.maintenance import check_store
    from forvalue.storage.sketch_basis import heavy_ids_path

    store = _copy_heavy(heavy_store, tmp_path)
    heavy_ids_path(store).write_bytes(b"not an npy file")
    assert cli("index", "sketch", "--store", store, "--sketch-heavy-ids", "0").exit_code == 0
    assert Store.open(store).manifest.sketch_heavy_ids == 0 and check_store(store).clean
    query = ["query", "--store", store, "-v", heavy_store / "val.jsonl", "--device", "cpu", "--quiet"]
    res = cli(*query, "--candidates", "3")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("switch", [(16, 0), (0, 16)])
def test_index_sketch_killed_before_the_manifest_while_switching_heavy_ids(heavy_store, tmp_path, monkeypatch, switch):
    """'index sketch' wrote the new column, then the manifest: a kill in between when only the heavy ids change (the
    same width) left sketches of one vocabulary hashing under a manifest of the other, and 'index check' said clean
    (silently wrong candidates). The manifest is now written first, so a kill leaves a missing column that check
    and a query name and a re-run recomputes."""
    from conftest import assert_one_line_error, cli

    import forvalue
    import forvalue.storage.store as store_module
    from forvalue.maintenance import check_store

    store = _copy_heavy(heavy_store, tmp_path)
    first, second = switch
    if first != 16:
        assert cli("index", "sketch", "--store", store, "--sketch-heavy-ids", str(first)).exit_code == 0

    def kill(*args, **kwargs):
        raise KeyboardInterrupt

    for killed in ("write_text", "add_columns"):
        with monkeypatch.context() as m:
            if killed == "write_text":
                m.setattr(store_module, "write_text", kill)
            else:
                import lance

                m.setattr(lance.LanceDataset, "add_columns", kill)
            with pytest.raises(KeyboardInterrupt):
                forvalue.open(store).sketch(heavy_ids=second)
        report = check_store(store)
        assert report.clean is False or _column_matches_manifest(store), report
        assert not report.clean and any("index sketch" in p and "--rebuild" in p for p in report.problems), report
        query = ["query", "--store", store, "-v", heavy_store / "val.jsonl", "--device", "cpu", "--quiet"]
        assert_one_line_error(cli(*query, "--candidates", "3"), "index sketch", "--rebuild")
    assert cli("index", "sketch", "--store", store, "--sketch-heavy-ids", str(second)).exit_code == 0
    assert check_store(store).clean and _column_matches_manifest(store)
    assert Store.open(store).manifest.sketch_heavy_ids == second


def test_convert_of_a_store_with_a_bad_sketch_vocab_leaves_no_output(heavy_store, tmp_path):
    """A source whose sketch_vocab.npy holds the wrong number of ids (an interrupted 'index sketch') was copied into
    the output before the sketcher refused it: a half-made output, an error not naming the store, and after the
    source was repaired every re-run failed the same way (the output's bad copy is kept: publish if absent)."""
    from conftest import assert_one_line_error, cli

    from forvalue.maintenance import check_store
    from forvalue.storage.sketch_basis import heavy_ids_path, load_heavy_ids

    store = _copy_heavy(heavy_store, tmp_path)
    good = load_heavy_ids(store)
    np.save(heavy_ids_path(store), good[:8])
    out = tmp_path / "out"
    convert = ["index", "convert", "--store", store, "--out", out, "--hidden-dtype", "int8", "--quiet"]
    assert_one_line_error(cli(*convert), str(store), "sketch_vocab.npy", "--rebuild")
    assert not out.exists()
    assert cli("index", "sketch", "--store", store, "--rebuild").exit_code == 0
    assert cli(*convert).exit_code == 0
    np.testing.assert_array_equal(load_heavy_ids(out), good)
    assert check_store(out).clean


def test_plain_index_sketch_repairs_a_heavy_id_list_of_the_wrong_length(tmp_path, tiny_model_dir, tiny_runner):
    """'index sketch' (no --rebuild) recomputes a sketch whose sketch_vocab.npy is absent or unreadable; a readable
    list of the wrong length (or with repeats, or ids beyond the vocabulary) is as unusable and is refitted too."""
    from forvalue.maintenance import check_store
    from forvalue.storage.sketch_basis import load_heavy_ids, publish_heavy_ids

    train, _ = _task_rows(4, 1)
    write_jsonl(tmp_path / "train.jsonl", train)
    encode = EncodeConfig(sketch_dim=256, sketch_vocab_buckets=128, sketch_hidden_cols=2, sketch_heavy_ids=8)
    cfg = BuildConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False, encode=encode)
    build_index([tmp_path / "train.jsonl"], tmp_path / "s", cfg, runner=tiny_runner)
    good = load_heavy_ids(tmp_path / "s")
    for bad in (good[:5], np.concatenate([good[:7], good[:1]]), np.append(good[:7], 10**6)):
        publish_heavy_ids(tmp_path / "s", bad, replace=True)
        assert not check_store(tmp_path / "s").clean
        report = forvalue.open(tmp_path / "s").sketch()
        assert report.sketched and check_store(tmp_path / "s").clean
        np.testing.assert_array_equal(load_heavy_ids(tmp_path / "s"), good)


def test_take_layouts_tool_times_each_layout_of_the_same_rows_and_leaves_nothing(sketched_store, tmp_path):
    """``python -m tools.bench_prefilter --take-layouts N``: the store's rows written again in four layouts of the
    same bytes, each timed; its scratch folder removed, the store untouched, a scratch inside the store refused."""
    from tools.bench_prefilter import main as bench

    tmp, _, _ = sketched_store
    store = tmp / "store"
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    out = tmp_path / "layouts.md"
    assert (
        bench(["--store", str(store), "--take-layouts", "3", "--scratch", str(tmp_path / "s"), "--out", str(out)]) == 0
    )
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "ms" not in line]
    assert len(rows) == 4 and len({line.split("|")[-2].strip() for line in rows[:3]}) == 1  # same MB for the three
    assert list((tmp_path / "s").iterdir()) == []
    with pytest.raises(SystemExit, match="inside the store"):
        bench(["--store", str(store), "--take-layouts", "3", "--scratch", str(store / "x")])
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


class _BestLast:
    """A FAISS index whose search puts a validation sample's true best rows (``ranking[:n]``, by exact score) at
    positions ``at .. at + n - 1`` of its order, the other rows in their exact order before and after them."""

    def __init__(self, index, ranking, n, at):
        self.index, self.rerank, self.rows = index, index.rerank, index.rows
        best, rest = list(ranking[:n]), list(ranking[n:])
        self.order = np.array(rest[:at] + list(best) + rest[at:], np.int64)

    def search(self, queries, k, nprobe=None):
        return np.zeros((len(queries), k), np.float32), np.tile(self.order[:k], (len(queries), 1))

    def to_gpu(self):
        pass


def test_the_pool_deepens_while_the_second_stage_finds_its_best_rows_at_its_end(sketched_store, tiny_runner):
    """The sketch's candidates (the pool) hold a sample's best rows only in their last quarter: the second stage
    ranks them first, so its best rows come from the pool's end and the pool doubles (once: in the larger pool
    they sit in the first half). With a pool of fixed size, the same rows are found, the pool stays."""
    import forvalue.engine.prefilter as qp
    from forvalue.engine.scan import score_all

    tmp, train, _ = sketched_store
    store = Store.open(tmp / "store")
    val = _encoded_val(tmp, store, tiny_runner).subset([0])
    exact = np.concatenate([s[:, 0] for *_, s in score_all(store, val, QueryConfig(progress=False), "cpu")])
    ranking = np.argsort(-exact, kind="stable").tolist()
    best = ranking[:6]
    index = _BestLast(faiss_index.ensure(store), ranking, 6, at=18)  # positions 18-23 of a pool of 24: its end
    k = 4
    t: dict = {}
    cfg = QueryConfig(top_k=k, progress=False, candidates=6, max_candidates=6, pool=24)  # a fixed count
    scores, rows = qp.prefilter_topk(store, val, cfg, "cpu", index=index, timings=t).result()
    assert t["pool"].tolist() == [48]
    assert rows[0].tolist() == best[:k]  # (the stage-2 order on this tiny model finds them among 24 rows)
    np.testing.assert_allclose(scores[0], exact[best[:k]], rtol=1e-9)
    ranked: dict = {}  # a deeper pool scores only its new rows in the second stage, with the same scores
    for pool in (24, 48, 30):
        found = index.order[:pool]
        cached = qp._staged_scores(index.rerank, val, 0, found, "none", ranked)
        np.testing.assert_array_equal(cached, qp._second_stage(index.rerank, val, 0, found, "none"))
    assert ranked[0][0].tolist() == sorted(index.order[:48].tolist())
    late: dict = {}
    qp.prefilter_topk(store, val, cfg, "cpu", index=_BestLast(index.index, ranking, 6, at=0), timings=late)
    assert late["pool"].tolist() == [24]  # the best rows first in the pool: no deeper pool


def test_a_pool_of_every_row_is_never_deepened_nor_called_unsettled_for_it(sketched_store, tiny_runner):
    """The pool holds every stored row: the second stage's best rows coming from its end says nothing (there is no
    deeper pool), and the sample was named unsettled 'at --max-candidates' though it settled at fewer (hostile
    pass: a gaussian-basis store, --pool = the rows)."""
    import forvalue.engine.prefilter as qp
    from forvalue.engine.scan import score_all

    tmp, _, _ = sketched_store
    store = Store.open(tmp / "store")
    n = store.count()
    val = _encoded_val(tmp, store, tiny_runner).subset([0])
    exact = np.concatenate([s[:, 0] for *_, s in score_all(store, val, QueryConfig(progress=False), "cpu")])
    ranking = np.argsort(-exact, kind="stable").tolist()
    index = _BestLast(faiss_index.ensure(store), ranking, 6, at=n - 6)  # the best rows last in FAISS order
    t: dict = {}
    cfg = QueryConfig(top_k=4, progress=False, candidates=10, max_candidates=80, pool=n)
    scores, rows = qp.prefilter_topk(store, val, cfg, "cpu", index=index, timings=t).result()
    assert t["pool"].tolist() == [n] and t["unsettled"] == []
    assert rows[0].tolist() == ranking[:4]


def test_pool_recall_tool_reports_the_pool_s_share_of_the_exact_top_k(tmp_path):
    """``python -m tools.bench_prefilter --pool-recall P1,P2``: per pool size, the share of each sample's exact
    top-k inside FAISS's first P rows (the pool the second stage ranks); an exact (flat) index of a small synthetic
    store: a larger pool holds at least as much, and a pool of every row holds all of it."""
    from tools.bench_prefilter import main as bench
    from tools.make_synthetic_store import main as make

    store = tmp_path / "syn"
    assert make(["--out", str(store), "--rows", "300", "--n-val", "4", "--topics", "10"]) == 0
    out = tmp_path / "pool.md"
    args = ["--store", str(store), "--n-val", "4", "--top-k", "10", "--pool-recall", "20,300", "--refine", "1,16"]
    assert bench([*args, "--out", str(out)]) == 0
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| - |")]
    assert [r[2].strip() for r in rows] == ["20", "300"]  # a flat index: no re-rank factor, one row per pool
    means = [float(r[3].split("/")[0]) for r in rows]
    assert means[0] <= means[1] == 1.0


def test_the_automatic_prefilter_loads_the_index_once_and_needs_one_that_is_there(
    sketched_store, tiny_runner, monkeypatch
):
    """A store of at least AUTO_MIN_ROWS rows with an index is queried through it without being asked: the index is
    read once (deciding read it a first time: 2.3 GB twice at 10^6). Below the size, or without an index file at
    its size, the query is exact."""
    import forvalue.engine.prefilter as qp

    tmp, _, _ = sketched_store
    store = Store.open(tmp / "store")
    faiss_index.ensure(store)
    loads = []
    real_load = faiss_index.load
    monkeypatch.setattr(faiss_index, "load", lambda s: loads.append(1) or real_load(s))
    cfg = QueryConfig(top_k=3, progress=False)
    assert not run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner).prefiltered
    assert loads == []
    monkeypatch.setattr(qp, "AUTO_MIN_ROWS", 1)
    res = run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner)
    assert res.prefiltered and len(loads) == 1
    record = tmp / "store" / faiss_index.INDEX_DIR / faiss_index.META_FILE
    kept = record.read_bytes()
    try:
        record.write_text("{}")  # no index record to take
        assert not faiss_index.present(store)
        assert not run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner).prefiltered
        meta = json.loads(kept)
        record.write_text(json.dumps({**meta, "from_column": False, "file": "gone.faiss", "bytes": 10}))
        assert not faiss_index.present(store)  # a record naming a file that is not there
    finally:
        record.write_bytes(kept)
    assert faiss_index.present(store)


@pytest.mark.parametrize("variant", [{"whiten": 0.1}, {"center": "mean"}, {"whiten": "auto"}, {"normalize": "cosine"}])
@pytest.mark.parametrize("asked", [{"candidates": 20}, {"max_candidates": 50}, {"pool": 100}])
def test_prefilter_settings_are_refused_with_a_score_variant_and_the_automatic_path_scans_exactly(
    sketched_store, tiny_runner, monkeypatch, tmp_path, variant, asked
):
    """The sketches and the second stage hold the raw G_i: a whitened or centred top-k taken from raw-score candidates
    missed rows without a warning (hostile pass: recall@10 0.96 / min 0.70 on a SmolLM2 store at --whiten 0.1). Asking
    for the prefilter with a variant is one line before any work; the automatic prefilter scans exactly instead."""
    from click.testing import CliRunner

    import forvalue.engine.prefilter as qp
    from forvalue.cli import main
    from forvalue.schemas.errors import ConfigError

    flag = "--" + next(iter(asked)).replace("_", "-")
    with pytest.raises(ConfigError, match=f"{flag}.*raw score.*--exact"):
        QueryConfig(**asked, **variant)
    tmp, _, _ = sketched_store
    option, value = next(iter(variant.items()))
    args = ["query", "--store", str(tmp / "store"), "-v", str(tmp / "val.jsonl"), flag, str(next(iter(asked.values())))]
    out = tmp_path / "top.jsonl"
    res = CliRunner().invoke(main, [*args, "--" + option, str(value), "-o", str(out)])
    assert res.exit_code == 2 and "--exact" in res.output and "Traceback" not in res.output
    assert not out.exists()
    if variant == {"whiten": 0.1}:  # the automatic path on a store past AUTO_MIN_ROWS: exact, the same top-k
        monkeypatch.setattr(qp, "AUTO_MIN_ROWS", 1)
        auto = run_query(
            tmp / "store", [tmp / "val.jsonl"], QueryConfig(top_k=3, progress=False, **variant), runner=tiny_runner
        )
        exact = run_query(
            tmp / "store",
            [tmp / "val.jsonl"],
            QueryConfig(top_k=3, progress=False, exact=True, **variant),
            runner=tiny_runner,
        )
        assert not auto.prefiltered and auto.top.to_pylist() == exact.top.to_pylist()


def test_a_prefilter_error_while_another_process_writes_the_store_names_the_writer(
    sketched_store, tiny_runner, monkeypatch
):
    """A query beside 'index sketch --rebuild' met the sketch half rewritten and said to run 'index sketch --rebuild'
    (hostile pass, 4 of 5 queries). While a writer holds the store's lease, a prefilter error names the writer and
    says to query again; without one, the error is the store's own."""
    import forvalue.engine.prefilter as qp
    from forvalue.schemas.errors import ConfigError, StoreError
    from forvalue.storage.store import WriterLease, writer_of

    tmp, _, _ = sketched_store

    def torn(*args, **kwargs):
        raise StoreError("a fitted sketch needs its (32, 4) basis, got (32, 2); run 'forvalue index sketch --rebuild'")

    monkeypatch.setattr(qp, "prefilter_topk", torn)
    cfg = QueryConfig(top_k=3, progress=False, candidates=10)
    with pytest.raises(StoreError, match="needs its"):
        run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner)
    assert writer_of(tmp / "store") is None
    with WriterLease.acquire(tmp / "store", sharded=False):
        assert "pid" in writer_of(tmp / "store")
        with pytest.raises(StoreError, match=r"another process is writing the store \(pid .*query again.*--exact"):
            run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner)
        with pytest.raises(ConfigError, match="--all-scores"):  # the user's own settings: their error, writer or not
            run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner, keep_scores=True)
    assert writer_of(tmp / "store") is None
    WriterLease.acquire(tmp / "store").release()  # the probe left no lock behind
    manifest = tmp / "store" / "manifest.json"
    kept = manifest.read_bytes()

    def rewritten(*args, **kwargs):  # an 'index sketch' ended while the query ran: no writer now, another manifest
        manifest.write_text(json.dumps({**json.loads(kept), "sketch_seed": 12345}))
        torn()

    monkeypatch.setattr(qp, "prefilter_topk", rewritten)
    try:
        with pytest.raises(StoreError, match=r"rewritten while this query ran.*query again.*--exact"):
            run_query(tmp / "store", [tmp / "val.jsonl"], cfg, runner=tiny_runner)
    finally:
        manifest.write_bytes(kept)


def test_an_index_of_another_sketch_width_is_rebuilt_not_a_traceback(sketched_store, tiny_runner, tmp_path):
    """prefilter.json describing the sketches before a rebuild at another width (a kill of the rebuild, or a
    query beside it) was a bare faiss AssertionError from queries and 'index sketch' (hostile pass): the index
    is stale, so it is made again from the column, and the query's scores are the exact ones."""
    import shutil

    from conftest import cli

    tmp, _, _ = sketched_store
    store = shutil.copytree(tmp / "store", tmp_path / "store")
    faiss_index.ensure(Store.open(store))
    old = (store / "prefilter" / "prefilter.json").read_text()
    res = cli("index", "sketch", "--store", store, "--rebuild", "--sketch-dim", "4096")
    assert res.exit_code == 0, res.output
    (store / "prefilter" / "prefilter.json").write_text(old)  # the width of before
    q = dict(top_k=3, progress=False, device="cpu")
    every = Store.open(store).count()  # every row a candidate: the top-k is the exact one
    pre = run_query(store, [tmp / "val.jsonl"], QueryConfig(candidates=every, **q), runner=tiny_runner)
    exact = run_query(store, [tmp / "val.jsonl"], QueryConfig(exact=True, **q), runner=tiny_runner)
    assert pre.top.column("train_id").to_pylist() == exact.top.column("train_id").to_pylist()
    (store / "prefilter" / "prefilter.json").write_text(old)
    assert cli("index", "sketch", "--store", store).exit_code == 0
    assert faiss_index.load(Store.open(store)).index.d == 4096
