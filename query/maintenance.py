"""Store maintenance that loads no model: what a store holds, and its prefilter sketches and FAISS index.

Imports stay light (no torch, transformers or lancedb at module level) so that
``forvalue index info`` answers in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from forvalue.storage import faiss_index
from forvalue.storage.store import Store


def store_info(path: str | Path) -> dict:
    """Manifest and counts of a store, as a plain dict (no model is loaded).

    Returns
    -------
    dict
        ``samples``, ``scored_tokens``, ``truncated_samples``, ``labels`` (label -> count),
        ``table_version``, ``bytes_on_disk``, ``bytes_per_token``, ``sketch``,
        ``prefilter_index`` and ``manifest`` (the manifest's fields).

    Example
    -------
    >>> forvalue.store_info("runs/store")["samples"]        # doctest: +SKIP
    """
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

    from forvalue.engine.scorer import decode_block
    from forvalue.indexer.build import BASIS_FIT_TOKENS
    from forvalue.indexer.sketch import SketchSpec, fit_basis, get_sketcher
    from forvalue.schemas.config import EncodeConfig
    from forvalue.schemas.tables import SCORING_COLUMNS
    from forvalue.storage.sketch_basis import load_basis, publish_basis

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
