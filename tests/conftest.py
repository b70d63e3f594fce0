"""Shared fixtures: a tiny random-initialised causal LM and an offline byte-level BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reverse the words of this sentence please",
    "solve the following math problem answer 42",
    "a chatbot that performs a specific transformation on sentences",
    "cats and dogs are friends in the garden",
    "numbers 0 1 2 3 4 5 6 7 8 9 and symbols -> * .",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model_dir(path: Path, tied: bool = False, seed: int = 0) -> Path:
    """Save a tiny Llama (untied LM head by default) + tokenizer into ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger output weights: peaked softmax, like a trained model
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_runner(tiny_model_dir):
    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.config import ModelConfig

    return load_runner(ModelConfig(path=str(tiny_model_dir), device="cpu"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_rows() -> list[dict]:
    """A small labelled prompt/response set (2 classes)."""
    rows = []
    for i in range(6):
        rows.append({"id": f"rev-{i}", "prompt": f"reverse the words {i}: the quick fox ->", "response": " fox quick the", "label": "reverse"})
        rows.append({"id": f"math-{i}", "prompt": f"solve the math problem {i} ->", "response": f" answer {i * 7}", "label": "math"})
    return rows


def cli(*args: str):
    """Run the forvalue CLI in-process (click's CliRunner)."""
    from click.testing import CliRunner

    from forvalue.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """A user error: exit status 2 and one ``error:`` line on stderr containing every needle."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err
