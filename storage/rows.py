"""The Arrow row format of the ``samples`` table: written by the build, decoded by every scorer.

One module for both directions so that the layout (flattened per-token lists, the order of
columns, dtypes) is defined once: :func:`encoded_to_arrow` turns encodings into rows
(schema :func:`forvalue.schemas.tables.samples_schema`), :func:`decode_block` turns a batch of
rows back into numpy arrays for scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from forvalue.schemas.tables import error_entries, samples_schema


def encoded_to_arrow(encoded: list, hidden_dtype: str, sketch: pa.FixedSizeListArray | None = None) -> pa.Table:
    """Rows of the ``samples`` table for a list of encodings.

    Parameters
    ----------
    encoded : list of forvalue.indexer.encoder.EncodedSample
        Per sample: ``hidden`` float array ``(n_scored, d)``, ``errors`` (top-m ids/probs
        ``(n_scored, m)``, target ids/probs and tail mass ``(n_scored,)``), ``sq_norm``.
    hidden_dtype : {"float16", "float32"}
    sketch : FixedSizeListArray of float32, length len(encoded), optional
        The prefilter sketch column (``forvalue.indexer.build.sketch_column``).
    """
    schema = samples_schema(hidden_dtype, sketch.type.list_size if sketch is not None else None)
    samples = [e.tokenized.sample for e in encoded]
    columns = {
        "id": pa.array([s.id for s in samples], pa.string()),
        "label": pa.array([s.label for s in samples], pa.string()),
        "prompt": pa.array([s.prompt for s in samples], pa.string()),
        "response": pa.array([s.response for s in samples], pa.string()),
        # a conversation is kept readable as one "role: content" line per turn (Sample.full_text)
        "text": pa.array([s.full_text if s.messages is not None else s.text for s in samples], pa.string()),
        "n_tokens": pa.array([len(e.tokenized.input_ids) for e in encoded], pa.int32()),
        "truncated": pa.array([e.tokenized.truncated for e in encoded], pa.bool_()),
        "n_scored": pa.array([len(e.hidden) for e in encoded], pa.int32()),
        "hidden": _list_array([e.hidden for e in encoded], schema.field("hidden").type.value_type),
        "topk_ids": _list_array([e.errors.topk_ids for e in encoded], pa.int32()),
        "topk_probs": _list_array([e.errors.topk_probs for e in encoded], pa.float32()),
        "target_ids": _list_array([e.errors.target_ids for e in encoded], pa.int32()),
        "target_probs": _list_array([e.errors.target_probs for e in encoded], pa.float32()),
        "tail_mass": _list_array([e.errors.tail_mass for e in encoded], pa.float32()),
        "sq_norm": pa.array([e.sq_norm for e in encoded], pa.float64()),
    }
    if sketch is not None:
        columns["sketch"] = sketch
    return pa.table(columns, schema=schema)


def _list_array(parts: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([p.ravel() for p in parts]) if parts else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


@dataclass
class TrainBlock:
    """Decoded scoring columns of a batch of stored rows.

    Attributes
    ----------
    hidden : float32 array, shape (N, d)
    ids, values : arrays, shape (N, m + 1)
    lengths : int64 array, shape (rows,)
    sq_norms : float64 array, shape (rows,)
    """

    hidden: np.ndarray
    ids: np.ndarray
    values: np.ndarray
    lengths: np.ndarray
    sq_norms: np.ndarray


def _flat(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False)


def decode_block(batch: pa.RecordBatch | pa.Table, hidden_size: int) -> TrainBlock:
    """Numpy views of a batch with the columns of ``forvalue.schemas.tables.SCORING_COLUMNS``."""
    lengths = batch.column("n_scored").to_numpy().astype(np.int64)
    n = int(lengths.sum())
    hidden = _flat(batch.column("hidden")).reshape(n, hidden_size).astype(np.float32, copy=False)
    topk_ids = _flat(batch.column("topk_ids")).reshape(n, -1)
    topk_probs = _flat(batch.column("topk_probs")).reshape(n, -1)
    ids, values = error_entries(
        topk_ids, topk_probs, _flat(batch.column("target_ids")), _flat(batch.column("target_probs"))
    )
    return TrainBlock(hidden, ids, values, lengths, batch.column("sq_norm").to_numpy())
