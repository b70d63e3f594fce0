"""Audit tables and the validation-encoding cache, inside a store (Lance tables, read and written with pylance).

::

    STORE/
      audit_<NAME>.lance/      one row per training sample: scores, rank, flag (versioned:
                               re-running an audit writes a new Lance version)
      validation_cache.lance/  encoded validation samples, keyed by content + model hash

Audits never write to the ``samples`` table.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from forvalue.schemas.errors import ForValueError, StoreError
from forvalue.storage.location import RemotePath, lance_options, remove_tree
from forvalue.storage.store import Store, short_reason, translate_errors

AUDIT_PREFIX = "audit_"
CACHE_TABLE = "validation_cache"
_META_KEY = b"forvalue.audit"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

CACHE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("n_scored", pa.int32(), nullable=False),
        pa.field("hidden", pa.list_(pa.float32()), nullable=False),
        pa.field("ids", pa.list_(pa.int64()), nullable=False),
        pa.field("values", pa.list_(pa.float32()), nullable=False),
        pa.field("sq_norm", pa.float64(), nullable=False),
    ]
)
_CACHED = ("n_scored", "hidden", "ids", "values", "sq_norm")  # the columns an encoding is read from
_FLOATS = ("hidden", "values", "sq_norm")


def label_column(label: str) -> str:
    """The audit column of the mean score against validation label ``label``: ``mean_vs_label:LABEL``, every
    character but letters, digits and ``_-+,;:!?@#&()[]{}<>=/~^|*$'`` and spaces written as ``%XX`` (UTF-8
    bytes): Lance reads ``.`` as a nested field and backticks and quotes as name quoting."""
    safe = "".join(
        c if c.isalnum() or c in _LABEL_SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in label
    )
    return f"mean_vs_label:{safe}"


_LABEL_SAFE = " _-+,;:!?@#&()[]{}<>=/~^|*$'"


def check_audit_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ForValueError(
            f"audit name {name!r} is not valid; use letters, digits, '_', '-', '.', starting with a letter or digit "
            "(max 64)"
        )
    return name


def committed(folder: Path) -> bool:
    """Whether a Lance table folder has a committed version (a ``_versions/*.manifest``).

    A process killed inside a table's first commit leaves the folder (data files, perhaps a
    transaction file) without one: that table does not exist for readers.
    """
    versions = folder / "_versions"
    try:
        return versions.is_dir() and any(p.name.endswith(".manifest") for p in versions.iterdir())
    except OSError:
        return False


def _table_dirs(store: Store) -> list[Path]:
    return sorted(p for p in store.path.iterdir() if p.is_dir() and p.name.endswith(".lance"))


def _tables(store: Store) -> list[str]:
    """Names of the Lance tables of the store with a committed version (read from the folder: no lancedb import)."""
    return [p.name[: -len(".lance")] for p in _table_dirs(store) if committed(p)]


def uncommitted_tables(store: Store) -> list[Path]:
    """Audit and cache table folders without a committed version (left by a kill inside their first commit)."""
    return [
        p
        for p in _table_dirs(store)
        if (p.name.startswith(AUDIT_PREFIX) or p.name == f"{CACHE_TABLE}.lance") and not committed(p)
    ]


@contextlib.contextmanager
def table_lock(store: Store, table: str, wait: bool = True):
    """An ``flock`` on ``STORE/.TABLE.lock`` held while a process writes table ``table`` (audit or cache).

    ``wait=False`` raises :class:`BlockingIOError` when another process holds it (``--repair`` then
    leaves that table alone: its first commit may be under way).
    """
    import fcntl

    if isinstance(store.path, RemotePath):  # an object store: an expiring lease object (storage/object_lease.py)
        from forvalue.schemas.errors import StoreError
        from forvalue.storage.object_lease import ObjectLease

        try:
            lease = ObjectLease.acquire(
                store.path / f".{table}.lock",
                busy=lambda holder: f"table {table} is being written ({holder})",
                wait=wait,
            )
        except StoreError as exc:
            if not wait and "is being written" in str(exc):
                raise BlockingIOError(str(exc)) from None
            raise
        with lease:
            yield
        return
    with translate_errors(store.path, f"lock table {table} of"):
        fd = os.open(store.path / f".{table}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)


def _drop_if_uncommitted(folder: Path) -> None:
    if folder.is_dir() and not committed(folder):
        with contextlib.suppress(OSError):
            remove_tree(folder)


def remove_uncommitted(store: Store) -> list[str]:
    """Delete the uncommitted table folders nobody is writing (``index check --repair``); returns their names."""
    removed = []
    for folder in uncommitted_tables(store):
        table = folder.name[: -len(".lance")]
        try:
            with table_lock(store, table, wait=False):
                if folder.is_dir() and not committed(folder):
                    remove_tree(folder)
                    removed.append(folder.name)
        except BlockingIOError:
            continue
    return removed


def write_audit(store: Store, name: str, table: pa.Table, meta: dict) -> int:
    """Write (or overwrite, as a new version) audit ``name``; returns the table version.

    Holds the audit's table lock; a folder left without a committed version by a killed run is
    removed first, so the new table starts clean.
    """
    import lance

    check_audit_name(name)
    schema = table.schema.with_metadata({_META_KEY: json.dumps(meta).encode()})
    table = table.cast(schema)
    folder = store.path / f"{AUDIT_PREFIX}{name}.lance"
    with table_lock(store, AUDIT_PREFIX + name):
        exists = committed(folder)
        if folder.is_dir() and not exists:
            remove_tree(folder)
        with translate_errors(store.path, f"write audit '{name}' to"):
            dataset = lance.write_dataset(
                table, str(folder), mode="overwrite" if exists else "create", storage_options=lance_options(store.path)
            )
            return int(dataset.version)


def audit_names(store: Store) -> list[str]:
    """Names of the store's audits (committed tables only), sorted."""
    return sorted(t[len(AUDIT_PREFIX) :] for t in _tables(store) if t.startswith(AUDIT_PREFIX))


def list_audits(store: Store) -> list[dict]:
    """Metadata of every audit in the store, sorted by name (reads no audit's rows)."""
    return [audit_meta(store, name) for name in audit_names(store)]


def _audit_dataset(store: Store, name: str):
    """The audit's Lance dataset; a clear error for an unknown name."""
    import lance

    check_audit_name(name)
    known = audit_names(store)
    if name not in known:
        raise ForValueError(
            f"{store.path}: no audit named '{name}' (known: {', '.join(known) or 'none'}); run 'forvalue audit run'"
        )
    with translate_errors(store.path, f"read audit '{name}' of"):
        return lance.dataset(str(store.path / f"{AUDIT_PREFIX}{name}.lance"), storage_options=lance_options(store.path))


def _meta_of(dataset) -> dict:
    meta = json.loads((dataset.schema.metadata or {}).get(_META_KEY, b"{}"))
    meta["version"] = int(dataset.version)
    return meta


def audit_meta(store: Store, name: str) -> dict:
    """Audit ``name``'s metadata and version, without reading its rows; a clear error for an unknown name."""
    return _meta_of(_audit_dataset(store, name))


def read_audit(store: Store, name: str) -> tuple[pa.Table, dict]:
    """The audit table and its metadata; a clear error for an unknown name."""
    dataset = _audit_dataset(store, name)
    with translate_errors(store.path, f"read audit '{name}' of"):
        return dataset.to_table(), _meta_of(dataset)


class ValidationCache:
    """Encoded validation samples keyed by a content hash (see ``forvalue.engine.validation.cache_key``).

    Read with pylance only (no lancedb import): :meth:`get` reads the key column, then takes only the
    wanted rows, and turns their list columns into arrays without Python objects per value, so a
    cached audit loads its encodings in time proportional to their bytes.
    """

    def __init__(self, store: Store):
        import lance

        self.store = store
        self._uri = str(store.path / f"{CACHE_TABLE}.lance")
        if CACHE_TABLE in _tables(store):
            return
        try:
            with translate_errors(store.path, "create the validation cache in"):
                lance.write_dataset(
                    CACHE_SCHEMA.empty_table(), self._uri, mode="create", storage_options=lance_options(store.path)
                )
        except Exception as exc:  # a concurrent twin made it, or the store is read-only / full
            if CACHE_TABLE not in _tables(store):
                _drop_if_uncommitted(store.path / f"{CACHE_TABLE}.lance")  # e.g. a full disk: leave no husk
                raise exc

    def _dataset(self):
        import lance

        return lance.dataset(self._uri, storage_options=lance_options(self.store.path))

    def _rows(self, dataset, keys: Iterable[str]) -> dict[str, int]:
        """Row of each key present (its first, should a key have been written twice)."""
        wanted = set(keys)
        first: dict[str, int] = {}
        for row, key in enumerate(dataset.to_table(columns=["key"]).column("key").to_pylist()):
            if key in wanted and key not in first:
                first[key] = row
        return first

    def _columns(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The taken rows' encodings one after another: ``hidden (N, d)``, ``ids`` / ``values (N, m+1)`` (list columns
        turned into arrays without Python objects per value), ``n_scored`` and ``sq_norm`` per row; a damaged cache
        (shapes that do not add up, ids outside the vocabulary, values that are not finite) is a :class:`StoreError`."""
        n = table.column("n_scored").to_numpy().astype(np.int64)
        tokens = int(n.sum())
        out = {"n_scored": n, "sq_norm": np.asarray(table.column("sq_norm").to_numpy(), np.float64)}
        for name, dtype in (("hidden", np.float32), ("ids", np.int64), ("values", np.float32)):
            column = table.column(name)
            total = sum(len(chunk.flatten()) for chunk in column.chunks)
            # one copy, chunk by chunk into the array: writable (torch refuses to share read-only Arrow memory) and
            # of the wanted dtype (combining the chunks first was a second copy, ~0.3 s of page faults at 1,000)
            flat, at = np.empty(total, dtype), 0
            for chunk in column.chunks:
                part = chunk.flatten().to_numpy(zero_copy_only=False)
                flat[at : at + part.size] = part
                at += part.size
            if (tokens == 0 and total) or (tokens and total % tokens) or (n < 0).any():
                self._damaged(f"a {name} column whose length does not match its token counts")
            out[name] = flat.reshape(tokens, total // max(tokens, 1))
        manifest = self.store.manifest
        if out["ids"].shape != out["values"].shape:
            self._damaged(f"{out['ids'].shape[1]} ids but {out['values'].shape[1]} values a token")
        # (beyond rounding: the Gram form of a near-zero ||G_v||^2 may land a hair below zero)
        if (out["sq_norm"] < -1e-9 * max(1.0, float(np.abs(out["sq_norm"]).max(initial=0.0)))).any():
            self._damaged("negative squared norms")
        if tokens and out["hidden"].shape[1] != manifest.hidden_size:
            self._damaged(f"hidden states {out['hidden'].shape[1]} wide where the model's are {manifest.hidden_size}")
        if out["ids"].size and (out["ids"].min() < 0 or out["ids"].max() >= manifest.vocab_size):
            self._damaged("ids outside the vocabulary")
        # (a sum: one pass, no mask of every value; NaN or inf anywhere makes it so)
        if not all(np.isfinite(out[k].sum(dtype=np.float64 if k != "hidden" else None)) for k in _FLOATS):
            self._damaged("values that are not finite")
        return out

    @contextlib.contextmanager
    def _reading(self):
        """Errors reading the cache: a file of it missing, truncated or garbled is one line saying to remove the
        cache (before: "the store may be damaged; run 'forvalue index check'", which finds the store clean and so
        sent the user in a loop); a permission or object-store failure keeps the store's message."""
        try:
            with translate_errors(self.store.path, "read the validation cache of"):
                yield
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, PermissionError) or isinstance(self.store.path, RemotePath) or cause is None:
                raise
            raise self._unusable(f"cannot read the validation cache ({short_reason(cause)})") from cause

    def _damaged(self, what: str):
        raise self._unusable(f"the validation cache holds {what} (a damaged file)")

    def _unusable(self, what: str) -> StoreError:
        return StoreError(
            f"{self._uri}: {what}; remove that folder (a cache: the next audit or query encodes its validation "
            "samples again)"
        )

    def get(self, keys: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
        """Cached ``(hidden (n, d), ids (n, m+1), values (n, m+1), sq_norm)`` by key, for the keys present."""
        with self._reading():
            dataset = self._dataset()
            first = self._rows(dataset, keys)
            if not first:
                return {}
            table = dataset.take(sorted(first.values()), columns=["key", *_CACHED])
        cols = self._columns(table)
        ends = np.cumsum(cols["n_scored"])
        out = {}
        for j, key in enumerate(table.column("key").to_pylist()):
            rows = slice(int(ends[j] - cols["n_scored"][j]), int(ends[j]))
            hidden, ids, values = (cols[name][rows] for name in ("hidden", "ids", "values"))
            out[key] = (hidden, ids, values, float(cols["sq_norm"][j]))
        return out

    def get_all(self, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
        """Every key's encoding, one after another in the order of ``keys`` (a key may repeat): flat arrays
        ``hidden (N, d)``, ``ids`` and ``values (N, m+1)``, ``lengths`` and ``sq_norms`` per key; None when some key
        is not cached. One ``take`` in that order, no per-key copies: what a cached audit's set is made of."""
        with self._reading():
            dataset = self._dataset()
            first = self._rows(dataset, keys)
            if len(first) < len(set(keys)):
                return None
            table = dataset.take([first[k] for k in keys], columns=list(_CACHED))
        cols = self._columns(table)
        return {
            "hidden": cols["hidden"],
            "ids": cols["ids"],
            "values": cols["values"],
            "lengths": cols["n_scored"],
            "sq_norms": cols["sq_norm"],
        }

    def put(self, items: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]]) -> None:
        """Append new entries in one commit."""
        import lance

        if not items:
            return
        keys = list(items)

        def lists(index: int, dtype) -> pa.ListArray:
            parts = [np.ascontiguousarray(items[k][index], dtype=dtype).ravel() for k in keys]
            offsets = np.concatenate([[0], np.cumsum([p.size for p in parts])]).astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(parts)))

        table = pa.table(
            [
                pa.array(keys, pa.string()),
                pa.array([int(items[k][0].shape[0]) for k in keys], pa.int32()),
                lists(0, np.float32),
                lists(1, np.int64),
                lists(2, np.float32),
                pa.array([float(items[k][3]) for k in keys], pa.float64()),
            ],
            schema=CACHE_SCHEMA,
        )
        with translate_errors(self.store.path, "write the validation cache of"):
            lance.write_dataset(table, self._uri, mode="append", storage_options=lance_options(self.store.path))
