"""Which prefilter lever finds the exact top-k: sketch shapes, candidate counts, a second-stage rerank, adaptive stop.

    python -m tools.bench sketch_levers --out DIR -- --store runs/s100k --specs 512x4,128x16 --n-val 100

One pass over a synthetic store (``tools/make_synthetic_store.py``, its ``validation.npz``) scores
every row exactly against every validation sample (the ground truth) and, for every sketch shape
``RxC`` (vocabulary buckets x hidden columns, fitted basis, one block), the sketch inner product
``<z(G_v), z(G_i)>`` of every row: what a ``Flat`` FAISS index returns, so the figures are the
sketch's own recall, free of IVF loss. Nothing is written to the store. Per shape and candidate
count ``C``: Recall@k of the top-``C`` by sketch against the exact top-k (mean, median, min over
the validation samples) and the ``C`` each validation sample needs for a recall of 0.8 / 0.95.

Two more levers are simulated on the same scores:

* **two stages**: the top ``C1`` by the first shape, reranked by a second (larger) shape, keep
  ``C2``, then exact: recall after stage 2, and the bytes per query stage 2 would read
  (``C1 x D2`` float16);
* **adaptive stop** (a heuristic, not a bound): candidates in sketch order are scored exactly in
  rounds (``--adaptive-start``, doubling); a linear fit of exact on sketch score over the scored
  rows gives a residual scale ``sigma``; stop when the next unscored row's predicted score
  ``+ z * sigma`` falls below the k-th exact score found. Reports recall and the candidates used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from forvalue.engine.ranking import TopK
from forvalue.engine.scan import scan_blocks
from forvalue.engine.scorer import BlockedScorer
from forvalue.indexer.build import BASIS_FIT_TOKENS
from forvalue.indexer.sketch import Sketcher, SketchSpec, fit_basis
from forvalue.storage.store import Store
from tools.bench_prefilter import load_val
from tools.common import emit


def parse_spec(text: str, vocab: int, d: int) -> SketchSpec:
    """``RxC`` (one count-sketch block) or ``RxCxT`` (``T`` independent blocks, D = T R C)."""
    r, c, *t = (int(x) for x in text.split("x"))
    return SketchSpec(r * c * (t[0] if t else 1), r, c, 0, vocab, d, "fitted")


def fit_hidden(store: Store, tokens: int) -> np.ndarray:
    parts, n = [], 0
    for _first, _batch, block in scan_blocks(store, 2048):
        parts.append(block.hidden)
        n += block.hidden.shape[0]
        if n >= tokens:
            break
    return np.concatenate(parts)[:tokens]


def recall_at(order_rank: np.ndarray, k: int, c: int) -> float:
    """Share of the exact top-k whose sketch rank (0-based) is below ``c``."""
    return float((order_rank < c).sum()) / k


def adaptive(sk: np.ndarray, ex: np.ndarray, k: int, start: int, z: float, cmax: int) -> tuple[set, int]:
    """Heuristic adaptive candidate count for one validation sample (sketch scores ``sk``, exact ``ex``)."""
    order = np.argsort(-sk, kind="stable")[:cmax]
    c = start
    while True:
        scored = order[:c]
        x, y = sk[scored], ex[scored]
        b, a = np.polyfit(x, y, 1)
        sigma = float(np.std(y - (a + b * x)))
        kth = float(np.partition(y, -k)[-k])
        if c >= cmax or a + b * sk[order[c]] + z * sigma < kth:
            break
        c = min(cmax, 2 * c)
    top = scored[np.argsort(-ex[scored], kind="stable")[:k]]
    return set(top.tolist()), c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_sketch_levers", description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument(
        "--specs", default="512x4,256x8,128x16,512x8,256x16", help="comma list of RxC or RxCxT (T count-sketch blocks)"
    )
    p.add_argument("--candidates", default="500,1000,2000,5000")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--two-stage", default="", help="comma list of SPEC1:SPEC2:C1:C2 (stage-2 rerank)")
    p.add_argument("--adaptive", default="", help="comma list of SPEC:Z (heuristic adaptive stop)")
    p.add_argument("--adaptive-start", type=int, default=500)
    p.add_argument("--adaptive-max", type=int, default=20000)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    import torch

    store = Store.open(a.store)
    man = store.manifest
    n_rows = store.count()
    val, _topics = load_val(a.store / "validation.npz")
    val = val.subset(list(range(min(a.n_val, len(val)))))
    n_val, k = len(val), a.top_k
    specs = {s: parse_spec(s, man.vocab_size, man.hidden_size) for s in a.specs.split(",")}
    for item in a.two_stage.split(",") if a.two_stage else []:
        for s in item.split(":")[:2]:
            specs.setdefault(s, parse_spec(s, man.vocab_size, man.hidden_size))

    t0 = time.perf_counter()
    fit = fit_hidden(store, BASIS_FIT_TOKENS)
    sketchers, zval = {}, {}
    for name, spec in specs.items():
        sketchers[name] = Sketcher(spec, basis=fit_basis(fit, spec.hidden_cols))
        zval[name] = torch.from_numpy(sketchers[name].sketch(val.hidden, val.ids, val.values, val.lengths))
    del fit
    exact = np.empty((n_rows, n_val), np.float32)
    approx = {name: np.empty((n_rows, n_val), np.float32) for name in specs}
    scorer = BlockedScorer(val, torch.device("cpu"))
    t_exact = t_sketch = 0.0
    for first, _batch, block in scan_blocks(store, 2048):
        n = block.lengths.size
        t1 = time.perf_counter()
        exact[first : first + n] = scorer.score(block)
        t2 = time.perf_counter()
        for name, sk in sketchers.items():
            z = torch.from_numpy(sk.sketch(block.hidden, block.ids, block.values, block.lengths))
            approx[name][first : first + n] = (z @ zval[name].T).numpy()
        t_exact += t2 - t1
        t_sketch += time.perf_counter() - t2
    top = TopK(k, n_val)
    top.update(exact, 0)
    true_rows = top.result()[1]
    lines = [
        f"Store `{a.store}`: {n_rows} rows, d={man.hidden_size}, top_m={man.top_m}, vocab {man.vocab_size}; "
        f"{n_val} validation samples, top-{k}; pass {time.perf_counter() - t0:.0f}s "
        f"(exact scoring {t_exact:.0f}s, sketching {t_sketch:.0f}s for {len(specs)} shapes). "
        "Sketch recall = Flat index (no IVF loss).",
        "",
        "| sketch RxC | D | "
        + " | ".join(f"R@{k} C={c} mean / median / min" for c in a.candidates.split(","))
        + " | C for 0.8 median / max | C for 0.95 median / max |",
        "|---|---|" + "---|" * (len(a.candidates.split(",")) + 2),
    ]
    ranks = {}
    for name, spec in specs.items():
        # rank (0-based) of each exact top-k row in the sketch order, per validation sample
        rk = np.empty((n_val, k), np.int64)
        for j in range(n_val):
            s = approx[name][:, j]
            sv = s[true_rows[j]]
            rk[j] = (s[None, :] > sv[:, None]).sum(1) if n_rows <= 200_000 else np.searchsorted(-np.sort(s), -sv)
        ranks[name] = rk
        cells = []
        for c in (int(x) for x in a.candidates.split(",")):
            rec = np.array([recall_at(rk[j], k, c) for j in range(n_val)])
            cells.append(f"{rec.mean():.3f} / {np.median(rec):.3f} / {rec.min():.3f}")
        need = {q: np.sort(rk, axis=1)[:, int(np.ceil(q * k)) - 1] + 1 for q in (0.8, 0.95)}
        lines.append(
            f"| {name} | {spec.dim} | "
            + " | ".join(cells)
            + f" | {int(np.median(need[0.8]))} / {int(need[0.8].max())} | "
            + f"{int(np.median(need[0.95]))} / {int(need[0.95].max())} |"
        )
        print(lines[-1], flush=True)
    if a.two_stage:
        lines += [
            "",
            "| stage 1 | stage 2 | C1 | C2 | R@k mean / median / min | stage-2 bytes per query (float16) |",
            "|---|---|---|---|---|---|",
        ]
        for item in a.two_stage.split(","):
            s1, s2, c1, c2 = item.split(":")
            c1, c2 = int(c1), int(c2)
            rec = []
            for j in range(n_val):
                first_stage = np.argpartition(-approx[s1][:, j], c1)[:c1]
                keep = first_stage[np.argsort(-approx[s2][first_stage, j], kind="stable")[:c2]]
                rec.append(len(set(keep.tolist()) & set(true_rows[j].tolist())) / k)
            rec = np.array(rec)
            lines.append(
                f"| {s1} | {s2} | {c1} | {c2} | {rec.mean():.3f} / {np.median(rec):.3f} / {rec.min():.3f} | "
                f"{c1 * specs[s2].dim * 2 / 1e6:.1f} MB |"
            )
            print(lines[-1], flush=True)
    if a.adaptive:
        lines += [
            "",
            f"Adaptive stop (heuristic): start {a.adaptive_start}, doubling, at most {a.adaptive_max} candidates.",
            "",
            "| sketch | z | R@k mean / median / min | candidates mean / median / max |",
            "|---|---|---|---|",
        ]
        for item in a.adaptive.split(","):
            name, z = item.split(":")
            rec, used = [], []
            for j in range(n_val):
                got, c = adaptive(approx[name][:, j], exact[:, j], k, a.adaptive_start, float(z), a.adaptive_max)
                rec.append(len(got & set(true_rows[j].tolist())) / k)
                used.append(c)
            rec, used = np.array(rec), np.array(used)
            lines.append(
                f"| {name} | {z} | {rec.mean():.3f} / {np.median(rec):.3f} / {rec.min():.3f} | "
                f"{used.mean():.0f} / {int(np.median(used))} / {used.max()} |"
            )
            print(lines[-1], flush=True)
    emit("\n".join(lines) + "\n", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
