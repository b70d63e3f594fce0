"""Exceptions raised by forvalue.

Every message is one line that says what is wrong, where (file, line, field) and how
to fix it. The CLI prints ``error: <message>`` and exits with status 2 for any
:class:`ForValueError`; anything else is a bug.
"""

from __future__ import annotations


class ForValueError(Exception):
    """Base class of all user-facing errors."""


class ConfigError(ForValueError, ValueError):
    """A setting has an invalid value; ``field`` names the config field (the CLI maps it to its flag)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class InputDataError(ForValueError):
    """A data file is unreadable or a row is malformed (names file, line and field)."""

    def __init__(self, path: object, message: str, line: int | None = None, field: str | None = None):
        where = str(path)
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = path, line, field


class ModelLoadError(ForValueError):
    """The model, tokenizer or adapter cannot be loaded."""


class StoreError(ForValueError):
    """A store path is not a store, is empty, or is damaged."""


class ManifestMismatchError(ForValueError):
    """A query or append uses a model, tokenizer or setting that differs from the store's; ``problems`` lists each
    difference (``"field: store ..., given ..."``) where the raiser knows them."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()):
        super().__init__(message)
        self.problems = tuple(problems)


class BadValuesError(ForValueError):
    """The model produced NaN or inf values (policy ``on_bad='error'``)."""
