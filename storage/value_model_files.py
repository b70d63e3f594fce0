"""A value model folder's files: their format, and loading them with every file checked
(:meth:`forvalue.value_model.ValueModel.load`).

A value model predicts numbers nobody can check by eye, so a damaged one must never load: the
manifest must be a well-formed JSON object of this format; every data file it names must exist
with the recorded size and SHA-256 (a save killed half-way, or a file swapped from another model,
fails here); the arrays must be the ones the student needs, floating point, finite, and shaped
for the features and targets the manifest declares; an embed model's tokenizer must load and
its ids must fit the token table. Each failure is one :class:`~forvalue.value_model.ValueModelError`
line naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from forvalue.schemas.errors import ForValueError

MANIFEST = "value_model.json"
WEIGHTS = "weights.safetensors"  # format 1's fixed names; format 2 names files by content hash
TOKENIZER = "tokenizer.json"
FORMAT = "forvalue.value_model"
FORMAT_VERSION = 2  # 2: data files named by content hash, listed with their SHA-256 in the manifest
STUDENTS = ("ngram", "embed")
EMBED_POOLINGS = ("sum", "mean")


class ValueModelError(ForValueError):
    """A value model folder that is missing, damaged, or used with a store/audit it was not trained for."""


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file (fast Rust tokenizer, no transformers import)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


MAX_NGRAM_DIM = 1 << 26
REDO = "the value model is damaged or was only half written; distil it again with 'forvalue distill'"


def _damaged(where: Path, what: str) -> ValueModelError:
    return ValueModelError(f"{where}: {what}; {REDO}")


def _read_manifest(path: Path) -> dict:
    manifest = path / MANIFEST
    if not path.is_dir():
        raise ValueModelError(f"{path}: not a value model folder; make one with 'forvalue distill'")
    if not manifest.is_file():
        raise ValueModelError(f"{path}: not a value model (no {MANIFEST}); make one with 'forvalue distill'")
    try:
        if manifest.stat().st_size > (64 << 20):
            raise _damaged(manifest, "far too large for a value model manifest")
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:120]
        raise _damaged(manifest, f"not valid JSON ({reason})") from None
    if not isinstance(meta, dict):
        raise _damaged(manifest, f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("student") not in STUDENTS:
        raise ValueModelError(f"{manifest}: not a forvalue value model manifest (format or student missing)")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise _damaged(manifest, "format_version is not a number")
    if version > FORMAT_VERSION:
        raise ValueModelError(f"{manifest}: format version {version} is newer than this forvalue; upgrade forvalue")
    targets = meta.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise _damaged(manifest, "'targets' must be a non-empty list of names")
    if len(set(targets)) != len(targets):
        raise _damaged(manifest, "'targets' repeats a name")
    if not isinstance(meta.get("features"), dict):
        raise _damaged(manifest, "'features' is missing or not an object")
    return meta


def _int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_features(manifest: Path, meta: dict) -> None:
    f = meta["features"]
    if meta["student"] == "ngram":
        if not _int(f.get("dim"), 1, MAX_NGRAM_DIM):
            raise _damaged(manifest, f"features.dim must be a whole number in [1, {MAX_NGRAM_DIM}]")
        for key in ("word_ngrams", "byte_ngrams"):
            sizes = f.get(key)
            if not isinstance(sizes, list) or not all(_int(n, 1, 16) for n in sizes):
                raise _damaged(manifest, f"features.{key} must be a list of n-gram sizes 1..16")
    else:
        if f.get("pooling", "mean") not in EMBED_POOLINGS:
            raise _damaged(manifest, f"features.pooling must be one of {', '.join(EMBED_POOLINGS)}")
        if "max_tokens" in f and not _int(f["max_tokens"], 1, 1 << 31):
            raise _damaged(manifest, "features.max_tokens must be a whole number >= 1")


def _data_files(path: Path, meta: dict) -> dict[str, Path]:
    """The data files the manifest names, each checked against its recorded size and SHA-256."""
    manifest = path / MANIFEST
    files = meta.get("files")
    if files is None:  # format 1: fixed names, no hashes recorded
        if meta.get("format_version", 0) >= 2:
            raise _damaged(manifest, "'files' is missing")
        out = {"weights": path / WEIGHTS}
        if meta["student"] == "embed":
            out["tokenizer"] = path / TOKENIZER
        for file in out.values():
            if not file.is_file():
                raise _damaged(file, "missing")
        return out
    roles = ("weights", "tokenizer") if meta["student"] == "embed" else ("weights",)
    if not isinstance(files, dict) or any(not isinstance(files.get(r), dict) for r in roles):
        raise _damaged(manifest, f"'files' must name the {' and '.join(roles)} file(s)")
    out = {}
    for role in roles:
        entry = files[role]
        name, digest, size = entry.get("name"), entry.get("sha256"), entry.get("bytes")
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise _damaged(manifest, f"files.{role}.name is not a file name in the folder")
        file = path / name
        if not file.is_file():
            raise _damaged(file, "missing")
        if isinstance(size, int) and file.stat().st_size != size:
            raise _damaged(file, f"{file.stat().st_size} bytes, the manifest recorded {size}")
        sha = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
        if sha.hexdigest() != digest:
            raise _damaged(
                file, "its SHA-256 differs from the one the manifest recorded (damaged or from another save)"
            )
        out[role] = file
    return out


def _arrays(file: Path, meta: dict) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file

        arrays = load_file(str(file))
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types for damaged files)
        raise _damaged(file, f"cannot read the weights ({type(exc).__name__}: {str(exc)[:120]})") from None
    n_targets = len(meta["targets"])
    if meta["student"] == "ngram":
        dim = meta["features"]["dim"]
        shapes = {"weight": (dim + 1, n_targets), "bias": (n_targets,)}
    else:
        table = arrays.get("token_table")
        rows = table.shape[0] if table is not None and table.ndim == 2 else -1
        shapes = {"token_table": (rows, n_targets), "length_weight": (n_targets,), "bias": (n_targets,)}
    for key, shape in shapes.items():
        a = arrays.get(key)
        if a is None:
            raise _damaged(file, f"missing array '{key}'")
        if not np.issubdtype(a.dtype, np.floating):
            raise _damaged(file, f"array '{key}' holds {a.dtype}, not floating point numbers")
        if a.shape != shape or (key == "token_table" and shape[0] < 1):
            raise _damaged(file, f"array '{key}' has shape {a.shape}, expected {shape} for the manifest's features")
        if not np.isfinite(a).all():
            raise _damaged(file, f"array '{key}' holds NaN or infinite values")
    hashes = arrays.get("labelled_id_hash")
    if hashes is not None and (hashes.ndim != 1 or hashes.dtype != np.int64):
        raise _damaged(file, "array 'labelled_id_hash' is not a list of 64-bit ids")
    return dict(arrays)


def load_checked(path: Path) -> tuple[str, list[str], dict, dict, object]:
    """``(student, targets, arrays, meta, tokenizer)`` read from folder ``path``, every file validated.

    Read under a shared ``flock`` on the folder's ``.value_model.lock`` (where it has one): a save (the exclusive
    lock) removes the files of the model it replaces, which a load between its manifest and its data files
    found missing and called the model damaged."""
    import fcntl
    import os

    try:
        fd = os.open(path / ".value_model.lock", os.O_RDONLY)
    except OSError:  # no lock file (a folder saved before it, or none at all): read as is
        return _load_checked(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return _load_checked(path)
    finally:
        os.close(fd)


def _load_checked(path: Path) -> tuple[str, list[str], dict, dict, object]:
    meta = _read_manifest(path)
    _check_features(path / MANIFEST, meta)
    files = _data_files(path, meta)
    arrays = _arrays(files["weights"], meta)
    tokenizer = None
    if meta["student"] == "embed":
        try:
            tokenizer = load_tokenizer(files["tokenizer"])
        except Exception as exc:  # noqa: BLE001  (the tokenizers library raises plain Exceptions)
            raise _damaged(files["tokenizer"], f"not a readable tokenizer ({str(exc).splitlines()[0][:120]})") from None
        rows = arrays["token_table"].shape[0]
        if tokenizer.get_vocab_size(with_added_tokens=True) > rows:
            raise _damaged(
                files["tokenizer"],
                f"its vocabulary ({tokenizer.get_vocab_size(with_added_tokens=True)}) is larger than the token "
                f"table ({rows} rows): tokenizer and weights belong to different models",
            )
    return meta["student"], list(meta["targets"]), arrays, meta, tokenizer
