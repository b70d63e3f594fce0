"""The model-runner extension point: what the build and the queries need from a model.

:class:`Runner` is the protocol: anything that tokenizes a sample, returns the last hidden
states of a padded batch and applies the LM head can drive ``forvalue``. Two implementations
share :class:`BaseRunner`: :class:`~forvalue.indexer.causal_lm.CausalLMRunner` (text) and
:class:`~forvalue.indexer.vlm_runner.VisionLanguageRunner` (image + text);
:func:`forvalue.indexer.model_runner.load_runner` picks one for a model folder.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from forvalue.indexer.fingerprint import tokenizer_sha256, weights_sha256
from forvalue.schemas.config import ModelConfig
from forvalue.schemas.errors import ModelLoadError

if TYPE_CHECKING:
    from forvalue.indexer.data import Sample
    from forvalue.indexer.tokenize import TokenizedSample

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelIdentity:
    """What the manifest records about a loaded model."""

    path: str
    weights_sha256: str
    adapter_path: str | None
    adapter_sha256: str | None
    tokenizer_sha256: str
    dtype: str


@runtime_checkable
class Runner(Protocol):
    """What the build, the validation encoder and the scorers call on a model.

    Attributes
    ----------
    model_kind : str
        ``"causal_lm"`` or ``"vlm"``; recorded in the manifest.
    hidden_size, vocab_size : int
        ``d`` and ``|V|`` of the LM head.
    pad_id : int
        Token id used to right-pad batches.
    device : torch.device
    identity : ModelIdentity
        Weights, adapter and tokenizer hashes recorded in (and checked against) the manifest.
    tokenizer : transformers tokenizer
    """

    model_kind: str
    hidden_size: int
    vocab_size: int
    pad_id: int
    device: torch.device
    identity: ModelIdentity | None
    tokenizer: object

    def tokenize(self, sample: "Sample", score_tokens: str, max_length: int, chat_template: bool) -> "TokenizedSample":
        """Token ids of one sample and the first scored position (see :mod:`forvalue.indexer.tokenize`)."""

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision=None) -> torch.Tensor:
        """Last hidden states (the LM head's input), shape ``(B, T, hidden_size)``, for right-padded ``(B, T)`` ids."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits in float32, shape ``(n, vocab_size)``, for ``hidden`` of shape ``(n, hidden_size)``."""

    def manifest_fields(self) -> dict:
        """Runner-specific manifest fields (image settings of a VLM; empty for text models)."""


class BaseRunner:
    """The part both runners share: the LM head, sizes, padding id, logits.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        In eval mode on ``device``, with ``get_output_embeddings()`` (the LM head).
    tokenizer : transformers tokenizer
    device : torch.device
    identity : ModelIdentity, optional
    """

    model_kind = "causal_lm"

    def __init__(self, model, tokenizer, device: torch.device, identity: ModelIdentity | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.identity = identity
        self.head = model.get_output_embeddings()
        self.hidden_size = int(self.head.weight.shape[1])
        self.vocab_size = int(self.head.weight.shape[0])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits in float32, shape ``(n, vocab_size)`` for ``hidden`` of shape ``(n, d)``."""
        return self.head(hidden.to(self.head.weight.dtype)).float()

    def manifest_fields(self) -> dict:
        return {}


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


def place_model(model, config: ModelConfig, source: Path, tokenizer, device: torch.device, dtype: str):
    """Merge the adapter (if any), move ``model`` to ``device``; returns ``(model, ModelIdentity)``."""
    adapter_sha = None
    if config.adapter is not None:
        model, adapter_sha = apply_adapter(model, config.adapter)
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


def apply_adapter(model, adapter: str):
    if importlib.util.find_spec("peft") is None:
        raise ModelLoadError("--adapter needs the 'peft' package: pip install peft")
    if not Path(adapter).is_dir():
        raise ModelLoadError(f"adapter folder '{adapter}' does not exist")
    from peft import PeftModel

    from forvalue.indexer.fingerprint import refuse_pickled_weights

    refuse_pickled_weights(Path(adapter), "adapter")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return merged, weights_sha256(adapter)
