"""Write a synthetic For-Value store of N samples without running a model (prefilter benchmarks).

Shapes are realistic (tens of scored tokens per sample, d in the hundreds, top-m sparse errors
over a vocabulary of tens of thousands, float16 hidden states) and so is the structure that
makes influence search meaningful:

* hidden states = a large shared direction (LLM hidden states are far from zero-mean) + the
  sample's topic centre + per-token noise, anisotropic like a real model's: variance along the
  j-th principal direction ~ j^-1.2 (the top 16 of d = 256 hold ~70% of it) and squared mean
  norm ~ the total variance. Measured on SmolLM2-135M last hidden states of the benchmark
  tasks (51k tokens, d = 576): top 16 hold 68%, ||mean||^2 / total variance = 0.86;
  ``--spectrum-decay 0 --mean-scale 1.5`` gives the earlier isotropic generator;
* each topic owns a pool of 64 vocabulary ids; targets come from it (70%) or from 256 common
  ids (30%); the top-m predicted ids are drawn from the topic pool and the common ids, the
  target included with probability 0.6; probabilities decay geometrically to a mass of 0.6-0.98.

``sq_norm`` is the restricted-vocabulary ``||G||_F^2`` (G accumulated in float32), the ``sketch`` column is computed
by ``forvalue.indexer.sketch`` exactly as a real build does (a fitted basis is fitted from the first
block and published before its commit, as ``forvalue.indexer.build`` does). Each block of rows is one atomic commit,
generated from ``(seed, block)`` alone, so a killed run resumes where it stopped, and
``--workers N --worker I`` processes write disjoint blocks into one store at once (row order
then interleaves blocks; ids stay ``s<row number>``).

    python -m tools.make_synthetic_store --out runs/synth1m --rows 1000000
    python -m tools.make_synthetic_store --out runs/synth1m --validation-only --n-val 50

Also writes ``<out>/validation.npz``: validation samples from the same generator (hidden, ids,
values, lengths, sq_norms, topics) for the prefilter suite (``python -m tools.bench prefilter``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from forvalue.indexer.build import BASIS_FIT_TOKENS
from forvalue.indexer.sketch import SketchSpec, get_sketcher
from forvalue.indexer.sparse_errors import error_entries
from forvalue.schemas.config import EncodeConfig
from forvalue.schemas.manifest import Manifest
from forvalue.schemas.tables import samples_schema
from forvalue.storage.sketch_basis import fit_basis, load_basis, publish_basis
from forvalue.storage.store import Store

POOL = 64
COMMON = 256


class Generator:
    def __init__(self, a):
        self.a = a
        rng = np.random.default_rng([a.seed, 0])
        d = a.hidden_size
        self.mu = rng.standard_normal(d).astype(np.float32) * a.mean_scale
        # anisotropic hidden states: variance lambda_j ~ j^-decay along the axes of a random rotation
        lam = np.arange(1, d + 1, dtype=np.float64) ** -a.spectrum_decay
        sigma = np.sqrt(lam / lam.mean())
        self.mix = (np.linalg.qr(rng.standard_normal((d, d)))[0] * sigma[None, :]).T.astype(np.float32)  # g @ mix
        self.centres = (rng.standard_normal((a.topics, d)).astype(np.float32) @ self.mix) * 0.7
        self.pool_start = rng.integers(COMMON, a.vocab - POOL, size=a.topics)

    def samples(self, rng: np.random.Generator, rows: int) -> dict:
        a, m = self.a, self.a.top_m
        topics = rng.integers(0, a.topics, rows)
        lengths = rng.integers(a.min_tokens, a.max_tokens + 1, rows)
        n = int(lengths.sum())
        tok_topic = np.repeat(topics, lengths)
        hidden = (
            self.mu
            + self.centres[tok_topic]
            + (rng.standard_normal((n, a.hidden_size), dtype=np.float32) @ self.mix) * 0.8
        )
        # candidate ids per token: its topic pool then the common ids; the top-m are m distinct of them
        cand_pool = self.pool_start[tok_topic][:, None] + np.arange(POOL)
        u = rng.random((n, POOL + COMMON), dtype=np.float32)
        u[:, :POOL] *= 0.25  # topic ids predicted more often than common ones
        pick = np.argpartition(u, m, axis=1)[:, :m]
        pick = np.take_along_axis(pick, np.argsort(np.take_along_axis(u, pick, 1), 1), 1)
        topk_ids = np.where(
            pick < POOL, np.take_along_axis(cand_pool, np.minimum(pick, POOL - 1), 1), pick - POOL
        ).astype(np.int32)
        # targets
        from_topic = rng.random(n) < 0.7
        zipf = (rng.random(n) ** 2 * POOL).astype(np.int64)
        target = np.where(
            from_topic, self.pool_start[tok_topic] + zipf, (rng.random(n) ** 2 * COMMON).astype(np.int64)
        ).astype(np.int32)
        in_top = (topk_ids == target[:, None]).any(1)
        put = ~in_top & (rng.random(n) < 0.6)
        pos = np.minimum((rng.random(n) ** 2 * m).astype(np.int64), m - 1)
        topk_ids[put, pos[put]] = target[put]
        in_top |= put
        # probabilities: geometric decay, total mass in [0.6, 0.98]
        decay = rng.uniform(0.15, 0.9, n).astype(np.float32)
        raw = np.exp(-decay[:, None] * np.arange(m, dtype=np.float32))
        topk_probs = (raw / raw.sum(1, keepdims=True) * rng.uniform(0.6, 0.98, n).astype(np.float32)[:, None]).astype(
            np.float32
        )
        tpos = np.argmax(topk_ids == target[:, None], axis=1)
        target_probs = np.where(
            in_top, topk_probs[np.arange(n), tpos], topk_probs[:, -1] * rng.random(n, dtype=np.float32)
        ).astype(np.float32)
        tail = np.clip(1.0 - topk_probs.sum(1) - np.where(in_top, 0, target_probs), 0, None).astype(np.float32)
        hidden = hidden.astype(np.float16)
        ids, values = error_entries(topk_ids, topk_probs, target, target_probs)
        return dict(
            topics=topics,
            lengths=lengths,
            hidden=hidden,
            topk_ids=topk_ids,
            topk_probs=topk_probs,
            target_ids=target,
            target_probs=target_probs,
            tail_mass=tail,
            ids=ids,
            values=values,
        )


def sq_norms(
    hidden: np.ndarray, ids: np.ndarray, values: np.ndarray, lengths: np.ndarray, vocab: int, sub: int = 256
) -> np.ndarray:
    """``||G||_F^2`` per sample (rows of G restricted to each sample's support; G summed in float32)."""
    out = np.empty(lengths.size)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for s0 in range(0, lengths.size, sub):
        s1 = min(lengths.size, s0 + sub)
        t0, t1 = offsets[s0], offsets[s1]
        sample = np.repeat(np.arange(s1 - s0), lengths[s0:s1])
        key = (sample[:, None] * vocab + ids[t0:t1]).ravel()
        uniq, inv = np.unique(key, return_inverse=True)
        h = torch.from_numpy(hidden[t0:t1].astype(np.float32))
        contrib = (torch.from_numpy(values[t0:t1])[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1])
        g = torch.zeros((uniq.size, h.shape[1]), dtype=torch.float32).index_add_(
            0, torch.from_numpy(inv.ravel()), contrib
        )
        per_row = (g.double() * g.double()).sum(1).numpy()
        out[s0:s1] = np.bincount(uniq // vocab, weights=per_row, minlength=s1 - s0)
    return out


def _list(parts: np.ndarray, lengths: np.ndarray, width: int, typ) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths * width)]).astype(np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(parts.ravel(), type=typ)).cast(pa.list_(typ))


def manifest(a) -> Manifest:
    return Manifest(
        model_path="synthetic",
        model_weights_sha256=f"synthetic-{a.seed}",
        adapter_path=None,
        adapter_sha256=None,
        tokenizer_sha256="synthetic",
        dtype="float32",
        hidden_size=a.hidden_size,
        vocab_size=a.vocab,
        top_m=a.top_m,
        score_tokens="all",
        chat_template=False,
        max_length=512,
        hidden_dtype="float16",
        lowest_likelihood_ratio=None,
        sketch_dim=a.sketch_dim or None,
        sketch_vocab_buckets=a.sketch_vocab_buckets,
        sketch_hidden_cols=a.sketch_hidden_cols,
        sketch_seed=0,
        sketch_basis=a.sketch_basis,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_synthetic_store", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--top-m", type=int, default=32)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--topics", type=int, default=2000)
    p.add_argument(
        "--spectrum-decay",
        type=float,
        default=1.2,
        help="hidden-state variance along principal direction j ~ j^-decay (0: isotropic)",
    )
    p.add_argument(
        "--mean-scale", type=float, default=1.0, help="std of the entries of the shared mean hidden direction"
    )
    p.add_argument("--sketch-dim", type=int, default=EncodeConfig.sketch_dim)
    p.add_argument("--sketch-vocab-buckets", type=int, default=EncodeConfig.sketch_vocab_buckets)
    p.add_argument("--sketch-hidden-cols", type=int, default=EncodeConfig.sketch_hidden_cols)
    p.add_argument("--sketch-basis", choices=["fitted", "gaussian"], default=EncodeConfig.sketch_basis)
    p.add_argument("--block", type=int, default=8192, help="rows per commit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="parallel generator processes (blocks are split by index)")
    p.add_argument("--worker", type=int, default=0, help="this process's index in 0..workers-1")
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--validation-only", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    gen = Generator(a)
    man = manifest(a)
    spec = SketchSpec.from_manifest(man)

    store = None if a.validation_only else Store.create(a.out, man)
    val = gen.samples(np.random.default_rng([a.seed, 10**9]), a.n_val)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.worker == 0:
        np.savez(
            a.out / "validation.npz",
            hidden=val["hidden"].astype(np.float32),
            ids=val["ids"],
            values=val["values"],
            lengths=val["lengths"],
            topics=val["topics"],
            sq_norms=sq_norms(val["hidden"], val["ids"], val["values"], val["lengths"], a.vocab),
        )
    if a.validation_only:
        return 0
    schema = samples_schema("float16", man.sketch_dim)
    # a block is one atomic commit, so its first id marks it done (resume, parallel workers)
    done = store.ids() if store.count() else set()
    started, sketch_s = time.perf_counter(), 0.0
    for b in range(-(-a.rows // a.block)):
        if b % a.workers != a.worker or f"s{b * a.block:08d}" in done:
            continue
        rows = min(a.block, a.rows - b * a.block)
        s = gen.samples(np.random.default_rng([a.seed, b + 1]), rows)
        L = s["lengths"]
        cols = {
            "id": pa.array([f"s{b * a.block + i:08d}" for i in range(rows)]),
            "label": pa.array([f"t{t}" for t in s["topics"]]),
            "prompt": pa.nulls(rows, pa.string()),
            "response": pa.nulls(rows, pa.string()),
            "text": pa.nulls(rows, pa.string()),
            "n_tokens": pa.array(L + 1, pa.int32()),
            "truncated": pa.array(np.zeros(rows, bool)),
            "n_scored": pa.array(L, pa.int32()),
            "hidden": _list(s["hidden"], L, a.hidden_size, pa.float16()),
            "topk_ids": _list(s["topk_ids"], L, a.top_m, pa.int32()),
            "topk_probs": _list(s["topk_probs"], L, a.top_m, pa.float32()),
            "target_ids": _list(s["target_ids"], L, 1, pa.int32()),
            "target_probs": _list(s["target_probs"], L, 1, pa.float32()),
            "tail_mass": _list(s["tail_mass"], L, 1, pa.float32()),
            "sq_norm": pa.array(sq_norms(s["hidden"], s["ids"], s["values"], L, a.vocab)),
        }
        if spec:
            t0 = time.perf_counter()
            basis = load_basis(a.out) if spec.basis == "fitted" else None
            if basis is None and spec.basis == "fitted":  # fitted from the first block, published before any row
                basis = publish_basis(
                    a.out, fit_basis(s["hidden"][:BASIS_FIT_TOKENS].astype(np.float32), spec.hidden_cols)
                )
            z = get_sketcher(spec, basis).sketch(s["hidden"], s["ids"], s["values"], L)
            sketch_s += time.perf_counter() - t0
            cols["sketch"] = pa.FixedSizeListArray.from_arrays(pa.array(z.ravel(), pa.float32()), spec.dim)
        store.append(pa.table(cols, schema=schema))
        el = time.perf_counter() - started
        print(f"block {b}: {store.count()} rows, {el:.0f}s elapsed, sketch {sketch_s:.0f}s", flush=True)
    print(
        f"done: {store.count()} rows, {store.size_bytes() / 1e9:.2f} GB, {time.perf_counter() - started:.0f}s, "
        f"sketching {sketch_s:.0f}s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
