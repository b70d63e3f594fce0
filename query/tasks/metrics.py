"""Retrieval-quality metrics of the paper's protocol (per validation sample, then mean +- std)."""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC of ``scores`` for the boolean ``positive`` labels (ties count one half).

    Parameters
    ----------
    scores : float array, shape (n,)
    positive : bool array, shape (n,)
    """
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def recall_at_class_size(scores: np.ndarray, positive: np.ndarray) -> float:
    """Fraction of the top-``n_pos`` samples (the class size) that are positive."""
    positive = np.asarray(positive, bool)
    k = int(positive.sum())
    if k == 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return float(positive[top].mean())


def class_retrieval(scores: np.ndarray, train_labels: list, val_labels: list) -> dict:
    """Mean and std of AUC and recall over validation samples.

    Parameters
    ----------
    scores : array, shape (n_val, n_train)
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
