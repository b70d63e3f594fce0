"""Which prefilter lever finds the exact top-k: sketch shapes, candidate counts, a second-stage rerank, adaptive stop.

    python -m tools.bench sketch_levers --out DIR -- --store runs/s100k --specs 512x4,128x16 --n-val 100

One pass over a synthetic store (``tools/make_synthetic_store.py``, its ``validation.npz``) scores
every row exactly against every validation sample (the ground truth) and, for every sketch shape
``RxC`` (vocabulary buckets x hidden columns, fitted basis, one block; ``RxChH``: H buckets for the H
heaviest vocabulary ids; ``vocabxC``: no count-sketch, see :func:`parse_spec`), the sketch inner product
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
import torch

from forvalue.engine.prefilter import needs_more
from forvalue.engine.ranking import TopK
from forvalue.engine.scan import scan_blocks
from forvalue.engine.scorer import BlockedScorer
from forvalue.indexer.build import BASIS_FIT_TOKENS
from forvalue.indexer.sketch import Sketcher, SketchSpec
from forvalue.storage.sketch_basis import fit_basis
from forvalue.storage.store import Store
from tools.bench_prefilter import load_val
from tools.common import emit


def parse_spec(text: str, vocab: int, d: int) -> SketchSpec:
    """``RxC`` (one count-sketch block) or ``RxCxT`` (``T`` independent blocks, D = T R C); ``RxChH``: ``H`` of
    the ``R`` buckets kept for the ``H`` vocabulary ids of most error mass (see :func:`heavy_sketcher`);
    ``vocabxC``: no count-sketch at all (every vocabulary id its own bucket: the collision-free limit, scored
    sparse, D = |V| C)."""
    shape, _, heavy = text.partition("h")
    r, c, *t = shape.split("x")
    r = vocab if r == "vocab" else int(r)
    c = int(c)
    return SketchSpec(r * c * (int(t[0]) if t else 1), r, c, 0, vocab, d, "fitted")


def fit_tokens(store: Store, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hidden states, error ids and values of the first ``tokens`` stored tokens (what a build fits on)."""
    parts, n = [], 0
    for _first, _batch, block in scan_blocks(store, 2048):
        parts.append((block.hidden, block.ids, block.values))
        n += block.hidden.shape[0]
        if n >= tokens:
            break
    return tuple(np.concatenate(x)[:tokens] for x in zip(*parts))


def fit_hidden(store: Store, tokens: int) -> np.ndarray:
    return fit_tokens(store, tokens)[0]


def heavy_sketcher(spec: SketchSpec, basis: np.ndarray, fit: tuple, heavy: int) -> Sketcher:
    """A one-block sketch whose first ``heavy`` buckets each hold one of the ``heavy`` vocabulary ids with the most
    error mass along the basis' first direction on the fitted tokens (``sum |value * <h, U_0>|``), sign +1; every
    other id is count-sketched into the other ``R - heavy`` buckets. (A bench lever, not a product sketch.)"""
    if spec.blocks != 1 or not 0 < heavy < spec.vocab_buckets:
        raise SystemExit(f"h{heavy}: needs one block and fewer heavy ids than the {spec.vocab_buckets} buckets")
    hidden, ids, values = fit
    mass = np.bincount(ids.ravel(), weights=np.abs(values * (hidden @ basis[:, :1])).ravel(), minlength=spec.vocab_size)
    top = np.argsort(-mass, kind="stable")[:heavy]
    rng = np.random.default_rng([spec.seed, 3])
    bucket = rng.integers(heavy, spec.vocab_buckets, size=spec.vocab_size)
    sign = rng.integers(0, 2, size=spec.vocab_size).astype(np.float32) * 2 - 1
    bucket[top], sign[top] = np.arange(heavy), 1.0
    sk = Sketcher(spec, basis=basis)
    table = np.zeros((spec.vocab_size, spec.vocab_buckets), np.float32)
    table[np.arange(spec.vocab_size), bucket] = sign
    sk.table = torch.from_numpy(table)
    return sk


class VocabExact:
    """``<G_v U, G_i U>`` with every vocabulary id its own bucket (no count-sketch): scored sparse, per stored row."""

    def __init__(self, spec: SketchSpec, basis: np.ndarray, val) -> None:
        self.basis, self.vocab = basis, spec.vocab_size
        self.val = self._rows(val.hidden, val.ids, val.values, val.lengths).to_dense().T.contiguous()

    def _rows(self, hidden, ids, values, lengths):
        proj = hidden @ self.basis  # (tokens, C)
        row = np.repeat(np.repeat(np.arange(lengths.size), lengths), ids.shape[1])
        cols, vals = [], []
        for j in range(proj.shape[1]):
            cols.append(ids.ravel().astype(np.int64) + j * self.vocab)
            vals.append((values * proj[:, j : j + 1]).ravel())
        index = torch.from_numpy(np.stack([np.tile(row, proj.shape[1]), np.concatenate(cols)]))
        shape = (lengths.size, self.vocab * proj.shape[1])
        return torch.sparse_coo_tensor(
            index, torch.from_numpy(np.concatenate(vals).astype(np.float32)), shape, check_invariants=False
        )

    def scores(self, block) -> np.ndarray:
        return torch.sparse.mm(self._rows(block.hidden, block.ids, block.values, block.lengths), self.val).numpy()


def recall_at(order_rank: np.ndarray, k: int, c: int) -> float:
    """Share of the exact top-k whose sketch rank (0-based) is below ``c``."""
    return float((order_rank < c).sum()) / k


def adaptive(sk: np.ndarray, ex: np.ndarray, k: int, start: int, z: str, cmax: int) -> tuple[set, int]:
    """Adaptive candidate count for one validation sample (sketch scores ``sk``, exact ``ex``): ``z = "tail"`` is
    the product's rule (:func:`forvalue.engine.prefilter.needs_more`), a number the linear-fit rule."""
    order = np.argsort(-sk, kind="stable")[:cmax]
    c = start
    while True:
        scored = order[:c]
        x, y = sk[scored], ex[scored]
        if c >= cmax:
            break
        if z == "tail":
            stop = not needs_more(y, y, k)
        else:
            b, a = np.polyfit(x, y, 1)
            sigma = float(np.std(y - (a + b * x)))
            kth = float(np.partition(y, -k)[-k])
            stop = a + b * sk[order[c]] + float(z) * sigma < kth
        if stop:
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
    p.add_argument(
        "--adaptive",
        default="",
        help="comma list of SPEC:Z (linear-fit stop, Z residual deviations) or SPEC:tail (the product's rule)",
    )
    p.add_argument("--adaptive-start", type=int, default=500)
    p.add_argument("--adaptive-max", type=int, default=20000)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

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
    fit = fit_tokens(store, BASIS_FIT_TOKENS)
    sketchers, zval, sparse = {}, {}, {}
    for name, spec in specs.items():
        basis = fit_basis(fit[0], spec.hidden_cols)
        if name.startswith("vocab"):
            sparse[name] = VocabExact(spec, basis, val)
            continue
        heavy = int(name.partition("h")[2] or 0)
        sketchers[name] = heavy_sketcher(spec, basis, fit, heavy) if heavy else Sketcher(spec, basis=basis)
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
        for name, exact_vocab in sparse.items():
            approx[name][first : first + n] = exact_vocab.scores(block)
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
            # rows scoring above each true top-k row (the sorted search's array must be increasing)
            rk[j] = (
                (s[None, :] > sv[:, None]).sum(1)
                if n_rows <= 200_000
                else n_rows - np.searchsorted(np.sort(s), sv, "right")
            )
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
                got, c = adaptive(approx[name][:, j], exact[:, j], k, a.adaptive_start, z, a.adaptive_max)
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
