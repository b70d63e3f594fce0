"""Arrow schemas of the Lance tables in a store.

One row per training sample. Per-token arrays are flattened in position order:
``hidden`` holds ``n_scored * hidden_size`` values (row-major, one hidden state per
scored position), ``topk_ids``/``topk_probs`` hold ``n_scored * top_m`` values.
For scored position k the prediction error is, on its support,
``e_k[target] = 1 - p_target`` and ``e_k[j] = -p_j`` for the other top-m ids ``j``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# 2: optional fixed-size ``sketch`` column (stores of version 1 have none and stay readable).
# 3: compact encodings recorded in the manifest: int8 hidden states with a ``hidden_scale`` column,
#    packed sparse errors (uint16/uint32 ids, float16 probabilities), float16 sketches. Stores of
#    versions 1-2 (int32 ids, float32 probabilities and sketches) keep opening and scoring as before.
SCHEMA_VERSION = 3
SAMPLES_TABLE = "samples"
HIDDEN_SCALE_COLUMN = "hidden_scale"

HIDDEN_TYPES = {"float16": pa.float16(), "float32": pa.float32(), "int8": pa.int8()}
ID_TYPES = {"int32": pa.int32(), "uint16": pa.uint16(), "uint32": pa.uint32()}
FLOAT_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


def ids_dtype_for(vocab_size: int) -> str:
    """The smallest id type of a vocabulary: ``uint16`` up to 65,536 entries, else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def samples_schema(
    hidden_dtype: str = "float16",
    sketch_dim: int | None = None,
    *,
    ids_dtype: str = "int32",
    probs_dtype: str = "float32",
    sketch_dtype: str = "float32",
) -> pa.Schema:
    """Schema of the ``samples`` table (:func:`schema_of` gives a store's from its manifest).

    Parameters
    ----------
    hidden_dtype : {"float16", "float32", "int8"}
        Storage type of the hidden-state values; ``int8`` adds the ``hidden_scale`` column
        (float16, one scale per token and block of channels, :mod:`forvalue.schemas.hidden_codec`).
    sketch_dim : int or None
        Length of the ``sketch`` column (the prefilter sketch of ``G``,
        ``forvalue.indexer.sketch``); None for stores without one (schema version 1 stores).
    ids_dtype : {"int32", "uint16", "uint32"}
        Type of ``topk_ids`` and ``target_ids`` (``int32`` before schema version 3).
    probs_dtype : {"float32", "float16"}
        Type of ``topk_probs`` and ``tail_mass`` (``target_probs`` stays float32: ``1 - p`` of a
        confident target needs its precision).
    sketch_dtype : {"float32", "float16"}
        Type of the sketch values.
    """
    sketch = [pa.field("sketch", pa.list_(FLOAT_TYPES[sketch_dtype], sketch_dim))] if sketch_dim else []
    scale = [pa.field(HIDDEN_SCALE_COLUMN, pa.list_(pa.float16()), nullable=False)] if hidden_dtype == "int8" else []
    ids, probs = ID_TYPES[ids_dtype], FLOAT_TYPES[probs_dtype]
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("prompt", pa.string()),
            pa.field("response", pa.string()),
            pa.field("text", pa.string()),
            pa.field("n_tokens", pa.int32(), nullable=False),
            pa.field("truncated", pa.bool_(), nullable=False),
            pa.field("n_scored", pa.int32(), nullable=False),
            pa.field("hidden", pa.list_(HIDDEN_TYPES[hidden_dtype]), nullable=False),
            pa.field("topk_ids", pa.list_(ids), nullable=False),
            pa.field("topk_probs", pa.list_(probs), nullable=False),
            pa.field("target_ids", pa.list_(ids), nullable=False),
            pa.field("target_probs", pa.list_(pa.float32()), nullable=False),
            pa.field("tail_mass", pa.list_(probs), nullable=False),
            pa.field("sq_norm", pa.float64(), nullable=False),
        ]
        + sketch
        + scale,
        metadata={"forvalue.schema_version": str(SCHEMA_VERSION)},
    )


def schema_of(manifest) -> pa.Schema:
    """The ``samples`` schema a store's manifest (:class:`forvalue.schemas.manifest.Manifest`) describes."""
    return samples_schema(
        manifest.hidden_dtype,
        manifest.sketch_dim,
        ids_dtype=manifest.ids_dtype,
        probs_dtype=manifest.probs_dtype,
        sketch_dtype=manifest.sketch_dtype,
    )


# Columns the exact scorer reads (everything else is metadata for humans). Int8 stores also need
# ``hidden_scale``: ``forvalue.storage.store.Store.scan``/``take`` add it wherever ``hidden`` is read.
SCORING_COLUMNS = ["hidden", "topk_ids", "topk_probs", "target_ids", "target_probs", "n_scored", "sq_norm"]


def error_entries(
    topk_ids: np.ndarray, topk_probs: np.ndarray, target_ids: np.ndarray, target_probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Support ids and values of the sparse errors, ``m + 1`` entries per position.

    Returns
    -------
    ids : int64 array, shape (n, m + 1)
        Top-m ids followed by the target id.
    values : float32 array, shape (n, m + 1)
        ``-p_j`` for top-m ids other than the target (0 where the id is the target) and
        ``1 - p_y`` for the target, so every id appears with its full error once.
    """
    topk_ids = topk_ids.astype(np.int64, copy=False)
    target_ids = target_ids.astype(np.int64, copy=False)
    vals = np.where(topk_ids == target_ids[:, None], 0.0, -topk_probs).astype(np.float32)
    ids = np.concatenate([topk_ids, target_ids[:, None]], axis=1)
    values = np.concatenate([vals, (1.0 - target_probs)[:, None].astype(np.float32)], axis=1)
    return ids, values
