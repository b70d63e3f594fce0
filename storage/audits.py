"""Audit tables and the validation-encoding cache, inside a store (Lance tables via LanceDB).

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
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from forvalue.schemas.errors import ForValueError
from forvalue.storage.store import Store, translate_errors

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
        raise ForValueError(f"audit name {name!r} is not valid; use letters, digits, '_', '-', '.' (max 64)")
    return name


def _db(store: Store):
    import lancedb

    return lancedb.connect(str(store.path))


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

    with translate_errors(store.path, f"lock table {table} of"):
        fd = os.open(store.path / f".{table}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)


def _drop_if_uncommitted(folder: Path) -> None:
    if folder.is_dir() and not committed(folder):
        shutil.rmtree(folder, ignore_errors=True)


def remove_uncommitted(store: Store) -> list[str]:
    """Delete the uncommitted table folders nobody is writing (``index check --repair``); returns their names."""
    removed = []
    for folder in uncommitted_tables(store):
        table = folder.name[: -len(".lance")]
        try:
            with table_lock(store, table, wait=False):
                if folder.is_dir() and not committed(folder):
                    shutil.rmtree(folder)
                    removed.append(folder.name)
        except BlockingIOError:
            continue
    return removed


def write_audit(store: Store, name: str, table: pa.Table, meta: dict) -> int:
    """Write (or overwrite, as a new version) audit ``name``; returns the table version.

    Holds the audit's table lock; a folder left without a committed version by a killed run is
    removed first, so the new table starts clean.
    """
    check_audit_name(name)
    schema = table.schema.with_metadata({_META_KEY: json.dumps(meta).encode()})
    table = table.cast(schema)
    db = _db(store)
    folder = store.path / f"{AUDIT_PREFIX}{name}.lance"
    with table_lock(store, AUDIT_PREFIX + name):
        exists = committed(folder)
        if folder.is_dir() and not exists:
            shutil.rmtree(folder)
        with translate_errors(store.path, f"write audit '{name}' to"):
            tbl = db.create_table(AUDIT_PREFIX + name, table, mode="overwrite" if exists else "create")
            return int(tbl.version)


def list_audits(store: Store) -> list[dict]:
    """Metadata of every audit in the store, sorted by name."""
    out = []
    for table in sorted(_tables(store)):
        if table.startswith(AUDIT_PREFIX):
            out.append(read_audit(store, table[len(AUDIT_PREFIX) :])[1])
    return out


def read_audit(store: Store, name: str) -> tuple[pa.Table, dict]:
    """The audit table and its metadata; a clear error for an unknown name."""
    check_audit_name(name)
    if AUDIT_PREFIX + name not in _tables(store):
        known = [t[len(AUDIT_PREFIX) :] for t in _tables(store) if t.startswith(AUDIT_PREFIX)]
        raise ForValueError(
            f"{store.path}: no audit named '{name}' (known: {', '.join(known) or 'none'}); run 'forvalue audit run'"
        )
    import lance

    with translate_errors(store.path, f"read audit '{name}' of"):
        dataset = lance.dataset(str(store.path / f"{AUDIT_PREFIX}{name}.lance"))
        data = dataset.to_table()
        meta = json.loads((dataset.schema.metadata or {}).get(_META_KEY, b"{}"))
    meta["version"] = int(dataset.version)
    return data, meta


class ValidationCache:
    """Encoded validation samples keyed by a content hash (see ``forvalue.engine.validation.cache_key``)."""

    def __init__(self, store: Store):
        self.store = store
        db = _db(store)
        if CACHE_TABLE in _tables(store):
            self._table = db.open_table(CACHE_TABLE)
        else:
            try:
                self._table = db.create_table(CACHE_TABLE, schema=CACHE_SCHEMA, exist_ok=True)
            except (OSError, ValueError, RuntimeError) as exc:  # a concurrent twin made it, or the store is read-only
                with translate_errors(store.path, "create the validation cache in"):
                    if CACHE_TABLE not in _tables(store):
                        _drop_if_uncommitted(store.path / f"{CACHE_TABLE}.lance")  # e.g. a full disk: leave no husk
                        raise exc
                    self._table = db.open_table(CACHE_TABLE)

    def get(self, keys: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
        """Cached ``(hidden (n, d), ids (n, m+1), values (n, m+1), sq_norm)`` by key, for the keys present."""
        wanted = set(keys)
        out = {}
        self._table.checkout_latest()
        for batch in self._table.to_lance().to_batches(batch_size=4096):
            for row in batch.to_pylist():
                if row["key"] in wanted and row["key"] not in out:
                    n = row["n_scored"]
                    ids = np.asarray(row["ids"], np.int64).reshape(n, -1)
                    out[row["key"]] = (
                        np.asarray(row["hidden"], np.float32).reshape(n, -1),
                        ids,
                        np.asarray(row["values"], np.float32).reshape(ids.shape),
                        row["sq_norm"],
                    )
        return out

    def put(self, items: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]]) -> None:
        """Append new entries in one commit."""
        if not items:
            return
        rows = [
            {
                "key": k,
                "n_scored": int(h.shape[0]),
                "hidden": h.ravel().tolist(),
                "ids": i.ravel().tolist(),
                "values": v.ravel().tolist(),
                "sq_norm": float(s),
            }
            for k, (h, i, v, s) in items.items()
        ]
        self._table.add(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA))
