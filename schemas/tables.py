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
SCHEMA_VERSION = 2
SAMPLES_TABLE = "samples"

_HIDDEN_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


def samples_schema(hidden_dtype: str = "float16", sketch_dim: int | None = None) -> pa.Schema:
    """Schema of the ``samples`` table.

    Parameters
    ----------
    hidden_dtype : {"float16", "float32"}
        Storage type of the hidden-state values.
    sketch_dim : int or None
        Length of the ``sketch`` column (the prefilter sketch of ``G``, float32,
        ``forvalue.indexer.sketch``); None for stores without one (schema version 1 stores).
    """
    sketch = [pa.field("sketch", pa.list_(pa.float32(), sketch_dim))] if sketch_dim else []
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
            pa.field("hidden", pa.list_(_HIDDEN_TYPES[hidden_dtype]), nullable=False),
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_probs", pa.list_(pa.float32()), nullable=False),
            pa.field("target_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("target_probs", pa.list_(pa.float32()), nullable=False),
            pa.field("tail_mass", pa.list_(pa.float32()), nullable=False),
            pa.field("sq_norm", pa.float64(), nullable=False),
        ]
        + sketch,
        metadata={"forvalue.schema_version": str(SCHEMA_VERSION)},
    )


# Columns the exact scorer reads (everything else is metadata for humans).
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
