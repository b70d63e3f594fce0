"""A slow, literal reference scorer (Eq. 1 with full-vocabulary softmax), kept for tests.

It shares only tokenization with the product; the forward pass, softmax and sums are
written independently, one sample at a time, in float64, so every fast path can be
checked against it.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np
import torch

from forvalue.indexer.data import Sample
from forvalue.indexer.tokenize import tokenize_sample


@torch.no_grad()
def dense_matrices(
    model,
    tokenizer,
    sample: Sample,
    score_tokens: str = "all",
    max_length: int = 512,
    chat_template: bool = False,
    top_m: int | None = None,
    hidden_dtype: str | None = None,
    tokenize=None,
    int8_block: int = 0,
    probs_dtype: str | None = None,
    hidden_basis: np.ndarray | None = None,
    stored: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states ``H (n, d)`` and dense errors ``E (n, |V|)`` of one sample's scored positions.

    ``top_m`` zeroes the error outside each position's top-m ∪ {target};
    ``hidden_dtype='float16'`` rounds ``H`` as the store does, ``'int8'`` rounds it to float16 and
    replaces it by its int8 codes times their scales (``int8_block`` channels per scale, 0 = one per
    token; :mod:`forvalue.schemas.hidden_codec`, the definition of the stored values);
    ``hidden_basis`` (a low-rank store's ``U``, d x R) replaces ``H`` by its coordinates ``float32(H) @ U``
    (:mod:`forvalue.indexer.low_rank`), then rounded / quantized as above when ``stored`` (the training side;
    a validation sample keeps the float32 coordinates);
    ``probs_dtype='float16'`` rounds the kept non-target probabilities as a schema-3 store keeps them. ``tokenize`` (a
    vision-language runner's ``tokenize``) replaces the text tokenizer; the image inputs
    it returns go to the full model's forward, unbatched.
    """
    if tokenize is not None:
        tok = tokenize(sample, score_tokens, max_length, chat_template)
    else:
        tok = tokenize_sample(tokenizer, sample, score_tokens, max_length, chat_template)
    ids = torch.tensor([tok.input_ids])
    out = model(input_ids=ids, output_hidden_states=True, **_image_inputs(model, ids, tok.vision))
    positions = torch.from_numpy(tok.target_indices() - 1)
    hidden = out.hidden_states[-1][0, positions].double()
    probs = torch.softmax(out.logits[0, positions].double(), dim=-1)
    targets = ids[0, positions + 1]
    errors = -probs
    errors[torch.arange(len(positions)), targets] += 1.0
    if top_m is not None:
        keep = torch.zeros_like(errors, dtype=torch.bool)
        keep.scatter_(1, probs.topk(min(top_m, probs.shape[1]), dim=1).indices, True)
        keep[torch.arange(len(positions)), targets] = True
        errors = torch.where(keep, errors, torch.zeros_like(errors))
        if probs_dtype == "float16":
            rounded = -probs.float().half().double()
            rounded[torch.arange(len(positions)), targets] = errors[torch.arange(len(positions)), targets]
            errors = torch.where(keep, rounded, errors)
    h = hidden.numpy()
    if hidden_dtype in ("float16", "int8"):
        h = h.astype(np.float16).astype(np.float64)
    if hidden_basis is not None:
        h = np.asarray(h, np.float32) @ np.asarray(hidden_basis, np.float32)
        if not stored:
            return h.astype(np.float64), errors.numpy()
        if hidden_dtype in ("float16", "int8"):
            h = h.astype(np.float16)
        h = h.astype(np.float64)
    if hidden_dtype == "int8":
        from forvalue.schemas.hidden_codec import dequantize, quantize, resolve_block

        h = dequantize(*quantize(h, resolve_block(int8_block, h.shape[1]))).astype(np.float64)
    return h, errors.numpy()


def _image_inputs(model, ids: torch.Tensor, vision: dict | None) -> dict:
    """A VLM's image inputs for one unpadded row, with Qwen-VL's token types (1 = image token) when it takes them."""
    if vision is None:
        return {}
    extra = dict(vision)
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is not None and "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        extra["mm_token_type_ids"] = (ids == image_token).long()
    return extra


def dense_scores(model, tokenizer, train: Sequence[Sample], val: Sequence[Sample], **kwargs) -> np.ndarray:
    """``S[v, i] = sum_k sum_k' <e_vk, e_ik'> <h_vk, h_ik'>``, float64 array of shape ``(n_val, n_train)``.

    ``kwargs`` go to :func:`dense_matrices`; the validation side is encoded as a query does: int8
    (``hidden_dtype``) becomes float16 and probabilities stay unrounded (``probs_dtype``) there.
    """
    val_kwargs = dict(kwargs, probs_dtype=None, stored=False)
    if kwargs.get("hidden_dtype") == "int8":
        val_kwargs["hidden_dtype"] = "float16"
    mats_t = [dense_matrices(model, tokenizer, s, **kwargs) for s in train]
    mats_v = [dense_matrices(model, tokenizer, s, **val_kwargs) for s in val]
    out = np.zeros((len(val), len(train)))
    for a, (hv, ev) in enumerate(mats_v):
        for b, (ht, et) in enumerate(mats_t):
            out[a, b] = float(((ev @ et.T) * (hv @ ht.T)).sum())
    return out


def dense_self_scores(model, tokenizer, samples: Sequence[Sample], **kwargs) -> np.ndarray:
    """``||G_i||_F^2`` of each sample as a store keeps it (``sq_norm``: both sides the stored values, int8 included),
    float64 array of shape ``(n,)``; ``kwargs`` go to :func:`dense_matrices`."""
    out = np.zeros(len(samples))
    for j, sample in enumerate(samples):
        h, e = dense_matrices(model, tokenizer, sample, **kwargs)
        out[j] = float(((e @ e.T) * (h @ h.T)).sum())
    return out
