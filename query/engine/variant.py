"""Score variants that leave the store as it is: centred hidden states (``center="mean"``).

Centring replaces ``<h_v, h_i>`` by ``<h_v - mu, h_i - mu>`` in Eq. 1, for a mean hidden state ``mu``
(:func:`store_mean`). The store is not rewritten: the validation side holds ``d + 1`` columns
``[h_v - mu, -<h_v - mu, mu>]`` and every stored token is read as ``[h_i, 1]``, so the plain inner product over
``d + 1`` columns is the centred one,

    <h_v - mu, h_i> - <h_v - mu, mu> = <h_v - mu, h_i - mu>,

and every scorer (token form, G-form, prefilter rerank, explanations, Ray actors) computes the centred score
without knowing it: :func:`centre_validation` transforms the validation set once and records ``mu`` in it,
:func:`for_scoring` reads each stored block for it. The stored rows' ``||G_i||^2`` (the cosine denominator)
become the centred ones without a pass over token pairs:

    ||G^c||^2 = ||G||^2 - 2 sum_k <E, e_k> <h_k, mu> + |mu|^2 ||E||^2,    E = sum_k e_k,

from the stored ``||G||^2`` (:func:`centred_sq_norms`). The float64 reference is
``tools.reference.centred_score``; docs/variants.md has the measurements.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage.rows import TrainBlock, decode_block

if TYPE_CHECKING:  # the validation module pulls the encoder in; this one stays light
    from forvalue.engine.validation import ValidationSet

# Stored samples whose scored tokens give the mean hidden state (evenly spaced over the store).
MEAN_ROWS = 4096


def store_mean(store, rows: int = MEAN_ROWS) -> np.ndarray:
    """The mean hidden state ``mu``, float64 of shape ``(d,)``: over the scored tokens of ``min(rows, n)``
    stored samples at evenly spaced positions (all of them in a store of at most ``rows`` samples).

    Deterministic for a store version; hidden states as the scorers read them (int8 dequantized).
    """
    total = store.count()
    positions = np.unique(np.linspace(0, max(total - 1, 0), num=min(rows, total)).round().astype(np.int64))
    width = store.manifest.stored_width  # a low-rank store's coordinates (its validation sets are projected)
    acc, count = np.zeros(width), 0
    for start in range(0, positions.size, 1024):
        part = positions[start : start + 1024].tolist()
        block = decode_block(store.take(part, SCORING_COLUMNS), width)
        acc += block.hidden.sum(axis=0, dtype=np.float64)
        count += block.hidden.shape[0]
    return acc / max(count, 1)


def centred_sq_norms(
    hidden: np.ndarray, ids: np.ndarray, values: np.ndarray, lengths: np.ndarray, sq_norms: np.ndarray, mu
) -> np.ndarray:
    """``||G_r^c||_F^2`` per row from its stored ``||G_r||_F^2`` (formula in the module docstring), float64.

    ``hidden`` ``(N, d)``, ``ids`` / ``values`` ``(N, m + 1)`` error entries, ``lengths`` tokens per row.
    """
    lengths = np.asarray(lengths, np.int64)
    n_rows = lengths.size
    if n_rows == 0:
        return np.zeros(0)
    row_of = np.repeat(np.arange(n_rows), lengths)
    width = int(ids.max(initial=0)) + 1
    keys = (row_of[:, None] * width + ids).ravel()
    unique, inverse = np.unique(keys, return_inverse=True)
    e_sum = np.bincount(inverse, weights=values.ravel().astype(np.float64), minlength=unique.size)  # E per (row, id)
    e_dot = (values.astype(np.float64) * e_sum[inverse].reshape(ids.shape)).sum(axis=1)  # <E_r, e_k> per token
    h_mu = hidden.astype(np.float64) @ np.asarray(mu, np.float64)
    cross = np.bincount(row_of, weights=e_dot * h_mu, minlength=n_rows)
    e_sq = np.bincount(unique // width, weights=e_sum * e_sum, minlength=n_rows)
    mu = np.asarray(mu, np.float64)
    return np.asarray(sq_norms, np.float64) - 2.0 * cross + float(mu @ mu) * e_sq


def centre_validation(val: "ValidationSet", mu: np.ndarray) -> "ValidationSet":
    """``val`` with hidden states ``[h - mu, -<h - mu, mu>]`` ``(M, d + 1)``, centred ``sq_norms``, ``center=mu``."""
    mu = np.asarray(mu, np.float64)
    shifted = val.hidden.astype(np.float64) - mu
    hidden = np.hstack([shifted, -(shifted @ mu)[:, None]]).astype(np.float32)
    sq = centred_sq_norms(val.hidden, val.ids, val.values, val.lengths, val.sq_norms, mu)
    return replace(val, hidden=hidden, sq_norms=sq, center=mu)


def centre_block(block: TrainBlock, mu: np.ndarray) -> TrainBlock:
    """A stored block read for a centred validation set: hidden ``[h, 1]`` ``(N, d + 1)``, centred ``sq_norms``."""
    sq = centred_sq_norms(block.hidden, block.ids, block.values, block.lengths, block.sq_norms, mu)
    ones = np.ones((block.hidden.shape[0], 1), np.float32)
    hidden = np.hstack([block.hidden.astype(np.float32, copy=False), ones])
    return TrainBlock(hidden, block.ids, block.values, block.lengths, sq)


def for_scoring(block: TrainBlock, val: "ValidationSet") -> TrainBlock:
    """``block`` as the scorers of ``val`` read it (centred when ``val`` is)."""
    return block if val.center is None else centre_block(block, val.center)


def as_block(val: "ValidationSet") -> TrainBlock:
    """The validation samples as a stored block read for ``val``'s scorers (its Gram matrix, ``||mean G_v||``):
    a centred set's own tokens are ``[h - mu, 0]`` against its ``[h - mu, -<h - mu, mu>]``."""
    hidden = val.hidden
    if val.center is not None:
        hidden = np.hstack([hidden[:, :-1], np.zeros((hidden.shape[0], 1), hidden.dtype)])
    return TrainBlock(hidden, val.ids, val.values, val.lengths, val.sq_norms)


def apply_variant(val: "ValidationSet", store, center: str) -> "ValidationSet":
    """``val`` prepared for ``center`` (``"none"``: unchanged; ``"mean"``: :func:`centre_validation` with
    :func:`store_mean`)."""
    if center == "none" or val.center is not None:
        return val
    return centre_validation(val, store_mean(store))
