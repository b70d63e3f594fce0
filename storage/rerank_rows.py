"""The prefilter's second stage: each stored row's ``G_i U`` as a sparse list of (vocabulary id, c values).

For-Value scores ``S(v, i) = <G_v, G_i>`` with ``G = sum_k e_k h_k^T``. The prefilter's sketch
(:mod:`forvalue.indexer.sketch`) folds the vocabulary side into a few thousand buckets, and its misses are
count-sketch collisions (docs/prefilter.md). The second stage keeps every vocabulary id apart and folds the
hidden side instead, onto a basis ``U`` (``d x c``, c >= 2: the mean hidden direction and the top principal
directions orthogonal to it, :func:`forvalue.storage.sketch_basis.fit_basis`; the store's own sketch basis when
it is fitted with at least 2 columns, so the second stage is that sketch without its collisions)::

    s2(v, i) = <G_v U, G_i U>

``G_i U`` is non-zero only on the row's error support (the top-m ids and targets of its tokens): about 263
distinct ids per row at top-m 32 and 24 scored tokens, stored as int32 id + c float16 values (8 bytes at c = 2).
A query ranks the sketch's candidates by ``s2`` and scores exactly only the best of them
(:mod:`forvalue.engine.prefilter`). ``s2`` is computed from the stored hidden states and errors alone, the
validation side from its encodings, both in the store's stored hidden coordinates.
"""

from __future__ import annotations

import numpy as np

# Hidden directions kept per vocabulary id at least (the basis' columns; more when the store's sketch has more, so
# the second stage holds the sketch's hidden subspace without its collisions).
COLS = 2
# Largest magnitude kept as float16 (below its 65,504 maximum, with room for rounding).
FLOAT16_MAX = 60000.0


def entry_dtype(cols: int, wide: bool = False) -> np.dtype:
    """The record of one entry: the int32 id and its ``cols`` values, float16 (float32 when ``wide``)."""
    return np.dtype([("id", "<i4"), ("v", "<f4" if wide else "<f2", (cols,))])


def row_entries(
    hidden: np.ndarray, ids: np.ndarray, values: np.ndarray, lengths: np.ndarray, basis: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``G_i U`` of each row of a decoded block, sparse: ``(counts, ids, values)``.

    Parameters
    ----------
    hidden : array, shape (N, d)
        Hidden states of the block's scored tokens, rows concatenated (stored coordinates).
    ids, values : arrays, shape (N, m + 1)
        Error support of each token (``forvalue.indexer.sparse_errors.error_entries``).
    lengths : int array, shape (rows,)
    basis : float32 array, shape (d, c)
    vocab_size : int

    Returns
    -------
    counts : int64 (rows,)
        Distinct ids per row.
    ids : int32 (sum(counts),)
        Each row's ids in increasing order, rows one after another.
    values : float32 (sum(counts), c)
        ``sum_k e_k[id] (U^T h_k)`` over the row's tokens.
    """
    lengths = np.asarray(lengths, np.int64)
    width = ids.shape[1] if ids.ndim == 2 else 0
    cols = basis.shape[1]
    proj = np.asarray(hidden, np.float32) @ np.asarray(basis, np.float32)  # (N, c)
    row = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths * width)
    keys = row * int(vocab_size) + np.asarray(ids, np.int64).ravel()
    uniq, inverse = np.unique(keys, return_inverse=True)
    weights = np.asarray(values, np.float32)[:, :, None] * proj[:, None, :]  # (N, m + 1, c)
    weights = weights.reshape(-1, cols).astype(np.float64)
    out = np.stack([np.bincount(inverse, weights[:, j], minlength=uniq.size) for j in range(cols)], axis=1)
    counts = np.bincount(uniq // int(vocab_size), minlength=lengths.size).astype(np.int64)
    return counts, (uniq % int(vocab_size)).astype(np.int32), out.astype(np.float32)


def packed(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The entries as one structured array (:func:`entry_dtype`): float16 values, or float32 when a value passes
    :data:`FLOAT16_MAX` (or is not finite: kept as is, never rounded to infinity)."""
    big = bool(values.size) and not (np.abs(values) <= FLOAT16_MAX).all()
    out = np.empty(ids.size, entry_dtype(values.shape[1], wide=big))
    out["id"], out["v"] = ids, values
    return out


def validation_table(
    hidden: np.ndarray, ids: np.ndarray, values: np.ndarray, basis: np.ndarray, vocab_size: int
) -> np.ndarray:
    """``G_v U`` of one validation sample (its tokens), dense: float32 ``(vocab_size, c)``."""
    cols = basis.shape[1]
    proj = np.asarray(hidden, np.float32) @ np.asarray(basis, np.float32)
    weights = (np.asarray(values, np.float64)[:, :, None] * proj[:, None, :].astype(np.float64)).reshape(-1, cols)
    flat = np.asarray(ids, np.int64).ravel()
    return np.stack(
        [np.bincount(flat, weights[:, j], minlength=vocab_size)[:vocab_size] for j in range(cols)], axis=1
    ).astype(np.float32)


def bag_scores(ids: np.ndarray, values: np.ndarray, counts: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``s2`` of rows given as entries (``ids`` int64, ``values`` float32 ``(n, c)``, ``counts`` per row, rows one
    after another) against a validation table ``(vocab, c)``: float64 ``(rows,)``."""
    import torch

    counts = np.asarray(counts, np.int64)
    if not counts.size or not ids.size:
        return np.zeros(counts.size, np.float64)
    idx = torch.from_numpy(np.ascontiguousarray(ids, np.int64))
    bags = torch.from_numpy(np.cumsum(counts) - counts)
    weights = torch.from_numpy(np.ascontiguousarray(values, np.float32))
    total = None
    for j in range(table.shape[1]):
        col = torch.from_numpy(np.ascontiguousarray(table[:, j : j + 1], np.float32))
        part = torch.nn.functional.embedding_bag(
            idx, col, bags, mode="sum", per_sample_weights=weights[:, j].contiguous()
        )
        total = part if total is None else total + part
    return total[:, 0].double().numpy()
