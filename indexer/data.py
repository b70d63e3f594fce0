"""Read training or validation samples from JSONL, Parquet, CSV or a ``datasets`` folder.

Rows are streamed (never the whole file in memory) and validated one by one; a bad row
raises :class:`~forvalue.schemas.errors.InputDataError` naming the file, the line (JSONL, CSV)
or row number (Parquet, Arrow) and the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa

from forvalue.schemas.config import DataConfig
from forvalue.schemas.errors import InputDataError

from forvalue.indexer.images import ImageRef, parse_image_cell

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_ARROW_BLOCK = 1024
FIRST_PASS_ROWS = 1000  # rows of each input validated by check_inputs before a model loads


@dataclass(frozen=True)
class Sample:
    """One input row, validated.

    Exactly one of ``text`` or (``prompt``, ``response``) is set. ``source`` is
    ``"file:line"`` for messages about this row later in the pipeline. ``image`` says
    where the row's image is (vision-language data); it is decoded only when encoded.
    """

    id: str
    prompt: str | None
    response: str | None
    text: str | None
    label: str | None
    source: str
    image: ImageRef | None = None

    @property
    def full_text(self) -> str:
        return self.text if self.text is not None else f"{self.prompt}{self.response}"


def content_id(prompt: str | None, response: str | None, text: str | None, image_key: str | None = None) -> str:
    """Stable id of a row without an ``id`` column: 16 hex digits of a SHA-256 of its content.

    ``image_key`` (the image path as written, or the hash of its bytes) is part of the
    content of an image row, so rows that differ only in their image get different ids.
    """
    content = [prompt, response, text] if image_key is None else [prompt, response, text, image_key]
    payload = json.dumps(content, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def iter_samples(paths: Iterable[str | Path], config: DataConfig) -> Iterator[Sample]:
    """Stream validated samples from every path, in order.

    Parameters
    ----------
    paths : iterable of str or Path
        Data files (``.jsonl``/``.json`` with one object per line, ``.parquet``, ``.csv``)
        or folders written by ``datasets.Dataset.save_to_disk``.
    config : DataConfig
        Column names.
    """
    for path in paths:
        path = Path(path)
        for where, row in _iter_rows(path):
            yield _to_sample(path, where, row, config)


def iter_samples_with(paths: Iterable[str | Path], config: DataConfig,
                      columns: Iterable[str]) -> Iterator[tuple[Sample, dict[str, str]]]:
    """Like :func:`iter_samples`, also yielding ``{column: value}`` of extra required ``columns`` per row.

    A missing or empty extra value raises :class:`InputDataError` naming file, line and field.
    """
    columns = list(columns)
    for path in paths:
        path = Path(path)
        for where, row in _iter_rows(path):
            yield _to_sample(path, where, row, config), {c: _field(path, where, row, c, required=True) for c in columns}


def check_paths(paths: Iterable[str | Path]) -> None:
    """Fail fast (before a model is loaded or a store created) on a missing path or unknown format."""
    for path in map(Path, paths):
        if not path.exists():
            raise InputDataError(path, "no such file or folder")
        if path.is_dir():
            if not (path / "state.json").exists():
                raise InputDataError(path, "folder is not a datasets save_to_disk folder (no state.json)")
        elif path.suffix.lower() not in SUFFIXES:
            raise InputDataError(path, f"unknown format '{path.suffix}'; use one of {', '.join(SUFFIXES)} or a datasets folder")


def check_inputs(paths: Iterable[str | Path], config: DataConfig, rows: int | None = None) -> None:
    """Cheap first pass before a model loads: every path exists, is readable and has rows, and its
    first ``rows`` rows (default :data:`FIRST_PASS_ROWS`) are valid samples (raises
    :class:`InputDataError` naming file, line and field)."""
    from itertools import islice

    rows = FIRST_PASS_ROWS if rows is None else rows
    paths = list(paths)
    check_paths(paths)
    for path in paths:
        if not sum(1 for _ in islice(iter_samples([path], config), rows)):
            raise InputDataError(path, "holds no rows; nothing to index (check the file, or leave it out)")


def _iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    check_paths([path])
    if path.is_dir():
        yield from _iter_arrow_folder(path)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _iter_jsonl(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=_ARROW_BLOCK)
            yield from _number_batches(batches)
        except pa.ArrowInvalid as exc:
            raise InputDataError(path, f"not a readable Parquet file ({exc})") from None
    else:  # ".csv" (check_paths refused the rest)
        yield from _iter_csv(path)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputDataError(path, f"not UTF-8 text (byte {exc.start + 1}); re-save the file as UTF-8", line=lineno) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputDataError(path, f"malformed JSON ({exc.msg}, column {exc.colno})", line=lineno) from None
            if not isinstance(row, dict):
                raise InputDataError(path, f"expected a JSON object, got {type(row).__name__}", line=lineno)
            yield lineno, row


def _iter_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import csv

    with path.open("r", encoding="utf-8-sig", newline="") as handle:
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
    except (ValueError, KeyError, TypeError):
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
        raise InputDataError(path, f"expected text, got the {type(value).__name__} {json.dumps(value)}; write it as a "
                             "string (in quotes) if it is meant as text", line=where, field=name)
    if isinstance(value, (int, float, bool)):
        value = str(value)
    if not isinstance(value, str):
        raise InputDataError(path, f"expected a string, got {type(value).__name__}", line=where, field=name)
    if not value.strip():
        # An empty optional cell (CSV has no null) is a missing value, like an absent key in JSONL.
        if required:
            raise InputDataError(path, "empty value", line=where, field=name)
        return None
    return value


def _to_sample(path: Path, where: int, row: dict[str, Any], config: DataConfig) -> Sample:
    text_column = config.text_column
    if text_column is None and not (config.prompt_column in row and config.response_column in row):
        text_column = "text" if "text" in row else None
        if text_column is None and (config.prompt_column in row or config.response_column in row):
            missing = config.response_column if config.prompt_column in row else config.prompt_column
            raise InputDataError(
                path, f"missing column (row has: {', '.join(sorted(row))}); name yours with "
                "--prompt-column/--response-column, or use --text-column", line=where, field=missing,
            )
        if text_column is None:
            raise InputDataError(
                path,
                f"row has neither '{config.prompt_column}' + '{config.response_column}' nor 'text' "
                f"(columns: {', '.join(sorted(row)) or 'none'}); name yours with --prompt-column/--response-column "
                "or --text-column",
                line=where,
            )
    if text_column is not None:
        prompt = response = None
        text = _field(path, where, row, text_column, required=True, text=True)
    else:
        text = None
        prompt = _field(path, where, row, config.prompt_column, required=True, text=True)
        response = _field(path, where, row, config.response_column, required=True, text=True)
    label = _field(path, where, row, config.label_column, required=False)
    image = _image(path, where, row, config.image_column)
    sample_id = _field(path, where, row, config.id_column, required=False)
    if sample_id is None:
        sample_id = content_id(prompt, response, text, image.key if image else None)
    return Sample(sample_id, prompt, response, text, label, f"{path}:{where}", image)


def _image(path: Path, where: int, row: dict[str, Any], column: str | None) -> ImageRef | None:
    """The row's image reference (not read yet); relative paths are taken from the data's folder."""
    if column is None:
        return None
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):
        what = "missing value" if column in row else f"missing column (row has: {', '.join(sorted(row)) or 'none'}); name it with --image-column"
        raise InputDataError(path, what, line=where, field=column)
    return parse_image_cell(value, path if path.is_dir() else path.parent, f"{path}:{where}", column)
