"""Baseline scorers for the quality suite (``tools.bench_quality``): the Emb ablation and gradient baselines.

Everything here runs the pretrained model as loaded by the product's runner; the model's
weights are never modified (the optional LoRA fine-tune of the gradient baselines trains
adapters held outside the model, in forward hooks).

Emb (alpha = 1 ablation of For-Value)
    ``S(v, i) = < sum_k h_vk , sum_k' h_ik' >`` with ``h`` the last hidden state (input of
    the LM head) at the same scored positions For-Value uses (``score_tokens``).

Gradient baselines (TracIn / "Hessian-free" and DataInf)
    Parameters: LoRA-style rank-``r`` adapters on ``q_proj`` and ``v_proj`` of *every*
    transformer layer (the setting of the paper's LoRA baselines), initialised like PEFT
    LoRA: ``A`` (r x d_in) Kaiming-uniform(a=sqrt(5)) from a fixed seed, ``B`` (d_out x r)
    zero, scaling 1. With ``B = 0`` the adapted model equals the pretrained one and
    ``d/dA = 0``; the per-sample gradient of the summed log-likelihood with respect to
    ``B`` is ``sum_t delta_t (A x_t)^T`` (``delta_t`` = gradient at the module output,
    ``x_t`` its input), i.e. the full ``q``/``v`` weight gradient times the fixed random
    matrix ``A^T`` -- a random projection on the input side built into LoRA. No other
    projection is applied (r * (576 + 192) * 30 = 184,320 numbers per sample for r = 8).

    Per-sample gradients are exact and computed with one backward pass per *batch* of
    samples: the loss is the sum of the samples' log-likelihoods and samples do not
    interact (causal attention, right padding, per-token norms), so the gradient at each
    module output of sample ``b`` only depends on sample ``b``; forward/backward hooks
    collect ``x`` and ``delta`` and form ``sum_t delta_bt (A x_bt)^T`` per sample.
    ``grad_batch = 1`` gives the textbook one-backward-per-sample loop (same numbers).

    TracIn (single checkpoint, unit learning rate) = Hessian-free: ``S = <g_v, g_i>``.
    DataInf (Kwon et al., 2024), per adapter module l with the training gradients
    ``g_il``: ``lambda_l = 0.1 * mean_i ||g_il||^2`` and
    ``S(v, k) = sum_l (1 / (n lambda_l)) sum_i (g_vl - (g_vl.g_il)/(lambda_l + ||g_il||^2) g_il) . g_kl``
    (sign chosen so that larger = more valuable, like the other scores).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from forvalue.indexer.tokenize import tokenize_sample


def tokenize_rows(tokenizer, samples, score_tokens: str, max_length: int = 512):
    """TokenizedSample for each Sample, exactly as the product tokenizes them."""
    return [tokenize_sample(tokenizer, s, score_tokens, max_length, False) for s in samples]


def _batches(tokenized, batch_size: int):
    """Length-sorted batches; yields (indices, ids, mask)."""
    order = sorted(range(len(tokenized)), key=lambda j: len(tokenized[j].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        longest = max(len(tokenized[j].input_ids) for j in idx)
        ids = torch.zeros((len(idx), longest), dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, j in enumerate(idx):
            t = tokenized[j].input_ids
            ids[row, : len(t)] = torch.tensor(t)
            mask[row, : len(t)] = 1
        yield idx, ids, mask


def _target_mask(tokenized, idx, longest: int) -> torch.Tensor:
    """(B, T) bool: position p is scored iff it predicts a scored target p + 1."""
    m = torch.zeros((len(idx), longest), dtype=torch.bool)
    for row, j in enumerate(idx):
        t = tokenized[j]
        m[row, t.first_target - 1 : len(t.input_ids) - 1] = True
    return m


def token_nll(model, tokenized, idx, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL (n_scored,) of the scored targets of a batch, and the batch row of each (the LM head runs on the
    scored positions only)."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    sel = _target_mask(tokenized, idx, ids.shape[1]).to(ids.device)
    tgt = torch.zeros_like(ids)
    tgt[:, :-1] = ids[:, 1:]
    logits = model.get_output_embeddings()(hidden[sel]).float()
    nll = torch.nn.functional.cross_entropy(logits, tgt[sel], reduction="none")
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(sel)[sel]
    return nll, rows


@torch.no_grad()
def emb_vectors(runner, tokenized, batch_size: int = 8) -> np.ndarray:
    """Sum of last hidden states over the scored positions, float64 (n, d)."""
    out = np.zeros((len(tokenized), runner.hidden_size), np.float64)
    for idx, ids, mask in _batches(tokenized, batch_size):
        hidden = runner.hidden_states(ids, mask).float().cpu()
        sel = _target_mask(tokenized, idx, ids.shape[1])
        summed = (hidden * sel[:, :, None]).sum(dim=1).double().numpy()
        out[idx] = summed
    return out


def rds_vectors(runner, tokenized, batch_size: int = 8) -> np.ndarray:
    """RDS+ (Ivison et al. 2025): mean of the last hidden states over the scored positions, L2-normalised
    (n, d) float64; inner products of two such vectors are cosines."""
    tokenized = list(tokenized)
    counts = np.array([max(len(t.input_ids) - t.first_target, 1) for t in tokenized], np.float64)
    mean = emb_vectors(runner, tokenized, batch_size) / counts[:, None]
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-30)


class LoraGradients:
    """Per-sample gradients w.r.t. LoRA ``B`` factors (see module doc).

    ``B`` starts at zero (the pretrained model); :meth:`finetune` trains ``A`` and ``B`` first
    (the paper's baselines are computed after a LoRA fine-tune). The adapters live in forward
    hooks (``out + (x A^T) B^T``); the model's own weights are never modified.
    """

    def __init__(self, model, rank: int = 8, targets=("q_proj", "v_proj"), seed: int = 0):
        self.model = model
        self.rank = rank
        gen = torch.Generator().manual_seed(seed)
        self.modules = []  # (name, module, A)
        self.B = []
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                a = torch.empty((rank, module.in_features), dtype=torch.float32)
                bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5))
                a.uniform_(-bound, bound, generator=gen)
                self.modules.append((name, module, a.to(module.weight.device)))
                self.B.append(torch.zeros((module.out_features, rank), device=module.weight.device))
        self.sizes = [m.out_features * rank for _, m, _ in self.modules]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n_params = int(self.offsets[-1])
        self.finetune_seconds = 0.0
        self.adapted = False  # True once finetune() has started training the adapters

    def _adapter_hooks(self):
        def make(k):
            def hook(module, inputs, output):
                if not self.adapted:  # B = 0: the pretrained model, leave the output alone
                    return None
                return output + (inputs[0] @ self.modules[k][2].T) @ self.B[k].T

            return hook

        return [module.register_forward_hook(make(k)) for k, (_, module, _) in enumerate(self.modules)]

    def finetune(
        self, tokenized, epochs: int, lr: float = 3e-4, batch_size: int = 8, device=None, seed: int = 0, accum: int = 1
    ) -> float:
        """Train the adapters (``A`` and ``B``, AdamW) for ``epochs`` over ``tokenized``; returns seconds.

        Loss: mean negative log-likelihood of the scored tokens of a batch (:func:`token_nll`; the
        model's own weights frozen). The one fine-tune loop of the benchmarks (the selection suite's
        :class:`tools.selection_lora.Lora` calls it too). Batches are length-sorted, visited in a seeded
        random order per epoch.
        ``accum`` micro-batches (each loss divided by ``accum``) make one optimizer step, and an
        epoch's last micro-batch always closes a step, as in the HF ``Trainer``: DataInf's
        reference fine-tune (batch 64 x 16 accumulation) is one step per epoch on 900 samples.
        """
        import time

        started = time.perf_counter()
        model = self.model
        device = device or next(model.parameters()).device
        params = [a for _, _, a in self.modules] + self.B
        for t in params:
            t.requires_grad_(True)
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.adapted = True
        handles = self._adapter_hooks()
        rng = np.random.default_rng(seed)
        try:
            batches = list(_batches(tokenized, batch_size))
            for _ in range(epochs):
                order = rng.permutation(len(batches))
                for n, b in enumerate(order):
                    idx, ids, mask = batches[b]
                    nll, _ = token_nll(model, tokenized, idx, ids.to(device), mask.to(device))
                    (nll.sum() / max(nll.numel(), 1) / accum).backward()
                    if (n + 1) % accum == 0 or n + 1 == len(order):
                        opt.step()
                        opt.zero_grad()
        finally:
            for h in handles:
                h.remove()
            for t in params:
                t.requires_grad_(False)
            for p, r in zip(model.parameters(), requires):
                p.requires_grad_(r)
        self.finetune_seconds = time.perf_counter() - started
        return self.finetune_seconds

    def compute(self, tokenized, batch_size: int = 8, device=None) -> np.ndarray:
        """float32 array (n, n_params): per-sample gradient of the summed log-likelihood."""
        model = self.model
        device = device or next(model.parameters()).device
        out = np.zeros((len(tokenized), self.n_params), np.float32)
        saved_x: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}
        handles = []

        def fwd_hook(k):
            def hook(module, inputs, output):
                saved_x[k] = inputs[0].detach() @ self.modules[k][2].T  # (B, T, r)
                output.register_hook(lambda g: grads.__setitem__(k, torch.einsum("bto,btr->bor", g, saved_x[k])))

            return hook

        handles = self._adapter_hooks()  # first: the gradient hooks see the adapted output
        for k, (_, module, _) in enumerate(self.modules):
            handles.append(module.register_forward_hook(fwd_hook(k)))
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            embed = model.get_input_embeddings()
            for idx, ids, mask in _batches(tokenized, batch_size):
                ids, mask = ids.to(device), mask.to(device)
                saved_x.clear()
                grads.clear()
                inputs = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=inputs, attention_mask=mask).logits.float()
                sel = _target_mask(tokenized, idx, ids.shape[1]).to(device)
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                tgt = logp.gather(2, ids[:, 1:, None]).squeeze(2)
                loglik = (tgt * sel[:, :-1]).sum()
                loglik.backward()
                for k in range(len(self.modules)):
                    out[idx, self.offsets[k] : self.offsets[k + 1]] = grads[k].reshape(len(idx), -1).cpu().numpy()
        finally:
            for h in handles:
                h.remove()
            for p, r in zip(model.parameters(), requires):
                p.requires_grad_(r)
        return out


def tracin_scores(g_val: np.ndarray, g_train: np.ndarray) -> np.ndarray:
    return g_val.astype(np.float64) @ g_train.astype(np.float64).T


def datainf_scores(
    g_val: np.ndarray, g_train: np.ndarray, offsets: np.ndarray, damping_ratio: float = 0.1
) -> np.ndarray:
    """DataInf scores (n_val, n_train), per-module closed-form inverse (see module doc)."""
    n = g_train.shape[0]
    total = np.zeros((g_val.shape[0], n), np.float64)
    for k in range(len(offsets) - 1):
        sl = slice(int(offsets[k]), int(offsets[k + 1]))
        G = g_train[:, sl].astype(np.float64)
        V = g_val[:, sl].astype(np.float64)
        sq = (G * G).sum(axis=1)
        lam = damping_ratio * sq.mean()
        if lam <= 0:
            continue
        VG = V @ G.T  # (m, n)
        R = (n * V - (VG / (lam + sq)[None, :]) @ G) / (n * lam)
        total += R @ G.T
    return total
