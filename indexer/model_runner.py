"""Load the model a config names (offline) and wrap it in the matching :class:`~forvalue.indexer.runner.Runner`.

A local Hugging Face folder or a ``.gguf`` file; a folder whose ``config.json`` has a
``vision_config`` is a vision-language model. ``path=None`` is the built-in default model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from forvalue.indexer.causal_lm import CausalLMRunner
from forvalue.indexer.fingerprint import refuse_pickled_weights
from forvalue.indexer.runner import TORCH_DTYPES, Runner, place_model, resolve_device, resolve_dtype
from forvalue.schemas.config import ModelConfig
from forvalue.schemas.errors import ModelLoadError


def load_runner(config: ModelConfig) -> Runner:
    """Load the model and tokenizer named by ``config`` (offline) and wrap them in a runner.

    A folder whose ``config.json`` has a ``vision_config`` is a vision-language model and
    gets an :class:`forvalue.indexer.vlm_runner.VisionLanguageRunner` (same interface).
    Pass the runner to several calls to load the model once.

    Example
    -------
    >>> runner = load_runner(forvalue.ModelConfig(path=model_path, device="cpu"))   # path=None: the default SmolLM2
    >>> runner.device.type
    'cpu'
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    path = config.path
    if path is None:
        from forvalue.indexer.default_model import default_model_dir

        path = str(default_model_dir())
    source = Path(path)
    if not source.exists():
        raise ModelLoadError(f"model path '{path}' does not exist; give a local Hugging Face folder or a .gguf file")
    kwargs: dict = {"local_files_only": True, "trust_remote_code": config.trust_remote_code}
    if source.is_file():
        if source.suffix != ".gguf":
            raise ModelLoadError(f"model path '{path}' is a file but not a .gguf; give a model folder or a GGUF file")
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError("loading a GGUF file needs the 'gguf' package: pip install gguf")
        folder, kwargs["gguf_file"] = str(source.parent), source.name
    else:
        if not (source / "config.json").exists():
            raise ModelLoadError(f"model folder '{path}' has no config.json; is it a Hugging Face model folder?")
        folder = str(source)
        refuse_pickled_weights(source, "model")
        from forvalue.indexer.vlm_runner import is_vlm_folder, load_vlm_runner

        if is_vlm_folder(source):
            return load_vlm_runner(config, source, device, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=TORCH_DTYPES[dtype], **kwargs)
    except (OSError, ValueError, RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model '{path}': {first}") from None
    model, identity = place_model(model, config, source, tokenizer, device, dtype)
    return CausalLMRunner(model, tokenizer, device, identity)
