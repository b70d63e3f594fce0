"""Top-k by FAISS prefilter + exact rerank.

1. The validation samples' sketches ``z(G_v)`` (``forvalue.indexer.sketch``, the store's spec) are
   searched in the store's FAISS index: ``C`` candidate rows per validation sample (or one
   search with the mean sketch for ``aggregate='mean'``; the sketch is linear).
2. Only the candidate rows are read from Lance (random access by row position) and scored
   exactly by the same scorer as the full scan; the top-k of those exact scores is returned.

Candidates are adaptive: a validation sample whose exact top-k still reaches into the last quarter of its
candidates gets twice as many, up to ``max_candidates`` (:func:`needs_more`, docs/prefilter.md "Adaptive
candidates").

Scores in the result are exact; only the candidate set is approximate. Many validation samples
(a batch query) are searched in one FAISS call and the union of their candidates is read once, in
row order; each sample is then scored exactly on its own candidates, so its result is the one a
query of that sample alone returns.
"""

from __future__ import annotations

import numpy as np

from forvalue.engine.plan import one_torch_thread
from forvalue.engine.ranking import TopK
from forvalue.engine.scorer import BlockedScorer, TrainBlock, decode_block
from forvalue.engine.validation import ValidationSet
from forvalue.engine.variant import for_scoring, raw_hidden
from forvalue.indexer.sketch import SketchSpec, get_sketcher
from forvalue.schemas.config import QueryConfig
from forvalue.schemas.errors import ConfigError, ForValueError
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage import faiss_index
from forvalue.storage.rerank_table import RerankTable
from forvalue.storage.sketch_basis import load_basis, load_heavy_ids
from forvalue.storage.store import Store

# Stores at least this large are queried with the prefilter by default (when they have an index).
AUTO_MIN_ROWS = 200_000


def default_candidates(rows: int, top_k: int, reranked: bool = False) -> int:
    """Candidates per validation sample (rows scored exactly) when ``--candidates`` is not given: behind the second
    stage 2 x top-k, at least 200; else (an index without one) 50 x top-k, at least 2,000."""
    if reranked:
        return int(min(rows, max(200, 2 * top_k)))
    return int(min(rows, max(2000, 50 * top_k)))


# The second stage ranks this many of the sketch's candidates at first (at least POOL_FACTOR x the rows to score
# exactly); a column whose second-stage best rows still come from the last of them gets twice as many, up to
# POOL_GROWTH x the first count (docs/prefilter.md "The second stage").
POOL = 4000
POOL_FACTOR = 4
POOL_GROWTH = 4


def pool_size(rows: int, candidates: int) -> int:
    """The sketch's candidates the second stage ranks when ``candidates`` rows are to be scored exactly."""
    return int(min(rows, max(POOL, POOL_FACTOR * candidates)))


def use_prefilter(store: Store, config: QueryConfig, full_scores: bool) -> bool:
    """Whether :func:`forvalue.api.run_query` takes the prefilter path (see docs/prefilter.md)."""
    if config.exact:
        return False
    explicit = config.candidates is not None or config.max_candidates is not None or config.pool is not None
    if full_scores:
        if explicit:
            asked = next(n for n in ("candidates", "max_candidates", "pool") if getattr(config, n) is not None)
            raise ConfigError(
                asked, "the prefilter scores only candidate rows; --all-scores (or keep_scores) needs --exact"
            )
        return False
    if config.normalize != "none" or config.center != "none" or config.whiten is not None:
        # (settings asking for the prefilter are refused with these by QueryConfig; the automatic path scans exactly)
        return False
    if not store.manifest.sketch_dim or not store.has_column(faiss_index.SKETCH_COLUMN):
        if explicit:
            faiss_index.check_sketch_column_kept(store)
            raise ForValueError(
                f"{store.path}: the store has no sketches; run 'forvalue index sketch --store {store.path}' first"
            )
        return False
    if explicit:
        return True
    return store.count() >= AUTO_MIN_ROWS and faiss_index.present(store)


def validation_sketches(
    val: ValidationSet,
    spec: SketchSpec,
    aggregate: str = "none",
    basis: np.ndarray | None = None,
    heavy_ids: np.ndarray | None = None,
) -> np.ndarray:
    """``(n_val, D)`` sketches of the validation samples, or ``(1, D)`` (their mean) for ``mean``.

    ``basis`` and ``heavy_ids``: the store's (``forvalue.storage.sketch_basis.load_basis`` /
    ``load_heavy_ids``) for fitted sketches.
    """
    hidden = raw_hidden(val)
    # a centred or whitened set (forvalue.engine.variant): its candidates come from the sketch of its raw G_v (the
    # stored sketches are of the raw G_i); the rerank scores them in the variant
    z = get_sketcher(spec, basis, heavy_ids=heavy_ids).sketch(hidden, val.ids, val.values, val.lengths)
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
    max_candidates: int | None = None,
    pool: int | None = None,
) -> TopK:
    """Top-k rows per validation sample (or of the mean) by prefilter + exact rerank, candidates adaptive.

    Each validation sample (or the mean) starts with ``candidates`` rows from FAISS; while
    :func:`needs_more` finds its exact top-k reaching into the last of its candidates, it gets twice as
    many (a deeper search; only rows not yet scored are read), up to ``max_candidates``.

    Parameters
    ----------
    store : Store
    val : ValidationSet
    config : QueryConfig
        ``top_k``, ``aggregate``, ``read_rows``, ``candidates`` and ``max_candidates`` are used;
        ``normalize`` must be ``none``.
    candidates : int, optional
        Rows per validation sample scored exactly at first (default ``config.candidates``, else
        :func:`default_candidates`): FAISS's best, or with the index's second stage the best by it of
        :func:`pool_size` FAISS candidates.
    index : PrefilterIndex, optional
        An already loaded, up-to-date index (else :func:`forvalue.storage.faiss_index.ensure`).
    timings : dict, optional
        Filled with seconds spent in ``sketch``, ``search``, ``read`` (``take`` calls, in a reading thread),
        ``read_wait`` (the scoring waiting for a read), ``score`` and ``rerank`` (the second stage); ``rows_read``,
        the rows read (each round's union once: a row read in one round can be read again in a later one for
        another column); ``rows_reranked``, the distinct rows scored exactly for any column; ``candidates``, the
        count each column ended with; ``unsettled``, the columns whose test still asked for more at
        ``max_candidates`` (or for which FAISS found fewer rows than asked).
    max_candidates : int, optional
        The most candidates a column may reach (default ``config.max_candidates``, else
        :data:`GROWTH` x the first count); the first count: a fixed count.
    """
    import time

    spec = SketchSpec.from_manifest(store.manifest)
    if spec is None:
        raise ForValueError(
            f"{store.path}: the store has no sketches; run 'forvalue index sketch --store {store.path}'"
        )
    rows_total = store.count()
    t = timings if timings is not None else {}
    for key in ("sketch", "search", "read", "score"):
        t.setdefault(key, 0.0)
    t0 = time.perf_counter()
    if index is None:
        index = faiss_index.ensure(store)
        index.to_gpu()
    rerank = second_stage_of(index)
    start, cap = candidate_range(rows_total, config, candidates, max_candidates, rerank is not None)
    heavy = load_heavy_ids(store.path) if spec.heavy else None  # (a stale file of an earlier sketch: not this one's)
    basis = load_basis(store.path) if spec.basis == "fitted" else None
    queries = validation_sketches(val, spec, config.aggregate, basis, heavy)
    t["sketch"] += time.perf_counter() - t0

    n_cols = queries.shape[0]
    rows = [np.zeros(0, np.int64) for _ in range(n_cols)]  # per column: scored rows, increasing
    scores = [np.zeros(0, np.float64) for _ in range(n_cols)]
    used = np.zeros(n_cols, np.int64)
    want = np.full(n_cols, start, np.int64)  # per column: rows to score exactly this round
    first_pool = min(rows_total, max(pool or config.pool or pool_size(rows_total, start), start))
    pool_cap = min(rows_total, max(POOL_GROWTH * first_pool, POOL_FACTOR * cap))
    pools = np.full(n_cols, first_pool, np.int64)  # per column: the sketch's candidates the second stage ranks
    unsettled: list[int] = []
    scorers: dict = {}
    ranked: dict = {}  # per column: the rows the second stage has scored (increasing) and their scores
    pending = np.arange(n_cols)
    while pending.size:
        asked = pools[pending] if rerank is not None else want[pending]
        t1 = time.perf_counter()
        found = _search(index, queries, pending, asked, nprobe)  # FAISS order, best first
        t["search"] += time.perf_counter() - t1
        staged = [None] * pending.size
        if rerank is not None:  # the second stage's order of the sketch's candidates, its best ``want``
            t1 = time.perf_counter()
            staged = [_staged_scores(rerank, val, j, f, config.aggregate, ranked) for j, f in zip(pending, found)]
            ordered = [f[np.argsort(-s2, kind="stable")][: want[j]] for j, f, s2 in zip(pending, found, staged)]
            t["rerank"] = t.get("rerank", 0.0) + time.perf_counter() - t1
        else:
            ordered = found
        new = [np.setdiff1d(f, rows[j]) for j, f in zip(pending, ordered)]
        if config.aggregate == "mean":  # one column: every validation sample scored on its rows, averaged
            t["rows_read"] = t.get("rows_read", 0) + int(new[0].size)
            got = [_score_rows(store, val, new[0], config, device, t).mean(axis=1)]
        else:
            got = _score_own_candidates(store, val, pending, new, config, device, t, scorers)
        later = []
        for i, (j, f, r, s) in enumerate(zip(pending, ordered, new, got)):
            rows[j], scores[j] = _merge(rows[j], scores[j], r, s)
            used[j] = f.size
            if rows[j].size >= rows_total:
                continue  # every row scored
            short = rows[j].size < config.top_k  # fewer rows scored than the top-k holds: more are needed
            more = short or needs_more(scores[j][np.searchsorted(rows[j], f)], scores[j], config.top_k)
            # the second stage's best rows still reaching into the sketch's last candidates: a deeper pool
            # (a pool of every row has nothing deeper: its order's end says nothing)
            deeper = (
                staged[i] is not None and found[i].size < rows_total and needs_more(staged[i], staged[i], int(want[j]))
            )
            if not more and not deeper:
                continue  # the top-k clear of the last candidates (and the second stage's of the sketch's last)
            ran_out = found[i].size < asked[i]  # FAISS gave fewer rows than asked though the store holds more (an
            # IVF index's probed lists ran out: a deeper search finds no more)
            grew, full = False, f.size >= want[j]  # (behind the second stage, fewer rows than wanted: a small pool)
            if more and not ran_out and full and want[j] < cap:
                want[j] = min(cap, 2 * want[j])
                pools[j] = max(pools[j], min(pool_cap, POOL_FACTOR * want[j]))
                grew = True
            if rerank is not None and (deeper or (more and not full)) and not ran_out and pools[j] < pool_cap:
                pools[j] = min(pool_cap, 2 * pools[j])
                grew = True
            if grew:
                later.append(j)
            else:  # at the most: the top-k may miss rows
                unsettled.append(int(j))
        pending = np.asarray(later, np.int64)
    t["pool"] = pools if rerank is not None else None
    t["candidates"] = used
    t["unsettled"] = sorted(unsettled)
    t["rows_reranked"] = int(np.unique(np.concatenate(rows)).size) if rows else 0
    return _best(config.top_k, rows, scores)


# The adaptive stop (docs/prefilter.md "Adaptive candidates"): a column's candidates are doubled while more than
# TAIL_SHARE of its exact top-k sits in the last TAIL_FRACTION of its candidates (FAISS order); GROWTH x the first
# count is the default most.
TAIL_FRACTION = 0.25
TAIL_SHARE = 0.04
GROWTH = 8


def candidate_range(
    rows: int,
    config: QueryConfig,
    candidates: int | None = None,
    max_candidates: int | None = None,
    reranked: bool = False,
) -> tuple[int, int]:
    """``(first, most)`` candidates per validation sample for a store of ``rows`` rows (``reranked``: behind the
    second stage)."""
    first = candidates or config.candidates or default_candidates(rows, config.top_k, reranked)
    most = max_candidates or config.max_candidates or GROWTH * first
    return min(rows, first, most), min(rows, max(most, 1))


def needs_more(in_order: np.ndarray, scored: np.ndarray, k: int) -> bool:
    """Whether a column's candidates should double: the exact scores ``in_order`` of its current candidates in
    FAISS order (best first) put more than ``TAIL_SHARE * k`` of the top-k of all its scored rows (``scored``)
    into the last ``TAIL_FRACTION`` of them. The top-k reaching that deep says the rows FAISS ranks next are
    likely to hold more of it (a heuristic, not a bound: docs/prefilter.md measures what it misses)."""
    if scored.size < k or in_order.size == 0:
        return False
    kth = np.partition(scored, scored.size - k)[scored.size - k]
    tail = in_order[int(in_order.size * (1 - TAIL_FRACTION)) :]
    return int((tail >= kth).sum()) > TAIL_SHARE * k


def second_stage_of(index) -> "RerankTable | None":
    """The index's second stage when it covers the index's rows (:mod:`forvalue.storage.rerank_table`), else None
    (then the sketch's order decides which rows are scored exactly)."""
    rerank = getattr(index, "rerank", None)
    return rerank if rerank is not None and rerank.rows == index.rows else None


def _search(index, queries: np.ndarray, columns: np.ndarray, asked: np.ndarray, nprobe) -> list[np.ndarray]:
    """FAISS's rows for each of ``columns``, ``asked[i]`` of them (fewer where it finds fewer), best first. Columns
    asking the same count are searched together (a column's rows do not depend on the others searched with it)."""
    found: list = [None] * columns.size
    for count in np.unique(asked):
        sel = np.flatnonzero(asked == count)
        _, got = index.search(queries[columns[sel]], int(count), nprobe=nprobe)
        for i, g in zip(sel, got):
            found[i] = g[g >= 0]
    return found


def _staged_scores(rerank, val: ValidationSet, column: int, found: np.ndarray, aggregate: str, ranked: dict):
    """:func:`_second_stage` of ``found``, scoring only the rows an earlier round of the column did not (a deeper
    pool starts with the rows of the one before); ``ranked`` keeps them across rounds."""
    rows, s2 = ranked.get(int(column), (np.zeros(0, np.int64), np.zeros(0)))
    pos = np.minimum(np.searchsorted(rows, found), max(rows.size - 1, 0))
    known = (rows[pos] == found) if rows.size else np.zeros(found.size, bool)
    out = np.empty(found.size, np.float64)
    out[known] = s2[pos[known]]
    fresh = found[~known]
    fresh_s2 = _second_stage(rerank, val, column, fresh, aggregate)
    out[~known] = fresh_s2
    order = np.argsort(fresh)
    ranked[int(column)] = _merge(rows, s2, fresh[order], fresh_s2[order])
    return out


def _second_stage(rerank, val: ValidationSet, column: int, found: np.ndarray, aggregate: str) -> np.ndarray:
    """The second-stage scores ``s2`` of ``found`` (the sketch's candidates of a column), in its order. The column
    is validation sample ``column``, or for ``aggregate='mean'`` the mean of all (``s2`` is linear in ``G_v``)."""
    from forvalue.storage.rerank_rows import validation_table

    if aggregate == "mean":  # the table of every token at once is the sum of the samples' tables
        part = slice(None)
    else:
        end = int(np.sum(val.lengths[: int(column) + 1]))
        part = slice(end - int(val.lengths[column]), end)
    table = validation_table(raw_hidden(val)[part], val.ids[part], val.values[part], rerank.basis, rerank.vocab_size)
    return rerank.score(found, table / len(val) if aggregate == "mean" else table)


def _merge(rows: np.ndarray, scores: np.ndarray, new_rows: np.ndarray, new_scores: np.ndarray):
    """Scored rows (increasing) and their scores, with ``new_rows`` (increasing, disjoint) added."""
    if not rows.size:
        return new_rows, np.asarray(new_scores, np.float64)
    merged = np.concatenate([rows, new_rows])
    order = np.argsort(merged, kind="stable")
    return merged[order], np.concatenate([scores, new_scores])[order]


def _best(k: int, rows: list[np.ndarray], scores: list[np.ndarray]) -> TopK:
    """A :class:`TopK` holding, per column, the ``k`` best of its ``rows`` by ``scores`` (ties: lower row first).

    A column with fewer rows than the others is padded with row -1 (score -inf), never the others cut to it:
    each column's result is the one it gets alone."""
    top = TopK(k, len(rows))
    width = min(k, max(r.size for r in rows)) if rows else 0
    best_s = np.full((len(rows), width), -np.inf)
    best_r = np.full((len(rows), width), -1, np.int64)
    for j, (r, s) in enumerate(zip(rows, scores)):
        order = np.lexsort((r, -s))[:width]
        best_s[j, : order.size], best_r[j, : order.size] = s[order], r[order]
    top.scores, top.rows = best_s, best_r
    return top


def _score_own_candidates(
    store: Store,
    val: ValidationSet,
    columns: np.ndarray,
    own: list[np.ndarray],
    config: QueryConfig,
    device,
    timings: dict,
    scorers: dict,
) -> list[np.ndarray]:
    """Exact scores of validation samples ``columns[i]`` on their own rows ``own[i]`` (increasing), reading the
    union of all their rows once: in sorted row order (storage order, fragment after fragment), ``read_rows``
    rows per ``take`` of the scoring columns only, read and decoded a block ahead of the scoring. ``scorers``
    keeps each sample's scorer across calls (the rounds of adaptive candidates).

    A sample's scores are those a query of that sample alone returns: the same rows, scored by the same scorer.
    """
    import time

    from forvalue.engine.scan import read_ahead
    from forvalue.engine.scorer import ExactScorer

    union = np.unique(np.concatenate(own)) if own else np.zeros(0, np.int64)
    timings["rows_read"] = timings.get("rows_read", 0) + int(union.size)
    scores = [np.empty(r.size, np.float64) for r in own]
    chunks = [union[i : i + config.read_rows] for i in range(0, union.size, config.read_rows)]

    def tables():
        for chunk in chunks:
            t0 = time.perf_counter()
            table = store.take(chunk.tolist(), SCORING_COLUMNS)
            timings["read"] += time.perf_counter() - t0
            yield table

    t_wait = time.perf_counter()
    with one_torch_thread():
        for chunk, (_table, block) in zip(chunks, read_ahead(tables(), store.manifest.stored_width, val=val)):
            t0 = time.perf_counter()
            timings["read_wait"] = timings.get("read_wait", 0.0) + t0 - t_wait
            offsets = np.concatenate([[0], np.cumsum(block.lengths)])
            for i, (j, r) in enumerate(zip(columns.tolist(), own)):
                a, b = np.searchsorted(r, chunk[0]), np.searchsorted(r, chunk[-1], side="right")
                if a == b:
                    continue
                if j not in scorers:
                    scorers[j] = ExactScorer(val.subset([j]), device)
                pos = np.searchsorted(chunk, r[a:b])
                sub = block if pos.size == chunk.size else _rows_of(block, pos, offsets)
                scores[i][a:b] = scorers[j].score(sub)[:, 0]
            t_wait = time.perf_counter()
            timings["score"] += t_wait - t0
    return scores


def _rows_of(block: TrainBlock, pos: np.ndarray, offsets: np.ndarray) -> TrainBlock:
    """The rows ``pos`` (increasing positions) of a decoded block."""
    lengths = block.lengths[pos]
    starts = offsets[pos]
    tokens = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    return TrainBlock(block.hidden[tokens], block.ids[tokens], block.values[tokens], lengths, block.sq_norms[pos])


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
        block: TrainBlock = for_scoring(decode_block(table, store.manifest.stored_width), val)
        t1 = time.perf_counter()
        out[first : first + part.size] = scorer.score(block)
        timings["read"] += t1 - t0
        timings["score"] += time.perf_counter() - t1
    return out
