"""The one place for rank and retrieval metrics: average ranks, Spearman, ROC-AUC, recall, top overlap.

Every report of the product and of the benchmarks (audit comparison, value-model agreement,
class retrieval of the paper's protocol) uses these, so the same data gives the same numbers.

Example
-------
>>> from forvalue.metrics import ranks, spearman, roc_auc
>>> ranks([10.0, 20.0, 20.0, 5.0]).tolist()        # ties share their mean rank (0-based)
[1.0, 2.5, 2.5, 0.0]
>>> round(spearman([1, 2, 3, 4], [10, 20, 30, 25]), 6)
0.8
>>> roc_auc([0.9, 0.8, 0.1, 0.4], [True, True, False, False])
1.0
"""

from __future__ import annotations

import numpy as np

TOP_FRACTION = 0.1


def ranks(x) -> np.ndarray:
    """0-based average ranks of ``x`` (ties share their mean rank), float64 of shape ``(n,)``."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return sums[inv] / counts[inv]


def spearman(a, b) -> float:
    """Spearman rank correlation with average ranks for ties (NaN when either side is constant or < 2 values)."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values against {len(b)}")
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def roc_auc(scores, positive) -> float:
    """ROC-AUC of ``scores`` for the boolean ``positive`` labels (ties count one half); NaN without both classes."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = ranks(scores) + 1.0
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def recall_at_class_size(scores, positive) -> float:
    """Fraction of the top-``n_pos`` samples (the class size) that are positive."""
    positive = np.asarray(positive, bool)
    k = int(positive.sum())
    if k == 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return float(positive[top].mean())


def top_overlap(estimated, exact, fraction: float = TOP_FRACTION) -> float:
    """Share of the top ``fraction`` by ``estimated`` that is also in the top ``fraction`` by ``exact``."""
    k = max(1, int(round(fraction * len(exact))))
    top_est = set(np.argsort(-np.asarray(estimated), kind="stable")[:k].tolist())
    top_exact = set(np.argsort(-np.asarray(exact), kind="stable")[:k].tolist())
    return len(top_est & top_exact) / k


def class_retrieval(scores, train_labels: list, val_labels: list) -> dict:
    """Mean and std of AUC and recall over validation samples (the paper's protocol).

    ``scores`` has shape ``(n_val, n_train)``; a training sample is a positive for a validation
    sample when their labels are equal.

    Example
    -------
    >>> r = class_retrieval([[3.0, 2.0, 1.0]], ["a", "a", "b"], ["a"])
    >>> r["auc_mean"], r["recall_mean"]
    (1.0, 1.0)
    """
    train_labels = np.asarray(train_labels, dtype=object)
    aucs, recalls = [], []
    for row, label in zip(scores, val_labels):
        pos = train_labels == label
        aucs.append(roc_auc(row, pos))
        recalls.append(recall_at_class_size(row, pos))
    return {
        "auc_mean": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs)),
        "recall_mean": float(np.mean(recalls)),
        "recall_std": float(np.std(recalls)),
    }


def agreement(estimated: np.ndarray, exact: np.ndarray) -> dict:
    """Spearman, top-10% precision and R^2 of estimated against exact values (1-D arrays)."""
    estimated, exact = np.asarray(estimated, np.float64), np.asarray(exact, np.float64)
    ss = ((exact - exact.mean()) ** 2).sum()
    r2 = float(1.0 - ((exact - estimated) ** 2).sum() / ss) if ss > 0 else float("nan")
    return {
        "n": int(len(exact)),
        "spearman": spearman(estimated, exact),
        "top10_precision": top_overlap(estimated, exact) if len(exact) else float("nan"),
        "r2": r2,
    }
