"""The low-rank tier (``--hidden-rank R``): hidden states stored as ``R`` coordinates in a fitted basis.

The score ``S(v, i) = sum <e_vk, e_ik'> <h_vk, h_ik'>`` needs the hidden states only through inner products.
With ``U`` (``d x R``, orthonormal) a low-rank store keeps ``y = U^T h`` (``R`` values per token) and scores
``<U^T h_v, U^T h_i> = h_v^T U U^T h_i``: the score of the hidden states projected onto the span of ``U``,
computed in ``R`` dimensions by every scoring path unchanged (validation samples are projected with the same
``U``). ``U`` is fitted like the fitted sketch basis (:func:`forvalue.storage.sketch_basis.fit_basis`: the mean
hidden direction, then the top principal directions orthogonal to it), from the first hidden states the
store gets, and kept in the store (:mod:`forvalue.storage.hidden_basis`). ``R = d`` keeps every direction: a
rotation, exact up to float rounding.

What a low-rank store holds, by definition: ``y = U^T h`` computed in float32 from the hidden state as a
full-width store of its dtype would hold it (float16-rounded for float16 and int8 stores), then stored like
a full hidden state of width ``R`` (rounded to float16, or int8-quantized per ``hidden_block`` channels:
:mod:`forvalue.schemas.hidden_codec`). Scores are exact on those stored values.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from forvalue.schemas.errors import ConfigError
from forvalue.schemas.hidden_codec import dequantize, quantize


def check_rank(rank: int, hidden_size: int, sketch_cols: int | None = None) -> None:
    """Refuse a rank the model (or the store's fitted sketch) cannot have (ConfigError naming ``hidden_rank``)."""
    if rank < 0 or rank > hidden_size:
        raise ConfigError(
            "hidden_rank", f"must be between 0 (full width) and the model's hidden size {hidden_size}, got {rank}"
        )
    if rank and sketch_cols is not None and sketch_cols > rank:
        raise ConfigError(
            "hidden_rank",
            f"must be at least the sketch's hidden columns ({sketch_cols}), got {rank}; "
            "lower --sketch-hidden-cols or raise --hidden-rank",
        )


def fit_hidden_basis(hidden: np.ndarray, rank: int, where: str = "the store") -> tuple[np.ndarray, np.ndarray]:
    """``(U float32 (d, rank), energy float64 (rank,))`` fitted to ``hidden`` ``(n, d)``.

    ``energy[r - 1]`` is the fraction of the fitting tokens' squared norm that the first ``r`` columns keep
    (``sum ||U_r^T h||^2 / sum ||h||^2``). Raises ConfigError when there are fewer tokens than ``rank``
    (the remaining directions would be arbitrary, not fitted).
    """
    from forvalue.storage.sketch_basis import basis_from_moments, hidden_moments

    hidden = np.asarray(hidden)
    n, d = hidden.shape
    check_rank(rank, d)
    if n < rank:
        raise ConfigError(
            "hidden_rank",
            f"fitting {rank} directions needs at least {rank} scored tokens, {where} has {n}; "
            "lower --hidden-rank or fit from more samples",
        )
    n, total, gram = hidden_moments(hidden)
    basis = basis_from_moments(n, total, gram, rank)
    u = basis.astype(np.float64)
    kept = np.einsum("ir,ij,jr->r", u, gram, u)  # ||u_r^T h||^2 summed over tokens, per column
    whole = float(np.trace(gram))
    energy = np.cumsum(kept) / whole if whole > 0 else np.ones(rank)
    return basis, np.minimum(energy, 1.0)


def project(hidden: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``hidden @ basis`` in float32 ``(n, R)``: the coordinates of (float16 or float32) hidden states."""
    return np.asarray(hidden, np.float32) @ np.asarray(basis, np.float32)


def stored_projection(hidden: np.ndarray, basis: np.ndarray, manifest) -> tuple[np.ndarray, tuple | None]:
    """``(values as a reader decodes them, int8 (codes, scales) or None)`` of one row's hidden states
    ``(n, d)`` (as a full-width store of the manifest's dtype holds them) in a low-rank store."""
    y = project(hidden, basis)
    if manifest.hidden_dtype == "float32":
        return y, None
    y = y.astype(np.float16)
    if manifest.hidden_dtype != "int8":
        return y, None
    codes = quantize(y, manifest.hidden_block)
    return dequantize(*codes), codes


def project_encoded(encoded: list, basis: np.ndarray, manifest) -> list:
    """Build-side encodings (:class:`forvalue.indexer.encoder.EncodedSample`, full-width hidden states not
    quantized) as a low-rank store keeps them: projected, rounded or quantized, ``sq_norm`` recomputed."""
    from forvalue.indexer.encoder import self_score

    out = []
    for e in encoded:
        values, codes = stored_projection(e.hidden, basis, manifest)
        out.append(dataclasses.replace(e, hidden=values, quantized=codes, sq_norm=self_score(values, e.errors)))
    return out
