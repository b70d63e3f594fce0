"""LoRA fine-tuning and evaluation primitives of ``tools/bench_selection.py``.

The adapters are the gradient baseline's own (:class:`tools.bench_baselines.LoraGradients`:
rank-``r`` factors on ``q_proj``/``v_proj`` of every layer, held in forward hooks, the model's
weights never modified), so the selection benchmark fine-tunes exactly the parameters whose
per-sample gradients the TracIn/LESS baseline ranks by. No ``peft`` is needed.

Supervised fine-tuning format: the prompt is tokenized as the product tokenizes it, the response
follows with the tokenizer's end-of-sequence token appended (so greedy generation knows where to
stop), and the loss is the mean negative log-likelihood of the response tokens and that EOS.
Logits are computed only at the scored positions (the LM head over a 49k vocabulary is a fifth of
the model's forward cost), which is what makes a fine-tune of SmolLM2-135M affordable on a CPU.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from forvalue.indexer.data import Sample
from forvalue.indexer.tokenize import TokenizedSample, tokenize_sample
from tools.bench_baselines import LoraGradients, _batches, token_nll


def sft_tokenize(tokenizer, rows: list[dict], max_length: int) -> list[TokenizedSample]:
    """Prompt + response (+ EOS) token ids; targets are the response tokens and the EOS.

    ``rows`` are dicts with ``id``, ``prompt``, ``response`` (and optional ``label``).
    """
    eos = tokenizer.eos_token_id
    out = []
    for r in rows:
        s = Sample(
            id=r["id"],
            prompt=r["prompt"],
            response=r["response"],
            text=None,
            label=r.get("label"),
            source=f"bench:{r['id']}",
        )
        t = tokenize_sample(tokenizer, s, "response", max_length - 1, False)
        ids = list(t.input_ids) + ([int(eos)] if eos is not None else [])
        out.append(TokenizedSample(s, ids, t.first_target, t.truncated))
    return out


class Lora:
    """A fresh set of LoRA adapters on ``model`` (``B = 0``: the pretrained model until trained)."""

    def __init__(self, model, rank: int, seed: int):
        self.model = model
        self.grads = LoraGradients(model, rank=rank, seed=seed)

    @contextmanager
    def active(self):
        """The adapters take part in every forward pass inside the block."""
        self.grads.adapted = True
        handles = self.grads._adapter_hooks()
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def state(self) -> dict:
        return {"A": [a.clone() for _, _, a in self.grads.modules], "B": [b.clone() for b in self.grads.B]}

    def load_state(self, state: dict) -> None:
        for k, (name, module, _) in enumerate(self.grads.modules):
            self.grads.modules[k] = (name, module, state["A"][k].clone())
            self.grads.B[k] = state["B"][k].clone()
        self.grads.adapted = True

    def finetune(self, tokenized, epochs: int, lr: float, batch_size: int, seed: int) -> float:
        """AdamW on the adapters (``A`` and ``B``), one step per batch; returns seconds
        (:meth:`tools.bench_baselines.LoraGradients.finetune`, the benchmarks' one fine-tune loop)."""
        return self.grads.finetune(tokenized, epochs, lr=lr, batch_size=batch_size, seed=seed)

    def gradients(self, tokenized, batch_size: int) -> np.ndarray:
        """Per-sample gradients (n, n_params) float32 of the summed log-likelihood w.r.t. ``B``."""
        return self.grads.compute(tokenized, batch_size, next(self.model.parameters()).device)


@torch.no_grad()
def sample_losses(model, tokenized, batch_size: int = 8) -> np.ndarray:
    """Mean NLL of each sample's scored tokens, float64 (n,), with whatever adapters are active."""
    device = next(model.parameters()).device
    out = np.zeros(len(tokenized))
    for idx, ids, mask in _batches(tokenized, batch_size):
        nll, rows = token_nll(model, tokenized, idx, ids.to(device), mask.to(device))
        sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, rows.cpu(), nll.double().cpu())
        counts = torch.bincount(rows.cpu(), minlength=len(idx)).clamp(min=1)
        out[idx] = (sums / counts).numpy()
    return out


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[dict], batch_size: int = 16, extra_tokens: int = 4) -> list[str]:
    """Greedy continuation of each row's prompt until EOS (at most the reference length + ``extra_tokens``)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    prompts = [tokenizer(r["prompt"], add_special_tokens=True)["input_ids"] for r in rows]
    ref_len = [len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda j: len(prompts[j]))
    answers = [""] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        longest = max(len(prompts[j]) for j in idx)
        ids = torch.full((len(idx), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, j in enumerate(idx):  # left padding: every prompt ends at the last column
            ids[row, longest - len(prompts[j]) :] = torch.tensor(prompts[j])
            mask[row, longest - len(prompts[j]) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max(ref_len[j] for j in idx) + extra_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            num_beams=1,
        )
        for row, j in enumerate(idx):
            new = out[row, longest:].tolist()
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            new = new[: ref_len[j] + extra_tokens]  # the row's own cap, whatever the batch's longest
            answers[j] = tokenizer.decode(new, skip_special_tokens=True)
    return answers


def evaluate(model, tokenizer, rows: list[dict], tokenized, batch_size: int = 16) -> dict:
    """Held-out loss and exact-match accuracy (greedy answer == response after ``strip``)."""
    started = time.perf_counter()
    losses = sample_losses(model, tokenized, batch_size)
    answers = greedy_answers(model, tokenizer, rows, batch_size)
    correct = [a.strip() == r["response"].strip() for a, r in zip(answers, rows)]
    return {
        "loss": float(losses.mean()),
        "acc": float(np.mean(correct)),
        "losses": losses.tolist(),
        "correct": correct,
        "answers": answers,
        "eval_seconds": time.perf_counter() - started,
    }
