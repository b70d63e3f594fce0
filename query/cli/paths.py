"""The output policy applied to every command, before it does any work.

Each path option of every command is declared here once: an input (read: data, validation,
values, stores, models, value models) or an output with its formats (:data:`OUTPUTS`), plus the
outputs a command derives from its options (the ``--explain`` page folders). :func:`guard_paths`
wraps every command of the CLI so that :func:`forvalue.storage.files.check_outputs` sees all of a
command's outputs and inputs together, after click parsed them and before the callback runs: an
output inside a store, equal to an input (same file, any spelling), inside an input folder,
colliding with another output, with the wrong suffix, or a device is one line and exit status 2,
before a model loads. ``tests/test_faults.py`` fails for a path option declared in neither table.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from forvalue.storage.files import FOLDER, STDOUT, check_outputs

TABLES = (".jsonl", ".csv", ".parquet")

# parameter names that are read by the commands that have them
INPUTS = ("data", "validation", "values", "value_model", "store", "path", "adapter")

# command path -> {parameter name: formats}; STDOUT where '-' (or no option) writes to standard output
OUTPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "query": {"output": (*TABLES, STDOUT), "all_scores": (".parquet",), "explain_dir": (FOLDER,)},
    "explain": {"output": (".html", ".jsonl", ".parquet")},
    "audit run": {"report": (".html",)},
    "audit show": {"report": (".html",)},
    "audit compare": {"report": (".html",)},
    "select": {"output": (".jsonl",)},
    "distill": {"out": (FOLDER,)},
    "estimate": {"output": TABLES, "report": (".html",)},
    "demo": {"workdir": (FOLDER,)},
}

# where a store is written: command path -> the parameter naming it (not inside another store)
STORE_TARGETS = {"index build": "store", "index add": "store", "index convert": "out"}


def _explain_folder(flag: str, base_param: str, switch: str, own: str | None = None):
    def derive(params: dict) -> dict:
        if not params.get(switch) or (own and params.get(own)):
            return {}
        base = params.get(base_param)
        if base is None or str(base) == STDOUT:
            return {}
        return {flag: (str(Path(base).with_suffix(".explain")), (FOLDER,))}

    return derive


# command path -> outputs derived from its parameters
DERIVED = {
    "query": _explain_folder("--explain pages", "output", "explain_n", own="explain_dir"),
    "audit run": _explain_folder("--explain-examples pages", "report", "explain_examples"),
}


def _flag(command: click.Command, name: str) -> str:
    for p in command.params:
        if p.name == name and getattr(p, "opts", None):
            return max(p.opts, key=len)
    return name


def _values(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def check_command(path: str, command: click.Command, params: dict) -> None:
    """Apply the output policy to one parsed command (``path`` like ``"audit run"``)."""
    declared = OUTPUTS.get(path, {})
    outputs = {_flag(command, name): (params.get(name), formats) for name, formats in declared.items()}
    derive = DERIVED.get(path)
    if derive is not None:
        outputs.update(derive(params))
    inputs = [v for name in INPUTS if name in params for v in _values(params[name])]
    target = STORE_TARGETS.get(path)
    if target is not None and params.get(target):
        _check_store_target(_flag(command, target), params[target])
    if path == "audit run" and params.get("name") is not None:
        from forvalue.storage.audits import check_audit_name

        check_audit_name(params["name"])
    check_outputs(outputs, inputs)


def _check_store_target(flag: str, store) -> None:
    """A store being written does not lie inside another store (folder inputs skip stores, so a store may
    sit inside an input folder)."""
    from forvalue.storage.files import OutputPathError, _absolute, store_above
    from forvalue.storage.location import check_store_name, is_uri

    if is_uri(store):  # an object-store location: Store.create refuses a prefix that holds something else
        return
    check_store_name(store)
    path = Path(store)
    if path.is_symlink() and not path.exists():
        raise OutputPathError(
            f"{flag} {store}: is a link to {os.readlink(path)}, which does not exist; create that folder or give "
            "another path"
        )
    outer = store_above(_absolute(store).parent)
    if outer is not None:
        raise OutputPathError(f"{flag} {store}: is inside the store {outer}; put the store elsewhere")


def guard_paths(group: click.Group, prefix: str = "") -> None:
    """Wrap every command below ``group`` so that :func:`check_command` runs before its callback."""
    for name, command in group.commands.items():
        path = f"{prefix} {name}".strip()
        if isinstance(command, click.Group):
            guard_paths(command, path)
            continue
        if getattr(command.callback, "_paths_guarded", False):
            continue
        command.callback = _wrap(path, command, command.callback)


def _wrap(path: str, command: click.Command, callback):
    @functools.wraps(callback)
    def run(*args, **params):
        check_command(path, command, params)
        return callback(*args, **params)

    run._paths_guarded = True
    return run
