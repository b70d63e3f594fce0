"""Every file forvalue writes, written one way: the output policy and the one atomic writer.

The policy (:func:`check_outputs`), applied before any work starts: an output path

- is not inside a store (a folder whose ``manifest.json`` is a forvalue manifest, or one holding
  ``samples.lance/``), nor a store itself: a report named ``STORE/manifest.json`` must never
  replace the manifest; nor inside a value model folder;
- is not one of the command's inputs, compared as files (device + inode), not by spelling, and
  not inside an input folder (a later run would read it as input);
- does not collide with another output of the same command (the same file, or one inside
  another output's folder);
- has a suffix of its format, and is not a device, pipe or socket (an atomic rename would
  replace the device node; ``-`` is standard output where a command allows it).

The writer: the bytes go to a hidden temporary name in the target's folder
(``.NAME.PID.RANDOM.tmp``), are flushed to disk, and the file is renamed into place, so a reader
(or a kill at any moment) sees the old file or the new one, never half of one.
:class:`TableSink` streams Arrow record batches (Parquet, CSV or JSONL) through it;
:func:`publish_if_absent` is its create-if-absent twin (a store's manifest, its sketch basis).
Value models are folders written file by file through it, their manifest last
(:mod:`forvalue.value_model`).

Example
-------
>>> check_outputs({"--output": ("top.jsonl", (".jsonl",))}, inputs=[validation_path])
>>> check_outputs({"--report": (store_path + "/manifest.json", (".html",))})
Traceback (most recent call last):
...
forvalue.storage.files.OutputPathError: --report ...: ... store ...
>>> with atomic_path("top.jsonl") as tmp:
...     _ = tmp.write_text("done")
>>> open("top.jsonl").read()
'done'
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from forvalue.schemas.errors import ForValueError
from forvalue.storage.location import RemotePath, is_uri

FOLDER = "folder"  # the format of an output that is a folder (value model, explanation pages)
STDOUT = "-"  # in an output's formats: '-' means standard output
STORE_MARKERS = ("samples.lance",)
MANIFEST_NAME = "manifest.json"


class OutputPathError(ForValueError):
    """An output path that the output policy refuses (one line naming the path and what to do)."""


# -- where a path is ---------------------------------------------------------------------------------
def _absolute(path: str | Path) -> Path:
    """``path`` made absolute with its existing part's symlinks resolved (the rest need not exist)."""
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    missing: list[str] = []
    head = path
    while not head.exists() and head != head.parent:
        missing.append(head.name)
        head = head.parent
    return head.resolve().joinpath(*reversed(missing))


def is_store(folder: Path) -> bool:
    """A forvalue store: a folder with ``samples.lance/``, or whose ``manifest.json`` is a forvalue manifest."""
    try:
        if not folder.is_dir():
            return False
        if any((folder / m).is_dir() for m in STORE_MARKERS):
            return True
        manifest = folder / MANIFEST_NAME
        if manifest.is_file() and manifest.stat().st_size < (1 << 20):
            return "model_weights_sha256" in manifest.read_text(errors="replace")
    except OSError:
        return False
    return False


def store_above(path: str | Path) -> Path | None:
    """The store that ``path`` is (or lies inside), or None."""
    path = _absolute(path)
    for folder in [path, *path.parents]:
        if is_store(folder):
            return folder
    return None


def is_value_model(folder: Path) -> bool:
    """A value model folder made by ``forvalue distill`` (its ``value_model.json`` names the format)."""
    manifest = folder / "value_model.json"
    try:
        return (
            manifest.is_file()
            and manifest.stat().st_size < (64 << 20)
            and ("forvalue.value_model" in manifest.read_text(errors="replace"))
        )
    except OSError:
        return False


def value_model_above(path: str | Path) -> Path | None:
    """The value model folder that ``path`` lies inside (not ``path`` itself), or None."""
    path = _absolute(path)
    return next((folder for folder in path.parents if is_value_model(folder)), None)


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _input_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """The existing files and folders that ``inputs`` name (globs expanded); items that are not paths (the rows
    of an in-memory validation set, say) name nothing."""
    import glob

    out: list[Path] = []
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):
            continue
        text = str(item)
        if text == "-":
            continue
        if _is_glob(text):
            out.extend(Path(m) for m in glob.glob(text, recursive=True))
        elif Path(text).exists():
            out.append(Path(text))
    return out


def _is_glob(text: str) -> bool:
    """An input is a glob pattern when it has one of ``*?[`` and names no existing path."""
    return any(c in text for c in "*?[") and not Path(text).exists()


def _input_globs(inputs: Iterable[str | Path | None]) -> list[str]:
    """The glob patterns among ``inputs``, as absolute patterns."""
    return [str(_absolute(i)) for i in inputs if isinstance(i, (str, os.PathLike)) and _is_glob(str(i))]


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` are the same existing file or folder (device + inode, not spelling)."""
    ka, kb = _file_key(Path(a)), _file_key(Path(b))
    return ka is not None and ka == kb


# -- the policy --------------------------------------------------------------------------------------
def check_outputs(
    outputs: Mapping[str, tuple[str | Path | None, Sequence[str]]],
    inputs: Iterable[str | Path | None] = (),
) -> None:
    """Refuse, before any work, outputs the policy forbids (module docstring); raises :class:`OutputPathError`.

    Parameters
    ----------
    outputs : {what: (path, formats)}
        ``what`` names the output in messages (a flag such as ``--report``); ``formats`` the allowed
        suffixes (``(".jsonl", ".csv")``, plus ``STDOUT`` where ``-`` means standard output) or
        ``(FOLDER,)`` for a folder. None paths are skipped.
    inputs : paths
        Everything the command reads: data files, folders, globs, stores, value models.
    """
    given = [(what, path, tuple(formats)) for what, (path, formats) in outputs.items() if path is not None]
    inputs = list(inputs)
    sources, patterns = _input_paths(inputs), _input_globs(inputs)
    seen: list[tuple[str, Path]] = []
    for what, raw, formats in given:
        if str(raw) == STDOUT:
            if STDOUT in formats:
                continue
            raise OutputPathError(f"{what} -: give a {'folder' if FOLDER in formats else 'file'} path")
        if is_uri(raw):
            raise OutputPathError(
                f"{what} {raw}: outputs are local files (object-store URIs are for stores); "
                "write it to a local path, then copy it"
            )
        formats = tuple(f for f in formats if f != STDOUT)
        _check_one(what, Path(str(raw)), formats, sources)
        here = _absolute(raw)
        for pattern in patterns:  # 'gdir/*.jsonl' in, 'gdir/out.jsonl' out: the next run reads it
            if fnmatch.fnmatchcase(str(here), pattern):
                raise OutputPathError(
                    f"{what} {raw}: matches the input pattern {pattern}; a later run would read it as input; "
                    "write it elsewhere or under another name"
                )
        for other_what, other in seen:
            if here == other or same_file(here, other) or other in here.parents or here in other.parents:
                raise OutputPathError(
                    f"{what} {raw}: collides with {other_what} {other} of the same command; "
                    "give each output its own path"
                )
        seen.append((what, here))


def _check_one(what: str, path: Path, formats: tuple[str, ...], sources: list[Path]) -> None:
    folder = FOLDER in formats
    label = f"{what} {path}"
    if "\n" in str(path) or "\r" in str(path):
        raise OutputPathError(f"{what} {str(path)!r}: a path with a line break; choose another name")
    store = store_above(path)
    if store is not None:
        where = "is the store" if _absolute(path) == store else f"is inside the store {store}"
        raise OutputPathError(
            f"{label}: {where}; outputs never go into a store (it would be damaged); write it elsewhere"
        )
    model = value_model_above(path)
    if model is not None:
        raise OutputPathError(
            f"{label}: is inside the value model {model}; outputs never go into a value model folder; "
            "write it elsewhere"
        )
    if not folder:
        suffix = path.suffix.lower()
        if path.is_dir():  # ("unknown output format ''" before)
            raise OutputPathError(f"{label}: is a folder; give a file path (ending in {' or '.join(formats)})")
        if suffix not in formats:
            raise OutputPathError(
                f"{label}: unknown output format '{path.suffix}'; use a name ending in {' or '.join(formats)}"
            )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputPathError(f"{label}: cannot be checked ({exc.strerror}); choose another path") from None
    if st is not None:
        if folder and not stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"{label}: exists and is not a folder; choose another path")
        if not folder and stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"{label}: is a folder; give a file name ending in {' or '.join(formats)}")
        if not folder and not stat.S_ISREG(st.st_mode):
            raise OutputPathError(
                f"{label}: exists and is not a regular file (a device, pipe or socket); give a file path"
                + (" (or - for standard output where the command allows it)" if ".jsonl" in formats else "")
            )
    here = _absolute(path)
    for source in sources:
        if st is not None and same_file(path, source):
            raise OutputPathError(
                f"{label}: is one of the command's inputs ({source}); writing it would replace the input; "
                "choose another path"
            )
        src = _absolute(source)
        if src.is_dir() and (src in here.parents):
            raise OutputPathError(
                f"{label}: is inside the input folder {source}; a later run would read it as input; write it elsewhere"
            )
        if folder and (here in src.parents or here == src):
            raise OutputPathError(f"{label}: holds the input {source}; choose another folder")
    parent = here if folder else here.parent  # (a folder output is made itself: a dangling link there too)
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link: its folder cannot be made ("File exists" after the whole run)
            raise OutputPathError(
                f"{label}: {parent} is a symbolic link to {os.readlink(parent)}, which does not exist; create that "
                "folder or choose another output path"
            )
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{label}: {parent} is a file, not a folder; choose another output path")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"{label}: cannot write into {parent}; choose a writable folder")
    try:  # a folder that only says it is writable (/proc, /sys, some mounts): a file made there and removed
        handle, probe = tempfile.mkstemp(prefix=".forvalue-probe.", dir=parent)  # (short: any legal name fits)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(
            f"{label}: cannot write into {parent} ({exc.strerror}); choose a writable folder"
        ) from None


# -- the writer --------------------------------------------------------------------------------------
def temp_name(target: Path) -> Path:
    """A hidden, unique temporary name beside ``target`` (same folder, so the rename is atomic).

    Temporary files of ``target`` left by writers that died (their pid is gone) are removed first.
    """
    _sweep(target)
    return target.with_name(f"{_temp_prefix(target)}{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _temp_prefix(target: Path) -> str:
    """``.NAME.`` with NAME cut to 200 bytes: the temporary name fits wherever the target's does (255 bytes)."""
    name = target.name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return f".{name}."


def _sweep(target: Path) -> None:
    """Remove ``.NAME.PID.RANDOM.tmp`` files beside ``target`` whose writer process no longer exists."""
    prefix = _temp_prefix(target)
    try:
        names = [n for n in os.listdir(target.parent) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if process_ended(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(target.parent / name)


def process_ended(pid: int) -> bool:
    """Whether the process ``pid`` (a writer named in a file's name) no longer runs on this machine (a process
    that cannot be asked counts as running: its files are left)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _guard_target(target: Path, inside_store: bool) -> None:
    """The last line of the policy, at write time: never into a store (unless the store writes its own file)."""
    if not inside_store:
        store = store_above(target)
        if store is not None:
            raise OutputPathError(f"{target}: is inside the store {store}; outputs never go into a store")
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(target)
        if not stat.S_ISREG(st.st_mode):
            raise OutputPathError(f"{target}: exists and is not a regular file; give a file path")


@contextlib.contextmanager
def atomic_path(target: str | Path, *, inside_store: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is synced and renamed to ``target``.

    On any exception (or a kill) ``target`` keeps its old content and the temporary file is removed
    (a kill leaves a hidden ``.NAME...tmp`` file at most). ``inside_store=True`` only for the store's own files.
    For a store on an object store the file is uploaded in one PUT on success (visible whole or not at all).
    """
    if isinstance(target, RemotePath):
        yield from _remote_atomic_path(target, inside_store)
        return
    target = Path(target)
    _guard_target(target, inside_store)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    except OSError as exc:
        raise _write_error(exc, target, tmp) from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_error(exc: OSError, target: Path, tmp: Path) -> OSError | OutputPathError:
    """The error to raise for ``exc`` met while writing ``target`` through ``tmp``: one naming ``target`` (not the
    hidden temporary file the user never gave) when it is about that file or names no file at all (a full disk, a
    quota, an I/O error); ``exc`` itself when it names another file."""
    if getattr(exc, "filename", None) not in (None, str(tmp)) and str(tmp) not in str(exc):
        return exc
    return OutputPathError(f"{target}: cannot be written ({exc.strerror or exc}); choose another path or free space")


def _remote_atomic_path(target: RemotePath, inside_store: bool) -> Iterator[Path]:
    if not inside_store:
        raise OutputPathError(f"{target}: outputs are local files (object-store URIs are for stores)")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="forvalue-upload-") as folder:
        tmp = Path(folder) / target.name
        yield tmp
        target.write_bytes(tmp.read_bytes())


def write_bytes(target: str | Path, data: bytes, *, inside_store: bool = False) -> Path:
    """Write ``data`` to ``target`` atomically (:func:`atomic_path`)."""
    if isinstance(target, RemotePath):
        if not inside_store:
            raise OutputPathError(f"{target}: outputs are local files (object-store URIs are for stores)")
        target.write_bytes(data)  # one PUT: visible whole or not at all
        return target
    with atomic_path(target, inside_store=inside_store) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str, *, inside_store: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return write_bytes(target, text.encode("utf-8", errors="backslashreplace"), inside_store=inside_store)


def publish_if_absent(target: str | Path, data: bytes) -> bool:
    """Create ``target`` with ``data`` only if it does not exist, atomically (temporary file + hard link).

    Safe against concurrent publishers: exactly one wins. Returns whether this call created it.
    Used for a store's own files (manifest, sketch basis), hence no store check. On an object store:
    a conditional PUT (``If-None-Match: *``).
    """
    if isinstance(target, RemotePath):
        return target.publish_if_absent(data)
    target = Path(target)
    tmp = temp_name(target)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        _fsync_folder(target.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def unique_columns(fixed: Sequence[str], names: Sequence[str]) -> list[str]:
    """``names`` made unique among themselves and against the ``fixed`` columns before them.

    A repeat (or a name equal to a fixed column, e.g. a validation id ``train_id``) becomes ``NAME#K``
    with the smallest free K, so every column of an output file has its own name.
    """
    taken = set(fixed)
    out = []
    for name in names:
        candidate, k = name, 0
        while candidate in taken:
            k += 1
            candidate = f"{name}#{k}"
        taken.add(candidate)
        out.append(candidate)
    return out


class TableSink:
    """Streams Arrow tables to a ``.parquet``, ``.csv`` or ``.jsonl`` file, renamed into place by :meth:`close`.

    The first :meth:`write` fixes the schema (its column names must be unique); :meth:`abort` (or any
    failure) removes the temporary file and leaves an existing ``path`` as it was.
    """

    def __init__(self, path: str | Path, schema=None):
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in (".parquet", ".csv", ".jsonl"):
            raise OutputPathError(f"{self.path}: unknown output format '{self.path.suffix}'")
        _guard_target(self.path, False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.path)
        self.writer = None
        self.handle = None
        self.schema = None
        if schema is not None:
            try:
                self._open(schema)
            except BaseException:
                self.abort()
                raise

    def _open(self, schema) -> None:
        names = list(schema.names)
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ForValueError(f"{self.path}: two output columns would both be named '{dup}'; rename one")
        self.schema = schema
        if self.suffix == ".jsonl":
            self.handle = self.tmp.open("w", encoding="utf-8", errors="backslashreplace")
        elif self.suffix == ".csv":
            import pyarrow.csv as pcsv

            self.writer = pcsv.CSVWriter(str(self.tmp), schema)
        else:
            import pyarrow.parquet as pq

            self.writer = pq.ParquetWriter(str(self.tmp), schema)

    def write(self, table) -> None:
        """Append ``table`` (a pyarrow Table or RecordBatch with the sink's schema)."""
        try:
            if self.schema is None:
                self._open(table.schema)
            if self.handle is not None:
                for row in table.to_pylist():
                    self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                self.writer.write(table)
        except OSError as exc:
            raise _write_error(exc, self.path, self.tmp) from None

    def close(self, schema=None) -> Path:
        """Finish the file (an empty one with ``schema`` when nothing was written) and rename it into place."""
        try:
            if self.schema is None:
                if schema is None:
                    raise ValueError("TableSink.close: nothing written and no schema")
                self._open(schema)
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if self.handle is not None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
                self.handle.close()
                self.handle = None
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
            _fsync_folder(self.path.parent)
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.path, self.tmp) from None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the partial file (closing may fail on a full disk: the file goes anyway)."""
        for h in (self.writer, self.handle):
            if h is not None:
                with contextlib.suppress(Exception):
                    h.close()
        self.writer = self.handle = None
        self.tmp.unlink(missing_ok=True)


def write_table(table, path: str | Path) -> Path:
    """Write a pyarrow ``table`` to ``path`` (format from the suffix) atomically."""
    sink = TableSink(path, table.schema)
    sink.write(table)
    return sink.close()
