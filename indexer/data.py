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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from forvalue.indexer.formats import detect_format, parse_messages
from forvalue.indexer.images import ImageRef, parse_image_cell
from forvalue.indexer.readers import check_paths, expand_inputs, iter_rows
from forvalue.indexer.sample_ids import Occurrences, content_id
from forvalue.schemas.config import DataConfig
from forvalue.schemas.errors import InputDataError

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
    occurrences = Occurrences()
    for path in expand_inputs(paths):
        for where, row in iter_rows(path):
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
        for where, row in iter_rows(path):
            return detect_format(path, where, row, config)
    return None


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
