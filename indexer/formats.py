"""TRL dataset formats: which format a row has, conversations as turns, and their assistant spans.

Formats (https://huggingface.co/docs/trl/dataset_formats), detected per row from its columns
unless ``DataConfig.format`` names one:

- ``conversational``: a ``messages`` column (a list of ``{"role", "content"}`` turns), or
  ``prompt`` and ``completion`` given as message lists (the prompt's turns are context);
- ``prompt-completion``: ``prompt`` + ``completion`` (or ``response``) strings;
- ``text``: a single ``text`` column (language modelling).

A conversation is rendered with the tokenizer's chat template when it has one, else as plain
``role: content`` lines (:func:`conversation_segments`). Its text is split at each assistant
turn's content, so the scored tokens are exactly the tokens of the assistant contents
(docs/data-formats.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forvalue.schemas.config import DataConfig
from forvalue.schemas.errors import InputDataError

FORMATS = ("text", "prompt-completion", "conversational")


def _missing(row: dict, column: str) -> str:
    return "missing value" if column in row else f"missing column (row has: {', '.join(sorted(row)) or 'none'})"


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def detect_format(path: Path | str, where: int, row: dict[str, Any], config: DataConfig) -> str:
    """The format of one row: ``config.format`` unless ``auto``, else read from the row's columns.

    Detection order: ``--text-column`` given -> text; a ``messages`` column -> conversational;
    prompt + completion/response -> conversational if either is a list, else prompt-completion;
    a ``text`` column -> text. Raises :class:`InputDataError` (file, line, field) otherwise.
    """
    if config.format != "auto":
        return config.format
    if config.text_column is not None:
        return "text"
    if config.messages_column in row:
        return "conversational"
    response = config.response_column or ("completion" if "completion" in row else "response")
    if config.prompt_column in row and response in row:
        pair = (row[config.prompt_column], row[response])
        return "conversational" if any(_is_list(v) for v in pair) else "prompt-completion"
    if "text" in row:
        return "text"
    names = f"'{config.prompt_column}' + '{config.response_column or 'completion'}'"
    if config.prompt_column in row or response in row:
        missing = response if config.prompt_column in row else config.prompt_column
        raise InputDataError(
            path,
            f"missing column (row has: {', '.join(sorted(row))}); a prompt-completion row needs {names} "
            "('response' also works); name yours with --prompt-column/--response-column, or use --text-column",
            line=where,
            field=missing,
        )
    raise InputDataError(
        path,
        f"row has neither '{config.messages_column}', {names} nor 'text' (columns: "
        f"{', '.join(sorted(row)) or 'none'}); name yours with --messages-column, --prompt-column/--response-column "
        "or --text-column, or see docs/data-formats.md",
        line=where,
    )


def parse_messages(
    path: Path | str, where: int, row: dict[str, Any], column: str, default_role: str | None = None
) -> tuple[tuple[str, str], ...]:
    """The turns ``((role, content), ...)`` of the message list in ``row[column]``.

    Parameters
    ----------
    row : dict
        The row; ``row[column]`` is a list of ``{"role": str, "content": str}`` (content may
        also be a list of ``{"type": "text", "text": str}`` parts, joined), or a JSON string of
        one (CSV cells).
    default_role : str, optional
        Conversational prompt-completion: a plain string in this column is one turn of this role.

    Raises
    ------
    InputDataError
        Naming file, line and the field (``messages[2].content``).
    """
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):
        raise InputDataError(path, _missing(row, column), line=where, field=column)
    if isinstance(value, str):
        if default_role is not None and not value.lstrip().startswith("["):
            if not value.strip():
                raise InputDataError(path, "empty value", line=where, field=column)
            return ((default_role, value),)
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # malformed, nested too deeply, or a number too long
            raise InputDataError(
                path,
                'expected a list of {"role", "content"} messages, got a string that is not a JSON list',
                line=where,
                field=column,
            ) from None
    if not _is_list(value):
        raise InputDataError(
            path,
            f'expected a list of {{"role", "content"}} messages, got {type(value).__name__}',
            line=where,
            field=column,
        )
    if not value:
        raise InputDataError(path, "empty conversation (no messages)", line=where, field=column)
    turns = []
    for i, message in enumerate(value):
        name = f"{column}[{i}]"
        if not isinstance(message, dict):
            raise InputDataError(
                path, f'expected a {{"role", "content"}} object, got {type(message).__name__}', line=where, field=name
            )
        role = message.get("role")
        if not isinstance(role, str) or not role.strip():
            raise InputDataError(
                path, "missing or empty role (system, user or assistant)", line=where, field=f"{name}.role"
            )
        turns.append((role, _content(path, where, message.get("content"), f"{name}.content")))
    return tuple(turns)


def _content(path, where, value, name: str) -> str:
    if isinstance(value, str):
        return value
    if _is_list(value):  # multimodal-style parts: the text parts, joined
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InputDataError(
                    path,
                    'only text parts ({"type": "text", "text": ...}) are supported in message content',
                    line=where,
                    field=name,
                )
            parts.append(part["text"])
        return "".join(parts)
    what = "missing content" if value is None else f"expected text, got {type(value).__name__}"
    raise InputDataError(path, what, line=where, field=name)


def conversation_segments(
    tokenizer, messages: tuple[tuple[str, str], ...], source: str
) -> tuple[list[tuple[str, int | None]], bool]:
    """A conversation's text, cut at each assistant turn's content.

    Returns
    -------
    segments : list of (text, turn)
        Concatenated, the texts are the whole rendered conversation; ``turn`` is the index of
        the assistant turn whose content the text is, None for template text and other turns.
    plain : bool
        True when the tokenizer has no chat template and the plain rendering was used (one
        ``role: content`` line per turn); the caller then adds the tokenizer's special tokens.

    With a chat template, the full conversation is rendered once; each assistant content is
    looked up in it after the rendering of the turns before it (with the generation prompt),
    so a content that also appears in an earlier turn is not mistaken for it. A template that
    strips the content's surrounding whitespace is allowed; one that rewrites it is refused.
    """
    if not getattr(tokenizer, "chat_template", None):
        segments: list[tuple[str, int | None]] = []
        for i, (role, content) in enumerate(messages):
            segments += [(f"{role}: ", None), (content, i if role == "assistant" else None), ("\n", None)]
        return _merge(segments), True
    dicts = [{"role": r, "content": c} for r, c in messages]
    full = _render(tokenizer, dicts, False, source)
    segments, cursor = [], 0
    for i, (role, content) in enumerate(messages):
        if role != "assistant":
            continue
        prefix = _render(tokenizer, dicts[:i], True, source) if i else ""
        start = max(cursor, len(prefix) if full.startswith(prefix) else cursor)
        for text in (content, content.strip()):
            at = full.find(text, start)
            if at >= 0:
                break
        else:
            raise InputDataError(
                source,
                f"the model's chat template does not reproduce assistant turn {i}'s "
                "content verbatim; use --score-tokens all, or fix the template",
                field=f"messages[{i}].content",
            )
        segments += [(full[cursor:at], None), (text, i)]
        cursor = at + len(text)
    segments.append((full[cursor:], None))
    return _merge(segments), False


def _render(tokenizer, messages: list[dict], generation_prompt: bool, source: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 errors (e.g. a template that raises on role order) and the like
        raise InputDataError(
            source,
            f"the model's chat template refused this conversation ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})",
        ) from None


def _merge(segments: list[tuple[str, int | None]]) -> list[tuple[str, int | None]]:
    """Empty context texts dropped, neighbouring context texts joined."""
    out: list[tuple[str, int | None]] = []
    for text, turn in segments:
        if turn is None and not text:
            continue
        if turn is None and out and out[-1][1] is None:
            out[-1] = (out[-1][0] + text, None)
        else:
            out.append((text, turn))
    return out
