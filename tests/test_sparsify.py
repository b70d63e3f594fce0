"""The error sparsifier against a dense softmax, and its bad-value detection."""

from __future__ import annotations

import numpy as np
import torch

from forvalue.indexer.sparse_errors import error_entries, sparsify


def _setup(n=40, vocab=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=g) * 2.0
    hidden = torch.randn(n, d, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:5] = (hidden[:5] @ weight.T).argmax(dim=1)  # some targets inside the top-m
    return (lambda h: h @ weight.T), hidden, targets, vocab


def test_sparsify_matches_dense_softmax():
    logits_fn, hidden, targets, vocab = _setup()
    errors, finite = sparsify(logits_fn, hidden, targets, top_m=7, vocab_size=vocab)
    probs = torch.softmax(logits_fn(hidden).double(), dim=1).numpy()
    assert finite.all()
    top = np.argsort(-probs, axis=1)[:, :7]
    np.testing.assert_array_equal(np.sort(errors.topk_ids, axis=1), np.sort(top, axis=1))
    np.testing.assert_allclose(errors.topk_probs, np.take_along_axis(probs, errors.topk_ids.astype(int), 1), rtol=1e-5)
    np.testing.assert_allclose(errors.target_probs, probs[np.arange(len(targets)), targets.numpy()], rtol=1e-5)
    # the kept entries of e = onehot(y) - p sum to the dropped tail mass (the full e sums to 0)
    ids, values = error_entries(errors.topk_ids, errors.topk_probs, errors.target_ids, errors.target_probs)
    np.testing.assert_allclose(values.sum(axis=1), errors.tail_mass, atol=1e-5)
    kept = np.zeros_like(probs, bool)
    np.put_along_axis(kept, top, True, axis=1)
    kept[np.arange(len(targets)), targets.numpy()] = True
    np.testing.assert_allclose(errors.tail_mass, np.where(kept, 0, probs).sum(axis=1), atol=1e-5)


def test_sparsify_flags_nan_and_inf_but_not_minus_inf():
    logits_fn, hidden, targets, vocab = _setup(n=6)

    def bad_logits(h):
        out = logits_fn(h)
        out[1, 3] = float("nan")
        out[2, 4] = float("inf")
        out[3, 5] = float("-inf")
        return out

    _, finite = sparsify(bad_logits, hidden, targets, top_m=4, vocab_size=vocab)
    assert finite.tolist() == [True, False, False, True, True, True]
