"""A For-Value store: a folder with ``manifest.json`` and Lance tables (via LanceDB).

Layout::

    STORE/
      manifest.json        model + settings identity (forvalue.schemas.manifest.Manifest)
      samples.lance/       one row per training sample (forvalue.schemas.tables.samples_schema)

Every :meth:`Store.append` is one Lance commit: a batch of rows becomes visible whole or
not at all, so a process killed at any moment leaves a store that opens, holding exactly
the batches that were committed. Readers work on the snapshot they opened; concurrent
appends (several workers) never disturb a running scan.

Writers hold a :class:`WriterLease` (``STORE/.writer.lock``, an ``flock``): an unsharded build
holds it exclusively, sharded workers (``--shard I/N``) share it and each holds its shard's
own lock exclusively, so two unsharded builds (or an unsharded build and a sharded worker,
or two workers of one shard) never write at once. The kernel drops the lock when its
process dies, so a crashed build leaves nothing that blocks the next one. As a second line
of defence :meth:`Store.append` drops the rows whose ids another writer committed since the
handle's snapshot. Errors of Lance, Arrow and the OS become one-line :class:`StoreError`
messages naming the store and suggesting ``forvalue index check``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa

from forvalue.schemas.errors import ManifestMismatchError, StoreError
from forvalue.schemas.manifest import MANIFEST_FILE, STORAGE_MUST_MATCH, Manifest
from forvalue.schemas.stored_settings import BUILD_MUST_MATCH
from forvalue.schemas.tables import HIDDEN_SCALE_COLUMN, SAMPLES_TABLE, schema_of
from forvalue.storage.files import publish_if_absent, write_text
from forvalue.storage.location import (
    RemotePath,
    check_reachable,
    check_store_name,
    describe_failure,
    lance_options,
    store_location,
)

# Seconds a build waits for a concurrent twin's first version of a table it found being created (Store.create).
TWIN_WAIT = 10.0


class Store:
    """Handle on an existing store; open with :meth:`open` or :meth:`create`."""

    def __init__(self, path: "Path | RemotePath", manifest: Manifest):
        # Reads go through pylance directly (0.4 s to import, against 2 s for lancedb), so commands
        # that load no model answer fast; appends use the LanceDB table, opened on first write
        # (on an object store, pylance's own append: the same one-commit-per-batch write).
        self.path = path
        self.manifest = manifest
        self._uri = str(path / f"{SAMPLES_TABLE}.lance")
        self._options = lance_options(path)
        self._writer = None
        with self.io("open"):
            if not (path / f"{SAMPLES_TABLE}.lance").is_dir():
                raise StoreError(
                    f"{path}: has a manifest but no '{SAMPLES_TABLE}' table (a build or convert stopped before its "
                    "first rows); re-run that 'forvalue index build' or 'index convert' to resume it, or remove the "
                    "folder"
                )
            self._snapshot = self._latest()
        self._fragments = {f.fragment_id for f in self._snapshot.get_fragments()}

    def _latest(self):
        import lance

        return lance.dataset(self._uri, storage_options=self._options)

    def io(self, action: str):
        """Context manager: Lance/Arrow/OS errors inside become one-line :class:`StoreError` about this store."""
        return translate_errors(self.path, action)

    # -- opening -----------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open an existing store (a folder or an ``s3://`` URI) for reading or appending."""
        path = store_location(path)
        check_reachable(path)
        with translate_errors(path, "open"):
            if not path.is_dir():
                what = "no object below that prefix" if isinstance(path, RemotePath) else "not a folder"
                raise StoreError(f"{path}: no such store ({what}); build one with 'forvalue index build'")
            manifest_path = path / MANIFEST_FILE
            if not manifest_path.exists():
                raise StoreError(
                    f"{path}: not a forvalue store (no {MANIFEST_FILE}); build one with 'forvalue index build'"
                )
            return cls(path, Manifest.load(manifest_path))

    @classmethod
    def create(cls, path: str | Path, manifest: Manifest) -> "Store":
        """Open ``path`` for appending, creating it if needed; refuses a different manifest.

        Safe when several workers call it at once: the manifest is published with an
        atomic create-if-absent and the table creation tolerates a concurrent twin.
        """
        path = store_location(path)
        check_store_name(path)
        check_reachable(path)
        with translate_errors(path, "create"):
            if path.is_file() if isinstance(path, RemotePath) else (path.exists() and not path.is_dir()):
                raise StoreError(f"{path}: exists and is not a folder")
            if path.is_dir() and not is_empty_folder(path) and not (path / MANIFEST_FILE).exists():
                what = "prefix holds objects" if isinstance(path, RemotePath) else "folder is not empty"
                raise StoreError(f"{path}: {what} and not a forvalue store; choose another path")
            if isinstance(path, RemotePath):  # (a local store target is checked by the CLI's output policy)
                for outer in path.parents:
                    if (outer / f"{SAMPLES_TABLE}.lance").is_dir() and (outer / MANIFEST_FILE).exists():
                        raise StoreError(f"{path}: is inside the store {outer}; put the store elsewhere")
            path.mkdir(parents=True, exist_ok=True)
            _publish_manifest(path / MANIFEST_FILE, manifest)
            stored = Manifest.load(path / MANIFEST_FILE)
        # every setting that changes stored values, and the storage layout
        problems = stored.mismatches(manifest, tuple(dict.fromkeys(BUILD_MUST_MATCH + STORAGE_MUST_MATCH)))
        if problems:
            raise ManifestMismatchError(
                f"{path}: store was built with other settings ({'; '.join(problems)}); give the store's values, or "
                "use 'forvalue index add', which encodes with the store's settings",
                problems,
            )
        if isinstance(path, RemotePath):
            _create_remote_table(path, schema_of(stored))
            return cls(path, stored)
        import lancedb

        with translate_errors(path, "create the table of"):
            db = lancedb.connect(str(path))
            if SAMPLES_TABLE not in db.table_names():
                try:
                    db.create_table(SAMPLES_TABLE, schema=schema_of(stored), exist_ok=True)
                except (OSError, ValueError, RuntimeError):
                    if SAMPLES_TABLE not in db.table_names():
                        raise
        return cls._beside_a_twin(path, stored)

    @classmethod
    def _beside_a_twin(cls, path: Path, manifest: Manifest) -> "Store":
        """The store just created, opened. Two builds started together into a new store: the one that found the
        table's folder made by the other can be there before that twin's first version, and opening it failed
        ("samples.lance was not found"; the suite's two-builds fault test in CI): wait for the version, up to
        :data:`TWIN_WAIT` seconds, then the error."""
        deadline = time.monotonic() + TWIN_WAIT
        while True:
            try:
                return cls(path, manifest)
            except StoreError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    # -- writing -----------------------------------------------------------------
    def append(self, rows: pa.Table) -> int:
        """Commit ``rows`` (schema :func:`samples_schema`) as one atomic Lance append.

        Rows whose id another writer committed since this handle's snapshot are dropped first
        (the latest version's new fragments are read); returns the number of rows committed.
        """
        import pyarrow.compute as pc

        with self.io("append to"):
            if self._writer is None and not isinstance(self.path, RemotePath):
                import lancedb

                self._writer = lancedb.connect(str(self.path)).open_table(SAMPLES_TABLE)
            taken = self._ids_committed_elsewhere()
            if taken:
                rows = rows.filter(
                    pc.invert(pc.is_in(rows.column("id"), value_set=pa.array(sorted(taken), pa.string())))
                )
            if rows.num_rows and self._writer is None:
                import lance

                lance.write_dataset(
                    rows.cast(schema_of(self.manifest)), self._uri, mode="append", storage_options=self._options
                )
            elif rows.num_rows:
                self._writer.add(rows.cast(schema_of(self.manifest)))
        self.refresh()
        return rows.num_rows

    def _ids_committed_elsewhere(self) -> set[str]:
        """Ids in fragments of the latest version that this handle's snapshot does not hold."""
        latest = self._latest()
        out: set[str] = set()
        if latest.version == self._snapshot.version:
            return out
        for fragment in latest.get_fragments():
            if fragment.fragment_id not in self._fragments:
                out.update(fragment.to_table(columns=["id"]).column(0).to_pylist())
        return out

    def delete_rows(self, addresses: Sequence[int]) -> int:
        """Delete the rows at Lance row addresses ``addresses`` in one atomic commit (``index check --repair``)."""
        if not addresses:
            return 0
        with self.io("delete from"):
            dataset = self._dataset()
            before = dataset.count_rows()
            dataset.delete(f"_rowaddr IN ({', '.join(str(int(a)) for a in addresses)})")
        self.refresh()
        return before - self.count()

    def refresh(self) -> None:
        """Move this handle's read snapshot to the latest committed version."""
        with self.io("open"):
            self._snapshot = self._latest()
            self._fragments = {f.fragment_id for f in self._snapshot.get_fragments()}

    # -- reading (all reads see the snapshot pinned at open or at the last refresh) --
    def _dataset(self):
        return self._snapshot

    def count(self) -> int:
        with self.io("count the rows of"):
            return self._dataset().count_rows()

    def ids(self) -> set[str]:
        """All stored sample ids (read column-wise, a few bytes per sample)."""
        out: set[str] = set()
        for batch in self.scan(["id"], batch_size=65536):
            out.update(batch.column(0).to_pylist())
        return out

    def columns_for(self, columns: Sequence[str]) -> list[str]:
        """``columns`` plus what decoding them needs: int8 ``hidden`` comes with its ``hidden_scale``."""
        out = list(columns)
        if "hidden" in out and HIDDEN_SCALE_COLUMN not in out and self.manifest.hidden_dtype == "int8":
            out.append(HIDDEN_SCALE_COLUMN)
        return out

    def scan(
        self,
        columns: Sequence[str],
        batch_size: int = 1024,
        with_row_address: bool = False,
        fragments: list | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream ``columns`` of every row, in storage order, ``batch_size`` rows at a time.

        ``with_row_address`` adds the Lance row address (``_rowaddr``, uint64) as a last column;
        ``fragments`` (from :meth:`fragments`) limits the scan to those fragments. Reading ``hidden``
        of an int8 store also reads ``hidden_scale`` (what :func:`forvalue.storage.rows.decode_block` needs).
        """
        with self.io("read"):
            yield from (
                self._dataset()
                .scanner(
                    columns=self.columns_for(columns),
                    batch_size=batch_size,
                    scan_in_order=True,
                    with_row_address=with_row_address,
                    fragments=fragments,
                )
                .to_batches()
            )

    def fragments(self) -> list:
        """The Lance fragments of the snapshot (each one or more data files under ``samples.lance/data``)."""
        return self._dataset().get_fragments()

    def scan_from(self, start: int, columns: Sequence[str], batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """Like :meth:`scan`, skipping the first ``start`` rows (extends derived indexes)."""
        total = self.count()
        with self.io("read"):
            for first in range(start, total, batch_size):
                yield from (
                    self._dataset()
                    .take(list(range(first, min(total, first + batch_size))), columns=self.columns_for(columns))
                    .to_batches()
                )

    def schema(self) -> pa.Schema:
        """The samples table's Arrow schema (of the snapshot)."""
        return self._dataset().schema

    def has_column(self, name: str) -> bool:
        return name in self._dataset().schema.names

    def set_column(
        self, name: str, field: pa.Field, fn, read_columns: Sequence[str], manifest: Manifest, batch_size: int = 1024
    ) -> None:
        """Add (or replace) column ``name`` computed by ``fn(batch) -> pa.Array`` from ``read_columns``,
        streaming the table ``batch_size`` rows at a time, after replacing the manifest with ``manifest``.

        Not safe against a concurrent :meth:`append` (run it while no build writes).
        """
        dataset = self._dataset()
        if name in dataset.schema.names:
            dataset.drop_columns([name])
            self.refresh()
            dataset = self._dataset()

        def udf(batch: pa.RecordBatch) -> pa.RecordBatch:
            return pa.RecordBatch.from_arrays([fn(batch)], schema=pa.schema([field]))

        # the manifest while the table has no such column, then the column: a kill in between leaves a missing
        # column (named by 'index check', recomputed by the re-run), never a column the manifest does not describe
        # (a sketch of another basis or heavy ids but the same width is indistinguishable from the right one)
        write_text(self.path / MANIFEST_FILE, manifest.to_json(), inside_store=True)
        self.manifest = manifest
        dataset.add_columns(
            udf, read_columns=list(read_columns), reader_schema=pa.schema([field]), batch_size=batch_size
        )
        self.refresh()

    def take(self, offsets: Sequence[int], columns: Sequence[str]) -> pa.Table:
        """Rows at the given positions (storage order, as yielded by :meth:`scan`)."""
        with self.io("read"):
            return self._dataset().take(list(offsets), columns=self.columns_for(columns))

    def version(self) -> int:
        return int(self._snapshot.version)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.path / f"{SAMPLES_TABLE}.lance").rglob("*") if f.is_file())


def is_empty_folder(path: Path) -> bool:
    """True when ``path`` holds nothing but what a writer leaves before a store's manifest exists: writer-lease
    files (a writer killed before its first write) and the manifest's temporary file (another worker of a
    sharded build creating the same store at this moment)."""
    return all(entry.name.startswith((".writer.", f".{MANIFEST_FILE}.")) for entry in path.iterdir())


def _create_remote_table(path: RemotePath, schema: pa.Schema) -> None:
    """Create the empty samples table at an object-store location, tolerating a concurrent twin (Lance's
    create is a conditional put of the first version: one creator wins, the other finds the table)."""
    import lance

    uri, options = str(path / f"{SAMPLES_TABLE}.lance"), lance_options(path)
    with translate_errors(path, "create the table of"):
        if (path / f"{SAMPLES_TABLE}.lance" / "_versions").is_dir():
            return
        try:
            lance.write_dataset(schema.empty_table(), uri, mode="create", storage_options=options)
        except (OSError, ValueError, RuntimeError):
            if not (path / f"{SAMPLES_TABLE}.lance" / "_versions").is_dir():
                raise


def _publish_manifest(target: Path, manifest: Manifest) -> None:
    """Write ``target`` only if absent, atomically (tmp file + hard link)."""
    if target.exists():
        return
    publish_if_absent(target, manifest.to_json().encode())


# -- errors ----------------------------------------------------------------------
_NOISE = re.compile(r"(External error: |LanceError\(\w+\): |, /\S+\.rs:\d+:\d+|\s+/\S+\.rs:\d+:\d+)")


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message, without Rust source locations, at most 200 characters."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    text = _NOISE.sub("", lines[0]).strip() if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _advice(exc: BaseException, path: Path) -> str:
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    if code == errno.ENOSPC or "no space left" in text:
        return "the disk is full; free space and re-run (committed batches are kept)"
    if (
        code in (errno.EROFS, errno.EACCES, errno.EPERM)
        or "read-only file system" in text
        or "permission denied" in text
    ):
        return "no permission to write there (read-only or another owner); fix the permissions or use another store"
    return f"the store may be damaged; run 'forvalue index check --store {path}'"


@contextlib.contextmanager
def translate_errors(path: str | Path, action: str) -> Iterator[None]:
    """Turn Lance/Arrow/OS errors raised inside into one :class:`StoreError` line naming the store.

    ``action`` completes "cannot ... the store" (e.g. ``"read"``, ``"append to"``). User errors
    (:class:`~forvalue.schemas.errors.ForValueError`) pass through unchanged.
    """
    from forvalue.schemas.errors import ForValueError

    try:
        yield
    except ForValueError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        if isinstance(path, RemotePath):
            line = describe_failure(path, exc)
            if line is not None:
                raise StoreError(line) from exc
            raise StoreError(
                f"{path}: cannot {action} the store ({short_reason(exc)}); "
                f"the store may be damaged; run 'forvalue index check --store {path}'"
            ) from exc
        reason, advice = short_reason(exc), _advice(exc, Path(path))
        if advice.startswith("the store may be damaged"):  # a vague Lance error: is the disk full or read-only?
            probe = _write_probe(Path(path))
            if probe is not None:
                reason = f"{short_reason(exc)}; writing a test file: {short_reason(probe)}"
                advice = _advice(probe, Path(path))
        raise StoreError(f"{path}: cannot {action} the store ({reason}); {advice}") from exc


def _write_probe(folder: Path, size: int = 1 << 20) -> OSError | None:
    """The error that writing (and syncing) a ``size``-byte file in ``folder`` raises when the folder's disk is
    full or read-only (or the folder not writable); None otherwise."""
    if not folder.is_dir():
        return None
    probe = folder / f".write-probe.{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * size)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return exc if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT) else None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


# -- the writer lease ----------------------------------------------------------------
LEASE_FILE = ".writer.lock"


class WriterLease:
    """Who may write to a store now: an ``flock`` on ``STORE/.writer.lock`` (see the module docstring).

    ``shard = (0, 1)`` (unsharded) takes the lock exclusively; a sharded worker ``(I, N)`` shares it
    and takes ``STORE/.writer.shard-I-of-N.lock`` exclusively. The holder's pid, host and start time
    are written into the file it holds exclusively, for the message another writer gets. Locks die
    with their process, so a crash leaves no stale lease (the file's text alone blocks nothing).

    Example
    -------
    >>> with WriterLease.acquire(store_path):          # a second writer now gets a one-line StoreError
    ...     WriterLease.acquire(store_path)
    Traceback (most recent call last):
    ...
    forvalue.schemas.errors.StoreError: ...
    """

    def __init__(self, path: Path, handles: list[int]):
        self.path, self._handles = path, handles

    @classmethod
    def acquire(cls, path: str | Path, shard: tuple[int, int] = (0, 1), sharded: bool = True) -> "WriterLease":
        """Take the lease now or raise :class:`StoreError` naming the holder (never waits); ``sharded=False``:
        the caller has no ``--shard`` to suggest (``index convert``, ``index sketch``)."""
        import fcntl

        path = store_location(path)
        index, count = shard
        if isinstance(path, RemotePath):
            return _remote_lease(path, shard)
        handles: list[int] = []
        try:
            main = _open_lock(path / LEASE_FILE)
            handles.append(main)
            if count == 1:
                if not _try_lock(main, fcntl.LOCK_EX):
                    raise StoreError(
                        f"another build is writing to {path} ({_holder(path)}); wait for it to finish"
                        + (", or use --shard I/N for parallel workers" if sharded else "")
                    )
                _write_holder(main)
                return cls(path, handles)
            if not _try_lock(main, fcntl.LOCK_SH):
                raise StoreError(
                    f"another build is writing to {path} ({_holder(path)}, unsharded); wait for it to "
                    "finish before starting sharded workers"
                )
            # workers of one sharded build agree on N: each holds its N's lock shared and finds no other N's held
            # (workers 0/2 and 0/3 at once split the ids two ways and wrote the shared ones twice; hostile pass)
            handles.append(_open_lock(path / f".writer.shards-of-{count}.lock"))
            fcntl.flock(handles[-1], fcntl.LOCK_SH)  # (held shared; another N's probe holds it a moment, waited for)
            for other in path.glob(".writer.shards-of-*.lock"):
                if other.name == f".writer.shards-of-{count}.lock":
                    continue
                probe = _open_lock(other)
                try:
                    free = _try_lock(probe, fcntl.LOCK_EX)
                finally:
                    os.close(probe)
                if not free:
                    n_other = other.name[len(".writer.shards-of-") : -len(".lock")]
                    raise StoreError(
                        f"sharded workers of {n_other} shards are writing to {path}; every worker of one build "
                        f"takes the same N in --shard I/N (give --shard {index}/{n_other}, or wait for them)"
                    )
            mine = path / f".writer.shard-{index}-of-{count}.lock"
            handles.append(_open_lock(mine))
            if not _try_lock(handles[-1], fcntl.LOCK_EX):
                raise StoreError(
                    f"another worker of shard {index}/{count} is writing to {path} "
                    f"({_read_holder(mine)}); give each worker its own --shard I/N"
                )
            _write_holder(handles[-1])
            return cls(path, handles)
        except BaseException:
            for fd in handles:
                os.close(fd)
            raise

    def release(self) -> None:
        """Drop the lease (also on process exit)."""
        for fd in self._handles:
            os.close(fd)
        self._handles = []

    def __enter__(self) -> "WriterLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _remote_lease(path: RemotePath, shard: tuple[int, int]):
    """The writer lease of a store on an object store: an expiring lease object (forvalue.storage.object_lease)."""
    from forvalue.storage.object_lease import ObjectLease

    if shard[1] != 1:
        raise StoreError(
            f"{path}: --shard is for stores on a file system; on an object store use --engine ray "
            "(one writer lease, workers on every node)"
        )
    return ObjectLease.acquire(
        path / REMOTE_LEASE_FILE,
        busy=lambda holder: f"another build is writing to {path} ({holder}); wait for it to finish",
    )


REMOTE_LEASE_FILE = ".writer.lease"


def writer_of(path: str | Path) -> str | None:
    """Who is writing ``path`` now (a build, ``index sketch``, ``check --repair``: the holder's note), or None; for
    a reader's message when the store changed under it. Tests the lease with a shared lock taken and dropped at
    once, so call it only on an error path (a writer starting in that instant would be refused). An object store:
    None (its lease is not a lock to test)."""
    import fcntl

    path = store_location(path)
    if isinstance(path, RemotePath):
        return None
    try:
        fd = os.open(path / LEASE_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        if not _try_lock(fd, fcntl.LOCK_SH):
            return _holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    held = _holder(path)
    return held if held.startswith("sharded worker") else None


def _open_lock(file: Path) -> int:
    try:
        return os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(
            f"{file.parent}: cannot write to the store ({exc.strerror}); {_advice(exc, file.parent)}"
        ) from None


def _try_lock(fd: int, mode: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _write_holder(fd: int) -> None:
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
    except OSError:
        pass  # the lock holds without its note


def _read_holder(file: Path) -> str:
    try:
        info = json.loads(file.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "holder unknown"


def _holder(path: Path) -> str:
    """Who holds the store's lease: a sharded worker's note if one holds its shard, else the main note."""
    import fcntl

    for file in sorted(path.glob(".writer.shard-*.lock")):
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _try_lock(fd, fcntl.LOCK_SH):
                return f"sharded worker: {_read_holder(file)}"
        finally:
            os.close(fd)
    return _read_holder(path / LEASE_FILE)
