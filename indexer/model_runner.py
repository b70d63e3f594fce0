"""Load a causal LM and run the no-grad forward pass that the method needs.

The runner is the pluggable piece: anything with ``hidden_size``, ``vocab_size``,
``hidden_states(input_ids, attention_mask)`` and ``logits(h)`` can drive the build
and the query (a vision-language runner adds images to the same interface).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from forvalue.schemas.config import ModelConfig
from forvalue.schemas.errors import ModelLoadError

from forvalue.indexer.fingerprint import tokenizer_sha256, weights_sha256

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelIdentity:
    """What the manifest records about a loaded model."""

    path: str
    weights_sha256: str
    adapter_path: str | None
    adapter_sha256: str | None
    tokenizer_sha256: str
    dtype: str


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first CUDA GPU when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"--device '{device}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` is bfloat16 on a GPU that supports it and float32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


class CausalLMRunner:
    """Forward pass of a Hugging Face causal LM split at the LM head.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM in eval mode on ``device``.
    tokenizer : transformers.PreTrainedTokenizerBase
    device : torch.device
    """

    model_kind = "causal_lm"

    def __init__(self, model, tokenizer, device: torch.device, identity: ModelIdentity | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.identity = identity
        self.head = model.get_output_embeddings()
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.hidden_size = int(self.head.weight.shape[1])
        self.vocab_size = int(self.head.weight.shape[0])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (input of the LM head), shape ``(B, T, hidden_size)``."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.decoder is not None:
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits in float32, shape ``(n, vocab_size)`` for ``hidden`` of shape ``(n, d)``."""
        return self.head(hidden.to(self.head.weight.dtype)).float()


def load_runner(config: ModelConfig) -> CausalLMRunner:
    """Load the model and tokenizer named by ``config`` (offline) and wrap them in a runner.

    A folder whose ``config.json`` has a ``vision_config`` is a vision-language model and
    gets an :class:`forvalue.indexer.vlm_runner.VisionLanguageRunner` (same interface).
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
        from forvalue.indexer.vlm_runner import is_vlm_folder, load_vlm_runner

        if is_vlm_folder(source):
            return load_vlm_runner(config, source, device, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=_TORCH_DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model '{path}': {first}") from None
    model, identity = place_model(model, config, source, tokenizer, device, dtype)
    return CausalLMRunner(model, tokenizer, device, identity)


def place_model(model, config: ModelConfig, source: Path, tokenizer, device: torch.device, dtype: str):
    """Merge the adapter (if any), move ``model`` to ``device``; returns ``(model, ModelIdentity)``."""
    adapter_sha = None
    if config.adapter is not None:
        model, adapter_sha = _apply_adapter(model, config.adapter)
    model.to(device)
    identity = ModelIdentity(
        path=str(source.resolve()),
        weights_sha256=weights_sha256(source),
        adapter_path=None if config.adapter is None else str(Path(config.adapter).resolve()),
        adapter_sha256=adapter_sha,
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        dtype=dtype,
    )
    return model, identity


def _apply_adapter(model, adapter: str):
    if importlib.util.find_spec("peft") is None:
        raise ModelLoadError("--adapter needs the 'peft' package: pip install peft")
    if not Path(adapter).is_dir():
        raise ModelLoadError(f"adapter folder '{adapter}' does not exist")
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return merged, weights_sha256(adapter)
