"""Streaming top-k over score blocks: keeps, per column, the k best rows seen so far."""

from __future__ import annotations

import numpy as np


class TopK:
    """Running top-k of a ``(n_rows_total, n_cols)`` score matrix fed in row blocks.

    Ties are broken by row position (earlier rows first), so results are deterministic.
    """

    def __init__(self, k: int, n_cols: int):
        self.k = k
        self.scores = np.full((n_cols, 0), -np.inf)
        self.rows = np.zeros((n_cols, 0), np.int64)

    def update(self, block: np.ndarray, first_row: int) -> None:
        """Merge ``block`` (shape ``(rows, n_cols)``) whose first row has global index ``first_row``."""
        rows = np.broadcast_to(np.arange(first_row, first_row + block.shape[0]), (block.shape[1], block.shape[0]))
        scores = np.concatenate([self.scores, block.T], axis=1)
        index = np.concatenate([self.rows, rows], axis=1)
        if scores.shape[1] > self.k:
            keep = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, keep, axis=1)
            index = np.take_along_axis(index, keep, axis=1)
        self.scores, self.rows = scores, index

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``, each ``(n_cols, <=k)``, best first."""
        order = np.lexsort((self.rows, -self.scores), axis=1)
        return np.take_along_axis(self.scores, order, axis=1), np.take_along_axis(self.rows, order, axis=1)
