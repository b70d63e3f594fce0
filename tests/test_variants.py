"""Score variants (``center``, ``validation_tokens``) through every path, against float64 references of their own
definitions: the exact query, the prefilter's rerank, the audit scan (G-form and token form), explanations,
cosine, int8 stores, the validation cache, value models and the CLI."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from conftest import assert_one_line_error, cli, write_jsonl

import forvalue
from forvalue.api import build_index, run_query
from forvalue.audit import run_audit
from forvalue.engine.explain import explain
from forvalue.engine.prefilter import prefilter_topk
from forvalue.engine.scan import audit_scan
from forvalue.engine.validation import encode_validation, store_hidden_basis
from forvalue.engine.variant import (
    centre_validation,
    centred_sq_norms,
    shrunk_covariance,
    store_mean,
    store_moments,
    whiten_validation,
    whitened_sq_norms,
)
from forvalue.indexer.data import iter_samples
from forvalue.indexer.sparse_errors import pair_score
from forvalue.schemas.config import (
    AuditConfig,
    BuildConfig,
    DataConfig,
    EncodeConfig,
    ExplainConfig,
    ModelConfig,
    QueryConfig,
)
from forvalue.schemas.errors import ForValueError
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage.rows import decode_block
from forvalue.storage.store import Store

LABELS = ("reverse", "math", "caps")


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        label = LABELS[i % 3]
        prompt, response = {
            "reverse": (f"reverse the words {i}: the quick brown fox ->", " fox brown quick the"),
            "math": (f"solve {i} plus {2 * i} ->", f" answer {3 * i}"),
            "caps": (f"shout this {i}: hello there ->", " HELLO THERE"),
        }[label]
        rows.append({"id": f"{label[0]}{i}", "prompt": prompt, "response": response, "label": label})
    return rows


@pytest.fixture(scope="module", params=["float16", "int8", "int8-rank16"])
def setting(request, tmp_path_factory, tiny_model_dir, tiny_runner):
    """A tiny store with sketches, its raw (uncentred, store-mode) validation encodings and stored rows."""
    tmp = tmp_path_factory.mktemp(f"variants-{request.param}")
    train = write_jsonl(tmp / "train.jsonl", _rows(15))
    val_rows = _rows(5, offset=100) + [{"id": "plain", "text": "the quick brown fox jumps", "label": "caps"}]
    val_path = write_jsonl(tmp / "val.jsonl", val_rows)
    enc = EncodeConfig(
        top_m=4,
        hidden_dtype=request.param.split("-")[0],
        hidden_rank=16 if request.param.endswith("rank16") else 0,  # a low-rank store: scored in its coordinates
        int8_block=0,
        sketch_dim=64,
        sketch_vocab_buckets=8,
        sketch_hidden_cols=2,
    )
    cfg = BuildConfig(
        model=ModelConfig(path=str(tiny_model_dir), device="cpu"), encode=enc, progress=False, write_every=4
    )
    build_index([train], tmp / "store", cfg)
    store = Store.open(tmp / "store")
    samples = list(iter_samples([val_path], DataConfig()))
    table = pa.Table.from_batches(list(store.scan(SCORING_COLUMNS + ["id"])))
    block = decode_block(table, store.manifest.stored_width)
    return dict(
        basis=store_hidden_basis(store),
        tmp=tmp,
        store=store,
        val_path=val_path,
        samples=samples,
        block=block,
        ids=table.column("id").to_pylist(),
    )


def _split(hidden, ids, values, lengths):
    off = np.concatenate([[0], np.cumsum(lengths)])
    return [
        (hidden[off[j] : off[j + 1]], ids[off[j] : off[j + 1]], values[off[j] : off[j + 1]])
        for j in range(len(lengths))
    ]


def _reference(train_block, val, mu=None, cosine=False, metric=None):
    """``(n_train, n_val)`` in float64, one ``pair_score`` per pair of samples, hidden states minus ``mu``; with
    ``metric`` (a matrix ``M``) the validation side's are ``M (h_v - mu)``: ``(h_v - mu)^T M (h_i - mu)``."""
    mu = 0.0 if mu is None else mu
    train = _split(train_block.hidden.astype(np.float64) - mu, train_block.ids, train_block.values, train_block.lengths)
    centred = val.hidden.astype(np.float64) - mu
    vals = _split(centred if metric is None else centred @ metric, val.ids, val.values, val.lengths)
    out = np.array([[pair_score(*v, *t) for v in vals] for t in train])
    if cosine:
        m = np.eye(centred.shape[1]) if metric is None else metric
        nt = np.array([pair_score(h @ m, i, v, h, i, v) for h, i, v in train])
        nv = np.array(
            [pair_score(h @ m, i, v, h, i, v) for h, i, v in _split(centred, val.ids, val.values, val.lengths)]
        )
        out = out / np.sqrt(nt[:, None] * nv[None, :])
    return out


def _metric(store, lam):
    """``(mu, C^-1)`` of the whitening with shrinkage ``lam``, fitted to every stored token in float64 here."""
    mu, cov = store_moments(store)
    return mu, np.linalg.inv(shrunk_covariance(cov, lam))


def _close(got, expected, rtol=2e-4):
    assert np.abs(expected).max() > 1e-6
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_centred_sq_norms_equal_the_pairwise_definition():
    rng = np.random.default_rng(3)
    lengths = np.array([3, 1, 5, 2])
    n = int(lengths.sum())
    hidden = rng.standard_normal((n, 6)) + 2.0
    ids = rng.integers(0, 9, (n, 4))  # repeated ids within and across tokens
    values = rng.standard_normal((n, 4))
    mu = rng.standard_normal(6)
    parts = _split(hidden, ids, values, lengths)
    raw = np.array([pair_score(*p, *p) for p in parts])
    centred = np.array([pair_score(h - mu, i, v, h - mu, i, v) for h, i, v in parts])
    np.testing.assert_allclose(centred_sq_norms(hidden, ids, values, lengths, raw, mu), centred, rtol=1e-10)
    np.testing.assert_allclose(centred_sq_norms(hidden, ids, values, lengths, raw, np.zeros(6)), raw, rtol=1e-12)


def test_store_mean_is_the_mean_of_the_stored_tokens(setting):
    block = setting["block"]
    np.testing.assert_allclose(store_mean(setting["store"]), block.hidden.astype(np.float64).mean(0), rtol=1e-6)
    sub = store_mean(setting["store"], rows=4)  # evenly spaced rows 0, 5, 9, 14
    parts = _split(block.hidden, block.ids, block.values, block.lengths)
    expected = np.concatenate([parts[j][0] for j in (0, 5, 9, 14)]).astype(np.float64).mean(0)
    np.testing.assert_allclose(sub, expected, rtol=1e-6)


@pytest.mark.parametrize("normalize", ["none", "cosine"])
def test_centred_query_equals_the_reference(setting, tiny_runner, normalize):
    store, samples = setting["store"], setting["samples"]
    val = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    mu = store_mean(store)
    cfg = QueryConfig(top_k=3, exact=True, center="mean", normalize=normalize, progress=False, read_rows=4)
    got = run_query(store, samples, cfg, runner=tiny_runner, keep_scores=True).scores
    expected = _reference(setting["block"], val, mu, cosine=normalize == "cosine").T
    _close(got, expected)
    plain = run_query(store, samples, QueryConfig(exact=True, progress=False), runner=tiny_runner, keep_scores=True)
    assert not np.allclose(plain.scores, got)  # centring changes the scores (the test can fail)


@pytest.mark.parametrize("normalize", ["none", "cosine"])
def test_centred_mean_aggregate_equals_the_reference(setting, tiny_runner, normalize):
    store, samples = setting["store"], setting["samples"]
    val = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    mu = store_mean(store)
    cfg = QueryConfig(exact=True, center="mean", normalize=normalize, aggregate="mean", progress=False)
    got = run_query(store, samples, cfg, runner=tiny_runner, keep_scores=True).scores[0]
    per = _reference(setting["block"], val, mu)
    expected = per.mean(axis=1)
    if normalize == "cosine":  # <mean G_v, G_i> / (||mean G_v|| ||G_i||), all centred
        vals = _split(val.hidden.astype(np.float64) - mu, val.ids, val.values, val.lengths)
        gram = np.array([[pair_score(*a, *b) for b in vals] for a in vals])
        train = _split(
            setting["block"].hidden.astype(np.float64) - mu,
            setting["block"].ids,
            setting["block"].values,
            setting["block"].lengths,
        )
        nt = np.array([pair_score(*t, *t) for t in train])
        expected = expected / np.sqrt(gram.mean() * nt)
    _close(got, expected)


@pytest.mark.parametrize("form", ["gform", "token"])
@pytest.mark.parametrize("normalize", ["none", "cosine"])
def test_centred_audit_scan_equals_the_reference(setting, tiny_runner, form, normalize):
    store, samples = setting["store"], setting["samples"]
    raw = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    mu = store_mean(store)
    val = centre_validation(raw, mu)
    labels = [s.label for s in samples]
    scan = audit_scan(store, val, labels, ["caps", "math"], "cpu", normalize=normalize, read_rows=4, form=form)
    _assert_scan_is(scan, _reference(setting["block"], raw, mu, cosine=normalize == "cosine"), labels, form)


def _assert_scan_is(scan, per, labels, form):
    """An audit scan's mean and ``caps`` aggregates are those of the per-pair reference ``per`` (stored x val)."""
    _close(scan.mean, per.mean(axis=1))
    caps = [j for j, l in enumerate(labels) if l == "caps"]
    _close(scan.by_label["caps"], per[:, caps].mean(axis=1))
    assert scan.form == form


def test_centred_prefilter_rerank_equals_the_exact_scan(setting, tiny_runner):
    store, samples = setting["store"], setting["samples"]
    val = centre_validation(
        encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"]), store_mean(store)
    )
    cfg = QueryConfig(top_k=4, center="mean", progress=False, read_rows=4)
    top = prefilter_topk(store, val, cfg, "cpu", candidates=store.count())  # every row a candidate: the exact top-k
    exact = run_query(
        store,
        samples,
        QueryConfig(top_k=4, exact=True, center="mean", progress=False),
        runner=tiny_runner,
        keep_scores=True,
    )
    expected = -np.sort(-exact.scores, axis=1)[:, :4]
    _close(top.scores, expected)


def test_centred_explanation_splits_the_centred_score(setting, tiny_runner):
    store, samples = setting["store"], setting["samples"]
    cfg = (
        ExplainConfig(val_index=1, center="mean", progress=False)
        if hasattr(ExplainConfig, "progress")
        else ExplainConfig(val_index=1, center="mean")
    )
    e = explain(store, [setting["val_path"]], setting["ids"][4], cfg, runner=tiny_runner)
    query = run_query(
        store, samples, QueryConfig(exact=True, center="mean", progress=False), runner=tiny_runner, keep_scores=True
    )
    expected = query.scores[1, 4]
    assert e.score == pytest.approx(expected, rel=2e-4, abs=1e-6 * abs(expected))
    assert float(e.train.per_token().sum()) == pytest.approx(e.score, rel=1e-6, abs=1e-9)
    cos = run_query(
        store,
        samples,
        QueryConfig(exact=True, center="mean", normalize="cosine", progress=False),
        runner=tiny_runner,
        keep_scores=True,
    ).scores[1, 4]
    assert e.cosine == pytest.approx(cos, rel=2e-4)


def test_response_validation_tokens_keep_only_the_response(setting, tiny_runner):
    store, samples = setting["store"], setting["samples"]
    full = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    resp = encode_validation(
        tiny_runner, samples, store.manifest, DataConfig(), tokens="response", basis=setting["basis"]
    )
    for j, s in enumerate(samples):
        off_f = np.concatenate([[0], np.cumsum(full.lengths)])
        off_r = np.concatenate([[0], np.cumsum(resp.lengths)])
        hf, hr = full.hidden[off_f[j] : off_f[j + 1]], resp.hidden[off_r[j] : off_r[j + 1]]
        if s.text is not None:  # a text-only row keeps the store's positions (batched apart: equal to rounding)
            assert resp.lengths[j] == full.lengths[j]
            np.testing.assert_allclose(hr, hf, rtol=1e-5, atol=1e-6)
            continue
        n_resp = tiny_runner.tokenize(s, "response", 512, False).n_scored
        assert 0 < n_resp < full.lengths[j] and resp.lengths[j] == n_resp
        np.testing.assert_allclose(hr, hf[-n_resp:], rtol=1e-5, atol=1e-6)  # the same forward pass, its tail
        np.testing.assert_array_equal(resp.ids[off_r[j] : off_r[j + 1]], full.ids[off_f[j] : off_f[j + 1]][-n_resp:])
    got = run_query(
        store,
        samples,
        QueryConfig(exact=True, validation_tokens="response", center="mean", progress=False),
        runner=tiny_runner,
        keep_scores=True,
    ).scores
    _close(got, _reference(setting["block"], resp, store_mean(store)).T)


def test_audit_variant_is_recorded_cached_and_checked_by_value_models(setting, tiny_runner):
    store = setting["store"]
    val = [setting["val_path"]]
    cfg = AuditConfig(center="mean", validation_tokens="response", normalize="cosine", progress=False)
    run_audit(store, val, "centred", cfg, runner=tiny_runner)
    run_audit(store, val, "plain", AuditConfig(progress=False), runner=tiny_runner)
    st = forvalue.open(store.path)
    table = st.audits["centred"].to_arrow()
    assert st.audits["centred"].info.meta["settings"]["center"] == "mean"
    raw = encode_validation(
        tiny_runner, setting["samples"], store.manifest, DataConfig(), tokens="response", basis=setting["basis"]
    )
    per = _reference(setting["block"], raw, store_mean(store), cosine=True)
    order = [setting["ids"].index(i) for i in table.column("id").to_pylist()]
    _close(table.column("score_mean").to_numpy(), per.mean(axis=1)[order])
    # a second run of the same audit reads every encoding from the cache (the response positions included)
    again = run_audit(store, val, "centred", cfg, runner=lambda: pytest.fail("the model must not load"))
    assert again.encoded_now == 0
    np.testing.assert_allclose(
        st.audits["centred"].to_arrow().column("score_mean").to_numpy(), table.column("score_mean").to_numpy()
    )
    # a value model distilled from the centred audit is refused on the plain audit of the same validation set
    vm = setting["tmp"] / f"vm-{id(cfg)}"
    st.audits["centred"].distill(vm)
    assert st.audits["centred"].evaluate(vm).all["n"] == 15
    with pytest.raises(ForValueError, match="center mean"):
        st.audits["plain"].evaluate(vm)


def test_cli_variant_options(setting, tiny_model_dir, tmp_path):
    store = setting["store"].path
    out = tmp_path / "top.jsonl"
    r = cli(
        "query",
        "--store",
        store,
        "-v",
        setting["val_path"],
        "-o",
        out,
        "--center",
        "mean",
        "--validation-tokens",
        "response",
        "--exact",
        "--quiet",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert out.read_text().count("\n") == 6 * 10
    bad = cli("query", "--store", store, "-v", setting["val_path"], "-o", tmp_path / "x.jsonl", "--center", "median")
    assert_one_line_error(bad, "--center")
    help_text = cli("audit", "run", "--help").output
    assert "--center" in help_text and "--validation-tokens" in help_text


# ---- whitening (whiten=lambda): (h_v - mu)^T C^-1 (h_i - mu), C = Sigma + lambda tr(Sigma) / d I ----


def test_store_moments_are_the_stored_tokens_mean_and_covariance(setting):
    tokens = setting["block"].hidden.astype(np.float64)
    mu, cov = store_moments(setting["store"])
    np.testing.assert_allclose(mu, tokens.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cov, np.cov(tokens.T, bias=True), rtol=1e-5, atol=1e-7 * np.abs(cov).max())
    c = shrunk_covariance(cov, 2.0)
    np.testing.assert_allclose(c - cov, 2.0 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0]), atol=1e-12)


def test_whitened_sq_norms_equal_the_pairwise_definition():
    rng = np.random.default_rng(5)
    lengths = np.array([3, 1, 5, 0, 2])
    n = int(lengths.sum())
    u = rng.standard_normal((n, 6))
    a = rng.standard_normal((6, 6))
    m = a @ a.T + np.eye(6)
    ids = rng.integers(0, 9, (n, 4))  # repeated ids within and across tokens
    values = rng.standard_normal((n, 4))
    expected = [pair_score(h @ m, i, v, h, i, v) for h, i, v in _split(u, ids, values, lengths)]
    np.testing.assert_allclose(whitened_sq_norms(u, u @ m, ids, values, lengths), expected, rtol=1e-10, atol=1e-12)
    # the identity metric gives the plain norms
    plain = [pair_score(*p, *p) for p in _split(u, ids, values, lengths)]
    np.testing.assert_allclose(whitened_sq_norms(u, u, ids, values, lengths), plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [0.1, 10.0])
def test_whitened_query_equals_the_reference(setting, tiny_runner, lam):
    store, samples = setting["store"], setting["samples"]
    val = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    mu, metric = _metric(store, lam)
    cfg = QueryConfig(top_k=3, exact=True, whiten=lam, progress=False, read_rows=4)
    got = run_query(store, samples, cfg, runner=tiny_runner, keep_scores=True).scores
    _close(got, _reference(setting["block"], val, mu, metric=metric).T)
    centred = run_query(
        store, samples, QueryConfig(exact=True, center="mean", progress=False), runner=tiny_runner, keep_scores=True
    )
    assert not np.allclose(centred.scores, got, rtol=1e-2)  # whitening changes the scores (the test can fail)
    mean = run_query(
        store,
        samples,
        QueryConfig(exact=True, whiten=lam, aggregate="mean", progress=False),
        runner=tiny_runner,
        keep_scores=True,
    ).scores[0]
    _close(mean, got.mean(axis=0))


@pytest.mark.parametrize("form", ["gform", "token"])
def test_whitened_audit_scan_equals_the_reference(setting, tiny_runner, form):
    store, samples = setting["store"], setting["samples"]
    raw = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    mu, cov = store_moments(store)
    val = whiten_validation(raw, mu, cov, 0.3)
    labels = [s.label for s in samples]
    scan = audit_scan(store, val, labels, ["caps", "math"], "cpu", read_rows=4, form=form)
    per = _reference(setting["block"], raw, mu, metric=np.linalg.inv(shrunk_covariance(cov, 0.3)))
    _assert_scan_is(scan, per, labels, form)


def test_whitened_validation_norms_are_the_metric_norms(setting, tiny_runner):
    store, samples = setting["store"], setting["samples"]
    raw = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    mu, metric = _metric(store, 0.3)
    val = whiten_validation(raw, mu, store_moments(store)[1], 0.3)
    parts = _split(raw.hidden.astype(np.float64) - mu, raw.ids, raw.values, raw.lengths)
    _close(val.sq_norms, np.array([pair_score(h @ metric, i, v, h, i, v) for h, i, v in parts]), rtol=1e-5)


def test_whitened_prefilter_rerank_equals_the_exact_scan(setting, tiny_runner):
    store, samples = setting["store"], setting["samples"]
    raw = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    mu, cov = store_moments(store)
    cfg = QueryConfig(top_k=4, whiten=1.0, progress=False, read_rows=4)
    top = prefilter_topk(store, whiten_validation(raw, mu, cov, 1.0), cfg, "cpu", candidates=store.count())
    exact = run_query(
        store,
        samples,
        QueryConfig(top_k=4, exact=True, whiten=1.0, progress=False),
        runner=tiny_runner,
        keep_scores=True,
    )
    _close(top.scores, -np.sort(-exact.scores, axis=1)[:, :4])


def test_whitened_explanation_splits_the_whitened_score(setting, tiny_runner):
    store, samples = setting["store"], setting["samples"]
    e = explain(
        store, [setting["val_path"]], setting["ids"][4], ExplainConfig(val_index=1, whiten=0.3), runner=tiny_runner
    )
    raw = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    mu, metric = _metric(store, 0.3)
    expected = _reference(setting["block"], raw, mu, metric=metric)[4, 1]
    assert e.score == pytest.approx(expected, rel=2e-4, abs=1e-6 * abs(expected))
    assert float(e.train.per_token().sum()) == pytest.approx(e.score, rel=1e-6, abs=1e-9)
    cos = _reference(setting["block"], raw, mu, cosine=True, metric=metric)[4, 1]
    assert e.cosine == pytest.approx(cos, rel=2e-4)


def test_whitening_is_refused_with_cosine_and_recorded_by_audits(setting, tiny_runner, tmp_path):
    from forvalue.schemas.errors import ConfigError

    for cls in (QueryConfig, AuditConfig):
        with pytest.raises(ConfigError, match="whiten: not with --normalize cosine"):
            cls(whiten=1.0, normalize="cosine")
    with pytest.raises(ConfigError, match=r"whiten: must be in \[0.001, 1e\+06\] or auto"):
        QueryConfig(whiten=0.0)
    store = setting["store"]
    run_audit(store, [setting["val_path"]], "whitened", AuditConfig(whiten=0.3, progress=False), runner=tiny_runner)
    st = forvalue.open(store.path)
    assert st.audits["whitened"].info.meta["settings"]["whiten"] == 0.3
    raw = encode_validation(tiny_runner, setting["samples"], store.manifest, DataConfig(), basis=setting["basis"])
    mu, metric = _metric(store, 0.3)
    per = _reference(setting["block"], raw, mu, metric=metric)
    table = st.audits["whitened"].to_arrow()
    order = [setting["ids"].index(i) for i in table.column("id").to_pylist()]
    _close(table.column("score_mean").to_numpy(), per.mean(axis=1)[order])
    vm = tmp_path / "vm"
    st.audits["whitened"].distill(vm)
    run_audit(
        store, [setting["val_path"]], "centred-only", AuditConfig(center="mean", progress=False), runner=tiny_runner
    )
    with pytest.raises(ForValueError, match="whiten 0.3"):
        st.audits["centred-only"].evaluate(vm)
    bad = cli(
        "audit",
        "run",
        "--store",
        store.path,
        "-v",
        setting["val_path"],
        "--name",
        "x",
        "--whiten",
        "1",
        "--normalize",
        "cosine",
    )
    assert_one_line_error(bad, "--whiten")


# ---- --whiten auto: chosen by the validation samples' own-label retrieval ----


def test_label_auc_leaves_each_sample_out():
    from forvalue.engine.variant import label_auc

    # rows: the samples as stored, columns: as queries; each column leaves its own row out
    scores = np.array(
        [
            [9.0, 5.0, 1.0, 0.0],
            [4.0, 9.0, 2.0, 3.0],
            [3.0, 1.0, 9.0, 3.0],
            [1.0, 6.0, 3.0, 9.0],
        ]
    )
    # column 0: row 1 (4, same) above rows 2, 3 (3, 1): 1; column 1: row 0 (5) vs 1, 6: 0.5;
    # column 2: row 3 (3) vs 1, 2: 1; column 3: row 2 (3) vs 0 and a tie with 3: 0.75
    assert label_auc(scores, ["a", "a", "b", "b"]) == pytest.approx((1 + 0.5 + 1 + 0.75) / 4)
    # an unlabelled row counts for nobody; column 3 has no other "b" and is left out: columns 0 (1) and 1 (0)
    assert label_auc(scores, ["a", "a", None, "b"]) == pytest.approx(0.5)
    assert np.isnan(label_auc(scores, ["a", None, None, None]))


def test_auto_settings_choose_by_the_reference_label_auc(setting, tiny_runner):
    from forvalue.engine.variant import WHITEN_GRID, choose_variant, label_auc

    store, samples = setting["store"], setting["samples"]
    labels = [s.label for s in samples]
    raw = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    resp = encode_validation(
        tiny_runner, samples, store.manifest, DataConfig(), tokens="response", basis=setting["basis"]
    )
    mu, cov = store_moments(store)
    lams = (*WHITEN_GRID, "raw")
    tokens, lam, aucs = choose_variant({"store": raw, "response": resp}, raw, labels, mu, cov, lams)
    expected = {}
    for name, query in (("store", raw), ("response", resp)):
        for grid_lam in lams:  # float64 pairwise: each validation sample (as a query) against the others (as stored)
            if grid_lam == "raw":
                gram = _reference(raw, query)
            else:
                metric = np.eye(mu.size) if grid_lam is None else np.linalg.inv(shrunk_covariance(cov, grid_lam))
                gram = _reference(raw, query, mu, metric=metric)  # rows: the samples as stored, columns: as queries
            expected[(name, grid_lam)] = label_auc(gram, labels)
    assert set(aucs) == set(expected)
    for k in expected:
        assert aucs[k] == pytest.approx(expected[k], abs=1e-9)
    best = max(expected.values())
    tied = [k for k, v in expected.items() if v >= best - 1e-12]
    assert (tokens, lam) in tied
    if any(k[0] == "store" for k in tied):  # ties: the store's positions, then the paper's, centred, mildest
        assert tokens == "store"
    with pytest.raises(ForValueError, match="two labels with two samples"):
        choose_variant({"store": raw}, raw, ["x"] * len(labels), mu, cov, lams)
    # with --normalize cosine the choice ranks cosine scores (each stored-side score over its ||G_i||), as the
    # scan returns them; it ranked the raw scores before
    _, _, cos_aucs = choose_variant({"store": raw, "response": resp}, raw, labels, mu, cov, ("raw",), None, "cosine")
    for name, query in (("store", raw), ("response", resp)):
        gram = _reference(raw, query) / np.sqrt(raw.sq_norms)[:, None]
        assert cos_aucs[(name, "raw")] == pytest.approx(label_auc(gram, labels), abs=1e-9)


@pytest.mark.parametrize("tokens, whiten", [("store", "auto"), ("auto", "auto"), ("auto", None)])
def test_auto_query_and_audit_use_and_record_the_choice(setting, tiny_runner, tmp_path, tokens, whiten):
    from forvalue.engine.variant import WHITEN_GRID, choose_variant

    store, samples = setting["store"], setting["samples"]
    labels = [s.label for s in samples]
    enc = {
        t: encode_validation(tiny_runner, samples, store.manifest, DataConfig(), tokens=t, basis=setting["basis"])
        for t in ("store", "response")
    }
    mu, cov = store_moments(store) if whiten else (store_mean(store), None)
    queries = enc if tokens == "auto" else {"store": enc["store"]}
    chosen_tokens, lam, _ = choose_variant(queries, enc["store"], labels, mu, cov, WHITEN_GRID if whiten else ("raw",))
    cfg = QueryConfig(exact=True, whiten=whiten, validation_tokens=tokens, progress=False)
    auto = run_query(store, samples, cfg, runner=tiny_runner, keep_scores=True)
    lam = None if lam == "raw" else lam
    assert auto.config.whiten == lam and auto.config.validation_tokens == chosen_tokens
    center = "mean" if whiten else "none"
    assert auto.auto_settings["chosen"] == {"validation_tokens": chosen_tokens, "center": center, "whiten": lam}
    fixed = QueryConfig(exact=True, center=center, whiten=lam, validation_tokens=chosen_tokens, progress=False)
    expected = run_query(store, samples, fixed, runner=tiny_runner, keep_scores=True).scores
    np.testing.assert_array_equal(auto.scores, expected)
    name = f"auto-{tokens}-{whiten}"
    audit_cfg = AuditConfig(whiten=whiten, validation_tokens=tokens, progress=False)
    run_audit(store, [setting["val_path"]], name, audit_cfg, runner=tiny_runner)
    meta = forvalue.open(store.path).audits[name].info.meta
    assert meta["settings"]["whiten"] == lam and meta["settings"]["validation_tokens"] == chosen_tokens
    assert meta["auto_settings"]["chosen"] == {"validation_tokens": chosen_tokens, "center": center, "whiten": lam}
    assert meta["settings"]["center"] == center
    n_candidates = (2 if tokens == "auto" else 1) * (len(WHITEN_GRID) if whiten else 1)
    assert len(meta["auto_settings"]["label_auc"]) == n_candidates


def test_auto_settings_cli(setting, tmp_path):
    store = setting["store"]
    out = tmp_path / "top.jsonl"
    args = ["--whiten", "auto", "--validation-tokens", "auto", "--exact", "--device", "cpu"]
    r = cli("query", "--store", store.path, "-v", setting["val_path"], "-o", out, "--quiet", *args)
    assert r.exit_code == 0, r.output
    assert "auto settings chose --validation-tokens" in r.output
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl", [{"id": f"u{i}", "text": f"hello {i}"} for i in range(4)])
    bad = cli("query", "--store", store.path, "-v", unlabelled, "-o", tmp_path / "u.jsonl", *args)
    assert_one_line_error(bad, "two labels with two samples")
    assert not (tmp_path / "u.jsonl").exists()
    for flag in ("--whiten", "--validation-tokens"):
        explain_args = ["--store", store.path, "-v", setting["val_path"], "--train-id", setting["ids"][0]]
        bad = cli("explain", *explain_args, flag, "auto")
        assert_one_line_error(bad, flag)
    bad = cli("query", "--store", store.path, "-v", setting["val_path"], "-o", tmp_path / "x.jsonl", "--whiten", "abc")
    assert_one_line_error(bad, "--whiten")


def test_the_auto_line_names_settings_that_reproduce_the_choice():
    from forvalue.engine.variant import describe_auto

    aucs = {"label_auc": {"store none": 0.9, "store 0.1": 0.8}}
    line = describe_auto({"chosen": {"validation_tokens": "store", "center": "mean", "whiten": None}, **aucs})
    assert "--validation-tokens store --center mean (" in line and "store none 0.900" in line
    line = describe_auto({"chosen": {"validation_tokens": "response", "center": "mean", "whiten": 0.1}, **aucs})
    assert "--validation-tokens response --whiten 0.1 (" in line and "--center" not in line
    line = describe_auto({"chosen": {"validation_tokens": "store", "center": "none", "whiten": None}, **aucs})
    assert "--validation-tokens store (" in line
    cosine = {"validation_tokens": "response", "center": "none", "whiten": None, "normalize": "cosine"}
    assert "--validation-tokens response --normalize cosine (" in describe_auto({"chosen": cosine, **aucs})


def test_auto_tokens_with_cosine_name_the_cosine_flag(setting, tiny_runner):
    # the line named --validation-tokens X only: without --normalize cosine those flags give other scores
    samples = [dataclasses.replace(s, label=f"k{j % 2}") for j, s in enumerate(setting["samples"][:6])]
    cfg = QueryConfig(exact=True, validation_tokens="auto", normalize="cosine", progress=False)
    got = run_query(setting["store"], samples, cfg, runner=tiny_runner)
    assert got.auto_settings["chosen"]["normalize"] == "cosine"


def test_whitening_implies_centring_for_value_models(setting, tiny_runner, tmp_path):
    # --whiten 1 and --whiten 1 --center mean (what --whiten auto records) score alike: a value model distilled from
    # one is accepted on the other
    store = setting["store"]
    val = [setting["val_path"]]
    run_audit(store, val, "w-plain", AuditConfig(whiten=1.0, progress=False), runner=tiny_runner)
    run_audit(store, val, "w-centred", AuditConfig(whiten=1.0, center="mean", progress=False), runner=tiny_runner)
    st = forvalue.open(store.path)
    np.testing.assert_array_equal(
        st.audits["w-plain"].to_arrow().column("score_mean").to_numpy(),
        st.audits["w-centred"].to_arrow().column("score_mean").to_numpy(),
    )
    vm = tmp_path / "vm"
    st.audits["w-plain"].distill(vm)
    assert st.audits["w-centred"].evaluate(vm).all["n"] == 15


def test_auto_settings_refuse_unusable_labels_before_the_model_loads(setting, tmp_path):
    store = setting["store"]
    many = [{"id": f"u{i}", "text": f"hello {i}", "label": f"l{i}"} for i in range(500)]  # 500 labels, one sample each
    no_model = lambda: pytest.fail("the model must not load")  # noqa: E731
    for whiten, tokens in (("auto", "store"), (None, "auto")):
        cfg = QueryConfig(whiten=whiten, validation_tokens=tokens, progress=False)
        with pytest.raises(ForValueError, match="two labels with two samples") as err:
            run_query(store, many, cfg, runner=no_model)
        assert len(str(err.value)) < 400, str(err.value)  # one readable line, not every label
        with pytest.raises(ForValueError, match="two labels with two samples"):
            run_audit(store, many, "u", AuditConfig(whiten=whiten, validation_tokens=tokens), runner=no_model)
    assert "u" not in list(forvalue.open(store.path).audits)


def test_auto_settings_print_the_centring_they_chose():
    from forvalue.engine.variant import describe_auto

    record = {
        "chosen": {"validation_tokens": "store", "center": "mean", "whiten": None},
        "label_auc": {"1": 0.5, "none": 0.9},
    }
    assert "chose --validation-tokens store --center mean (" in describe_auto(record)
    record["chosen"].update(center="none")
    assert "chose --validation-tokens store (" in describe_auto(record)
    record["chosen"].update(center="mean", whiten=1.0)  # whitening implies centring: the flag alone reproduces it
    assert "chose --validation-tokens store --whiten 1 (" in describe_auto(record)


def test_numpy_numbers_in_configs_are_recorded(setting, tiny_runner):
    # settings are recorded as JSON (audit metadata): numpy scalars become Python numbers (np.float32 crashed the
    # audit's write after the whole scan)
    import json
    from dataclasses import asdict

    cfg = AuditConfig(whiten=np.float32(0.5), read_rows=np.int64(64), flag_fraction=np.float32(0.25), progress=False)
    assert type(cfg.whiten) is float and type(cfg.read_rows) is int and type(cfg.flag_fraction) is float
    json.dumps(asdict(cfg))
    run_audit(setting["store"], [setting["val_path"]], "numpy", cfg, runner=tiny_runner)
    assert forvalue.open(setting["store"].path).audits["numpy"].info.meta["settings"]["whiten"] == 0.5
    with pytest.raises(ForValueError, match="finite"):
        QueryConfig(whiten=np.float32("nan"))


def test_auto_positions_count_each_sample_encoded_once(setting, tiny_runner):
    # --validation-tokens auto encodes each sample with both positions: the run reports samples, not encodings
    rows = [dict(r, prompt=f"once more, {r['prompt']}") for r in _rows(6, offset=300)]
    cfg = AuditConfig(validation_tokens="auto", progress=False)
    run = run_audit(setting["store"], rows, "auto-count", cfg, runner=tiny_runner)
    assert run.encoded_now == 6
    assert run_audit(setting["store"], rows, "auto-count", cfg, runner=tiny_runner).encoded_now == 0


def test_auto_choice_samples_keep_labels_of_a_set_sorted_by_label():
    from forvalue.engine.variant import CHOOSE_SAMPLES, choice_samples, label_auc

    # 900 validation samples, 300 labels of 3, sorted by label: an evenly spaced 256 kept one of each label and the
    # auto settings were refused after every sample was encoded
    labels = [f"t{j // 3}" for j in range(900)]
    pick = choice_samples(labels)
    counts = Counter(labels[j] for j in pick)
    assert len(pick) <= CHOOSE_SAMPLES and len(counts) >= 2 and min(counts.values()) >= 2
    scores = np.random.default_rng(0).normal(size=(len(pick), len(pick)))
    assert np.isfinite(label_auc(scores, [labels[j] for j in pick]))
    # 20 labels of 50, one unlabelled sample and one singleton: evenly spaced within each label with two or more
    labels = [f"c{j % 20}" for j in range(1000)] + [None, "single"]
    pick = choice_samples(labels)
    counts = Counter(labels[j] for j in pick)
    assert len(pick) <= CHOOSE_SAMPLES and set(counts) == {f"c{k}" for k in range(20)} and set(counts.values()) == {12}
    assert choice_samples(labels[:CHOOSE_SAMPLES]) == list(range(CHOOSE_SAMPLES))  # small sets: every sample


def test_auto_labels_are_counted_as_label_auc_compares_them():
    # labels 1 and "1" are one label to label_auc (strings); counted apart, a set the AUC cannot use was accepted
    from forvalue.engine.variant import CHOOSE_SAMPLES, check_auto_labels, choice_samples

    with pytest.raises(ForValueError, match="two labels with two samples"):
        check_auto_labels([1, "1", 2, "3"])
    check_auto_labels([1, "1", 2, "2"])
    labels = [j % 3 if j % 2 else str(j % 3) for j in range(3 * CHOOSE_SAMPLES)]
    counts = Counter(str(labels[j]) for j in choice_samples(labels))
    assert set(counts) == {"0", "1", "2"} and min(counts.values()) >= 2


def test_audit_show_prints_the_score_settings_as_flags(setting, tmp_path):
    from forvalue.engine.variant import variant_flags

    assert variant_flags({}) == "--normalize none --center none --validation-tokens store"
    assert variant_flags({"center": "mean", "whiten": 0.1, "validation_tokens": "response"}).endswith(
        "--center mean --validation-tokens response --whiten 0.1"
    )
    store = setting["store"]
    ran = cli("audit", "run", "--store", store.path, "-v", setting["val_path"], "--name", "shown", "--whiten", "auto")
    assert ran.exit_code == 0, ran.output
    meta = forvalue.open(store.path).audits["shown"].info.meta
    shown = cli("audit", "show", "--store", store.path, "shown")
    assert shown.exit_code == 0, shown.output
    line = next(l for l in shown.output.splitlines() if l.startswith("score: "))
    assert line == f"score: {variant_flags(meta['settings'])} (chosen by auto)"
    assert "--center mean" in line


def test_auto_none_candidate_is_judged_with_the_mean_its_scores_use(setting, tiny_runner, monkeypatch):
    """--whiten auto's centred-only candidate is judged (and its AUC recorded) with --center mean's mean, the one its
    scores then use, even where the whitening's moments come from fewer samples (here 4 rows, as on a store larger
    than MOMENT_ROWS)."""
    import forvalue.engine.variant as variant
    from forvalue.engine.variant import choose_variant, resolve_auto

    moments = variant.store_moments
    monkeypatch.setattr(variant, "store_moments", lambda store, *a: moments(store, 4))
    store, samples = setting["store"], setting["samples"]
    labels = [s.label for s in samples]
    raw = encode_validation(tiny_runner, samples, store.manifest, DataConfig(), basis=setting["basis"])
    mu4, cov4 = variant.store_moments(store)
    assert np.abs(mu4 - store_mean(store)).max() > 1e-3  # the two means differ: the test can tell them apart
    centred_on = []
    centre = variant.centre_validation
    monkeypatch.setattr(variant, "centre_validation", lambda v, mu: centred_on.append(mu) or centre(v, mu))
    cfg = QueryConfig(exact=True, whiten="auto", progress=False)
    cfg, val, record = resolve_auto(cfg, store, lambda tokens: raw, labels)
    assert centred_on and all(np.allclose(mu, store_mean(store)) for mu in centred_on)
    _, _, by_mean = choose_variant({"store": raw}, raw, labels, mu4, cov4, (None,), store_mean(store))
    assert record["label_auc"]["none"] == round(by_mean[("store", None)], 6)
    if cfg.whiten is None:  # centred only chosen: the set is centred on store_mean, as --center mean's
        np.testing.assert_allclose(val.center, store_mean(store))


def test_printed_flags_keep_every_digit_of_the_whitening():
    # audit show printed --whiten 0.123456789 as --whiten 0.123457 (format g): those flags score differently, and a
    # value model distilled from the audit is refused on an audit run with them
    from forvalue.engine.variant import describe_auto, variant_flags

    for lam in (0.123456789, 1 / 3, 2.5e-3, 123456.7):
        flags = variant_flags({"whiten": lam})
        assert float(flags.rsplit(" ", 1)[1]) == lam, flags
        line = describe_auto(
            {"chosen": {"validation_tokens": "store", "center": "mean", "whiten": lam}, "label_auc": {}}
        )
        assert float(line.split("--whiten ")[1].split(" ")[0]) == lam, line
    assert variant_flags({"whiten": 0.1}).endswith("--whiten 0.1") and variant_flags({"whiten": 3.0}).endswith(" 3")


def test_auto_whitening_reads_the_store_moments_once(setting, tiny_runner, monkeypatch):
    import forvalue.engine.variant as variant

    calls = []
    moments = variant.store_moments
    monkeypatch.setattr(variant, "store_moments", lambda store, *a: calls.append(1) or moments(store, *a))
    store, samples = setting["store"], setting["samples"]
    for whiten, tokens in (("auto", "store"), (0.3, "auto")):
        calls.clear()
        cfg = QueryConfig(exact=True, whiten=whiten, validation_tokens=tokens, progress=False)
        got = run_query(store, samples, cfg, runner=tiny_runner, keep_scores=True)
        assert got.config.whiten is not None and len(calls) == 1
        calls.clear()
        run_audit(
            store,
            [setting["val_path"]],
            f"once-{whiten}",
            AuditConfig(whiten=whiten, validation_tokens=tokens, progress=False),
            runner=tiny_runner,
        )
        assert len(calls) == 1
