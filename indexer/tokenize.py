"""Turn a :class:`~forvalue.indexer.data.Sample` into token ids and the positions to score.

Position convention: the hidden state at index ``t - 1`` predicts token ``ids[t]``; a
sample "scores target t" for ``t`` in ``1..T-1``. ``score_tokens='all'`` scores every
target; ``'response'`` only targets that belong to the response.
"""

from __future__ import annotations

from dataclasses import dataclass

from forvalue.schemas.errors import InputDataError

from forvalue.indexer.data import Sample


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids after truncation and the first scored target index.

    Attributes
    ----------
    input_ids : list of int, length T
    first_target : int
        Targets ``first_target .. T-1`` are scored (``first_target >= 1``).
    truncated : bool
        True if the text was longer than ``max_length`` tokens and was cut.
    vision : dict of str to Tensor, or None
        Image inputs of a vision-language model (e.g. ``pixel_values`` and
        ``image_grid_thw``, first dimension per image or patch); None for text.
    """

    sample: Sample
    input_ids: list[int]
    first_target: int
    truncated: bool
    vision: dict | None = None

    @property
    def n_scored(self) -> int:
        return max(0, len(self.input_ids) - self.first_target)


def tokenize_sample(tokenizer, sample: Sample, score_tokens: str, max_length: int, chat_template: bool) -> TokenizedSample:
    """Tokenize one sample.

    The prompt and the response are tokenized separately so the boundary between them
    is exact; the response gets no special tokens of its own.
    """
    if sample.image is not None:
        raise InputDataError(
            sample.source, "this row has an image but the model is a text-only causal LM; use a vision-language "
            "model (its config.json has a vision_config) or drop --image-column", field=sample.image.column,
        )
    if sample.text is not None:
        if score_tokens == "response":
            raise InputDataError(
                sample.source, "--score-tokens response needs prompt/response columns, this row has only text",
                field="text",
            )
        prompt_ids = tokenizer(sample.text, add_special_tokens=True)["input_ids"]
        response_ids: list[int] = []
    else:
        if chat_template:
            prompt_ids = _chat_prompt_ids(tokenizer, sample)
        else:
            prompt_ids = tokenizer(sample.prompt, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(sample.response, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(response_ids)
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    first = 1 if score_tokens == "all" else max(1, len(prompt_ids))
    return TokenizedSample(sample, ids, first, truncated)


def _chat_prompt_ids(tokenizer, sample: Sample) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InputDataError(sample.source, "--chat-template given but the tokenizer has no chat template")
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": sample.prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)
