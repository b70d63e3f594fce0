"""The fitted hidden-side basis of a store's prefilter sketch (``STORE/sketch_basis.npy``).

A store whose manifest says ``sketch_basis = "fitted"`` computes every sketch with one
``(d, c)`` basis ``U`` (``forvalue.indexer.sketch.fit_basis``), fitted from the first hidden states
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

from forvalue.schemas.errors import StoreError
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
