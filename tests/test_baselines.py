"""The quality benchmark's gradient baseline (``tools.bench_baselines``) against plain autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_jsonl

from tools.bench_baselines import LoraGradients, tokenize_rows


@pytest.fixture
def tokenized(tiny_runner, toy_rows, tmp_path):
    from forvalue.indexer.data import iter_samples
    from forvalue.schemas.config import DataConfig

    samples = list(iter_samples([write_jsonl(tmp_path / "rows.jsonl", toy_rows)], DataConfig()))
    return tokenize_rows(tiny_runner.tokenizer, samples, "all")


def _autograd_gradient(lg: LoraGradients, model, t) -> np.ndarray:
    """One sample, one backward: d(summed log-likelihood of its scored targets) / d(every B)."""
    for b in lg.B:
        b.grad = None
        b.requires_grad_(True)
    lg.adapted = True  # route the outputs through the adapters so B is in the graph
    handles = lg._adapter_hooks()
    try:
        ids = torch.tensor([t.input_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        positions = torch.arange(t.first_target - 1, len(t.input_ids) - 1)
        logp[positions, targets[positions]].sum().backward()
        return torch.cat([b.grad.reshape(-1) for b in lg.B]).numpy()
    finally:
        for h in handles:
            h.remove()
        for b in lg.B:
            b.requires_grad_(False)
        lg.adapted = False


@pytest.mark.parametrize("batch_size", [1, 3])
def test_per_sample_lora_gradients_match_autograd(tiny_runner, tokenized, batch_size):
    """Batched hook gradients (padding, several samples per backward) equal one backward per sample."""
    model = tiny_runner.model
    lg = LoraGradients(model, rank=4, seed=0)
    got = lg.compute(tokenized, batch_size=batch_size)
    assert got.shape == (len(tokenized), lg.n_params)
    want = np.stack([_autograd_gradient(lg, model, t) for t in tokenized])
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("accum, steps_per_epoch", [(1, 3), (2, 2), (100, 1)])
def test_finetune_accumulation_steps(tiny_runner, tokenized, monkeypatch, accum, steps_per_epoch):
    """``accum`` micro-batches per optimizer step; an epoch's last micro-batch closes a step."""
    calls = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: calls.append(1) or real_step(self, *a, **k))
    n = len(tokenized)
    batch_size = -(-n // 3)  # three micro-batches per epoch
    lg = LoraGradients(tiny_runner.model, rank=2, seed=0)
    before = lg.compute(tokenized[:1])
    lg.finetune(tokenized, epochs=2, batch_size=batch_size, accum=accum)
    assert len(calls) == 2 * steps_per_epoch
    assert not np.allclose(lg.compute(tokenized[:1]), before)  # the adapters moved
