"""Ridge regression for value models: the kernel (dual) form with exact leave-one-out choice of lambda.

``alpha = (K_c + lambda I)^-1 y_c`` with the centred Gram matrix ``K_c`` (unpenalised intercept);
``lambda`` is chosen by exact leave-one-out on the labelled rows (``r_i = (y_i - yhat_i) / (1 - H_ii)``,
one eigendecomposition for the whole grid), maximising the leave-one-out Spearman correlation of the
first target. Above ``MAX_DUAL`` labelled rows, lambda is chosen the same way on a random ``MAX_DUAL``
of them and the primal system is solved on all of them by conjugate gradients.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from forvalue.metrics import agreement, spearman

MAX_DUAL = 4000
LAMBDA_GRID = tuple(10.0 ** np.arange(-5.0, 2.5, 0.5))  # times the mean eigenvalue of K_c


@dataclass
class Design:
    """A design matrix: dense (n, p) float64, or CSR arrays of shape (n, p)."""

    n: int
    p: int
    dense: np.ndarray | None = None
    csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def take(self, rows: np.ndarray) -> "Design":
        if self.dense is not None:
            return Design(len(rows), self.p, dense=self.dense[rows])
        indptr, indices, values = self.csr
        lens = np.diff(indptr)[rows]
        sel = np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows]) if len(rows) else np.zeros(0, int)
        new_ptr = np.zeros(len(rows) + 1, np.int64)
        new_ptr[1:] = np.cumsum(lens)
        return Design(len(rows), self.p, csr=(new_ptr, indices[sel], values[sel]))

    def _torch(self):
        import torch

        if self.dense is not None:
            return torch.from_numpy(self.dense)
        indptr, indices, values = self.csr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(
                torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values), size=(self.n, self.p)
            )

    def gram(self) -> np.ndarray:
        """``X X^T``: (n, n) float64."""
        x = self._torch()
        if self.dense is not None:
            return (x @ x.T).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return (x @ x.t().to_sparse_csr()).to_dense().numpy()

    def matmul(self, v: np.ndarray) -> np.ndarray:
        """``X v`` for v (p, T): (n, T)."""
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return (self._torch() @ torch.from_numpy(np.ascontiguousarray(v, np.float64))).numpy()

    def rmatmul(self, u: np.ndarray) -> np.ndarray:
        """``X^T u`` for u (n, T): (p, T)."""
        import torch

        x = self._torch()
        u = torch.from_numpy(np.ascontiguousarray(u, np.float64))
        if self.dense is not None:
            return (x.T @ u).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return (x.t().to_sparse_csr() @ u).numpy()


@dataclass
class RidgeFit:
    """A fitted linear head: ``y = x @ weight + bias``; ``loo`` are leave-one-out metrics at ``lam``."""

    weight: np.ndarray  # (p, T) float64
    bias: np.ndarray  # (T,)
    lam: float
    lam_relative: float
    loo: dict
    grid: list = field(default_factory=list)


def _loo_choose(K: np.ndarray, Z: np.ndarray) -> tuple[float, float, np.ndarray, dict, list]:
    """Choose lambda by exact leave-one-out on Gram ``K`` and centred, standardised targets ``Z`` (n, T).

    The intercept is not penalised: the hat matrix is ``11^T/n + K_c (K_c + lambda I)^-1`` and the
    leave-one-out residual of row i is ``(z_i - zhat_i) / (1 - H_ii)``.

    Returns ``(lam, lam_relative, alpha (n, T), loo metrics, grid [(relative lambda, LOO spearman)])``.
    """
    n = len(K)
    r = K.mean(axis=1)
    Kc = K - r[:, None] - r[None, :] + K.mean()
    s, U = np.linalg.eigh((Kc + Kc.T) / 2)
    s = np.clip(s, 0.0, None)
    scale = max(float(s.sum()) / n, 1e-12)
    UtZ = U.T @ Z
    best = None
    grid = []
    for rel in LAMBDA_GRID:
        lam = rel * scale
        inv = 1.0 / (s + lam)
        alpha = U @ (inv[:, None] * UtZ)
        # hat matrix with the unpenalised intercept: 11^T/n + U diag(s/(s+lam)) U^T (Z is centred)
        shrink = s * inv
        fitted = U @ (shrink[:, None] * UtZ)
        h = 1.0 / n + (U**2) @ shrink
        loo_pred = Z - (Z - fitted) / np.maximum(1.0 - h, 1e-12)[:, None]
        rho = spearman(loo_pred[:, 0], Z[:, 0])
        mse = float(((loo_pred[:, 0] - Z[:, 0]) ** 2).mean())
        key = (-np.inf if np.isnan(rho) else rho, -mse)
        grid.append((float(rel), rho))
        if best is None or key > best[0]:
            best = (key, lam, float(rel), alpha, loo_pred)
    _, lam, rel, alpha, loo_pred = best
    return lam, rel, alpha, agreement(loo_pred[:, 0], Z[:, 0]), grid


def _cg(apply, B: np.ndarray, x0: np.ndarray, iters: int = 500, tol: float = 1e-6) -> np.ndarray:
    """Conjugate gradients for the SPD system ``apply(X) = B``, every column of (p, T) at once."""
    x = x0.copy()
    r = B - apply(x)
    p = r.copy()
    rs = (r * r).sum(axis=0)
    stop = tol**2 * np.maximum((B * B).sum(axis=0), 1e-300)
    for _ in range(iters):
        if np.all(rs <= stop):
            break
        ap = apply(p)
        a = rs / np.maximum((p * ap).sum(axis=0), 1e-300)
        x += a * p
        r -= a * ap
        rs_new = (r * r).sum(axis=0)
        p = r + (rs_new / np.maximum(rs, 1e-300)) * p
        rs = rs_new
    return x


def fit_ridge(X: Design, Y: np.ndarray, seed: int = 0) -> RidgeFit:
    """Ridge regression of ``Y`` (n, T) on ``X`` with an intercept, lambda chosen by leave-one-out.

    Targets are standardised per column before the fit (so one lambda suits all) and the
    weights mapped back, so ``predict = x @ weight + bias`` is in the audit's units.
    """
    Y = np.asarray(Y, np.float64)
    n = X.n
    y_mean = Y.mean(axis=0)
    y_sd = Y.std(axis=0)
    y_sd[y_sd == 0] = 1.0
    Z = (Y - y_mean) / y_sd
    x_mean = X.rmatmul(np.full((n, 1), 1.0 / n))[:, 0]  # (p,)
    if n <= MAX_DUAL:
        lam, rel, alpha, loo, grid = _loo_choose(X.gram(), Z)
        w = X.rmatmul(alpha)  # (p, T); sum(alpha) = 0, so the centring term vanishes
    else:
        sub = np.sort(np.random.default_rng(seed).choice(n, MAX_DUAL, replace=False))
        Xs = X.take(sub)
        lam, rel, _, loo, grid = _loo_choose(Xs.gram(), Z[sub])

        def apply(V):  # (X_c^T X_c + lam I) V, X_c = X - 1 x_mean^T
            XV = X.matmul(V) - (x_mean @ V)[None, :]
            return X.rmatmul(XV) - np.outer(x_mean, XV.sum(axis=0)) + lam * V

        rhs = X.rmatmul(Z) - np.outer(x_mean, Z.sum(axis=0))
        w = _cg(apply, rhs, np.zeros_like(rhs))
    w = w * y_sd
    bias = y_mean - x_mean @ w
    return RidgeFit(w, bias, lam, rel, loo, grid)
