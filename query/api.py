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

from forvalue.indexer.build import BuildReport, build_index
from forvalue.indexer.data import Sample
from forvalue.indexer.model_runner import load_runner
from forvalue.schemas.config import DataConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import StoreError
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage import faiss_index
from forvalue.storage.store import Store

from forvalue.engine.ranking import TopK
from forvalue.engine.scorer import BlockedScorer, TrainBlock, decode_block
from forvalue.engine.validation import ValidationSet, data_for_store, encode_validation, load_validation_samples

__all__ = ["build_index", "BuildReport", "run_query", "QueryResult", "store_info", "load_store_runner", "score_all"]


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


def store_info(path: str | Path) -> dict:
    """Manifest and counts of a store, as a plain dict."""
    store = Store.open(path)
    rows = tokens = truncated = 0
    labels: dict[str, int] = {}
    for batch in store.scan(["n_scored", "truncated", "label"], batch_size=65536):
        rows += batch.num_rows
        tokens += int(np.asarray(batch.column("n_scored")).sum())
        truncated += int(np.asarray(batch.column("truncated")).sum())
        for label in batch.column("label").to_pylist():
            labels[str(label)] = labels.get(str(label), 0) + 1
    size = store.size_bytes()
    return {
        "path": str(path),
        "samples": rows,
        "scored_tokens": tokens,
        "truncated_samples": truncated,
        "labels": dict(sorted(labels.items())) if len(labels) <= 50 else f"{len(labels)} distinct",
        "table_version": store.version(),
        "bytes_on_disk": size,
        "bytes_per_token": round(size / tokens, 1) if tokens else None,
        "sketch": _sketch_state(store),
        "prefilter_index": _prefilter_state(store, rows),
        "manifest": store.manifest.__dict__,
    }


def _sketch_state(store: Store) -> str:
    m = store.manifest
    if not m.sketch_dim or not store.has_column(faiss_index.SKETCH_COLUMN):
        return "none (add with 'forvalue index sketch')"
    return f"D={m.sketch_dim} (vocab buckets {m.sketch_vocab_buckets}, hidden cols {m.sketch_hidden_cols}, {m.sketch_basis} basis)"


def _prefilter_state(store: Store, rows: int) -> str:
    meta = faiss_index.describe(store)
    if meta is None:
        return "none"
    behind = f", {rows - meta['rows']} rows behind (extended on next use)" if meta["rows"] < rows else ""
    return f"{meta.get('factory')} over {meta['rows']} rows, {meta.get('bytes', 0) / 1e6:.1f} MB{behind}"


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
    ``aggregate='mean'``), already normalized per ``config.normalize``.
    """
    store = _open(store)
    scorer = BlockedScorer(val, device, config.val_block_tokens)
    val_norms = np.sqrt(val.sq_norms)
    if config.aggregate == "mean":
        gram = scorer.score(TrainBlock(val.hidden, val.ids, val.values, val.lengths, val.sq_norms))
        val_norms = np.sqrt(np.array([max(gram.mean(), 0.0)]))
    first = 0
    for batch in store.scan(SCORING_COLUMNS + ["id", "label"], batch_size=config.read_rows):
        block = decode_block(batch, store.manifest.hidden_size)
        scores = scorer.score(block)
        if config.aggregate == "mean":
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
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    store = _open(store)
    if runner is None:
        runner = load_store_runner(store, replace(model or ModelConfig(), device=config.device))
    samples = load_validation_samples(validation, data_for_store(data, store.manifest))
    val = encode_validation(runner, samples, store.manifest, data, config.batch_size)
    n_cols = 1 if config.aggregate == "mean" else len(val)
    col_names = ["mean"] if config.aggregate == "mean" else [s.id for s in samples]
    top = TopK(config.top_k, n_cols)
    writer = _ScoreWriter(all_scores_path, col_names) if all_scores_path else None
    kept_scores, kept_ids = [], []
    total = store.count()
    from forvalue.engine.prefilter import prefilter_topk, use_prefilter

    prefiltered = use_prefilter(store, config, full_scores=keep_scores or all_scores_path is not None)
    if prefiltered:  # FAISS candidates + exact rerank (forvalue.engine.prefilter, docs/prefilter.md)
        top = prefilter_topk(store, val, config, runner.device)
    bar = tqdm(total=total, desc="scoring", unit="sample", disable=not config.progress or prefiltered)
    for first, ids, labels, scores in () if prefiltered else score_all(store, val, config, runner.device):
        top.update(scores, first)
        if writer:
            writer.write(ids, labels, scores)
        if keep_scores:
            kept_scores.append(scores)
            kept_ids.extend(ids)
        bar.update(len(ids))
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
    out: dict[str, list] = {k: [] for k in ("validation_id", "validation_label", "rank", "train_id", "train_label", "score")}
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


class _ScoreWriter:
    """Streams the full score matrix to Parquet, one row group per scored block."""

    def __init__(self, path: str | Path, columns: list[str]):
        import pyarrow.parquet as pq

        unique = _unique_names(columns)
        self.schema = pa.schema([("train_id", pa.string()), ("train_label", pa.string())] + [(c, pa.float64()) for c in unique])
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, ids: list, labels: list, scores: np.ndarray) -> None:
        arrays = [pa.array(ids, pa.string()), pa.array(labels, pa.string())] + [pa.array(scores[:, j]) for j in range(scores.shape[1])]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}#{count}")
    return out
