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

from forvalue.engine.ranking import TopK
from forvalue.engine.scorer import BlockedScorer, TrainBlock, decode_block
from forvalue.engine.validation import ValidationSet
from forvalue.indexer.sketch import SketchSpec, get_sketcher
from forvalue.schemas.config import QueryConfig
from forvalue.schemas.errors import ForValueError
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage import faiss_index
from forvalue.storage.sketch_basis import load_basis
from forvalue.storage.store import Store

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
            raise ForValueError(
                f"{store.path}: the store has no sketches; run 'forvalue index sketch --store {store.path}' first"
            )
        return False
    if explicit:
        return True
    return store.count() >= AUTO_MIN_ROWS and faiss_index.load(store) is not None


def validation_sketches(
    val: ValidationSet, spec: SketchSpec, aggregate: str = "none", basis: np.ndarray | None = None
) -> np.ndarray:
    """``(n_val, D)`` sketches of the validation samples, or ``(1, D)`` (their mean) for ``mean``.

    ``basis``: the store's fitted basis (``forvalue.storage.sketch_basis.load_basis``) for fitted sketches.
    """
    z = get_sketcher(spec, basis).sketch(val.hidden, val.ids, val.values, val.lengths)
    return z.mean(axis=0, keepdims=True) if aggregate == "mean" else z


def prefilter_topk(
    store: Store,
    val: ValidationSet,
    config: QueryConfig,
    device,
    candidates: int | None = None,
    index: "faiss_index.PrefilterIndex | None" = None,
    nprobe: int | None = None,
    timings: dict | None = None,
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
        raise ForValueError(
            f"{store.path}: the store has no sketches; run 'forvalue index sketch --store {store.path}'"
        )
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


def _score_rows(
    store: Store, val: ValidationSet, rows: np.ndarray, config: QueryConfig, device, timings: dict
) -> np.ndarray:
    """Exact raw scores ``(len(rows), n_val)`` of the given row positions."""
    import time

    scorer = BlockedScorer(val, device, config.val_block_tokens)
    out = np.empty((rows.size, len(val)), np.float64)
    for first in range(0, rows.size, config.read_rows):
        part = rows[first : first + config.read_rows]
        t0 = time.perf_counter()
        table = store.take(part.tolist(), SCORING_COLUMNS)
        block: TrainBlock = decode_block(table, store.manifest.stored_width)
        t1 = time.perf_counter()
        out[first : first + part.size] = scorer.score(block)
        timings["read"] += t1 - t0
        timings["score"] += time.perf_counter() - t1
    return out
