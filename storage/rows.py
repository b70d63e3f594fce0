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

from forvalue.schemas.hidden_codec import dequantize, quantize
from forvalue.schemas.tables import HIDDEN_SCALE_COLUMN, error_entries, schema_of


def encoded_to_arrow(encoded: list, manifest, sketch: pa.FixedSizeListArray | None = None) -> pa.Table:
    """Rows of the ``samples`` table of a store with ``manifest`` for a list of encodings.

    Parameters
    ----------
    encoded : list of forvalue.indexer.encoder.EncodedSample
        Per sample: ``hidden`` float array ``(n_scored, d)`` (for an int8 store also ``quantized``,
        its int8 codes and scales), ``errors`` (top-m ids/probs ``(n_scored, m)``, target ids/probs
        and tail mass ``(n_scored,)``), ``sq_norm``.
    manifest : forvalue.schemas.manifest.Manifest
        The store's: its hidden dtype and int8 block, id/probability/sketch types (``schema_of``).
    sketch : FixedSizeListArray, length len(encoded), optional
        The prefilter sketch column (``forvalue.indexer.build.sketch_column``); cast to the store's type.
    """
    schema = _schema(manifest, sketch)
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
    }
    codes = [_codes(e, manifest.hidden_block) for e in encoded] if manifest.hidden_dtype == "int8" else None
    parts = [(e.hidden, None if codes is None else codes[j], e.errors) for j, e in enumerate(encoded)]
    columns.update(_scoring_arrays(parts, [e.sq_norm for e in encoded], manifest, schema, sketch))
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def stored_rows(meta, parts: list, sq_norms, manifest, sketch: pa.FixedSizeListArray | None = None) -> pa.Table:
    """Rows of a store with ``manifest`` from already stored rows re-encoded (``forvalue.indexer.convert``).

    ``meta`` (a batch of stored rows) gives the id, label, text, ``n_tokens`` and ``truncated`` columns;
    ``parts`` per row ``(hidden (n, d) as stored, int8 (codes, scales) or None, SparseErrors)``.
    """
    schema = _schema(manifest, sketch)
    columns = {name: meta.column(name) for name in ("id", "label", "prompt", "response", "text", "n_tokens")}
    columns["truncated"] = meta.column("truncated")
    columns.update(_scoring_arrays(parts, sq_norms, manifest, schema, sketch))
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def _schema(manifest, sketch) -> pa.Schema:
    schema = schema_of(manifest)
    if sketch is None and "sketch" in schema.names:
        schema = schema.remove(schema.get_field_index("sketch"))
    return schema


def _scoring_arrays(parts: list, sq_norms, manifest, schema: pa.Schema, sketch) -> dict:
    """The per-token columns of rows given per row ``(hidden, int8 codes or None, SparseErrors)``."""
    errors = [p[2] for p in parts]
    columns = {
        "n_scored": pa.array([len(p[0]) for p in parts], pa.int32()),
        "topk_ids": _list_array([e.topk_ids for e in errors], _value_type(schema, "topk_ids")),
        "topk_probs": _list_array([e.topk_probs for e in errors], _value_type(schema, "topk_probs")),
        "target_ids": _list_array([e.target_ids for e in errors], _value_type(schema, "target_ids")),
        "target_probs": _list_array([e.target_probs for e in errors], pa.float32()),
        "tail_mass": _list_array([e.tail_mass for e in errors], _value_type(schema, "tail_mass")),
        "sq_norm": pa.array(np.asarray(sq_norms, np.float64), pa.float64()),
    }
    width = getattr(manifest, "stored_width", manifest.hidden_size)
    wrong = next((p[0].shape[1] for p in parts if p[0].ndim != 2 or p[0].shape[1] != width), None)
    if wrong is not None:  # e.g. full-width hidden states for a low-rank store (never written)
        raise ValueError(f"hidden states of width {wrong} for a store that keeps {width} values per token")
    if manifest.hidden_dtype == "int8":
        columns["hidden"] = _list_array([p[1][0] for p in parts], pa.int8())
        columns[HIDDEN_SCALE_COLUMN] = _list_array([p[1][1] for p in parts], pa.float16())
    else:
        columns["hidden"] = _list_array([p[0] for p in parts], _value_type(schema, "hidden"))
    if sketch is not None:
        columns["sketch"] = sketch.cast(schema.field("sketch").type)
    return columns


def _value_type(schema: pa.Schema, name: str) -> pa.DataType:
    return schema.field(name).type.value_type


def _codes(encoded, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The int8 codes and scales of an encoding: the encoder's (those its ``sq_norm`` was computed on) when
    they use ``block``, else quantized here from its hidden states."""
    codes = getattr(encoded, "quantized", None)
    if codes is not None and codes[0].shape[1] == block * codes[1].shape[1]:
        return codes
    return quantize(encoded.hidden, block)


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


def hidden_values(batch: pa.RecordBatch | pa.Table, hidden_size: int) -> np.ndarray:
    """The stored hidden states of a batch as float32 ``(tokens, hidden_size)``: float16/float32 values
    widened, int8 codes dequantized with the batch's ``hidden_scale``
    (:func:`forvalue.schemas.hidden_codec.dequantize`)."""
    flat = _flat(batch.column("hidden"))
    hidden = flat.reshape(-1, hidden_size)
    if HIDDEN_SCALE_COLUMN in batch.schema.names:
        scales = _flat(batch.column(HIDDEN_SCALE_COLUMN))
        if hidden.shape[0] and scales.size % hidden.shape[0]:
            raise ValueError(f"{scales.size} int8 scales for {hidden.shape[0]} tokens")
        return dequantize(hidden, scales.reshape(hidden.shape[0], -1))
    if flat.dtype == np.int8:
        raise ValueError("int8 hidden states were read without their 'hidden_scale' column")
    return hidden.astype(np.float32, copy=False)


def decode_block(batch: pa.RecordBatch | pa.Table, hidden_size: int) -> TrainBlock:
    """Numpy views of a batch with the columns of ``forvalue.schemas.tables.SCORING_COLUMNS`` (and, for an int8
    store, ``hidden_scale``: :meth:`forvalue.storage.store.Store.scan` adds it)."""
    lengths = batch.column("n_scored").to_numpy().astype(np.int64)
    n = int(lengths.sum())
    hidden = hidden_values(batch, hidden_size)
    if hidden.shape[0] != n:
        raise ValueError(f"{hidden.shape[0]} hidden states for {n} scored tokens")
    topk_ids = _flat(batch.column("topk_ids")).reshape(n, -1)
    topk_probs = _flat(batch.column("topk_probs")).reshape(n, -1)
    ids, values = error_entries(
        topk_ids, topk_probs, _flat(batch.column("target_ids")), _flat(batch.column("target_probs"))
    )
    return TrainBlock(hidden, ids, values, lengths, batch.column("sq_norm").to_numpy())
