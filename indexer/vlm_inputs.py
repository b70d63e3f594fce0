"""Vision-language samples to model inputs: chat template, image tokens, scored positions.

The image and the prompt form the user turn of the model's chat template (an image
content entry, then the text), the assistant turn opens with the template's generation
prompt, and the response follows as the answer. Only response tokens are scored, never
the prompt, the template's markers or the image placeholder tokens: with ``P`` the
prompt ids (image tokens expanded), ``first_target = P`` and targets ``P .. T-1`` are
the response tokens (the same convention as ``forvalue.indexer.tokenize``). As on the text
path, the response is tokenized on its own (no special tokens), so the boundary is
exact, and the template's end-of-turn marker after the answer is not scored.

The model's own processor (``AutoProcessor``) does the image preprocessing and token
expansion. Where it cannot be loaded (in transformers 5, Qwen-VL processors need
torchvision for their video half), :class:`VisionTextInputs` does the same with the
image processor alone, for processors of the Qwen-VL kind (``merge_size`` and
``image_grid_thw``); tests check both give identical ids and pixels.
"""

from __future__ import annotations

import hashlib
import json

import torch

from forvalue.indexer.data import Sample
from forvalue.indexer.images import open_image
from forvalue.indexer.tokenize import TokenizedSample
from forvalue.schemas.errors import InputDataError, ModelLoadError

# Keys of a processor's output that are not image inputs: the text ids, and per-token
# arrays that the runner recomputes for the padded batch.
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class VisionTextInputs:
    """Builds :class:`~forvalue.indexer.tokenize.TokenizedSample` s (with image inputs) for a VLM.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    image_processor : transformers image processor
    chat_template : str
        Jinja chat template that renders an ``{"type": "image"}`` content entry as the
        model's image placeholder.
    processor : transformers processor or None
        The model's processor; None uses the Qwen-VL-style expansion of this class.
    max_pixels : int
        Images are downscaled to at most this many pixels first (0: no limit).
    """

    def __init__(self, tokenizer, image_processor, chat_template: str, processor=None, max_pixels: int = 0):
        if not chat_template:
            raise ModelLoadError(
                "the vision-language model has no chat template (chat_template.json or the tokenizer's); "
                "add the one the model was trained with to the model folder"
            )
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.processor = processor
        self.max_pixels = max_pixels
        self.image_token = (
            getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        )
        if processor is None and getattr(image_processor, "merge_size", None) is None:
            raise ModelLoadError(
                f"cannot load the model's processor and {type(image_processor).__name__} is not of the Qwen-VL kind "
                "(no merge_size); install the processor's requirements (e.g. pip install torchvision)"
            )

    def fingerprint(self) -> str:
        """SHA-256 of what turns an image and a prompt into inputs: image preprocessing settings and chat template."""
        settings = {
            k: v
            for k, v in self.image_processor.to_dict().items()
            if k not in ("image_processor_type", "processor_class")
        }
        payload = json.dumps(
            [settings, self.chat_template, self.image_token, self.max_pixels], sort_keys=True, default=str
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def prompt_text(self, sample: Sample) -> str:
        """The user turn (image entry first, then the prompt) and the assistant's generation prompt, as text."""
        content = ([{"type": "image"}] if sample.image is not None else []) + [{"type": "text", "text": sample.prompt}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )

    def encode_prompt(self, text: str, image) -> tuple[list[int], dict | None]:
        """Token ids of the rendered prompt with image tokens expanded, and the image inputs.

        Returns
        -------
        ids : list of int
        vision : dict of str to Tensor, or None
            E.g. ``pixel_values`` (float32, ``(n_patches, patch_dim)``) and
            ``image_grid_thw`` (int64, ``(1, 3)``); None without an image.
        """
        if image is None:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None
        if self.processor is not None:
            out = self.processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt")
        else:
            out = dict(self.image_processor(images=[image], return_tensors="pt"))
            n_tokens = int(out["image_grid_thw"][0].prod()) // self.image_processor.merge_size**2
            text = text.replace(self.image_token, self.image_token * n_tokens)
            out["input_ids"] = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        vision = {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        return out["input_ids"][0].tolist(), vision

    def tokenize(self, sample: Sample, score_tokens: str, max_length: int, chat_template: bool) -> TokenizedSample:
        """One sample's ids, image inputs and ``first_target`` (the first response token).

        ``score_tokens`` and ``chat_template`` are accepted for the text interface and
        ignored: a VLM always scores the response and always uses its chat template.
        A sample whose prompt with image tokens reaches ``max_length`` keeps no scored
        token (the image tokens are never cut); a longer response is cut at ``max_length``.

        Raises
        ------
        InputDataError
            A row with a single text column (a VLM needs prompt/response).
        forvalue.indexer.images.ImageError
            The image is missing or does not decode.
        """
        if sample.messages is not None:
            raise InputDataError(
                sample.source,
                "conversations (message lists) are not supported with a vision-language model yet; "
                "give prompt/response string columns",
                field="messages",
            )
        if sample.text is not None:
            raise InputDataError(
                sample.source,
                "a vision-language model scores the response: give prompt/response columns "
                "(--prompt-column/--response-column), not a single text column",
                field="text",
            )
        image = open_image(sample.image, self.max_pixels) if sample.image is not None else None
        prompt_ids, vision = self.encode_prompt(self.prompt_text(sample), image)
        response_ids = list(self.tokenizer(sample.response, add_special_tokens=False)["input_ids"])
        ids = prompt_ids + response_ids
        truncated = len(ids) > max_length
        first = max(1, len(prompt_ids))
        if first >= max_length:  # nothing of the response fits: keep the prompt whole, score nothing
            return TokenizedSample(sample, prompt_ids, len(prompt_ids), truncated, None)
        return TokenizedSample(sample, ids[:max_length], first, truncated, vision)
