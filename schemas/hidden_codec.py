"""The int8 encoding of stored hidden states: a signed byte per value and a float16 scale per block of channels.

A token's hidden state ``h`` (``d`` values) is cut into ``d / block`` blocks of ``block`` consecutive
channels; block ``b`` stores ``s_b = float16(max |h_b| / 127)`` and ``q = clip(rint(h_b / s_b), -127, 127)``
as int8. The stored value is, by definition, ``h~ = float32(q) * float32(s_b)`` (:func:`dequantize`): the
build, ``index convert`` and every reader compute it with this one function, so the score of an int8
store is exactly the score of these dequantized values (tests hold it against the float64 reference).

``block = d`` is one scale per token (the default of new stores). LLM last hidden states have a few outlier
channels (SmolLM2-135M: one channel reaches 52 where the median channel's maximum is 3.6), so smaller blocks
keep more precision for 2 bytes per block: measured on SmolLM2 (docs/benchmarks.md, "Store tiers"), block 64
halves the relative error of the inner products of block 576 for 16 more bytes per token, but one scale per
token already keeps the paper's tasks' AUC / recall to the fourth decimal, so it is the default.
"""

from __future__ import annotations

import numpy as np

# Channels per int8 scale when the user gives none: 0 = one scale per token, the smallest int8 encoding, and
# the default of new stores (docs/benchmarks.md, "Store tiers": it keeps float16's AUC / recall to the fourth
# decimal with per-sample Spearman >= 0.99995 on the paper's three tasks; block 64 halves the score error for
# 16 more bytes per token on SmolLM2).
DEFAULT_BLOCK = 0


def resolve_block(block: int, hidden_size: int) -> int:
    """The channels per scale a store of width ``hidden_size`` uses for a requested ``block`` (0 = whole token).

    Raises ValueError when ``block`` does not divide ``hidden_size``.
    """
    if block <= 0 or block >= hidden_size:
        return hidden_size
    if hidden_size % block:
        raise ValueError(
            f"must divide the {hidden_size} values stored per token (the hidden size, or --hidden-rank) "
            f"(or be 0 for one scale per token), got {block}"
        )
    return block


def quantize(hidden: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scales)`` of ``hidden`` ``(n, d)``: int8 ``(n, d)`` and float16 ``(n, d // block)``."""
    hidden = np.asarray(hidden, np.float32)
    n, d = hidden.shape
    parts = hidden.reshape(n, d // block, block)
    amax = np.abs(parts).max(axis=2)
    scales = (amax / np.float32(127.0)).astype(np.float16)
    s32 = scales.astype(np.float32)
    safe = np.where(s32 > 0, s32, np.float32(1.0))[:, :, None]
    q = np.clip(np.rint(parts / safe), -127, 127).astype(np.int8)
    q[s32 == 0] = 0  # an all-zero block (or one below float16's range) stores zeros
    return q.reshape(n, d), scales


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The stored values ``float32(q) * float32(scale)``, float32 ``(n, d)``; the block is ``d // scales.shape[1]``."""
    n, d = q.shape
    if n == 0:
        return np.zeros((0, d), np.float32)
    blocks = scales.shape[1] if scales.ndim == 2 else scales.size // n
    out = q.reshape(n, blocks, d // blocks).astype(np.float32)
    out *= np.asarray(scales, np.float32).reshape(n, blocks, 1)
    return out.reshape(n, d)
