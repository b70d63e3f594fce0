"""The fitted hidden-side basis of a store's prefilter sketch (``STORE/sketch_basis.npy``).

A store whose manifest says ``sketch_basis = "fitted"`` computes every sketch with one
``(d, c)`` basis ``U`` (``forvalue.indexer.sketch.fit_basis``), fitted from the first hidden states
written. It is published *before* the first row that uses it is committed, with an atomic
create-if-absent (like the manifest): when several build workers start at once each may fit
one, the first to publish wins and every worker then sketches with the published one.
``forvalue index sketch --rebuild`` replaces it (and recomputes every sketch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from forvalue.schemas.errors import StoreError
from forvalue.storage.files import publish_if_absent, write_bytes
from forvalue.storage.location import store_location

BASIS_FILE = "sketch_basis.npy"


def basis_path(store_path: str | Path) -> Path:
    return store_location(store_path) / BASIS_FILE


def load_basis(store_path: str | Path) -> np.ndarray | None:
    """The published basis, float32 ``(d, c)``, or None when there is none."""
    import io

    path = basis_path(store_path)
    try:
        basis = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable sketch basis ({exc}); run 'forvalue index sketch --rebuild'") from None
    return np.asarray(basis, np.float32)


def publish_basis(store_path: str | Path, basis: np.ndarray, replace: bool = False) -> np.ndarray:
    """Publish ``basis`` unless one exists (or ``replace``); returns the basis now on disk."""
    import io

    path = basis_path(store_path)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(basis, np.float32), allow_pickle=False)
    if replace:
        write_bytes(path, buffer.getvalue(), inside_store=True)
    else:
        publish_if_absent(path, buffer.getvalue())  # atomic create-if-absent: the first publisher wins
    return load_basis(store_path)


def basis_sha256(basis: np.ndarray | None) -> str | None:
    if basis is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(basis, np.float32).tobytes()).hexdigest()
