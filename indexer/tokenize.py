"""Turn a :class:`~forvalue.indexer.data.Sample` into token ids and the positions to score.

Position convention: the hidden state at index ``t - 1`` predicts token ``ids[t]``; a
sample "scores target t" for ``t`` in ``1..T-1``. ``score_tokens='all'`` scores every
target; ``'response'`` only targets that belong to the response (in a ``messages``
conversation: the last assistant turn); ``'assistant'`` the targets inside any assistant turn
of a conversation (after its prompt turns, for conversational prompt-completion rows) and the
response of a prompt-completion row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forvalue.indexer.data import Sample
from forvalue.indexer.formats import conversation_segments
from forvalue.schemas.errors import InputDataError


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids after truncation and the first scored target index.

    Attributes
    ----------
    input_ids : list of int, length T
    first_target : int
        Targets ``first_target .. T-1`` are scored (``first_target >= 1``), unless ``targets`` is set.
    truncated : bool
        True if the text was longer than ``max_length`` tokens and was cut.
    vision : dict of str to Tensor, or None
        Image inputs of a vision-language model (e.g. ``pixel_values`` and
        ``image_grid_thw``, first dimension per image or patch); None for text.
    targets : tuple of int, optional
        The scored target indices, ascending, each in ``1..T-1`` (conversations scored by
        assistant turns: not one contiguous range); None means ``first_target .. T-1``.
    """

    sample: Sample
    input_ids: list[int]
    first_target: int
    truncated: bool
    vision: dict | None = None
    targets: tuple[int, ...] | None = None

    @property
    def n_scored(self) -> int:
        if self.targets is not None:
            return len(self.targets)
        return max(0, len(self.input_ids) - self.first_target)

    def target_indices(self) -> np.ndarray:
        """The scored target indices ``t`` (int64, shape ``(n_scored,)``); hidden state ``t - 1`` predicts each."""
        if self.targets is not None:
            return np.asarray(self.targets, dtype=np.int64)
        return np.arange(self.first_target, len(self.input_ids), dtype=np.int64)


def tokenize_sample(
    tokenizer, sample: Sample, score_tokens: str, max_length: int, chat_template: bool
) -> TokenizedSample:
    """Tokenize one sample.

    The prompt and the response are tokenized separately so the boundary between them
    is exact; the response gets no special tokens of its own. A conversation is cut the
    same way at each assistant content (:func:`forvalue.indexer.formats.conversation_segments`).
    ``score_tokens='auto'`` means ``assistant`` for a conversation and ``all`` otherwise.
    """
    if sample.image is not None:
        raise InputDataError(
            sample.source,
            "this row has an image but the model is a text-only causal LM; use a vision-language "
            "model (its config.json has a vision_config) or drop --image-column",
            field=sample.image.column,
        )
    if score_tokens == "auto":
        score_tokens = "assistant" if sample.messages is not None else "all"
    if sample.messages is not None:
        return _tokenize_conversation(tokenizer, sample, score_tokens, max_length)
    if sample.text is not None:
        if score_tokens in ("response", "assistant"):
            raise InputDataError(
                sample.source,
                f"--score-tokens {score_tokens} needs prompt/completion columns or a conversation, this "
                "row has only text",
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


def scored_turns(sample: Sample, score_tokens: str) -> set[int]:
    """Indices of the conversation turns whose content is scored (``score_tokens`` other than ``all``).

    ``assistant``: every assistant turn after the prompt turns (``context_turns``); ``response``:
    the same for a conversational prompt-completion row, the last assistant turn of a
    ``messages`` row.
    """
    turns = [i for i, (role, _) in enumerate(sample.messages) if role == "assistant" and i >= sample.context_turns]
    if score_tokens == "response" and sample.context_turns == 0:
        return set(turns[-1:])
    return set(turns)


def _tokenize_conversation(tokenizer, sample: Sample, score_tokens: str, max_length: int) -> TokenizedSample:
    segments, plain = conversation_segments(tokenizer, sample.messages, sample.source)
    scored = scored_turns(sample, score_tokens) if score_tokens != "all" else set()
    ids: list[int] = []
    flags: list[bool] = []
    for n, (text, turn) in enumerate(segments):
        part = tokenizer(text, add_special_tokens=plain and n == 0)["input_ids"]
        ids += part
        flags += [turn is not None and turn in scored] * len(part)
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    if score_tokens == "all":
        return TokenizedSample(sample, ids, 1, truncated)
    targets = tuple(t for t in range(1, len(ids)) if flags[t])
    return TokenizedSample(sample, ids, targets[0] if targets else len(ids), truncated, targets=targets)


def _chat_prompt_ids(tokenizer, sample: Sample) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InputDataError(sample.source, "--chat-template given but the tokenizer has no chat template")
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": sample.prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)
