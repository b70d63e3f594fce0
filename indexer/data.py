"""Read training or validation samples from JSONL, Parquet, CSV or ``datasets`` folders, plain or at scale.

An input is a file, a folder of shards (every data file under it, in sorted order), a glob
(``data/*.parquet``) or a ``datasets`` ``save_to_disk`` folder; JSONL and CSV may be gzip
(``.gz``) or zstandard (``.zst``) compressed. Rows are streamed (never a whole file in memory)
and validated one by one; a bad row raises :class:`~forvalue.schemas.errors.InputDataError`
naming the file, the line (JSONL, CSV) or row number (Parquet, Arrow) and the field.

Each row is one of the TRL dataset formats (:mod:`forvalue.indexer.formats`): ``text``,
``prompt`` + ``completion`` (or ``response``), or a conversation (``messages``, or
``prompt``/``completion`` given as message lists). Rows without an ``id`` column get a content
hash; a row repeating an earlier row's content gets the hash plus ``-K`` (its K-th repeat), so
repeats stay separate samples (docs/data-formats.md).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from forvalue.indexer.formats import detect_format, parse_messages
from forvalue.indexer.images import ImageRef, parse_image_cell
from forvalue.schemas.config import DataConfig
from forvalue.schemas.errors import InputDataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
COMPRESSIONS = (".gz", ".zst")
_ARROW_BLOCK = 1024
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
FIRST_PASS_ROWS = 1000  # rows of each input validated by check_inputs before a model loads


@dataclass(frozen=True)
class Sample:
    """One input row, validated.

    Exactly one of ``text``, (``prompt``, ``response``) or ``messages`` is set. ``source`` is
    ``"file:line"`` for messages about this row later in the pipeline. ``image`` says
    where the row's image is (vision-language data); it is decoded only when encoded.

    Attributes
    ----------
    messages : tuple of (role, content) pairs, optional
        A conversation (TRL conversational format), rendered with the model's chat template.
    context_turns : int
        The first ``context_turns`` turns of ``messages`` are the prompt (TRL conversational
        prompt-completion: ``prompt`` as a message list); only later assistant turns are scored
        with ``score_tokens='assistant'``. 0 for a ``messages`` row.
    occurrence : int
        0 for the first row with this content, K for its K-th repeat (rows without an id column).
    """

    id: str
    prompt: str | None
    response: str | None
    text: str | None
    label: str | None
    source: str
    image: ImageRef | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    context_turns: int = 0
    occurrence: int = 0

    @property
    def full_text(self) -> str:
        """The sample as one readable text (conversations: one ``role: content`` line per turn)."""
        if self.messages is not None:
            return "\n".join(f"{role}: {content}" for role, content in self.messages)
        return self.text if self.text is not None else f"{self.prompt}{self.response}"


def content_id(
    prompt: str | None,
    response: str | None,
    text: str | None,
    image_key: str | None = None,
    messages: tuple[tuple[str, str], ...] | None = None,
    context_turns: int = 0,
) -> str:
    """Stable id of a row without an ``id`` column: 16 hex digits of a SHA-256 of its content.

    ``image_key`` (the image path as written, or the hash of its bytes) is part of the
    content of an image row, so rows that differ only in their image get different ids. A
    conversation's turns (and where its prompt ends) are its content.
    """
    content: list = [prompt, response, text] if image_key is None else [prompt, response, text, image_key]
    if messages is not None:
        content += [[list(turn) for turn in messages], context_turns]
    payload = json.dumps(content, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class _KeyCounts:
    """Occurrence counts of 64-bit keys in a numpy open-addressing table: 12 bytes per slot, 2 to 4 slots per key
    (a Python dict of ints would take ~100 bytes per key).

    Keys are the leading 64 bits of a SHA-256 (uniform), so their low bits index the table directly.
    """

    def __init__(self, capacity: int = 1 << 12):
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.counts = np.zeros(capacity, dtype=np.uint32)
        self.size = 0

    def bump(self, key: int) -> int:
        """Count one more occurrence of ``key``; returns how many were counted before (0 the first time)."""
        key = key or 1  # 0 marks an empty slot
        slot = self._slot(self.keys, key)
        before = int(self.counts[slot])
        self.counts[slot] = before + 1
        if before == 0:
            self.keys[slot] = key
            self.size += 1
            if 2 * self.size > len(self.keys):
                self._grow()
        return before

    @staticmethod
    def _slot(keys: np.ndarray, key: int) -> int:
        """The slot holding ``key``, or the empty slot where it goes (linear probing)."""
        mask = len(keys) - 1
        slot = key & mask
        while True:
            held = int(keys[slot])
            if held == 0 or held == key:
                return slot
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        old_keys, old_counts = self.keys, self.counts
        self.keys = np.zeros(2 * len(old_keys), dtype=np.uint64)
        self.counts = np.zeros(len(self.keys), dtype=np.uint32)
        for start in range(0, len(old_keys), 8192):  # as Python ints a few thousand at a time
            used = start + np.flatnonzero(old_keys[start : start + 8192])
            for key, count in zip(old_keys[used].tolist(), old_counts[used].tolist()):
                slot = self._slot(self.keys, key)
                self.keys[slot], self.counts[slot] = key, count


class _Occurrences:
    """Numbers repeated content ids in reading order: the K-th repeat of id X becomes ``X-K``.

    Holds one 64-bit key and a count per distinct content (:class:`_KeyCounts`), not the rows.
    """

    def __init__(self) -> None:
        self.counts = _KeyCounts()

    def number(self, sample: Sample) -> Sample:
        k = self.counts.bump(int(sample.id, 16))
        return sample if k == 0 else replace(sample, id=f"{sample.id}-{k}", occurrence=k)


def iter_samples(paths: Iterable[str | Path], config: DataConfig) -> Iterator[Sample]:
    """Stream validated samples from every input, in order.

    Parameters
    ----------
    paths : iterable of str or Path
        Data files (``.jsonl``/``.json`` with one object per line, ``.parquet``, ``.csv``; JSONL
        and CSV also ``.gz`` or ``.zst``), folders of such files (shards, read in sorted order),
        globs, or folders written by ``datasets.Dataset.save_to_disk``
        (:func:`expand_inputs`).
    config : DataConfig
        Format and column names.

    Yields
    ------
    Sample
        Rows without an id column get content-hash ids; the K-th repeat of a content (counted
        over all ``paths`` in order) gets ``<hash>-K``, so re-reading the same inputs gives the same ids.
    """
    for sample, _ in _samples(paths, config, ()):
        yield sample


def iter_samples_with(
    paths: Iterable[str | Path], config: DataConfig, columns: Iterable[str]
) -> Iterator[tuple[Sample, dict[str, str]]]:
    """Like :func:`iter_samples`, also yielding ``{column: value}`` of extra required ``columns`` per row.

    A missing or empty extra value raises :class:`InputDataError` naming file, line and field.
    """
    yield from _samples(paths, config, list(columns))


def _samples(paths, config: DataConfig, columns) -> Iterator[tuple[Sample, dict[str, str]]]:
    occurrences = _Occurrences()
    for path in expand_inputs(paths):
        for where, row in _iter_rows(path):
            sample, generated = _to_sample(path, where, row, config)
            if generated:
                sample = occurrences.number(sample)
            yield sample, {c: _field(path, where, row, c, required=True) for c in columns}


def data_format(paths: Iterable[str | Path], config: DataConfig) -> str | None:
    """The format (``text``, ``prompt-completion`` or ``conversational``) of the first row of the inputs.

    ``config.format`` when it is not ``auto``; None when the inputs hold no row.
    """
    if config.format != "auto":
        return config.format
    for path in expand_inputs(paths):
        for where, row in _iter_rows(path):
            return detect_format(path, where, row, config)
    return None


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


def _check_regular(path: Path) -> None:
    """Refuse an input that is neither a file nor a folder (a pipe, FIFO, socket or device) before reading it."""
    import stat

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
            key = (st.st_dev, st.st_ino)
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


def check_inputs(paths: Iterable[str | Path], config: DataConfig, rows: int | None = None) -> None:
    """Cheap first pass before a model loads: every path exists, is readable and has rows, and its
    first ``rows`` rows (default :data:`FIRST_PASS_ROWS`) are valid samples (raises
    :class:`InputDataError` naming file, line and field)."""
    from itertools import islice

    rows = FIRST_PASS_ROWS if rows is None else rows
    files = expand_inputs(paths)
    check_paths(files)
    for path in files:
        if not sum(1 for _ in islice(iter_samples([path], config), rows)):
            raise InputDataError(path, "holds no rows; nothing to index (check the file, or leave it out)")


def _iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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
            batches = pq.ParquetFile(path).iter_batches(batch_size=_ARROW_BLOCK)
            yield from _number_batches(batches)
        except pa.ArrowInvalid as exc:
            raise InputDataError(path, f"not a readable Parquet file ({exc})") from None
    else:  # ".csv" (check_paths refused the rest)
        yield from _iter_csv(path, compression)


def _open_binary(path: Path, compression: str | None):
    """A buffered binary stream of the file's (decompressed) bytes."""
    if compression == ".gz":
        import gzip

        return gzip.open(path, "rb")
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
                row = _json_row(path, lineno, raw)
                if row is not None:
                    yield lineno, row
    except _decompress_errors() as exc:
        raise InputDataError(
            path,
            f"not a readable {compression} file ({exc or type(exc).__name__}) after line "
            f"{lineno}; the file is damaged or cut short",
            line=lineno + 1,
        ) from None


def _json_row(path: Path, lineno: int, raw: bytes) -> dict[str, Any] | None:
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


def _field(path: Path, where: int, row: dict[str, Any], name: str, required: bool, text: bool = False) -> str | None:
    """A cell as a string; ``text`` columns (what the model reads) must be strings, ids and labels may be numbers."""
    value = row.get(name)
    if value is None or (isinstance(value, float) and value != value):
        if required:
            what = "missing value" if name in row else f"missing column (row has: {', '.join(sorted(row)) or 'none'})"
            raise InputDataError(path, what, line=where, field=name)
        return None
    if text and isinstance(value, (int, float, bool)):
        raise InputDataError(
            path,
            f"expected text, got the {type(value).__name__} {json.dumps(value)}; write it as a "
            "string (in quotes) if it is meant as text",
            line=where,
            field=name,
        )
    if isinstance(value, (int, float, bool)):
        try:
            value = str(value)
        except ValueError:  # an integer beyond Python's digit limit for str()
            raise InputDataError(path, "a number too long to use as text; quote it", line=where, field=name) from None
    if not isinstance(value, str):
        raise InputDataError(path, f"expected a string, got {type(value).__name__}", line=where, field=name)
    if not value.strip():
        # An empty optional cell (CSV has no null) is a missing value, like an absent key in JSONL.
        if required:
            raise InputDataError(path, "empty value", line=where, field=name)
        return None
    return value


def _to_sample(path: Path, where: int, row: dict[str, Any], config: DataConfig) -> tuple[Sample, bool]:
    """The row as a Sample, and whether its id was generated (no id column)."""
    fmt = detect_format(path, where, row, config)
    prompt = response = text = messages = None
    context_turns = 0
    if fmt == "text":
        text = _field(path, where, row, config.text_column or "text", required=True, text=True)
    elif fmt == "prompt-completion":
        prompt = _field(path, where, row, config.prompt_column, required=True, text=True)
        response = _field(path, where, row, _response_column(row, config), required=True, text=True)
    elif config.messages_column in row or config.prompt_column not in row:
        messages = parse_messages(path, where, row, config.messages_column)
    else:  # conversational prompt-completion: prompt and completion as message lists (or one of them a string)
        head = parse_messages(path, where, row, config.prompt_column, default_role="user")
        tail = parse_messages(path, where, row, _response_column(row, config), default_role="assistant")
        messages, context_turns = head + tail, len(head)
    label = _field(path, where, row, config.label_column, required=False)
    image = _image(path, where, row, config.image_column)
    sample_id = _field(path, where, row, config.id_column, required=False)
    generated = sample_id is None
    if generated:
        sample_id = content_id(prompt, response, text, image.key if image else None, messages, context_turns)
    sample = Sample(sample_id, prompt, response, text, label, f"{path}:{where}", image, messages, context_turns)
    return sample, generated


def _response_column(row: dict[str, Any], config: DataConfig) -> str:
    """The response column: ``--response-column`` if given, else ``completion`` (TRL), else ``response``."""
    if config.response_column is not None:
        return config.response_column
    return "completion" if "completion" in row or "response" not in row else "response"


def _image(path: Path, where: int, row: dict[str, Any], column: str | None) -> ImageRef | None:
    """The row's image reference (not read yet); relative paths are taken from the data's folder."""
    if column is None:
        return None
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):
        what = (
            "missing value"
            if column in row
            else f"missing column (row has: {', '.join(sorted(row)) or 'none'}); name it with --image-column"
        )
        raise InputDataError(path, what, line=where, field=column)
    return parse_image_cell(value, path if path.is_dir() else path.parent, f"{path}:{where}", column)
