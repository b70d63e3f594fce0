"""The fitted hidden-side basis of a store's prefilter sketch (``STORE/sketch_basis.npy``).

A store whose manifest says ``sketch_basis = "fitted"`` computes every sketch with one
``(d, c)`` basis ``U`` (``forvalue.storage.sketch_basis.fit_basis``), fitted from the first hidden states
written. It is published *before* the first row that uses it is committed, with an atomic
create-if-absent (like the manifest): when several build workers start at once each may fit
one, the first to publish wins and every worker then sketches with the published one.
``forvalue index sketch --rebuild`` replaces it (and recomputes every sketch).

A sketch with heavy vocabulary ids (``sketch_heavy_ids = H > 0`` in the manifest) also has
``STORE/sketch_vocab.npy``: the ``H`` ids given buckets of their own, fitted from the same first tokens
(:func:`forvalue.indexer.sketch.fit_heavy_ids`) and published the same way, after the basis and before
the first sketched row.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from forvalue.schemas.errors import ForValueError, StoreError
from forvalue.storage.files import publish_if_absent, write_bytes
from forvalue.storage.location import store_location

BASIS_FILE = "sketch_basis.npy"


def basis_path(store_path: str | Path) -> Path:
    return store_location(store_path) / BASIS_FILE


def _load(path: Path, what: str) -> np.ndarray | None:
    """The array saved at ``path``, None when there is none; unreadable: a StoreError naming ``what``."""
    import io

    try:
        return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:  # (EOFError: an empty file)
        raise StoreError(f"{path}: unreadable {what} ({exc}); run 'forvalue index sketch --rebuild'") from None


def _publish(path: Path, array: np.ndarray, replace: bool) -> None:
    """Save ``array`` at ``path``: replacing it, or only when absent (atomic create-if-absent: the first publisher
    of concurrent build workers wins, and every worker then uses what is on disk)."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    if replace:
        write_bytes(path, buffer.getvalue(), inside_store=True)
    else:
        publish_if_absent(path, buffer.getvalue())


def load_basis(store_path: str | Path) -> np.ndarray | None:
    """The published basis, float32 ``(d, c)``, or None when there is none."""
    basis = _load(basis_path(store_path), "sketch basis")
    return None if basis is None else np.asarray(basis, np.float32)


def publish_basis(store_path: str | Path, basis: np.ndarray, replace: bool = False) -> np.ndarray:
    """Publish ``basis`` unless one exists (or ``replace``); returns the basis now on disk."""
    _publish(basis_path(store_path), np.asarray(basis, np.float32), replace)
    return load_basis(store_path)


VOCAB_FILE = "sketch_vocab.npy"


def heavy_ids_path(store_path: str | Path) -> Path:
    return store_location(store_path) / VOCAB_FILE


def load_heavy_ids(store_path: str | Path) -> np.ndarray | None:
    """The published heavy vocabulary ids of the sketch (``--sketch-heavy-ids``), int64 ``(H,)``, or None."""
    path = heavy_ids_path(store_path)
    ids = _load(path, "sketch vocabulary")
    if ids is None:
        return None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise StoreError(
            f"{path}: not a list of vocabulary ids ({ids.dtype}, shape {ids.shape}); "
            "run 'forvalue index sketch --rebuild'"
        )
    return ids.astype(np.int64)


def heavy_ids_fit(ids: np.ndarray | None, count: int, vocab_size: int) -> bool:
    """Whether ``ids`` can be a sketch's heavy ids: ``count`` distinct whole vocabulary ids in ``[0, vocab_size)``
    (what the sketcher, ``index check``, ``index sketch`` and ``index convert`` all require)."""
    if ids is None:
        return False
    ids = np.asarray(ids)
    return (
        ids.shape == (count,)
        and ids.dtype.kind in "iu"
        and np.unique(ids).size == ids.size
        and (ids.size == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab_size))
    )


def publish_heavy_ids(store_path: str | Path, ids: np.ndarray, replace: bool = False) -> np.ndarray:
    """Publish the heavy ids unless some exist (or ``replace``), like :func:`publish_basis`; returns those on disk."""
    _publish(heavy_ids_path(store_path), np.asarray(ids, np.int64), replace)
    return load_heavy_ids(store_path)


def basis_sha256(basis: np.ndarray | None) -> str | None:
    """SHA-256 of a basis' float32 bytes (of heavy ids' int64 bytes); None for None."""
    if basis is None:
        return None
    dtype = np.int64 if np.asarray(basis).dtype.kind in "iu" else np.float32
    return hashlib.sha256(np.ascontiguousarray(basis, dtype).tobytes()).hexdigest()


# Rows of hidden states per float64 block when fitting a basis.
_FIT_ROWS = 16384


def fit_basis(hidden: np.ndarray, cols: int) -> np.ndarray:
    """An orthonormal hidden-side basis for the fitted sketch.

    Column 0 is the mean hidden direction; columns ``1..cols-1`` are the top principal
    directions of the hidden states after removing that direction.

    Parameters
    ----------
    hidden : array, shape (N, d)
        Hidden states of stored tokens (any float dtype; a few thousand tokens suffice).
    cols : int
        Number of columns ``c`` (``1 <= c <= d``).

    Returns
    -------
    float32 array, shape (d, cols)
    """
    if hidden.ndim != 2 or hidden.shape[0] == 0:
        raise ForValueError("fitting the sketch basis needs at least one stored token")
    d = hidden.shape[1]
    if not 1 <= cols <= d:
        raise ForValueError(f"the sketch basis needs 1 <= cols <= {d}, got {cols}")
    return basis_from_moments(*hidden_moments(hidden), cols)


def hidden_moments(hidden: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, sum of rows, sum of outer products)`` of ``hidden`` ``(n, d)`` in float64, a block of rows at a time
    (no float64 copy of all rows)."""
    n, d = hidden.shape
    total, gram = np.zeros(d), np.zeros((d, d))
    for start in range(0, n, _FIT_ROWS):
        block = np.asarray(hidden[start : start + _FIT_ROWS], np.float64)
        total += block.sum(axis=0)
        gram += block.T @ block
    return n, total, gram


def basis_from_moments(n: int, total: np.ndarray, gram: np.ndarray, cols: int) -> np.ndarray:
    """The basis of :func:`fit_basis` from the moments of :func:`hidden_moments`, float32 ``(d, cols)``."""
    d = gram.shape[0]
    mean = total / n
    cov = gram - n * np.outer(mean, mean)  # scatter of the centred hidden states
    norm = np.linalg.norm(mean)
    first = mean / norm if norm > 0 else np.eye(d)[0]
    proj = np.eye(d) - np.outer(first, first)  # removes the mean direction
    _, vecs = np.linalg.eigh(proj @ cov @ proj)  # ascending eigenvalues; eigenvectors span R^d
    basis = np.concatenate([first[:, None], vecs[:, ::-1][:, : cols - 1]], axis=1)
    q, r = np.linalg.qr(basis)  # exactly orthonormal; signs fixed so column 0 is the mean direction
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
    return q.astype(np.float32)
