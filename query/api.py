"""Python API: build a store, inspect it, and query it (the CLI only calls these).

Example
-------
>>> from forvalue.api import build_index, run_query
>>> build_index(["train.jsonl"], "store/")                     # doctest: +SKIP
>>> result = run_query("store/", ["val.jsonl"])                # doctest: +SKIP
>>> result.top.to_pandas().head()                              # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from forvalue.engine.ranking import TopK
from forvalue.engine.scorer import BlockedScorer, TrainBlock, decode_block
from forvalue.engine.validation import ValidationSet, data_for_store, encode_validation, load_validation_samples
from forvalue.indexer.build import BuildReport, build_index
from forvalue.indexer.data import Sample
from forvalue.indexer.model_runner import load_runner
from forvalue.present.output import ScoreWriter, check_output_path
from forvalue.schemas.config import BuildConfig, DataConfig, EngineConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import ConfigError, StoreError
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage.store import Store

__all__ = [
    "build_index",
    "add_to_index",
    "settings_for_store",
    "BuildReport",
    "run_query",
    "QueryResult",
    "load_store_runner",
    "score_all",
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
    """

    top: pa.Table
    n_train: int
    n_validation: int
    seconds: float
    scores: np.ndarray | None = None
    train_ids: list[str] | None = None
    prefiltered: bool = False


def settings_for_store(manifest, config: BuildConfig) -> BuildConfig:
    """``config`` with the store's encoding settings, and its model unless ``config`` names one.

    What ``index add`` (:func:`add_to_index`) encodes with: chat template, max length, top-m,
    scored tokens, position filter, hidden dtype and sketch come from the manifest; model path,
    adapter and dtype too, each unless given; columns, ``on_bad``, batch sizes and shard from ``config``.
    """
    m = manifest
    data = replace(
        config.data,
        chat_template=m.chat_template,
        max_length=m.max_length,
        image_column=config.data.image_column or m.image_column,
    )
    model = replace(
        config.model,
        path=config.model.path or m.model_path,
        adapter=config.model.adapter or m.adapter_path,
        dtype=m.dtype if config.model.dtype == "auto" else config.model.dtype,
        image_max_pixels=config.model.image_max_pixels if m.image_max_pixels is None else m.image_max_pixels,
    )
    encode = replace(
        config.encode,
        top_m=m.top_m,
        score_tokens=m.score_tokens,
        lowest_likelihood_ratio=m.lowest_likelihood_ratio,
        hidden_dtype=m.hidden_dtype,
        int8_block=m.hidden_block,
        probs_dtype=m.probs_dtype,
        sketch_dim=m.sketch_dim or 0,
        sketch_vocab_buckets=m.sketch_vocab_buckets,
        sketch_hidden_cols=m.sketch_hidden_cols,
        sketch_seed=m.sketch_seed,
        sketch_basis=m.sketch_basis,
    )
    return replace(config, data=data, model=model, encode=encode)


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
    >>> forvalue.add_to_index(["more.jsonl"], "runs/store").written     # doctest: +SKIP
    """
    manifest = Store.open(store).manifest
    return build_index(data_paths, store, settings_for_store(manifest, config), engine=engine)


def load_store_runner(store: Store, model: ModelConfig | None = None):
    """Load the store's model (or ``model`` when given) with the store's dtype unless overridden."""
    manifest = store.manifest
    model = model or ModelConfig()
    return load_runner(
        replace(
            model,
            path=model.path or manifest.model_path,
            adapter=model.adapter or manifest.adapter_path,
            dtype=manifest.dtype if model.dtype == "auto" else model.dtype,
            image_max_pixels=model.image_max_pixels if manifest.image_max_pixels is None else manifest.image_max_pixels,
        )
    )


def _open(store: str | Path | Store) -> Store:
    store = store if isinstance(store, Store) else Store.open(store)
    if store.count() == 0:
        raise StoreError(f"{store.path}: the store holds no samples; add some with 'forvalue index add'")
    return store


def score_all(store: str | Path | Store, val: ValidationSet, config: QueryConfig, device, sink=None):
    """Stream the whole store through the exact scorer; yields ``(first_row, ids, labels, scores)``.

    ``scores`` is float64 of shape ``(rows, n_val)`` (or ``(rows, 1)`` with
    ``aggregate='mean'``), already normalized per ``config.normalize``. The mean is scored in the
    G-form (one matrix ``mean_v G_v``) when :func:`forvalue.engine.gform.choose_form` finds it cheaper.
    """
    from forvalue.engine.gform import BlockedGForm, choose_form

    store = _open(store)
    gform = config.aggregate == "mean" and choose_form(val, 1) == "gform"
    if gform:  # one matrix mean_v G_v scored against every stored row (forvalue.engine.gform, docs/gform.md)
        scorer = BlockedGForm(val, np.full((len(val), 1), 1.0 / len(val)), device)
        val_norms = np.sqrt(np.maximum(scorer.sq_frobenius(), 0.0))
    else:
        scorer = BlockedScorer(val, device, config.val_block_tokens)
        val_norms = np.sqrt(val.sq_norms)
    if config.aggregate == "mean" and not gform:
        gram = scorer.score(TrainBlock(val.hidden, val.ids, val.values, val.lengths, val.sq_norms))
        val_norms = np.sqrt(np.array([max(gram.mean(), 0.0)]))
    first = 0
    for batch in store.scan(SCORING_COLUMNS + ["id", "label"], batch_size=config.read_rows):
        block = decode_block(batch, store.manifest.hidden_size)
        scores = scorer.score(block)
        if config.aggregate == "mean" and not gform:
            scores = scores.mean(axis=1, keepdims=True)
        if config.normalize == "cosine":
            scores = scores / np.maximum(np.sqrt(block.sq_norms)[:, None] * val_norms[None, :], 1e-30)
        yield first, batch.column("id").to_pylist(), batch.column("label").to_pylist(), scores
        first += batch.num_rows


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
    runner : optional
        An already loaded runner of the store's model.
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
    >>> r = forvalue.run_query("runs/store", ["val.jsonl"], forvalue.QueryConfig(top_k=5))   # doctest: +SKIP
    >>> r.top.to_pandas().head()                                                             # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    on_ray = engine is not None and engine.engine == "ray"
    if on_ray and config.candidates is not None:
        raise ConfigError("candidates", "--engine ray scores every stored sample (exact scan); drop --candidates")
    if all_scores_path is not None:
        check_output_path(all_scores_path, (".parquet",))
    store = _open(store)
    if runner is None:
        runner = load_store_runner(store, replace(model or ModelConfig(), device=config.device))
    samples = load_validation_samples(validation, data_for_store(data, store.manifest))
    val = encode_validation(runner, samples, store.manifest, data, config.batch_size)
    n_cols = 1 if config.aggregate == "mean" else len(val)
    col_names = ["mean"] if config.aggregate == "mean" else [s.id for s in samples]
    top = TopK(config.top_k, n_cols)
    writer = ScoreWriter(all_scores_path, col_names) if all_scores_path else None
    kept_scores, kept_ids = [], []
    total = store.count()
    from forvalue.engine.prefilter import prefilter_topk, use_prefilter

    prefiltered = not on_ray and use_prefilter(store, config, full_scores=keep_scores or all_scores_path is not None)
    if prefiltered:  # FAISS candidates + exact rerank (forvalue.engine.prefilter, docs/prefilter.md)
        top = prefilter_topk(store, val, config, runner.device)
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
                score_all,
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
    )


def _top_table(store: Store, top: TopK, samples: list[Sample], config: QueryConfig) -> pa.Table:
    scores, rows = top.result()
    columns = ["id", "label"] + (["prompt", "response", "text"] if config.include_text else [])
    unique_rows = np.unique(rows)
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
        for rank, (row, score) in enumerate(zip(rows[col], scores[col]), start=1):
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
