"""Benchmark of the exact query: training tokens scored per second vs a plain matmul.

A synthetic store is written directly with ``forvalue.storage.store.Store`` (rows matching
``forvalue.schemas.tables.samples_schema``: random float16 hidden states of width ``--dim``,
random sparse errors with ``--top-m`` entries, ~``--tokens`` scored tokens per sample),
and validation sets of ``--val-sizes`` samples are built directly as
``forvalue.engine.validation.ValidationSet`` from random arrays (no model involved).

For each validation size, these run interleaved (order alternates per repetition):

* ``run_query``: ``forvalue.api.run_query`` end to end (Lance scan + decode + exact scorer +
  streaming top-k + result table); the validation encoding is replaced by the random set.
* ``read + decode``: the same Lance scan and ``decode_block`` without scoring (I/O part).
* ``scorer (in memory)``: ``BlockedScorer.score`` over blocks decoded beforehand.
* ``plain matmul``: ``H_train @ H_val^T`` (float32) over the same in-memory blocks, in
  the scorer's chunk size: the floor every exact scorer must pay.

Usage::

    python -m tools.bench query --out DIR [-- --samples 20000 --val-sizes 1,10,100 --device cpu]
    python -m tools.bench_query [--samples 20000] ... [--out FILE]       # the same suite on its own
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from tools.common import add_common_args, apply_threads, emit, machine_info, md_table, median, resolve, sync


def _list(values: np.ndarray, lengths: np.ndarray, width: int, value_type: pa.DataType) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths * width)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.ravel(), type=value_type))


def random_errors(rng: np.random.Generator, n: int, m: int, vocab: int):
    """Top-m ids (skewed towards frequent ids, like real predictions) and sorted probabilities."""
    topk_ids = np.minimum((vocab * rng.random((n, m)) ** 3).astype(np.int32), vocab - 1)
    probs = rng.random((n, m)).astype(np.float32) ** 4
    probs = -np.sort(-probs / probs.sum(axis=1, keepdims=True) * 0.9, axis=1)
    target_ids = np.minimum((vocab * rng.random(n) ** 3).astype(np.int32), vocab - 1)
    target_probs = (rng.random(n) * 0.5).astype(np.float32)
    return topk_ids, probs.astype(np.float32), target_ids, target_probs


def write_synthetic_store(
    path: Path, n_samples: int, tokens: int, d: int, m: int, vocab: int, seed: int = 0
) -> tuple[int, int]:
    from forvalue.schemas.manifest import Manifest
    from forvalue.schemas.tables import samples_schema
    from forvalue.storage.store import Store

    manifest = Manifest(
        model_path="synthetic",
        model_weights_sha256="0" * 64,
        adapter_path=None,
        adapter_sha256=None,
        tokenizer_sha256="0" * 64,
        dtype="float32",
        hidden_size=d,
        vocab_size=vocab,
        top_m=m,
        score_tokens="all",
        chat_template=False,
        max_length=512,
        hidden_dtype="float16",
        lowest_likelihood_ratio=None,
    )
    store = Store.create(path, manifest)
    schema = samples_schema("float16")
    rng = np.random.default_rng(seed)
    total_tokens = 0
    chunk = 2048
    for first in range(0, n_samples, chunk):
        rows = min(chunk, n_samples - first)
        lengths = rng.integers(tokens // 2, tokens + tokens // 2 + 1, rows).astype(np.int64)
        n = int(lengths.sum())
        total_tokens += n
        hidden = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
        topk_ids, topk_probs, target_ids, target_probs = random_errors(rng, n, m, vocab)
        table = pa.table(
            {
                "id": pa.array([f"syn-{first + i}" for i in range(rows)], pa.string()),
                "label": pa.array([f"class-{(first + i) % 10}" for i in range(rows)], pa.string()),
                "prompt": pa.nulls(rows, pa.string()),
                "response": pa.nulls(rows, pa.string()),
                "text": pa.array(["synthetic"] * rows, pa.string()),
                "n_tokens": pa.array(lengths + 1, pa.int32()),
                "truncated": pa.array(np.zeros(rows, bool)),
                "n_scored": pa.array(lengths, pa.int32()),
                "hidden": _list(hidden, lengths, d, pa.float16()),
                "topk_ids": _list(topk_ids, lengths, m, pa.int32()),
                "topk_probs": _list(topk_probs, lengths, m, pa.float32()),
                "target_ids": _list(target_ids, lengths, 1, pa.int32()),
                "target_probs": _list(target_probs, lengths, 1, pa.float32()),
                "tail_mass": _list(np.full(n, 0.05, np.float32), lengths, 1, pa.float32()),
                "sq_norm": pa.array(rng.random(rows) * 1e4 + 1.0, pa.float64()),
            },
            schema=schema,
        )
        store.append(table)
    return store.count(), total_tokens


def random_validation(n_val: int, tokens: int, d: int, m: int, vocab: int, seed: int):
    from forvalue.engine.validation import ValidationSet
    from forvalue.indexer.data import Sample
    from forvalue.indexer.sparse_errors import error_entries

    rng = np.random.default_rng(1000 + seed)
    lengths = rng.integers(tokens // 2, tokens + tokens // 2 + 1, n_val).astype(np.int64)
    n = int(lengths.sum())
    ids, values = error_entries(*random_errors(rng, n, m, vocab))
    samples = [Sample(f"val-{j}", None, None, "synthetic", f"class-{j % 10}", f"synthetic:{j}") for j in range(n_val)]
    return ValidationSet(
        samples=samples,
        hidden=rng.standard_normal((n, d), dtype=np.float32).astype(np.float16).astype(np.float32),
        ids=ids,
        values=values,
        lengths=lengths,
        sq_norms=rng.random(n_val) * 1e4 + 1.0,
    )


class _DeviceOnly:
    """Stands in for a model runner: ``run_query`` only needs its ``device`` once encoding is bypassed."""

    def __init__(self, device):
        self.device = device


def time_run_query(store, val, device) -> float:
    import forvalue.api as api
    from forvalue.schemas.config import QueryConfig

    original = api.encode_validation
    api.encode_validation = lambda *args, **kwargs: val
    try:
        sync(device)
        start = time.perf_counter()
        result = api.run_query(
            store, val.samples, QueryConfig(progress=False, device=str(device)), runner=_DeviceOnly(device)
        )
        sync(device)
        seconds = time.perf_counter() - start
    finally:
        api.encode_validation = original
    assert result.top.num_rows == len(val) * 10
    return seconds


def time_read_decode(store, config_rows: int, d: int) -> float:
    from forvalue.engine.scorer import decode_block
    from forvalue.schemas.tables import SCORING_COLUMNS

    start = time.perf_counter()
    for batch in store.scan(SCORING_COLUMNS + ["id", "label"], batch_size=config_rows):
        decode_block(batch, d)
    return time.perf_counter() - start


def time_scorer(blocks, val, device) -> float:
    from forvalue.engine.scorer import BlockedScorer

    sync(device)
    start = time.perf_counter()
    scorer = BlockedScorer(val, device, 4096)
    for block in blocks:
        scorer.score(block)
    sync(device)
    return time.perf_counter() - start


def time_matmul(train_hidden: list[torch.Tensor], val, device) -> float:
    from forvalue.engine import scorer as scorer_mod

    m_tokens = int(val.lengths.sum())
    chunk = max(1, scorer_mod._BLOCK_FLOATS // m_tokens)  # same chunk as ExactScorer
    hv = torch.from_numpy(val.hidden).to(device)
    buf = torch.empty((chunk, m_tokens), dtype=torch.float32, device=device)
    sync(device)
    start = time.perf_counter()
    hvt = hv.T
    for h in train_hidden:
        for s in range(0, h.shape[0], chunk):
            part = h[s : s + chunk]
            torch.mm(part, hvt, out=buf[: part.shape[0]])
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_query", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20000, help="training samples in the synthetic store")
    p.add_argument("--tokens", type=int, default=50, help="mean scored tokens per sample (uniform in [t/2, 3t/2])")
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--top-m", type=int, default=32)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--val-sizes", default="1,10,100")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--max-pair-tokens",
        type=float,
        default=5e8,
        help="cap on train tokens x val tokens per validation size (smaller store for big validation sets)",
    )
    p.add_argument("--store", type=Path, default=None, help="folder to keep/reuse the synthetic stores in")
    add_common_args(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    device = resolve(args.device)
    from forvalue.engine.scorer import decode_block
    from forvalue.schemas.config import QueryConfig
    from forvalue.schemas.tables import SCORING_COLUMNS
    from forvalue.storage.store import Store

    tmp = tempfile.TemporaryDirectory(prefix="forvalue-bench-query-")
    root = args.store or Path(tmp.name)
    read_rows = QueryConfig().read_rows

    def get_store(n_samples: int):
        path = root / f"store-{n_samples}"
        if not path.exists():
            t = time.perf_counter()
            write_synthetic_store(path, n_samples, args.tokens, args.dim, args.top_m, args.vocab)
            print(f"wrote {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        store = Store.open(path)
        n_tok = int(sum(int(np.asarray(b.column(0)).sum()) for b in store.scan(["n_scored"], 65536)))
        return store, store.count(), n_tok

    rows, stores_used, current = [], [], (None, None)
    for n_val in [int(x) for x in args.val_sizes.split(",")]:
        val = random_validation(n_val, args.tokens, args.dim, args.top_m, args.vocab, seed=n_val)
        m_tokens = int(val.lengths.sum())
        # bound the work (train tokens x val tokens) so large validation sets stay within minutes
        n_used = int(min(args.samples, max(read_rows, args.max_pair_tokens // (m_tokens * args.tokens))))
        if current[0] != n_used:
            current = (None, None)  # free the previous blocks first
            store, n_rows, n_tokens = get_store(n_used)
            blocks = [decode_block(b, args.dim) for b in store.scan(SCORING_COLUMNS, batch_size=read_rows)]
            train_hidden = [torch.from_numpy(b.hidden).to(device) for b in blocks]
            current = (n_used, (store, n_rows, n_tokens, blocks, train_hidden))
            stores_used.append((n_rows, n_tokens, store.size_bytes()))
        store, n_rows, n_tokens, blocks, train_hidden = current[1]
        # warm-up (small): first-call allocations
        time_scorer(blocks[:1], val, device)
        time_matmul(train_hidden[:1], val, device)
        times: dict[str, list[float]] = {k: [] for k in ("run_query", "read", "scorer", "matmul")}
        for rep in range(args.reps):
            order = ["run_query", "read", "scorer", "matmul"]
            if rep % 2:
                order.reverse()
            for what in order:
                if what == "run_query":
                    s = time_run_query(store, val, device)
                elif what == "read":
                    s = time_read_decode(store, read_rows, args.dim)
                elif what == "scorer":
                    s = time_scorer(blocks, val, device)
                else:
                    s = time_matmul(train_hidden, val, device)
                times[what].append(s)
            print(
                f"  val {n_val} rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                file=sys.stderr,
                flush=True,
            )
        med = {k: median(v) for k, v in times.items()}
        pair_q = median([q / mm for q, mm in zip(times["run_query"], times["matmul"])])
        pair_s = median([s / mm for s, mm in zip(times["scorer"], times["matmul"])])
        pair_r = median([r / q for r, q in zip(times["read"], times["run_query"])])
        flops = 2.0 * n_tokens * args.dim * m_tokens
        rows.append(
            [
                n_val,
                m_tokens,
                f"{n_rows} / {n_tokens:,}",
                f"{n_tokens / med['run_query']:,.0f}",
                f"{n_tokens / med['scorer']:,.0f}",
                f"{n_tokens / med['matmul']:,.0f}",
                f"{med['run_query']:.2f}",
                f"{med['read']:.2f}",
                f"{med['scorer']:.2f}",
                f"{med['matmul']:.2f}",
                f"**{pair_q:.2f}**",
                f"**{pair_s:.2f}**",
                f"{100 * pair_r:.0f}%",
                f"{flops / med['matmul'] / 1e9:.1f}",
            ]
        )
    current = None
    store_desc = "; ".join(f"{r} samples, {t:,} tokens, {b / 2**20:.0f} MiB" for r, t, b in stores_used)
    text = "\n".join(
        [
            "## Exact query benchmark (`python -m tools.bench query`)",
            "",
            machine_info(device),
            "",
            f"Synthetic stores ({store_desc}): ~{args.tokens} scored tokens per sample (uniform in "
            f"[{args.tokens // 2}, {args.tokens + args.tokens // 2}]), d={args.dim}, top_m={args.top_m}, hidden "
            "float16; "
            f"read_rows {read_rows}, val_block_tokens 4096. The store used for a validation size is capped so that "
            f"train tokens x val tokens <= {args.max_pair_tokens:.0e} (throughput per token does not depend on store "
            "size). "
            f"Validation sets are random (`ValidationSet` built directly). "
            f"{args.reps} interleaved repetitions, medians; ratios are medians of per-repetition ratios.",
            "",
            "Columns: tokens/s = training tokens scored per second; `run_query` = end to end "
            "(Lance scan + decode + scorer + top-k + result table, validation encoding bypassed); "
            "`read+decode` = the Lance scan and `decode_block` alone; `scorer` = `BlockedScorer.score` "
            "over blocks already decoded in memory; `matmul` = `H_train @ H_val^T` alone (float32, same blocks and "
            "chunks).",
            "",
            md_table(
                [
                    "val samples",
                    "val tokens",
                    "train samples / tokens",
                    "run_query tok/s",
                    "scorer tok/s",
                    "matmul tok/s",
                    "run_query s",
                    "read+decode s",
                    "scorer s",
                    "matmul s",
                    "run_query / matmul",
                    "scorer / matmul",
                    "read+decode / run_query",
                    "matmul GFLOP/s",
                ],
                rows,
            ),
            "",
        ]
    )
    emit(text, args.out)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
