"""Benchmark of the FAISS prefilter + exact rerank against the exact full scan (synthetic store).

    python -m tools.make_synthetic_store --out runs/synth --rows 1000000
    python -m tools.bench prefilter --out DIR -- --store runs/synth --candidates 500,2000,10000,20000
    python -m tools.bench_prefilter --store runs/synth ... --out runs/prefilter.md   # the same suite on its own

Measures, on one store and in one run: FAISS build time and index size; the exact full scan
(all validation samples scored together, per-sample time = total / n); per validation sample,
prefilter + rerank latency (median, p90) for each candidate count and Recall@k of its top-k
against the exact top-k. Memory stays bounded: the index is built from sketch blocks and both
paths read hidden states block by block (exact) or only for candidates (prefilter).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

import forvalue.engine.prefilter as qp
from forvalue.engine.prefilter import prefilter_topk
from forvalue.engine.ranking import TopK
from forvalue.engine.scan import score_all
from forvalue.engine.validation import ValidationSet
from forvalue.schemas.config import QueryConfig
from forvalue.storage import faiss_index
from forvalue.storage.store import Store
from tools.common import emit


def load_val(path: Path) -> tuple[ValidationSet, np.ndarray]:
    z = np.load(path)
    n = len(z["lengths"])
    return ValidationSet(
        list(range(n)), z["hidden"], z["ids"].astype(np.int64), z["values"], z["lengths"], z["sq_norms"]
    ), z["topics"]


def sketch_exact_search(store: Store, val: ValidationSet, c: int, block_rows: int = 65536) -> np.ndarray:
    """``(n_val, c)`` rows with the largest sketch inner product per validation sample, best first (exact)."""
    from forvalue.engine.prefilter import validation_sketches
    from forvalue.indexer.sketch import SketchSpec
    from forvalue.storage.sketch_basis import load_basis, load_heavy_ids

    q = validation_sketches(
        val, SketchSpec.from_manifest(store.manifest), "none", load_basis(store.path), load_heavy_ids(store.path)
    )
    q = q.astype(np.float32)
    best_s, best_r, first = np.full((len(val), 0), -np.inf, np.float32), np.zeros((len(val), 0), np.int64), 0
    for batch in store.scan([faiss_index.SKETCH_COLUMN], batch_size=block_rows):
        z = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1).astype(np.float32)
        s = np.concatenate([best_s, (z @ q.T).T], 1)
        r = np.concatenate([best_r, np.broadcast_to(np.arange(first, first + z.shape[0]), (len(val), z.shape[0]))], 1)
        keep = np.argpartition(-s, min(c, s.shape[1] - 1), axis=1)[:, :c]
        best_s, best_r = np.take_along_axis(s, keep, 1), np.take_along_axis(r, keep, 1)
        first += z.shape[0]
    return np.take_along_axis(best_r, np.argsort(-best_s, axis=1, kind="stable"), 1)


def true_topk_scores(store: Store, one: ValidationSet, rows: np.ndarray) -> np.ndarray:
    """Exact scores of one validation sample on the given rows (its exact top-k), decreasing."""
    import torch

    from forvalue.engine.scorer import ExactScorer, decode_block
    from forvalue.engine.variant import for_scoring
    from forvalue.schemas.tables import SCORING_COLUMNS

    ordered = np.sort(np.asarray(rows, np.int64))
    block = for_scoring(decode_block(store.take(ordered.tolist(), SCORING_COLUMNS), store.manifest.stored_width), one)
    return np.sort(ExactScorer(one, torch.device("cpu")).score(block)[:, 0])[::-1]


def take_floor(path: Path, n: int, out: Path | None) -> int:
    """What reading ``n`` candidate rows costs at best: one sorted ``take`` of the scoring columns, cold and again
    warm (the same rows, now in the page cache), and warm with the two scalar columns left out."""
    from forvalue.schemas.tables import SCORING_COLUMNS

    store = Store.open(path)
    rng = np.random.default_rng(0)
    lists = [c for c in SCORING_COLUMNS if c not in ("n_scored", "sq_norm")]
    lines = [
        f"Store `{path}`: {store.count()} rows; {n} random rows per read, sorted, one `take`.",
        "",
        "| read | cold ms | warm ms | warm, list columns only ms | MB |",
        "|---|---|---|---|---|",
    ]
    for rep in range(4):
        rows = np.sort(rng.choice(store.count(), n, replace=False)).tolist()
        times, sizes = [], []
        for columns in (SCORING_COLUMNS, SCORING_COLUMNS, lists):
            t0 = time.perf_counter()
            sizes.append(store.take(rows, columns).nbytes / 1e6)
            times.append(1000 * (time.perf_counter() - t0))
        lines.append(f"| {rep + 1} | {times[0]:.0f} | {times[1]:.0f} | {times[2]:.0f} | {sizes[0]:.1f} |")
        print(lines[-1], flush=True)
    emit("\n".join(lines) + "\n", out)
    return 0


def _binary(column):
    """A list column as a binary column of the same bytes per row (each row's values back to back)."""
    import pyarrow as pa

    lists = column.combine_chunks()
    values = lists.values.to_numpy(zero_copy_only=False)
    offsets = np.asarray(lists.offsets).astype(np.int64) * values.itemsize
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(lists), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(values.tobytes())]
    )


def take_layouts(path: Path, n: int, scratch: Path, out: Path | None, rows: int = 100_000) -> int:
    """Why reading candidate rows costs what it does: the first ``rows`` rows of the store's scoring lists, written
    again in other layouts under ``scratch`` (a folder of its own, removed after), and one warm ``take`` of ``n``
    random rows from each (after a first take of the same rows): the cost is per column more than per byte."""
    import shutil

    import lance
    import pyarrow as pa

    from forvalue.schemas.tables import SCORING_COLUMNS

    store = Store.open(path)
    lists = [c for c in SCORING_COLUMNS if c not in ("n_scored", "sq_norm")]
    if scratch.resolve().is_relative_to(Path(path).resolve()):
        raise SystemExit(f"--scratch {scratch}: inside the store; give a folder outside it")
    work = scratch / f"take-layouts-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        batches, count = [], 0
        for batch in store.scan(lists, batch_size=8192):
            batches.append(batch)
            count += batch.num_rows
            if count >= rows:
                break
        table = pa.Table.from_batches(batches).slice(0, rows)
        binary = {c: _binary(table.column(c)) for c in lists}
        row_bytes = [b"".join(binary[c][i].as_py() for c in lists) for i in range(table.num_rows)]
        packed = pa.array(row_bytes, pa.large_binary())
        layouts = {
            "the store's five list columns": table,
            "the five as binary columns": pa.table(binary),
            "one binary column (the five back to back)": pa.table({"row": packed}),
            "hidden states alone (one list column)": table.select(["hidden"]),
        }
        for i, (name, t) in enumerate(layouts.items()):
            lance.write_dataset(t, str(work / f"l{i}.lance"), max_rows_per_file=8192)
        rng = np.random.default_rng(0)
        times: dict = {name: [] for name in layouts}
        mb = {}
        for _ in range(3):
            take = np.sort(rng.choice(table.num_rows, n, replace=False)).tolist()
            for i, name in enumerate(layouts):
                ds = lance.dataset(str(work / f"l{i}.lance"))
                ds.take(take)
                t0 = time.perf_counter()
                mb[name] = ds.take(take).nbytes / 1e6
                times[name].append(1000 * (time.perf_counter() - t0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Store `{path}`: its first {table.num_rows} rows' scoring lists ({', '.join(lists)}) written again in "
        f"other layouts (8,192 rows a file); {n} random rows per read, sorted, one warm `take` (3 reads).",
        "",
        "| layout | warm ms, 3 reads | MB |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {' / '.join(f'{t:.0f}' for t in times[name])} | {mb[name]:.1f} |" for name in layouts]
    emit("\n".join(lines) + "\n", out)
    return 0


def pool_recall(store: Store, pre, val: ValidationSet, exact_rows: np.ndarray, a, lines: list[str]) -> int:
    """The pool's share of each sample's exact top-k (what the second stage can find at best) and the search time,
    per pool size and re-rank factor: what a pool costs and buys (docs/prefilter.md "The second stage at 10^6")."""
    import faiss

    from forvalue.engine.prefilter import validation_sketches
    from forvalue.indexer.sketch import SketchSpec
    from forvalue.storage.sketch_basis import load_basis, load_heavy_ids

    spec = SketchSpec.from_manifest(store.manifest)
    queries = validation_sketches(val, spec, "none", load_basis(store.path), load_heavy_ids(store.path))
    refine = faiss.downcast_index(pre.index) if "Refine" in pre.meta.get("factory", "") else None
    lines += [
        f"| re-rank factor | pool | pool's share of the exact top-{a.top_k}: mean / median / min | "
        "search p50 / p95 ms |",
        "|---|---|---|---|",
    ]
    for factor in [float(x) for x in a.refine.split(",")]:
        if refine is None and factor != float(a.refine.split(",")[0]):
            continue  # (no re-rank in this index: one row per pool)
        if refine is not None:
            refine.k_factor = factor
        for size in [int(x) for x in a.pool_recall.split(",")]:
            share, times = [], []
            for j in range(len(val)):
                t0 = time.perf_counter()
                _, found = pre.search(queries[j : j + 1], size)
                times.append(time.perf_counter() - t0)
                share.append(len(set(found[0].tolist()) & set(exact_rows[j].tolist())) / a.top_k)
            lines.append(
                f"| {f'{factor:g}' if refine is not None else '-'} | {size} | {np.mean(share):.3f} / "
                f"{np.median(share):.3f} / {np.min(share):.2f} | {1000 * np.median(times):.0f} / "
                f"{1000 * np.percentile(times, 95):.0f} |"
            )
            print(lines[-1], flush=True)
    if refine is not None:
        refine.k_factor = float(faiss_index.REFINE_FACTOR)
    emit("\n".join(lines) + "\n", a.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_prefilter", description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--candidates", default="500,2000,10000")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--n-val", type=int, default=20)
    p.add_argument("--faiss-index", default="auto")
    p.add_argument("--nprobe", default="", help="comma list of nprobe values to try (IVF only)")
    p.add_argument(
        "--growth",
        default="1",
        help="comma list of G: adaptive candidates up to G x the candidate count (1: a fixed count; the product's "
        "default is 8)",
    )
    p.add_argument(
        "--stages",
        default="2",
        help="comma list: 2 = the index's second stage ranks the sketch's candidates (when it has one), 1 = the "
        "sketch's order alone; --candidates then counts the rows scored exactly",
    )
    p.add_argument(
        "--pool",
        default="",
        help="comma list of first pool sizes for --stages 2 (the sketch's candidates the second stage ranks; "
        "default: the product's)",
    )
    p.add_argument(
        "--pool-recall",
        default="",
        help="comma list of pool sizes: only the share of each validation sample's exact top-k inside FAISS's first P "
        "rows (one search per sample, the pool the second stage ranks) and the search time, for each --refine",
    )
    p.add_argument(
        "--refine",
        default="16",
        help="comma list of re-rank factors for --pool-recall (a `pq` index's 8-bit re-rank of F x P rows)",
    )
    p.add_argument("--rebuild", action="store_true")
    p.add_argument(
        "--single-exact", action="store_true", help="also time the exact scan for one validation sample alone"
    )
    p.add_argument(
        "--batches",
        default="",
        help="comma list of batch sizes: one query of that many validation samples (the union of their candidates "
        "read once), at the first --candidates value",
    )
    p.add_argument(
        "--validation",
        type=Path,
        default=None,
        help="validation .npz (default STORE/validation.npz; "
        "python -m tools.make_synthetic_store --validation-only makes more)",
    )
    p.add_argument("--skip-exact", action="store_true", help="no exact scan (only with --batches)")
    p.add_argument(
        "--exact-cache",
        type=Path,
        default=None,
        help="an .npz keeping the exact top-k rows and scan time: reused when it matches the store's rows, the "
        "validation samples and top-k (another sketch of the same store needs no second exact scan)",
    )
    p.add_argument(
        "--exact-only", action="store_true", help="only the exact scan into --exact-cache (a store without sketches)"
    )
    p.add_argument(
        "--sketch-exact-search",
        action="store_true",
        help="also the recall of an exact search of the sketch column (no IVF, no 8-bit codes): the index's share",
    )
    p.add_argument(
        "--take-floor",
        type=int,
        default=0,
        help="only time the read of this many random rows' scoring columns, cold then warm (page cache), 4 times",
    )
    p.add_argument(
        "--take-layouts",
        type=int,
        default=0,
        help="only time a warm read of this many random rows of the store's first 100,000 rows written again in "
        "other column layouts (under --scratch)",
    )
    p.add_argument("--scratch", type=Path, default=Path("/tmp"), help="where --take-layouts writes (removed after)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.take_floor:
        return take_floor(a.store, a.take_floor, a.out)
    if a.take_layouts:
        return take_layouts(a.store, a.take_layouts, a.scratch, a.out)
    if a.exact_only and not a.exact_cache:
        p.error("--exact-only needs --exact-cache")
    import torch

    dev = torch.device("cpu")
    store = Store.open(a.store)
    rows = store.count()
    all_val, topics = load_val(a.validation or a.store / "validation.npz")
    val = all_val.subset(list(range(min(a.n_val, len(all_val)))))
    lines = [
        f"Store `{a.store}`: {rows} samples, d={store.manifest.hidden_size}, top_m={store.manifest.top_m}, "
        f"sketch {store.manifest.sketch_dim} (r={store.manifest.sketch_vocab_buckets}, "
        f"c={store.manifest.sketch_hidden_cols}, {store.manifest.sketch_basis} basis), "
        f"{store.size_bytes() / 1e9:.2f} GB on disk; {len(val)} validation samples; top-k {a.top_k}; "
        f"{torch.get_num_threads()} torch threads.",
        "",
    ]

    cfg = QueryConfig(top_k=a.top_k, progress=False, read_rows=2048)
    t_exact = t_single = None
    key = np.array([rows, len(val), a.top_k], np.int64)  # a re-sketch makes a new table version: not in the key
    cached = np.load(a.exact_cache) if a.exact_cache and a.exact_cache.exists() else None
    if cached is not None and np.array_equal(cached["key"], key) and np.array_equal(cached["lengths"], val.lengths):
        exact_rows, t_exact = cached["rows"], float(cached["seconds"])
        print(f"exact top-{a.top_k}: from {a.exact_cache} (its scan took {t_exact:.1f}s)", flush=True)
    elif not a.skip_exact:
        t0 = time.perf_counter()
        top = TopK(a.top_k, len(val))
        for first, _ids, _labels, scores in score_all(store, val, cfg, dev):
            top.update(scores, first)
        t_exact = time.perf_counter() - t0
        _, exact_rows = top.result()
        print(f"exact scan: {t_exact:.1f}s for {len(val)} samples", flush=True)
        if a.exact_cache:
            np.savez(a.exact_cache, key=key, lengths=val.lengths, rows=exact_rows, seconds=t_exact)
    if a.exact_only:
        return 0
    t0 = time.perf_counter()
    pre = faiss_index.ensure(store, kind=a.faiss_index, rebuild=a.rebuild)
    t_faiss = time.perf_counter() - t0
    pre.to_gpu()
    if a.pool_recall:
        return pool_recall(store, pre, val, exact_rows, a, lines)
    lines += [
        "| FAISS index | rows | build+save s (this run) | train s | add s | size MB |",
        "|---|---|---|---|---|---|",
        f"| {pre.meta['factory']} | {pre.rows} | {t_faiss:.1f} | {pre.meta.get('train_seconds', '-')} | "
        f"{pre.meta.get('add_seconds', '-')} | {pre.meta.get('bytes', 0) / 1e6:.1f} |",
        "",
    ]
    print("\n".join(lines), flush=True)

    if a.single_exact:  # what one user query for one validation sample costs without the prefilter
        t0 = time.perf_counter()
        one = TopK(a.top_k, 1)
        for first, _ids, _labels, scores in score_all(store, val.subset([0]), cfg, dev):
            one.update(scores, first)
        t_single = time.perf_counter() - t0
        print(f"exact scan, 1 validation sample: {t_single:.1f}s", flush=True)

    k = a.top_k
    table = [
        f"| stages | pool first / mean / max | candidates | most | % of store | nprobe | Recall@{k} mean / median / "
        f"min | candidates used mean / median / max | unsettled | worst returned / true: top-1, {k}-th score | "
        "latency p50 ms | p95 ms | sketch+search ms | second stage ms | take ms | score ms | waiting for reads ms | "
        "speedup vs exact (per sample) | vs 1-sample exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    truth: dict[int, np.ndarray] = {}  # exact scores of each sample's true top-k (read once, outside the timings)
    nprobes = [int(x) for x in a.nprobe.split(",") if x] or [None]
    single_p50 = {}
    pools = [int(x) for x in a.pool.split(",") if x] or [None]
    settings = [
        (int(st), int(c), int(g), nprobe, pool)
        for st in a.stages.split(",")
        for pool in (pools if st == "2" else [None])
        for c in a.candidates.split(",")
        for g in a.growth.split(",")
        for nprobe in nprobes
    ]
    sketch_only = dataclasses.replace(pre, rerank=None)
    for stages, c, g, nprobe, pool in settings if t_exact is not None else []:
        index = pre if stages == 2 else sketch_only
        if stages == 2 and pre.rerank is None:
            print("the index has no second stage: --stages 2 skipped", flush=True)
            continue
        lat, rec, used, unsettled, first_ratio, kth_ratio, pooled = [], [], [], 0, [], [], []
        parts = {"sketch": 0.0, "search": 0.0, "read": 0.0, "score": 0.0, "read_wait": 0.0, "rerank": 0.0}
        for j in range(len(val)):
            one = val.subset([j])
            t0 = time.perf_counter()
            res = prefilter_topk(
                store,
                one,
                cfg,
                dev,
                candidates=c,
                index=index,
                nprobe=nprobe,
                timings=parts,
                max_candidates=g * c,
                pool=pool,
            )
            pooled.append(0 if parts["pool"] is None else int(parts["pool"][0]))
            lat.append(time.perf_counter() - t0)
            got_s, got_r = res.result()
            rec.append(len(set(got_r[0].tolist()) & set(exact_rows[j].tolist())) / k)
            if j not in truth:
                truth[j] = true_topk_scores(store, one, exact_rows[j])
            found = got_s[0][got_r[0] >= 0]
            first_ratio.append(found[0] / truth[j][0])
            kth_ratio.append(found[min(k, found.size) - 1] / truth[j][min(k, truth[j].size) - 1])
            used.append(int(parts["candidates"][0]))
            unsettled += len(parts["unsettled"])
        n = len(val)
        p50 = float(np.median(lat))
        single_p50.setdefault((stages, c), p50)
        table.append(
            f"| {stages} | {f'{pool or qp.POOL} / {np.mean(pooled):.0f} / {max(pooled)}' if stages == 2 else '-'} | "
            f"{c} | {g * c} | {100 * c / rows:.2f} | {nprobe or pre.meta.get('nprobe') or '-'} | "
            f"{np.mean(rec):.3f} / {np.median(rec):.3f} / {np.min(rec):.3f} | "
            f"{np.mean(used):.0f} / {np.median(used):.0f} / {max(used)} | {unsettled} | "
            f"{min(first_ratio):.3f}, {min(kth_ratio):.3f} | "
            f"{1000 * p50:.0f} | {1000 * np.percentile(lat, 95):.0f} | "
            f"{1000 * (parts['sketch'] + parts['search']) / n:.0f} | {1000 * parts['rerank'] / n:.0f} | "
            f"{1000 * parts['read'] / n:.0f} | {1000 * parts['score'] / n:.0f} | "
            f"{1000 * parts['read_wait'] / n:.0f} | {t_exact / n / p50:.0f}x | "
            f"{f'{t_single / p50:.0f}x' if t_single else '-'} |"
        )
        print(table[-1], flush=True)
    if t_exact is not None:
        lines += [
            f"Exact full scan: {t_exact:.1f} s for {len(val)} validation samples scored together "
            f"({1000 * t_exact / len(val):.0f} ms per sample, amortised)"
            + (f"; {t_single:.1f} s for one validation sample alone." if t_single else "."),
            "",
        ] + table
    if a.sketch_exact_search and t_exact is not None:
        t0 = time.perf_counter()
        found = sketch_exact_search(store, val, max(int(x) for x in a.candidates.split(",")))
        lines += [
            "",
            f"The sketch column searched exactly (every row's sketch inner product; {time.perf_counter() - t0:.0f} s):",
            "",
            f"| candidates | Recall@{k} mean / median / min |",
            "|---|---|",
        ]
        for c in (int(x) for x in a.candidates.split(",")):
            rec = [len(set(found[j, :c].tolist()) & set(exact_rows[j].tolist())) / k for j in range(len(val))]
            lines.append(f"| {c} | {np.mean(rec):.3f} / {np.median(rec):.3f} / {np.min(rec):.3f} |")
            print(lines[-1], flush=True)
    if a.batches:
        c, growth = int(a.candidates.split(",")[0]), int(a.growth.split(",")[0])
        batch_table = [
            "",
            f"Batch queries ({c} candidates per validation sample; one query of B samples: one FAISS search, the "
            "union of the candidates read once in row order, each sample reranked on its own candidates):",
            "",
            "| batch B | total s | per query ms | distinct rows read | rows read per query | take s | score s | "
            "per query vs B=1 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        per_one = None
        for b in [int(x) for x in a.batches.split(",")]:
            if b > len(all_val):
                print(f"batch {b}: only {len(all_val)} validation samples; skipped", flush=True)
                continue
            parts = {"sketch": 0.0, "search": 0.0, "read": 0.0, "score": 0.0, "read_wait": 0.0}
            reps = max(1, min(20, 20 // b))  # small batches: the median of a few different batches
            times = []
            for r in range(reps):
                sub = all_val.subset(list(range(r * b, (r + 1) * b)) if (r + 1) * b <= len(all_val) else range(b))
                t0 = time.perf_counter()
                prefilter_topk(store, sub, cfg, dev, candidates=c, index=pre, timings=parts, max_candidates=growth * c)
                times.append(time.perf_counter() - t0)
            total = float(np.median(times))
            per_one = per_one or total / b
            batch_table.append(
                f"| {b} | {total:.2f} | {1000 * total / b:.1f} | {parts['rows_read'] // reps} | "
                f"{parts['rows_read'] / reps / b:.0f} | {parts['read'] / reps:.2f} | {parts['score'] / reps:.2f} | "
                f"{total / b / per_one:.2f}x |"
            )
            print(batch_table[-1], flush=True)
        lines += batch_table
    emit("\n".join(lines) + "\n", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
