"""Python API: build a store, inspect it, and query it (the CLI only calls these).

Example
-------
>>> from forvalue.api import run_query                # what forvalue.open(path).query(...) calls
>>> result = run_query(store_path, [validation_path], forvalue.QueryConfig(top_k=2, progress=False))
>>> result.n_train, result.top.num_rows
(12, 4)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from forvalue.engine.ranking import TopK
from forvalue.engine.scan import score_all
from forvalue.engine.validation import (
    data_for_store,
    encode_validation,
    load_validation_samples,
    store_hidden_basis,
    validation_paths,
)
from forvalue.engine.variant import apply_variant, check_auto_labels, resolve_auto
from forvalue.indexer.build import BuildReport, build_index
from forvalue.indexer.data import Sample
from forvalue.present.output import ScoreWriter, check_output_path
from forvalue.schemas.config import BuildConfig, DataConfig, EngineConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import ConfigError, ForValueError, ManifestMismatchError, StoreError
from forvalue.session import get_runner, open_nonempty, settings_for_store, storage_of
from forvalue.storage.store import Store

__all__ = [
    "build_index",
    "add_to_index",
    "BuildReport",
    "run_query",
    "QueryResult",
]


@dataclass
class QueryResult:
    """Outcome of :func:`run_query`.

    Attributes
    ----------
    top : pyarrow.Table
        Columns ``validation_id, validation_label, rank, train_id, train_label, score``
        (+ ``train_text`` with ``include_text``); ``rank`` starts at 1. With
        ``aggregate='mean'`` the validation id is ``"mean"``.
    scores : float64 array of shape (n_validation or 1, n_train), or None
        The full score matrix when ``keep_scores=True``, columns in storage order.
    train_ids : list of str or None
        Ids of the columns of ``scores``.
    prefiltered : bool
        Whether FAISS candidates were reranked (docs/prefilter.md) rather than every row scored.
    rows_read : int or None
        Prefiltered: the candidate rows read, each adaptive round's union once for all validation samples
        together (a row a later round asks for again, for another sample, is read again).
    rows_reranked : int or None
        Prefiltered: the distinct candidate rows scored exactly, for any validation sample (at most ``n_train``).
    candidates : list of int or None
        Prefiltered: the candidates each validation sample (or the mean) ended with (adaptive, docs/prefilter.md).
    pools : list of int or None
        Prefiltered through the index's second stage: the FAISS candidates it ranked for each validation sample at
        the end (adaptive); None for an index without one (then ``candidates`` came from FAISS directly).
    unsettled : list of str or None
        Prefiltered: the validation ids (or ``"mean"``) whose top-k still reached into their last candidates at
        ``max_candidates``: their top-k may miss rows (raise ``max_candidates`` or use ``exact``).
    config : QueryConfig or None
        The settings the query ran with (explanation pages of its results use its score variant); ``auto``
        settings replaced by what was chosen.
    auto_settings : dict or None
        ``whiten`` / ``validation_tokens`` ``"auto"``: what was chosen (``chosen``) and each candidate's own-label
        AUC (``label_auc``; :func:`forvalue.engine.variant.resolve_auto`).
    """

    top: pa.Table
    n_train: int
    n_validation: int
    seconds: float
    scores: np.ndarray | None = None
    train_ids: list[str] | None = None
    prefiltered: bool = False
    rows_read: int | None = None
    rows_reranked: int | None = None
    candidates: list[int] | None = None
    pools: list[int] | None = None
    unsettled: list[str] | None = None
    config: QueryConfig | None = None
    auto_settings: dict | None = None


def add_to_index(
    data_paths: Sequence[str | Path],
    store: str | Path,
    config: BuildConfig = BuildConfig(),
    engine: EngineConfig | None = None,
) -> BuildReport:
    """Append samples to an existing store with the store's model and settings.

    Parameters
    ----------
    data_paths : sequence of paths
        JSONL, Parquet, CSV files or ``datasets`` folders.
    store : path
        An existing store (refused with :class:`StoreError` otherwise).
    config : BuildConfig
        Columns, ``on_bad``, batch sizes, shard and optional model/adapter/dtype overrides; the
        encoding settings always come from the store (:func:`settings_for_store`).
    engine : EngineConfig, optional
        ``EngineConfig(engine="ray", ...)`` encodes on Ray actors (:func:`build_index`).

    Returns
    -------
    BuildReport
        Counts of written, skipped and truncated samples.

    Example
    -------
    >>> report = add_to_index([train_path], store_path)     # forvalue.open(path).add(...) calls this
    >>> report.written, report.already_stored
    (0, 12)
    """
    manifest = storage_of(store).manifest
    try:
        return build_index(data_paths, store, settings_for_store(manifest, config), engine=engine)
    except ManifestMismatchError as error:
        if not error.problems:
            raise
        # the encoding settings come from the store: only a model, adapter or dtype given here can differ
        raise ManifestMismatchError(
            f"{store}: the store was built with other settings ({'; '.join(error.problems)}); rows are added with the "
            "store's own model: leave out --model, --adapter and --dtype",
            error.problems,
        ) from None


def run_query(
    store: str | Path | Store,
    validation: Iterable[str | Path] | Sequence[dict] | Sequence[Sample],
    config: QueryConfig = QueryConfig(),
    data: DataConfig = DataConfig(),
    model: ModelConfig | None = None,
    runner=None,
    keep_scores: bool = False,
    all_scores_path: str | Path | None = None,
    engine: EngineConfig | None = None,
) -> QueryResult:
    """Score every stored sample exactly against validation samples; return the top-k.

    Parameters
    ----------
    store : path or Store
    validation : paths, dict rows or Samples
        Read with the column names of ``data``; max length and chat template come from
        the store's manifest.
    config : QueryConfig
    model : ModelConfig, optional
        Overrides of the store's model (refused if it is not the same model).
    runner : Runner or a function returning one, optional
        The store's model already loaded, or a loader called once the validation input is read (default:
        load the store's model then).
    keep_scores : bool
        Return the full score matrix in memory (small stores, notebooks).
    all_scores_path : path, optional
        Stream the full score matrix to this Parquet file (one row per training
        sample, one column per validation sample).
    engine : EngineConfig, optional
        ``EngineConfig(engine="ray", ...)`` scores every stored sample on Ray actors (docs/scale.md;
        never the prefilter); the result is the single-process exact one.

    Returns
    -------
    QueryResult
        ``top`` (pyarrow: ``validation_id``, ``rank``, ``train_id``, ``score``...), and ``scores``
        (float64, shape ``(n_validation or 1, n_train)``) when ``keep_scores``.

    Example
    -------
    >>> r = run_query(store_path, [validation_path], forvalue.QueryConfig(top_k=3, progress=False), keep_scores=True)
    >>> r.scores.shape, r.top.column("rank").to_pylist()[:3]
    ((2, 12), [1, 2, 3])
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    on_ray = engine is not None and engine.engine == "ray"
    for name in ("candidates", "max_candidates", "pool"):
        if on_ray and getattr(config, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(name, f"--engine ray scores every stored sample (exact scan); drop {flag}")
    if all_scores_path is not None:
        check_output_path(all_scores_path, (".parquet",), inputs=validation_paths(validation), what="all_scores_path")
    store = open_nonempty(store)
    samples = load_validation_samples(validation, data_for_store(data, store.manifest))  # bad input: before the model
    check_auto_labels([s.label for s in samples], config)
    runner = get_runner(runner, store, model, config.device)
    config, val, auto_settings = resolve_auto(  # auto settings: chosen by the validation samples' own labels
        config,
        store,
        lambda tokens: encode_validation(
            runner, samples, store.manifest, data, config.batch_size, tokens, store_hidden_basis(store)
        ),
        [s.label for s in samples],
    )
    val = apply_variant(val, store, config.center, config.whiten)  # centred / whitened scores (docs/variants.md)
    n_cols = 1 if config.aggregate == "mean" else len(val)
    col_names = ["mean"] if config.aggregate == "mean" else [s.id for s in samples]
    top = TopK(config.top_k, n_cols)
    kept_scores, kept_ids = [], []
    total = store.count()
    from forvalue.engine.prefilter import prefilter_topk, use_prefilter

    timings: dict = {}
    full_scores = keep_scores or all_scores_path is not None
    with _writer_named(store):
        prefiltered = not on_ray and use_prefilter(store, config, full_scores=full_scores)
        if prefiltered:  # FAISS candidates + exact rerank (forvalue.engine.prefilter, docs/prefilter.md)
            top = prefilter_topk(store, val, config, runner.device, timings=timings)
    # opened once the query is known to run (a refusal above leaves no temporary file or folder behind)
    writer = ScoreWriter(all_scores_path, col_names) if all_scores_path else None
    blocks = () if prefiltered else score_all(store, val, config, runner.device)
    bar = tqdm(total=total, desc="scoring", unit="sample", disable=not config.progress or prefiltered or on_ray)
    try:
        if on_ray:  # the full scan on Ray actors, merged top-k (forvalue.engine.ray_scan)
            from forvalue.engine.ray_scan import ray_score_topk

            top, blocks = ray_score_topk(
                store,
                val,
                config,
                config.device,
                engine,
                keep=keep_scores or writer is not None,
                progress=config.progress,
            )
        for first, ids, labels, scores in blocks:
            if not on_ray:  # the Ray scan returns its merged top-k
                top.update(scores, first)
            if writer:
                writer.write(ids, labels, scores)
            if keep_scores:
                kept_scores.append(scores)
                kept_ids.extend(ids)
            bar.update(len(ids))
    except BaseException:
        if writer:
            writer.abort()
        raise
    bar.close()
    if writer:
        writer.close()
    table = _top_table(store, top, samples, config)
    return QueryResult(
        top=table,
        n_train=total,
        n_validation=len(samples),
        seconds=time.perf_counter() - started,
        scores=np.concatenate(kept_scores).T if keep_scores else None,
        train_ids=kept_ids if keep_scores else None,
        prefiltered=prefiltered,
        rows_read=timings.get("rows_read") if prefiltered else None,
        rows_reranked=timings.get("rows_reranked") if prefiltered else None,
        candidates=[int(c) for c in timings["candidates"]] if prefiltered else None,
        pools=[int(c) for c in timings["pool"]] if prefiltered and timings.get("pool") is not None else None,
        unsettled=[col_names[j] for j in timings["unsettled"]] if prefiltered else None,
        config=config,
        auto_settings=auto_settings,
    )


@contextlib.contextmanager
def _writer_named(store: Store):
    """A prefilter error while another process writes the store (``index sketch --rebuild`` changing the sketch, a
    build extending it) says so, instead of naming a repair the store does not need (hostile pass: 4 of 5 queries
    beside a sketch rebuild failed with "run 'forvalue index sketch --rebuild'")."""
    from forvalue.storage.store import writer_of

    try:
        yield
    except ConfigError:
        raise  # the user's settings (--candidates with --all-scores...): theirs to change, writer or not
    except ForValueError as exc:
        holder = writer_of(store.path)
        if holder is not None:
            who = f"another process is writing the store ({holder})"
        elif _rewritten(store):
            who = "the store was rewritten while this query ran (an 'index sketch' or a build ended meanwhile)"
        else:
            raise
        raise StoreError(
            f"{store.path}: {who} and its sketches changed under this query; query again (when the writer has "
            "finished), or add --exact"
        ) from exc


def _rewritten(store: Store) -> bool:
    """Whether the store's manifest on disk is no longer the one ``store`` opened with."""
    try:
        return Store.open(store.path).manifest != store.manifest
    except ForValueError:
        return False


def _top_table(store: Store, top: TopK, samples: list[Sample], config: QueryConfig) -> pa.Table:
    scores, rows = top.result()  # rows -1: padding of a prefiltered column with fewer rows than the others
    columns = ["id", "label"] + (["prompt", "response", "text"] if config.include_text else [])
    unique_rows = np.unique(rows[rows >= 0])
    fetched = store.take(unique_rows.tolist(), columns).to_pylist()
    by_row = dict(zip(unique_rows.tolist(), fetched))
    val_ids = ["mean"] if config.aggregate == "mean" else [s.id for s in samples]
    val_labels = [None] if config.aggregate == "mean" else [s.label for s in samples]
    out: dict[str, list] = {
        k: [] for k in ("validation_id", "validation_label", "rank", "train_id", "train_label", "score")
    }
    if config.include_text:
        out["train_text"] = []
    for col, (vid, vlabel) in enumerate(zip(val_ids, val_labels)):
        for rank, (row, score) in enumerate(zip(rows[col][rows[col] >= 0], scores[col][rows[col] >= 0]), start=1):
            rec = by_row[int(row)]
            out["validation_id"].append(vid)
            out["validation_label"].append(vlabel)
            out["rank"].append(rank)
            out["train_id"].append(rec["id"])
            out["train_label"].append(rec["label"])
            out["score"].append(float(score))
            if config.include_text:
                text = rec["text"] if rec["text"] is not None else f"{rec['prompt']}{rec['response']}"
                out["train_text"].append(text)
    return pa.table(out)
