"""Load a vision-language model and run the forward pass the method needs, split at the LM head.

Same interface (:class:`forvalue.indexer.runner.Runner`) as
:class:`forvalue.indexer.causal_lm.CausalLMRunner` (``hidden_states``,
``logits``, ``hidden_size``, ``vocab_size``, ``pad_id``, ``identity``) plus
``tokenize`` (image + prompt + response to ids and image inputs, see
:mod:`forvalue.indexer.vlm_inputs`) and the image settings the manifest records. A model folder
is a VLM when its ``config.json`` has a ``vision_config``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from forvalue.indexer.runner import TORCH_DTYPES, BaseRunner, place_model
from forvalue.indexer.vlm_inputs import VisionTextInputs
from forvalue.schemas.config import ModelConfig
from forvalue.schemas.errors import ModelLoadError

# Per-token arrays some VLMs need (Qwen-VL's multimodal RoPE): 0 text, 1 image, 2 video.
_TOKEN_TYPES = "mm_token_type_ids"


def is_vlm_folder(folder: str | Path) -> bool:
    """True when ``folder/config.json`` describes a vision-language model (has a ``vision_config``)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and "vision_config" in config


class VisionLanguageRunner(BaseRunner):
    """Forward pass of a Hugging Face image-text-to-text model, split at the LM head.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        In eval mode on ``device``; ``model.model`` takes ``input_ids``, ``attention_mask``
        and the image inputs and returns ``last_hidden_state`` (the LM head's input).
    inputs : VisionTextInputs
    device : torch.device
    identity : ModelIdentity
    """

    model_kind = "vlm"

    def __init__(self, model, inputs: VisionTextInputs, device: torch.device, identity=None):
        super().__init__(model, inputs.tokenizer, device, identity)
        self.inputs = inputs
        self.image_max_pixels = inputs.max_pixels
        self.processor_sha256 = inputs.fingerprint()
        self.base = getattr(model, "model", None)
        forward = self.base.forward if self.base is not None else model.forward
        self._token_types = _TOKEN_TYPES in inspect.signature(forward).parameters
        config = model.config
        self._image_token = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        self._video_token = getattr(config, "video_token_id", None)
        dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
        self._float_dtype = dtypes[0] if dtypes else torch.float32

    def tokenize(self, sample, score_tokens: str, max_length: int, chat_template: bool):
        """See :meth:`forvalue.indexer.vlm_inputs.VisionTextInputs.tokenize` (response tokens only)."""
        return self.inputs.tokenize(sample, score_tokens, max_length, chat_template)

    def batch_vision(self, vision: list[dict | None], input_ids: torch.Tensor) -> dict:
        """Image inputs of a padded batch: per-image tensors concatenated in row order, token types per position.

        Parameters
        ----------
        vision : list of (dict of str to Tensor) or None, length B
        input_ids : int64 Tensor, shape (B, T)
        """
        parts = [v for v in vision if v]
        out = {}
        for key in parts[0] if parts else ():
            value = torch.cat([p[key] for p in parts]).to(self.device)
            out[key] = value.to(self._float_dtype) if value.is_floating_point() else value
        if self._token_types:
            types = torch.zeros_like(input_ids)
            if self._image_token is not None:
                types[input_ids == self._image_token] = 1
            if self._video_token is not None:
                types[input_ids == self._video_token] = 2
            out[_TOKEN_TYPES] = types
        return out

    @torch.no_grad()
    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: list[dict | None] | None = None
    ) -> torch.Tensor:
        """Last hidden states (input of the LM head), shape ``(B, T, hidden_size)``.

        Parameters
        ----------
        input_ids, attention_mask : int64 Tensor, shape (B, T)
            Right-padded.
        vision : list of dict or None, length B
            Each row's image inputs from :meth:`tokenize` (None for rows without image).
        """
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        extra = self.batch_vision(vision or [None] * len(input_ids), input_ids)
        if self.base is not None:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
        return out.hidden_states[-1]

    def manifest_fields(self) -> dict:
        """The image settings a VLM store records (and checks on queries)."""
        return {"image_max_pixels": self.image_max_pixels, "processor_sha256": self.processor_sha256}


def load_vlm_runner(config: ModelConfig, source: Path, device: torch.device, dtype: str) -> VisionLanguageRunner:
    """Load the VLM in folder ``source`` (offline) with its processor and wrap it in a runner.

    The model class is ``AutoModelForImageTextToText``, else the class named in the
    folder's ``config.json`` (``architectures``).
    """
    import transformers

    folder = str(source)
    kwargs: dict = {"local_files_only": True, "trust_remote_code": config.trust_remote_code}
    try:
        inputs = _load_inputs(folder, kwargs, config.image_max_pixels)
        model = _load_model(transformers, folder, kwargs, TORCH_DTYPES[dtype])
    except (OSError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load vision-language model '{folder}': {first}") from None
    model, identity = place_model(model, config, source, inputs.tokenizer, device, dtype)
    return VisionLanguageRunner(model, inputs, device, identity)


def _load_model(transformers, folder: str, kwargs: dict, torch_dtype):
    try:
        return transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except ValueError:  # not registered with the auto class: use the model's own class
        arch = (json.loads((Path(folder) / "config.json").read_text()).get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise
        return cls.from_pretrained(folder, dtype=torch_dtype, **kwargs)


def _load_inputs(folder: str, kwargs: dict, max_pixels: int) -> VisionTextInputs:
    """The model's processor when it loads, else its tokenizer + image processor.

    See :mod:`forvalue.indexer.vlm_inputs`.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(folder, **kwargs)
    except (ImportError, OSError, ValueError, TypeError, AttributeError):
        processor = None  # e.g. a Qwen-VL processor without torchvision (its video half needs it)
    if processor is not None and getattr(processor, "image_processor", None) is not None:
        template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
        return VisionTextInputs(processor.tokenizer, processor.image_processor, template, processor, max_pixels)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(folder, **kwargs)
    return VisionTextInputs(tokenizer, image_processor, _chat_template(folder, tokenizer), None, max_pixels)


def _chat_template(folder: str, tokenizer) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        path = Path(folder) / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)
