"""Batched forward pass: tokenized samples in, per-sample hidden states and sparse errors out.

Shared by the index build (training samples) and the query (validation samples), so both
sides are encoded by the very same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from forvalue.indexer.sparse_errors import SparseErrors, error_entries, pair_score, sparsify
from forvalue.indexer.tokenize import TokenizedSample
from forvalue.schemas.config import EncodeConfig
from forvalue.schemas.hidden_codec import dequantize, quantize, resolve_block

# int8 stores: hidden states are rounded to float16 first (so a build and an ``index convert`` of a
# float16 store write the same codes), quantized on the training side only; validation samples stay float16.
_NP_HIDDEN = {"float16": np.float16, "float32": np.float32, "int8": np.float16}
# Samples read ahead and sorted by length, so batches pad little.
_SORT_WINDOW_BATCHES = 8


@dataclass
class EncodedSample:
    """What the forward pass keeps for one sample.

    Attributes
    ----------
    hidden : array, shape (n_scored, d), dtype float16 or float32 (the storage dtype; for int8
        the float32 dequantized values, exactly what a reader of the store decodes)
    errors : SparseErrors with n_scored positions
    sq_norm : float
        ``||G||_F^2`` computed from the stored (rounded) values.
    finite : bool
        False if the model produced NaN or inf for this sample.
    quantized : (int8 array (n_scored, d), float16 array (n_scored, d // block)) or None
        The int8 codes and scales written to an int8 store (:mod:`forvalue.schemas.hidden_codec`).
    """

    tokenized: TokenizedSample
    hidden: np.ndarray
    errors: SparseErrors
    sq_norm: float
    finite: bool
    quantized: tuple[np.ndarray, np.ndarray] | None = None

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        e = self.errors
        return error_entries(e.topk_ids, e.topk_probs, e.target_ids, e.target_probs)


def encode_stream(
    runner, samples: Iterable[TokenizedSample], config: EncodeConfig, batch_size: int, training: bool = True
) -> Iterator[EncodedSample]:
    """Encode samples in length-sorted batches; yields one :class:`EncodedSample` per input.

    Parameters
    ----------
    runner : CausalLMRunner-like
    samples : iterable of TokenizedSample
        Samples with no scored position must be filtered out beforehand.
    training : bool
        Apply the lowest-likelihood position filter (training side only).
    """
    window: list[TokenizedSample] = []
    for sample in samples:
        window.append(sample)
        if len(window) >= batch_size * _SORT_WINDOW_BATCHES:
            yield from _encode_window(runner, window, config, batch_size, training)
            window = []
    if window:
        yield from _encode_window(runner, window, config, batch_size, training)


def _encode_window(runner, window, config, batch_size, training):
    window = sorted(window, key=lambda s: len(s.input_ids))
    for start in range(0, len(window), batch_size):
        yield from encode_batch(runner, window[start : start + batch_size], config, training)


def pad_batch(batch: list[TokenizedSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, mask)``, both int64 of shape ``(len(batch), longest)``."""
    longest = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[row, : len(s.input_ids)] = 1
    return ids, mask


@torch.no_grad()
def encode_batch(
    runner, batch: list[TokenizedSample], config: EncodeConfig, training: bool = True
) -> list[EncodedSample]:
    """One padded forward pass over ``batch``; returns the encodings in the same order."""
    ids, mask = pad_batch(batch, runner.pad_id)
    vision = [s.vision for s in batch]
    if any(v is not None for v in vision):  # a vision-language runner: image inputs per row
        hidden = runner.hidden_states(ids, mask, vision=vision)
    else:
        hidden = runner.hidden_states(ids, mask)
    rows, cols = [], []
    for row, s in enumerate(batch):
        positions = torch.from_numpy(s.target_indices() - 1)
        rows.append(torch.full_like(positions, row))
        cols.append(positions)
    rows_t, cols_t = torch.cat(rows), torch.cat(cols)
    h = hidden[rows_t.to(hidden.device), cols_t.to(hidden.device)]
    targets = ids[rows_t, cols_t + 1]
    errors, finite = sparsify(runner.logits, h, targets, config.top_m, runner.vocab_size)
    finite &= torch.isfinite(h).all(dim=1).cpu().numpy()
    h_np = h.float().cpu().numpy().astype(_NP_HIDDEN[config.hidden_dtype])
    out, offset = [], 0
    for s in batch:
        n = s.n_scored
        part = slice(offset, offset + n)
        offset += n
        keep = np.arange(n)
        if training and config.lowest_likelihood_ratio is not None:
            k = math.ceil(config.lowest_likelihood_ratio * n)
            keep = np.sort(np.argsort(errors.target_probs[part], kind="stable")[:k])
        errs = errors.select(part).select(keep)
        if training:  # the values the store keeps, so that sq_norm and the sketch are those of the stored row
            errs = errs.stored_as(config.probs_dtype)
        hid = h_np[part][keep]
        ok = bool(finite[part].all())
        codes = None
        if training and config.hidden_dtype == "int8" and ok and not config.hidden_rank:
            # (a low-rank store quantizes the projected values: forvalue.indexer.low_rank)
            codes = quantize(hid, resolve_block(config.int8_block, hid.shape[1]))
            hid = dequantize(*codes)
        sq = self_score(hid, errs) if ok and not (training and config.hidden_rank) else float("nan")
        out.append(EncodedSample(s, hid, errs, sq, ok, codes))
    return out


def self_score(hidden: np.ndarray, errors: SparseErrors) -> float:
    ids, vals = error_entries(errors.topk_ids, errors.topk_probs, errors.target_ids, errors.target_probs)
    return pair_score(hidden, ids, vals, hidden, ids, vals)
