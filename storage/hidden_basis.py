"""The basis of a low-rank store (``STORE/hidden_basis.npz``): where its stored hidden states live.

A store whose manifest has ``hidden_rank = R > 0`` stores, for every scored token, the ``R`` coordinates
``U^T h`` of its hidden state in one orthonormal basis ``U`` (``d x R``,
:func:`forvalue.indexer.low_rank.fit_hidden_basis`), fitted once from the store's own hidden states. Every
score of the store is ``<U^T h_v, U^T h_i>``: validation samples are projected onto the same ``U``, so the
basis is part of the store's data (without it the stored values cannot be scored). It is published with an
atomic create-if-absent before the first row that uses it is committed (like the sketch basis), with the
fraction of the fitting tokens' energy ``sum ||U_r^T h||^2 / sum ||h||^2`` that each prefix of ``r`` columns
keeps (``energy[r - 1]``, reported by ``index info``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from forvalue.schemas.errors import StoreError
from forvalue.storage.files import publish_if_absent

HIDDEN_BASIS_FILE = "hidden_basis.npz"


def hidden_basis_path(store_path: str | Path) -> Path:
    return Path(store_path) / HIDDEN_BASIS_FILE


def load_hidden_basis(store_path: str | Path, manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """``(basis float32 (d, R), energy float64 (R,))`` of a low-rank store; None for a full-width store
    (``manifest.hidden_rank == 0``).

    Raises StoreError (one line) when the file is missing, unreadable or does not fit the manifest.
    """
    return _load(store_path, manifest, missing_ok=False)


def published_hidden_basis(store_path: str | Path, manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """Like :func:`load_hidden_basis`, but None while no basis is published (a store being written)."""
    return _load(store_path, manifest, missing_ok=True)


def _load(store_path, manifest, missing_ok: bool):
    rank = getattr(manifest, "hidden_rank", 0)
    if not rank:
        return None
    path = hidden_basis_path(store_path)
    if not path.exists():
        if missing_ok:
            return None
        raise StoreError(
            f"{path}: missing; the store's hidden states are stored in this basis (--hidden-rank {rank}) and cannot "
            "be scored without it: restore the file from a copy of the store, or convert the full store again"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            basis, energy = np.asarray(data["basis"], np.float32), np.asarray(data["energy"], np.float64)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise StoreError(f"{path}: unreadable hidden basis ({exc}); restore it from a copy of the store") from None
    if basis.shape != (manifest.hidden_size, rank) or energy.shape != (rank,) or not np.isfinite(basis).all():
        raise StoreError(
            f"{path}: holds a basis of shape {basis.shape}, the manifest needs ({manifest.hidden_size}, {rank}); "
            "restore it from a copy of the store"
        )
    return basis, energy


def publish_hidden_basis(store_path: str | Path, basis: np.ndarray, energy: np.ndarray, manifest):
    """Publish ``(basis, energy)`` unless a basis is there already; returns the one on disk (the first
    publisher wins when several writers fit one at once)."""
    buffer = io.BytesIO()
    np.savez(buffer, basis=np.asarray(basis, np.float32), energy=np.asarray(energy, np.float64))
    publish_if_absent(hidden_basis_path(store_path), buffer.getvalue())
    return load_hidden_basis(store_path, manifest)
