"""Find and read input files: JSONL (plain, .gz, .zst), Parquet, CSV, ``datasets`` folders, folders and globs.

:func:`expand_inputs` turns what a user names into a list of files (each read once, however it was
named); ``_iter_rows`` streams ``(line or row number, row dict)`` from one of them, never a whole
file in memory; bad bytes, JSON or Unicode raise :class:`~forvalue.schemas.errors.InputDataError`
naming the file and line. Turning rows into samples is :mod:`forvalue.indexer.data`'s job.
"""

from __future__ import annotations

import glob
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa

from forvalue.schemas.errors import ForValueError, InputDataError
from forvalue.storage.location import RemotePath, is_uri

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
COMPRESSIONS = (".gz", ".zst")
_ARROW_BLOCK = 1024
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _kind(path: Path) -> tuple[str, str | None] | None:
    """``(suffix, compression)`` of a data file name (``x.jsonl.zst`` -> ``(".jsonl", ".zst")``), None if unknown."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = None
    if suffixes and suffixes[-1] in COMPRESSIONS:
        compression = suffixes.pop()
    if suffixes and suffixes[-1] in SUFFIXES and not (compression and suffixes[-1] == ".parquet"):
        return suffixes[-1], compression
    return None


def _known() -> str:
    return ", ".join(SUFFIXES) + " (JSONL and CSV also .gz or .zst)"


def _is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").exists()


def as_paths(data) -> list:
    """One input or many: ``"train.jsonl"`` and ``["train.jsonl"]`` mean the same (a list of rows passes through;
    a single path was iterated character by character: "t: no such file or folder")."""
    if data is None or isinstance(data, (bytes, int, float)):  # (a TypeError from deep inside before)
        raise ForValueError(f"expected a path, or a list of paths or rows, for the data; got {data!r}")
    return [data] if isinstance(data, (str, Path)) else list(data)


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Every data file or ``datasets`` folder the inputs name, in order.

    A file stays itself; a ``datasets`` ``save_to_disk`` folder (with ``state.json``) stays one
    input; any other folder becomes the data files under it (recursively, hidden ones left out,
    sorted by path); a pattern with ``*``, ``?`` or ``[`` becomes its sorted matches (``**``
    crosses folders). Raises :class:`InputDataError` naming the path when something is missing,
    matches nothing, or has an unknown format.

    The same file reached twice (named again, through a folder, a glob, a link or another spelling)
    is read once, at its first place: files are told apart by device and inode, not by name. A pipe,
    FIFO or device (``<(cat x.jsonl)``, ``/dev/stdin``) is refused: inputs are read twice (a first
    check before the model loads, then the build), which a pipe cannot do.
    """
    out: list[Path] = []
    for item in paths:
        if is_uri(item):  # s3://bucket/data/*.parquet, an object, or a prefix: streamed like a local file
            out.extend(_remote_inputs(item))
            continue
        text = str(item)
        if any(c in text for c in "*?[") and not Path(text).exists():
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            found = [m for m in matches if _is_datasets_folder(m) or (m.is_file() and _kind(m))]
            if not found:
                what = "matches no file" if not matches else f"matches no data file ({_known()})"
                raise InputDataError(text, f"{what}; check the pattern (quote it so the shell leaves it to forvalue)")
            out.extend(found)
            continue
        path = Path(text)
        if not path.exists():
            raise InputDataError(path, "no such file or folder")
        if path.is_dir() and not _is_datasets_folder(path):
            if (path / "dataset_dict.json").exists():
                raise InputDataError(
                    path, f"is a datasets DatasetDict folder; give one split's folder (e.g. {path / 'train'})"
                )
            stores = _stores_below(path)
            files = sorted(
                f
                for f in path.rglob("*")
                if f.is_file()
                and _kind(f)
                and not any(part.startswith(".") or part.endswith(".lance") for part in f.relative_to(path).parts)
                and not stores.intersection(f.parents)
            )
            if not files:
                raise InputDataError(
                    path,
                    f"folder holds no data file ({_known()}) and is not a datasets save_to_disk folder (no state.json)",
                )
            out.extend(files)
            continue
        _check_regular(path)
        out.append(path)
    return _read_once(out)


def _remote_inputs(item) -> list[RemotePath]:
    """The data objects an ``s3://`` input names: a glob's matches, one object, or the data files below a prefix."""
    from forvalue.storage.location import check_reachable, remote_glob, store_location

    text = str(item)
    if not isinstance(item, RemotePath) and any(c in text for c in "*?["):
        matches = remote_glob(text)
        found = [m for m in matches if _kind(m)]
        if not found:
            what = "matches no object" if not matches else f"matches no data file ({_known()})"
            raise InputDataError(text, f"{what}; check the pattern (quote it so the shell leaves it to forvalue)")
        return found
    location = store_location(item)
    check_reachable(location)
    if location.is_file():
        return [location]
    listed = list(location.rglob("*"))
    if not listed:
        raise InputDataError(location, "no such object or prefix")
    stores = {str(f).split("/samples.lance/")[0] + "/" for f in listed if "/samples.lance/" in str(f)}  # skipped
    files = [
        f
        for f in listed
        if _kind(f)
        and not any(p.startswith(".") or p.endswith(".lance") for p in str(f)[len(str(location)) + 1 :].split("/"))
        and not any(str(f).startswith(store) for store in stores)
    ]
    if not files:
        raise InputDataError(location, f"prefix holds no data file ({_known()})")
    return files


def _check_regular(path: Path) -> None:
    """Refuse an input that is neither a file nor a folder (a pipe, FIFO, socket or device) before reading it."""
    import stat

    if isinstance(path, RemotePath):
        return
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise InputDataError(path, f"cannot be read ({exc.strerror})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a pipe or FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise InputDataError(
            path,
            f"is {kind}, not a file: inputs are read twice (a first check, then the run); save the data to a "
            "file first (e.g. cat ... > data.jsonl)",
        )


def _read_once(paths: list[Path]) -> list[Path]:
    """``paths`` without the ones that are the same file (device + inode) as an earlier one."""
    seen: set[tuple[int, int]] = set()
    out = []
    for path in paths:
        try:
            st = path.stat()
            key = (str(path), 0) if isinstance(path, RemotePath) else (st.st_dev, st.st_ino)
        except OSError:
            key = None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out.append(path)
    return out


def _stores_below(top: Path) -> set[Path]:
    """The forvalue stores inside folder ``top`` (their files are no data: a manifest is not a JSONL row)."""
    from forvalue.storage.files import is_store

    return {m.parent for m in top.rglob("manifest.json") if is_store(m.parent)}


def check_paths(paths: Iterable[str | Path]) -> None:
    """Fail fast (before a model is loaded or a store created) on a missing path or unknown format."""
    for path in expand_inputs(paths):
        if path.is_file() and _kind(path) is None:
            raise InputDataError(
                path,
                f"unknown format '{''.join(path.suffixes[-2:]) or path.name}'; use one of "
                f"{_known()}, a folder of them, or a datasets folder",
            )


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    check_paths([path])
    if path.is_dir():
        yield from _iter_arrow_folder(path)
        return
    suffix, compression = _kind(path)
    if suffix in (".jsonl", ".json"):
        yield from _iter_jsonl(path, compression)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            source = path.open_random_access() if isinstance(path, RemotePath) else path
            batches = pq.ParquetFile(source).iter_batches(batch_size=_ARROW_BLOCK)
            yield from _number_batches(batches)
        except pa.ArrowInvalid as exc:
            raise InputDataError(path, f"not a readable Parquet file ({exc})") from None
    else:  # ".csv" (check_paths refused the rest)
        yield from _iter_csv(path, compression)


def _open_binary(path: Path, compression: str | None):
    """A buffered binary stream of the file's (decompressed) bytes."""
    if compression == ".gz":
        import gzip

        return gzip.open(path.open("rb") if isinstance(path, RemotePath) else path, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise InputDataError(
                path, "reading .zst files needs the zstandard package (pip install zstandard)"
            ) from None
        raw = path.open("rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return path.open("rb")


def _decompress_errors() -> tuple[type[BaseException], ...]:
    import gzip
    import zlib

    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _iter_jsonl(path: Path, compression: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    lineno = 0
    try:
        with _open_binary(path, compression) as handle:
            for lineno, raw in enumerate(handle, start=1):
                row = json_row(path, lineno, raw)
                if row is not None:
                    yield lineno, row
    except _decompress_errors() as exc:
        raise InputDataError(
            path,
            f"not a readable {compression} file ({exc or type(exc).__name__}) after line "
            f"{lineno}; the file is damaged or cut short",
            line=lineno + 1,
        ) from None


def json_row(path: Path, lineno: int, raw: bytes) -> dict[str, Any] | None:
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte order mark starts some files
    except UnicodeDecodeError as exc:
        raise InputDataError(
            path, f"not UTF-8 text (byte {exc.start + 1}); re-save the file as UTF-8", line=lineno
        ) from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputDataError(path, f"malformed JSON ({exc.msg}, column {exc.colno})", line=lineno) from None
    except RecursionError:
        raise InputDataError(path, "JSON nested too deeply; flatten the row", line=lineno) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InputDataError(path, f"unreadable JSON ({str(exc).splitlines()[0][:120]})", line=lineno) from None
    if not isinstance(row, dict):
        raise InputDataError(path, f"expected a JSON object, got {type(row).__name__}", line=lineno)
    if "\\u" in line and _SURROGATE.search(line):  # an escaped UTF-16 half: valid only in a pair
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputDataError(
                path,
                f"invalid Unicode: a lone surrogate {exc.object[exc.start]!a} (half of a UTF-16 pair) in a string; "
                "fix the text",
                line=lineno,
            ) from None
    return row


def _iter_csv(path: Path, compression: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    import csv

    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long texts are data, not damage
    binary = _open_binary(path, compression)
    with io.TextIOWrapper(binary, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                if None in row:
                    raise InputDataError(path, "more values than header columns", line=reader.line_num)
                yield reader.line_num, row
        except UnicodeDecodeError:
            raise InputDataError(path, "not UTF-8 text; re-save the file as UTF-8") from None
        except csv.Error as exc:
            raise InputDataError(path, f"malformed CSV ({exc})", line=reader.line_num) from None
        except _decompress_errors() as exc:
            raise InputDataError(
                path,
                f"not a readable {compression} file ({exc or type(exc).__name__}); the file is damaged or cut short",
                line=reader.line_num + 1,
            ) from None


def _number_batches(batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[int, dict[str, Any]]]:
    row_number = 0
    for batch in batches:
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row


def _iter_arrow_folder(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a ``save_to_disk`` folder (Arrow stream files listed in ``state.json``)."""
    state = path / "state.json"
    try:
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError, RecursionError, OSError):
        raise InputDataError(state, "not a datasets state.json (needs '_data_files': [{'filename': ...}])") from None

    def batches() -> Iterator[pa.RecordBatch]:
        for file in files:
            if not file.is_file():
                raise InputDataError(file, "listed in state.json but missing; the datasets folder is incomplete")
            with pa.memory_map(str(file)) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid as exc:
                    raise InputDataError(file, f"not an Arrow stream file ({exc})") from None
                yield from reader

    yield from _number_batches(batches())
