"""The error sparsifier: keep the top-m probabilities and the target of every position.

For a scored position with hidden state ``h`` and target ``y``, the prediction error is
``e = onehot(y) - softmax(W h)``, a |V|-vector. We keep its entries on the support
``topk_m(p) ∪ {y}``: ``-p_j`` for the top-m ids ``j != y`` and ``1 - p_y`` for the target.
The softmax runs in float32 over chunks of positions so that peak memory is bounded by
``chunk * |V|`` floats whatever the vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from forvalue.schemas.tables import error_entries  # noqa: F401  (the stored format's error convention)

# Positions per softmax chunk are chosen so one chunk's logits stay under this many floats.
_CHUNK_FLOATS = 1 << 24


@dataclass
class SparseErrors:
    """Sparse prediction errors of ``n`` positions (numpy arrays).

    Attributes
    ----------
    topk_ids : int32 array, shape (n, m)
    topk_probs : float32 array, shape (n, m)
    target_ids : int32 array, shape (n,)
    target_probs : float32 array, shape (n,)
    tail_mass : float32 array, shape (n,)
        Probability mass on tokens that are neither top-m nor the target.
    """

    topk_ids: np.ndarray
    topk_probs: np.ndarray
    target_ids: np.ndarray
    target_probs: np.ndarray
    tail_mass: np.ndarray

    def stored_as(self, probs_dtype: str) -> "SparseErrors":
        """These errors with the top-m probabilities and tail mass rounded as a store of ``probs_dtype`` keeps them
        (``float16``: packed errors, schema version 3; the arrays stay float32). The target probability is kept."""
        if probs_dtype == "float32":
            return self

        def rounded(a: np.ndarray) -> np.ndarray:
            return a.astype(np.float16).astype(np.float32)

        return SparseErrors(
            self.topk_ids, rounded(self.topk_probs), self.target_ids, self.target_probs, rounded(self.tail_mass)
        )

    def select(self, index: np.ndarray | slice) -> "SparseErrors":
        return SparseErrors(
            *(a[index] for a in (self.topk_ids, self.topk_probs, self.target_ids, self.target_probs, self.tail_mass))
        )


@torch.no_grad()
def sparsify(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    top_m: int,
    vocab_size: int,
) -> tuple[SparseErrors, np.ndarray]:
    """Top-m sparse errors of positions with hidden states ``hidden`` and targets ``targets``.

    Parameters
    ----------
    logits_fn : callable
        Maps ``(n, d)`` hidden states to float32 ``(n, |V|)`` logits.
    hidden : Tensor, shape (n, d)
    targets : Tensor of int, shape (n,)
    top_m : int
        Clipped to |V|.
    vocab_size : int
        |V|, to size the position chunks.

    Returns
    -------
    errors : SparseErrors
    finite : bool array, shape (n,)
        False where the logits held NaN or inf.
    """
    n = hidden.shape[0]
    outs: list[tuple[torch.Tensor, ...]] = []
    finite_parts = []
    m = min(top_m, vocab_size)
    chunk = max(1, _CHUNK_FLOATS // vocab_size)
    for start in range(0, n, chunk):
        logits = logits_fn(hidden[start : start + chunk])
        # top-m on the logits (softmax is monotonic) and probabilities from the log-normaliser:
        # one pass over |V| fewer than materialising the softmax. A NaN or +inf logit makes
        # log_z non-finite, so the finiteness check needs no pass of its own (-inf logits are
        # legitimate zero probabilities).
        log_z = torch.logsumexp(logits, dim=1, keepdim=True)
        finite_parts.append(torch.isfinite(log_z[:, 0]).cpu())
        top_l, top_i = logits.topk(m, dim=1)
        top_p = (top_l - log_z).exp()
        tgt = targets[start : start + chunk].to(logits.device).long()
        tgt_p = (logits.gather(1, tgt[:, None]) - log_z).exp().squeeze(1)
        in_top = (top_i == tgt[:, None]).any(dim=1)
        tail = 1.0 - top_p.sum(dim=1) - torch.where(in_top, torch.zeros_like(tgt_p), tgt_p)
        outs.append((top_i.int(), top_p, tgt.int(), tgt_p, tail.clamp_min(0.0)))
    if not outs:
        empty_i, empty_f = np.zeros((0, m), np.int32), np.zeros((0, m), np.float32)
        z = np.zeros(0, np.float32)
        return SparseErrors(empty_i, empty_f, np.zeros(0, np.int32), z, z.copy()), np.zeros(0, bool)
    cat = [torch.cat([o[i] for o in outs]).cpu().numpy() for i in range(5)]
    errors = SparseErrors(
        cat[0], cat[1].astype(np.float32), cat[2], cat[3].astype(np.float32), cat[4].astype(np.float32)
    )
    return errors, torch.cat(finite_parts).numpy()


def pair_score(
    h_a: np.ndarray, ids_a: np.ndarray, vals_a: np.ndarray, h_b: np.ndarray, ids_b: np.ndarray, vals_b: np.ndarray
) -> float:
    """``<G_a, G_b>`` of two samples from their hidden states and error entries (Eq. 1), in float64.

    Used for the squared norm ``||G_i||^2`` at build time; the batched scorer in
    ``forvalue.engine.scorer`` does the same for blocks of samples. Picks the cheaper of the Gram
    form (Eq. 1, cost ~ n_a n_b (|U| + d)) and the restricted-G form (Eq. 2, ~ (n_a + n_b) |U| d).
    """
    vocab, inverse = np.unique(np.concatenate([ids_a.ravel(), ids_b.ravel()]), return_inverse=True)
    dense_a = _scatter_rows(inverse[: ids_a.size].reshape(ids_a.shape), vals_a, vocab.size)
    dense_b = _scatter_rows(inverse[ids_a.size :].reshape(ids_b.shape), vals_b, vocab.size)
    h_a, h_b = h_a.astype(np.float64), h_b.astype(np.float64)
    n_a, n_b, d = h_a.shape[0], h_b.shape[0], h_a.shape[1]
    if n_a * n_b * (vocab.size + d) <= (n_a + n_b) * vocab.size * d:
        return float(((dense_a @ dense_b.T) * (h_a @ h_b.T)).sum())
    return float(((dense_a.T @ h_a) * (dense_b.T @ h_b)).sum())


def _scatter_rows(columns: np.ndarray, values: np.ndarray, width: int) -> np.ndarray:
    """Dense ``(n, width)`` float64 matrix with ``values[r, j]`` added at ``(r, columns[r, j])``."""
    n = columns.shape[0]
    flat = (np.arange(n)[:, None] * width + columns).ravel()
    return np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=n * width).reshape(n, width)
