"""The retrieval metrics every headline number rests on, against their brute-force definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from forvalue.metrics import class_retrieval, recall_at_class_size, roc_auc


def _auc_pairwise(scores, positive) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _recall_by_definition(scores, positive) -> float:
    """Of the k highest scores (k = number of positives; earlier index first on ties), the positive fraction."""
    k = sum(positive)
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sum(positive[i] for i in ranked[:k]) / k


@pytest.mark.parametrize("seed", range(40))
def test_roc_auc_equals_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    # few distinct values in half the cases, so ties are common
    scores = rng.integers(0, 4, n).astype(float) if seed % 2 else rng.normal(size=n)
    positive = rng.random(n) < rng.uniform(0.1, 0.9)
    if positive.all() or not positive.any():
        positive[0] = not positive[0]
    assert roc_auc(scores, positive) == pytest.approx(_auc_pairwise(list(scores), list(positive)), abs=1e-12)


def test_roc_auc_extremes_and_degenerate_labels():
    positive = np.array([True, True, False, False])
    assert roc_auc(np.array([4.0, 3.0, 2.0, 1.0]), positive) == 1.0
    assert roc_auc(np.array([1.0, 2.0, 3.0, 4.0]), positive) == 0.0
    assert roc_auc(np.ones(4), positive) == 0.5
    assert np.isnan(roc_auc(np.arange(3.0), np.zeros(3, bool)))
    assert np.isnan(roc_auc(np.arange(3.0), np.ones(3, bool)))


@pytest.mark.parametrize("seed", range(40))
def test_recall_at_class_size_equals_its_definition(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 40))
    scores = rng.integers(0, 5, n).astype(float) if seed % 2 else rng.normal(size=n)
    positive = rng.random(n) < 0.4
    if not positive.any():
        positive[-1] = True
    assert recall_at_class_size(scores, positive) == pytest.approx(
        _recall_by_definition(list(scores), list(positive)), abs=1e-12
    )


def test_class_retrieval_is_the_mean_and_std_over_validation_rows():
    rng = np.random.default_rng(7)
    train_labels = ["a", "b", "c"] * 5
    val_labels = ["a", "c", "b", "a"]
    scores = rng.normal(size=(4, 15))
    out = class_retrieval(scores, train_labels, val_labels)
    aucs = [_auc_pairwise(list(row), [t == v for t in train_labels]) for row, v in zip(scores, val_labels)]
    recalls = [_recall_by_definition(list(row), [t == v for t in train_labels]) for row, v in zip(scores, val_labels)]
    assert out["auc_mean"] == pytest.approx(np.mean(aucs)) and out["auc_std"] == pytest.approx(np.std(aucs))
    assert out["recall_mean"] == pytest.approx(np.mean(recalls))
    assert out["recall_std"] == pytest.approx(np.std(recalls))
