"""Top-k by FAISS prefilter + exact rerank.

1. The validation samples' sketches ``z(G_v)`` (``forvalue.indexer.sketch``, the store's spec) are
   searched in the store's FAISS index: ``C`` candidate rows per validation sample (or one
   search with the mean sketch for ``aggregate='mean'``; the sketch is linear).
2. Only the candidate rows are read from Lance (random access by row position) and scored
   exactly by the same scorer as the full scan; the top-k of those exact scores is returned.

Scores in the result are exact; only the candidate set is approximate. Validation samples are
handled in groups, each group's candidates united, so a row found for one sample is scored for
all samples of its group (this can only improve recall).
"""

from __future__ import annotations

import numpy as np

from forvalue.indexer.sketch import SketchSpec, fit_basis, get_sketcher
from forvalue.schemas.config import QueryConfig
from forvalue.schemas.errors import ForValueError
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage import faiss_index
from forvalue.storage.sketch_basis import load_basis, publish_basis
from forvalue.storage.store import Store

from forvalue.engine.ranking import TopK
from forvalue.engine.scorer import BlockedScorer, TrainBlock, decode_block
from forvalue.engine.validation import ValidationSet

# Stores at least this large are queried with the prefilter by default (when they have an index).
AUTO_MIN_ROWS = 200_000
# Validation samples whose candidates are united and scored together.
GROUP = 16


def default_candidates(rows: int, top_k: int) -> int:
    """Candidates per validation sample when ``--candidates`` is not given."""
    return int(min(rows, max(2000, 50 * top_k)))


def use_prefilter(store: Store, config: QueryConfig, full_scores: bool) -> bool:
    """Whether :func:`forvalue.api.run_query` takes the prefilter path (see docs/prefilter.md)."""
    if config.exact:
        return False
    explicit = config.candidates is not None
    if full_scores:
        if explicit:
            raise ForValueError("--candidates scores only candidate rows; --all-scores (or keep_scores) needs --exact")
        return False
    if config.normalize != "none":
        if explicit:
            raise ForValueError("the prefilter ranks by the raw score; use --exact with --normalize cosine")
        return False
    if not store.manifest.sketch_dim or not store.has_column(faiss_index.SKETCH_COLUMN):
        if explicit:
            raise ForValueError(f"{store.path}: the store has no sketches; run 'forvalue index sketch --store {store.path}' first")
        return False
    if explicit:
        return True
    return store.count() >= AUTO_MIN_ROWS and faiss_index.load(store) is not None


def validation_sketches(val: ValidationSet, spec: SketchSpec, aggregate: str = "none", basis: np.ndarray | None = None) -> np.ndarray:
    """``(n_val, D)`` sketches of the validation samples, or ``(1, D)`` (their mean) for ``mean``.

    ``basis``: the store's fitted basis (``forvalue.storage.sketch_basis.load_basis``) for fitted sketches.
    """
    z = get_sketcher(spec, basis).sketch(val.hidden, val.ids, val.values, val.lengths)
    return z.mean(axis=0, keepdims=True) if aggregate == "mean" else z


def prefilter_topk(
    store: Store, val: ValidationSet, config: QueryConfig, device, candidates: int | None = None,
    index: "faiss_index.PrefilterIndex | None" = None, nprobe: int | None = None, timings: dict | None = None,
) -> TopK:
    """Top-k rows per validation sample (or of the mean) by prefilter + exact rerank.

    Parameters
    ----------
    store : Store
    val : ValidationSet
    config : QueryConfig
        ``top_k``, ``aggregate`` and ``read_rows`` are used; ``normalize`` must be ``none``.
    candidates : int, optional
        Rows per validation sample from FAISS (default :func:`default_candidates`).
    index : PrefilterIndex, optional
        An already loaded, up-to-date index (else :func:`forvalue.storage.faiss_index.ensure`).
    timings : dict, optional
        Filled with seconds spent in ``sketch``, ``search``, ``read`` and ``score``.
    """
    import time

    spec = SketchSpec.from_manifest(store.manifest)
    if spec is None:
        raise ForValueError(f"{store.path}: the store has no sketches; run 'forvalue index sketch --store {store.path}'")
    rows_total = store.count()
    candidates = min(rows_total, candidates or config.candidates or default_candidates(rows_total, config.top_k))
    t = timings if timings is not None else {}
    for key in ("sketch", "search", "read", "score"):
        t.setdefault(key, 0.0)
    t0 = time.perf_counter()
    if index is None:
        index = faiss_index.ensure(store)
        index.to_gpu()
    queries = validation_sketches(val, spec, config.aggregate, load_basis(store.path))
    t1 = time.perf_counter()
    _, found = index.search(queries, candidates, nprobe=nprobe)
    t2 = time.perf_counter()
    t["sketch"] += t1 - t0
    t["search"] += t2 - t1

    n_cols = queries.shape[0]
    top = TopK(config.top_k, n_cols)
    best_scores = np.full((n_cols, 0), -np.inf)
    best_rows = np.zeros((n_cols, 0), np.int64)
    parts_s, parts_r = [], []
    for g0 in range(0, n_cols, GROUP):
        cols = np.arange(g0, min(n_cols, g0 + GROUP))
        rows = np.unique(found[cols])
        rows = rows[rows >= 0]
        sub = val if config.aggregate == "mean" else val.subset(cols.tolist())
        scores = _score_rows(store, sub, rows, config, device, t)
        if config.aggregate == "mean":
            scores = scores.mean(axis=1, keepdims=True)
        k = min(config.top_k, rows.size)
        order = np.lexsort((np.broadcast_to(rows, scores.T.shape), -scores.T), axis=1)[:, :k]
        parts_s.append(np.take_along_axis(scores.T, order, axis=1))
        parts_r.append(rows[order])
    if parts_s:
        best_scores, best_rows = np.concatenate(parts_s), np.concatenate(parts_r)
    top.scores, top.rows = best_scores, best_rows
    return top


def _score_rows(store: Store, val: ValidationSet, rows: np.ndarray, config: QueryConfig, device, timings: dict) -> np.ndarray:
    """Exact raw scores ``(len(rows), n_val)`` of the given row positions."""
    import time

    scorer = BlockedScorer(val, device, config.val_block_tokens)
    out = np.empty((rows.size, len(val)), np.float64)
    for first in range(0, rows.size, config.read_rows):
        part = rows[first : first + config.read_rows]
        t0 = time.perf_counter()
        table = store.take(part.tolist(), SCORING_COLUMNS)
        block: TrainBlock = decode_block(table, store.manifest.hidden_size)
        t1 = time.perf_counter()
        out[first : first + part.size] = scorer.score(block)
        timings["read"] += t1 - t0
        timings["score"] += time.perf_counter() - t1
    return out


def sketch_store(path, rebuild: bool = False, dim: int | None = None, seed: int | None = None, kind: str | None = None,
                 vocab_buckets: int | None = None, hidden_cols: int | None = None, basis: str | None = None,
                 block_rows: int = 1024) -> dict:
    """Add the ``sketch`` column to a store that lacks it (or recompute it), then build its FAISS index.

    Streams the table ``block_rows`` rows at a time (Lance ``add_columns``); the manifest records
    the new sketch spec. A fitted sketch refits its basis from the first stored hidden states.
    Not safe while another process appends to the store.
    """
    import dataclasses
    import time

    import pyarrow as pa

    from forvalue.indexer.build import BASIS_FIT_TOKENS
    from forvalue.schemas.config import EncodeConfig

    store = Store.open(path)
    m = store.manifest
    default = EncodeConfig()
    had = bool(m.sketch_dim)
    shape_given = vocab_buckets is not None or hidden_cols is not None or basis is not None
    new = dataclasses.replace(
        m,
        sketch_dim=dim or (m.sketch_dim if had and not shape_given else default.sketch_dim),
        sketch_seed=seed if seed is not None else (m.sketch_seed if had else default.sketch_seed),
        sketch_vocab_buckets=vocab_buckets or (m.sketch_vocab_buckets if had and not shape_given else default.sketch_vocab_buckets),
        sketch_hidden_cols=hidden_cols or (m.sketch_hidden_cols if had and not shape_given else default.sketch_hidden_cols),
        sketch_basis=basis or (m.sketch_basis if had else default.sketch_basis),
        schema_version=max(m.schema_version, 2),
    )
    spec = SketchSpec.from_manifest(new)
    report = {"store": str(path), "rows": store.count(), "sketch_dim": spec.dim, "sketch_basis": spec.basis,
              "vocab_buckets": spec.vocab_buckets, "hidden_cols": spec.hidden_cols, "sketched": False}
    started = time.perf_counter()
    missing_basis = spec.basis == "fitted" and load_basis(store.path) is None
    if rebuild or new != m or missing_basis or not store.has_column(faiss_index.SKETCH_COLUMN):
        fitted = None
        if spec.basis == "fitted":
            fitted = publish_basis(store.path, fit_basis(_first_hidden(store, BASIS_FIT_TOKENS, block_rows), spec.hidden_cols),
                                   replace=True)
        sketcher = get_sketcher(spec, fitted)
        field = pa.field(faiss_index.SKETCH_COLUMN, pa.list_(pa.float32(), spec.dim))

        def fn(batch):
            b = decode_block(batch, m.hidden_size)
            z = sketcher.sketch(b.hidden, b.ids, b.values, b.lengths)
            return pa.FixedSizeListArray.from_arrays(pa.array(z.ravel(), pa.float32()), spec.dim)

        store.set_column(faiss_index.SKETCH_COLUMN, field, fn, SCORING_COLUMNS, new, batch_size=block_rows)
        report["sketched"] = True
    report["sketch_seconds"] = round(time.perf_counter() - started, 2)
    t0 = time.perf_counter()
    pre = faiss_index.ensure(store, kind=kind, rebuild=report["sketched"] or kind is not None)
    report.update(faiss=pre.meta.get("factory"), faiss_rows=pre.rows, faiss_seconds=round(time.perf_counter() - t0, 2),
                  faiss_bytes=pre.meta.get("bytes"))
    return report


def _first_hidden(store: Store, tokens: int, block_rows: int) -> np.ndarray:
    """Hidden states of the first stored tokens (up to ``tokens``), float32 ``(N, d)``."""
    parts, n = [], 0
    for batch in store.scan(["hidden", "n_scored"], batch_size=block_rows):
        h = batch.column("hidden").flatten().to_numpy(zero_copy_only=False).reshape(-1, store.manifest.hidden_size)
        parts.append(h.astype(np.float32))
        n += h.shape[0]
        if n >= tokens:
            break
    if not parts:
        raise ForValueError(f"{store.path}: the store is empty; nothing to fit a sketch basis from")
    return np.concatenate(parts)[:tokens]
