"""Exact For-Value scores of stored samples against validation samples (Eq. 1), in blocks.

For a block of N stored tokens and the M tokens of a validation block:

    HH = H_train @ H_val^T                    (N, M)   one BLAS/GPU matmul
    EE[k, k'] = <e_k, e_k'>                   (N, M)   embedding_bag over the train
                                                       tokens' m+1 support entries into
                                                       the val errors on their vocabulary
    S[i, v] = sum_{k in i, k' in v} HH * EE            two index_add reductions

so the cost per stored token is ~ M * (d + m + 2) with no Python loop per sample.
"""

from __future__ import annotations

import numpy as np
import torch

from forvalue.engine.validation import ValidationSet
from forvalue.storage.rows import TrainBlock, decode_block  # noqa: F401  (the scorer's input format)

# Floats allowed in one (train tokens x val tokens) intermediate.
_BLOCK_FLOATS = 1 << 23


# Ids are mapped by a look-up table up to this many entries (8 MB), or 64 per validation id beyond it; a binary
# search per id above that.
LOOKUP_MIN = 1 << 20


def id_table(vocab: torch.Tensor) -> torch.Tensor | None:
    """The look-up table of :func:`id_positions` for ``vocab`` (sorted, non-negative ids): entry ``id`` holds its
    place in ``vocab``, every other entry ``len(vocab)``, over ``0 .. max(vocab) + 1`` (the last entry: ids above
    the largest, and through index -1 negative ones); None for ids far beyond any vocabulary (no table that large).
    A binary search per id was two thirds of a one-sample query's scoring."""
    n = vocab.numel()
    top = int(vocab[-1]) + 2 if n else 1
    if top > max(LOOKUP_MIN, 64 * n):
        return None
    table = torch.full((top,), n, dtype=torch.int64, device=vocab.device)
    table[vocab] = torch.arange(n, device=vocab.device)
    return table


def id_positions(vocab: torch.Tensor, table: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """Place of each id in ``vocab``, ``len(vocab)`` for ids not in it (the scorers' zero row); ``table`` from
    :func:`id_table` (None: a binary search)."""
    if table is not None:
        return table[ids.clamp(-1, table.numel() - 1)]
    n = vocab.numel()
    pos = torch.searchsorted(vocab, ids).clamp_max(n - 1)
    return torch.where(vocab[pos] == ids, pos, n)


class ExactScorer:
    """Scores blocks of stored tokens against one block of validation samples.

    Parameters
    ----------
    val : ValidationSet
    device : torch.device
    """

    def __init__(self, val: ValidationSet, device: torch.device):
        self.device = device
        self.n_val = len(val)
        vocab, inverse = np.unique(val.ids, return_inverse=True)
        m_tokens = val.ids.shape[0]
        dense = np.zeros((vocab.size + 1, m_tokens), np.float32)  # last row: ids absent from val
        np.add.at(dense, (inverse.reshape(val.ids.shape), np.arange(m_tokens)[:, None]), val.values)
        self.vocab = torch.from_numpy(vocab).to(device)
        self.val_errors_t = torch.from_numpy(dense).to(device)
        self.val_hidden = torch.from_numpy(val.hidden).to(device)
        self.val_segment = torch.from_numpy(np.repeat(np.arange(self.n_val), val.lengths)).to(device)
        self.chunk_tokens = max(1, _BLOCK_FLOATS // max(1, m_tokens))

    @torch.no_grad()
    def score(self, block: TrainBlock) -> np.ndarray:
        """Raw scores ``<G_v, G_i>``, float64 array of shape ``(rows, n_val)``."""
        rows = block.lengths.size
        out = torch.zeros((rows, self.n_val), dtype=torch.float64, device=self.device)
        segment = torch.from_numpy(np.repeat(np.arange(rows), block.lengths)).to(self.device)
        hidden = read_only_tensor(block.hidden).to(self.device)
        ids = torch.from_numpy(block.ids).to(self.device)
        pos = id_positions(self.vocab, id_table(self.vocab), ids)  # (the table made per call: none held between)
        values = torch.from_numpy(block.values).to(self.device)
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            part = slice(start, start + self.chunk_tokens)
            hh = hidden[part] @ self.val_hidden.T
            ee = torch.nn.functional.embedding_bag(
                pos[part], self.val_errors_t, per_sample_weights=values[part], mode="sum"
            )
            per_val = torch.zeros((hh.shape[0], self.n_val), dtype=torch.float32, device=self.device)
            per_val.index_add_(1, self.val_segment, hh.mul_(ee))
            out.index_add_(0, segment[part], per_val.double())
        return out.cpu().numpy()


def val_blocks(val: ValidationSet, max_tokens: int) -> list[np.ndarray]:
    """Split validation samples into groups of at most ``max_tokens`` tokens (one sample may exceed it)."""
    groups, current, size = [], [], 0
    for j, n in enumerate(val.lengths):
        if current and size + n > max_tokens:
            groups.append(np.array(current))
            current, size = [], 0
        current.append(j)
        size += int(n)
    if current:
        groups.append(np.array(current))
    return groups


class BlockedScorer:
    """Scores stored blocks against any number of validation samples, in validation blocks."""

    def __init__(self, val: ValidationSet, device: torch.device, max_val_tokens: int = 4096):
        self.groups = val_blocks(val, max_val_tokens)
        self.scorers = [ExactScorer(val.subset(g), device) for g in self.groups]
        self.n_val = len(val)

    def score(self, block: TrainBlock) -> np.ndarray:
        out = np.empty((block.lengths.size, self.n_val), np.float64)
        for group, scorer in zip(self.groups, self.scorers):
            out[:, group] = scorer.score(block)
        return out


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` of a block's array that may be read-only (a float32 store's hidden states are Arrow's
    memory, zero-copy), without torch's "The given NumPy array is not writable" warning: scorers never write to
    these tensors (every operation on them makes a new one)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
