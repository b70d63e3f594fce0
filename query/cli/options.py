"""Click options generated from the config dataclasses, and the CLI's error handling.

Each option's flag, default, choices and help text come from the field of
:mod:`forvalue.schemas.config` it fills (``EncodeConfig.top_m`` -> ``--top-m``), so they are
declared once. A :class:`~forvalue.schemas.errors.ConfigError` names a field; :class:`Group`
prints it with the flag the user typed and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Callable, Iterable

import click

from forvalue.schemas.errors import ConfigError, ForValueError

# field name -> flag, filled as options are generated (for ConfigError messages)
_FLAGS: dict[str, str] = {}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class NumberOrAuto(click.ParamType):
    """A number, or the word ``auto`` (a setting the command chooses)."""

    name = "NUMBER|auto"

    def get_metavar(self, param, ctx=None):  # as typed (click upper-cases a type's name: 'AUTO' is refused)
        return self.name

    def convert(self, value, param, ctx):
        if value is None or value == "auto" or isinstance(value, float):
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"'{value}' is not a number or auto", param, ctx)


def _click_type(f: dataclasses.Field):
    choices = f.metadata.get("choices")
    if choices:
        return click.Choice([str(c) for c in choices])
    kind = str(f.type)
    if kind.startswith("float | str"):
        return NumberOrAuto()
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def config_options(
    cls,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    unset: Iterable[str] = (),
    unset_help: str = "the store's",
) -> Callable:
    """Decorator adding one click option per CLI field of dataclass ``cls``.

    Parameters
    ----------
    only, exclude : field names
        Which fields become options (default: every field with ``cli=True`` metadata).
    unset : field names
        Fields whose option defaults to None ("not given": the callee fills in e.g. the
        store's value); their help says ``(default: <unset_help>, else <dataclass default>)``.
    """
    only = None if only is None else list(only)
    exclude, unset = set(exclude), set(unset)
    chosen = [
        f
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", False) and f.name not in exclude and (only is None or f.name in only)
    ]
    if only is not None:
        chosen.sort(key=lambda f: only.index(f.name))
    else:  # the command's own settings first, the shared runtime ones (RuntimeConfig, ScanConfig) after them
        own = set(vars(cls).get("__annotations__", {}))
        chosen.sort(key=lambda f: f.name not in own)

    def decorate(fn):
        for f in reversed(chosen):
            flag = flag_of(f)
            _FLAGS[f.name] = flag
            help_text = f.metadata.get("help", "")
            if f.type == "bool":
                fn = click.option(flag, f.name, is_flag=True, default=None, help=help_text)(fn)
                continue
            if f.name in unset:
                default = None
                # the command's own default replaces the field's (one default in the help, never "else None")
                help_text = re.sub(r"\s*\(default: [^()]*\)", "", help_text)
                fallback = "" if f.default is None else f", else {_show(f.default)}"
                help_text += f" (default: {unset_help}{fallback})"
                show = False
            else:
                default = f.default
                show = f.default is not None
            if f.name == "shard":
                fn = click.option(
                    flag,
                    f.name,
                    default=None if f.name in unset else "0/1",
                    show_default=show,
                    callback=_parse_shard,
                    help=help_text,
                )(fn)
                continue
            fn = click.option(flag, f.name, type=_click_type(f), default=default, show_default=show, help=help_text)(fn)
        return fn

    return decorate


def _show(value: Any) -> str:
    return "/".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _parse_shard(ctx, param, value):
    if value is None:
        return None
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not I/N with 0 <= I < N (e.g. 0/4)") from None
    return index, count


def make(cls, kw: dict, **extra) -> Any:
    """``cls`` built from the options in ``kw`` that are its fields (None/unset flags keep the default)."""
    values = {f.name: kw[f.name] for f in dataclasses.fields(cls) if kw.get(f.name) is not None}
    values.update(extra)
    return cls(**values)


class Group(click.Group):
    """Turns every user-facing error into one line on stderr and exit status 2.

    Covers :class:`~forvalue.schemas.errors.ForValueError` (a :class:`ConfigError` is printed
    with its flag), click's usage errors below the top level (bad option values, unknown
    options, missing arguments) and OS errors that reach the CLI.

    ``--debug`` (or ``FORVALUE_DEBUG=1``) lets the traceback through instead.
    """

    def main(self, args=None, *rest, **kwargs):
        """Run the CLI; as the ``forvalue`` program itself (no ``args``: from ``sys.argv``), a Ctrl-C that comes
        after the command has ended, while the interpreter shuts down (seconds with a model loaded), is
        ignored instead of killing the process silently with SIGINT (status -2, no message)."""
        try:
            return super().main(args, *rest, **kwargs)
        finally:
            if args is None:
                import signal

                signal.signal(signal.SIGINT, signal.SIG_IGN)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise  # a group given no command: click prints its help
        except click.UsageError as exc:  # a bad option value, unknown option or missing argument: one line too
            if _debug(ctx):
                raise
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            _fail(f"{exc.format_message().rstrip('.')}; see '{where} --help'")
        except ConfigError as exc:
            if _debug(ctx):
                raise
            _fail(f"{_FLAGS.get(exc.field, exc.field)}: {exc.message}")
        except ForValueError as exc:
            if _debug(ctx):
                raise
            _fail(str(exc))
        except (KeyboardInterrupt, click.exceptions.Abort):  # Ctrl-C: one line, the conventional status 130
            if _debug(ctx):
                raise
            click.echo(
                "error: interrupted; what was committed is kept (a build or convert resumes when the same command is "
                "re-run)",
                err=True,
            )
            sys.exit(130)
        except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:  # disk full, read-only, permissions, missing files below a store
            if _debug(ctx):
                raise
            # no file name: the failing write was to standard output (e.g. a full disk behind a redirect)
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else "writing the output: "
            _fail(
                f"{where}{exc.strerror or exc}; check the path, its permissions and free space "
                "(--debug shows the traceback)"
            )


def _debug(ctx) -> bool:
    root = ctx.find_root()
    return bool((root.params or {}).get("debug")) or os.environ.get("FORVALUE_DEBUG") == "1"


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def quiet_transformers() -> None:
    """Silence transformers' info logging and its download progress bars (no-op if absent)."""
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# The DataConfig fields that name input columns and formats: the column flags of every command reading data.
COLUMN_FIELDS = (
    "format",
    "prompt_column",
    "response_column",
    "text_column",
    "messages_column",
    "id_column",
    "label_column",
    "image_column",
)
TEXT_COLUMN_FIELDS = tuple(f for f in COLUMN_FIELDS if f != "image_column")

STORAGE_OPTIONS_KEY = "forvalue.storage_options"


def store_option(func=None, *, required: bool = True, help: str = "Store folder, or s3://bucket/path (object store)."):
    """``--store`` plus the repeatable ``--storage-option KEY=VALUE``: an ``s3://`` store reaches the command
    as a location carrying those options (:func:`forvalue.storage.location.store_location`); a folder as given.
    The parsed options are also in ``click.get_current_context().meta[STORAGE_OPTIONS_KEY]`` (``index convert
    --out``)."""

    def decorate(f):
        import functools

        @functools.wraps(f)
        def run(*args, **kw):
            from forvalue.storage.location import is_uri, parse_storage_options, store_location

            options = parse_storage_options(kw.pop("storage_options", ()))
            click.get_current_context().meta[STORAGE_OPTIONS_KEY] = options
            store = kw.get("store")
            if store is not None and is_uri(store):
                kw["store"] = store_location(store, options)
            elif options and not is_uri(kw.get("out") or ""):
                raise ConfigError("storage_options", "is for object-store URIs (--store s3://...); drop it")
            return f(*args, **kw)

        run = click.option(
            "--storage-option",
            "storage_options",
            multiple=True,
            metavar="KEY=VALUE",
            help="Setting of an s3:// store, repeatable: endpoint, region, access_key_id, secret_access_key, "
            "session_token, allow_http, connect_timeout, request_timeout (default: the AWS_* environment variables).",
        )(run)
        return click.option("--store", required=required, default=None, type=click.Path(), help=help)(run)

    return decorate(func) if func is not None else decorate


_FLAGS["storage_options"] = "--storage-option"
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bar.")
validation_option = click.option(
    "--validation",
    "-v",
    "validation",
    multiple=True,
    required=True,
    type=click.Path(),
    help="Validation file(s): JSONL, Parquet, CSV or datasets folder; repeat for several.",
)
