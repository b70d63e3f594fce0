"""FAISS index kinds over one store's sketch column: candidate recall, search latency, build time, bytes.

    python -m tools.bench_prefilter --store S --n-val 100 --exact-cache X --exact-only   # the exact top-k, once
    python -m tools.bench_index_kinds --store S --exact-cache X --candidates 1000,2000 --kinds ivf,ivf-l2aug,sq8

The prefilter's rerank is exact, so its Recall@k is the share of the exact top-k among the index's
candidates: this compares index kinds on that share without reading any hidden state. Every index is
built from the same pass over the sketch column (blocks of rows; the column is read once for all
kinds) and searched one validation sample at a time (the ad hoc query), on the machine's threads.

Kinds: ``flat`` (exact inner product of the float32 sketches: the sketch's own recall, the ceiling),
``sq8`` (a brute-force scan of 8-bit codes), ``ivf`` (``IVF<nlist>,SQ8``, inner-product lists: the
product's ``auto`` above 100,000 rows), ``ivf-l2aug`` (the maximum-inner-product search reduced to a
nearest-neighbour search: each row gets one more coordinate ``sqrt(M^2 - |x|^2)``, queries a 0, and
the lists are L2 lists), and
``pqfs`` (a brute-force scan of 4-bit product codes, ``PQ<D/4>x4fs``, re-ranked by 8-bit codes of
``--refine`` times the candidates; ``pqfs<M>``: ``M`` sub-quantizers, ``pqfs<M>r<F>``: re-rank ``F`` times;
``opqfs...``: the same after an OPQ rotation). The first row is the sketch's own ceiling: every row's
sketch inner product, streamed from the column (``tools.bench_prefilter.sketch_exact_search``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from forvalue.storage import faiss_index
from forvalue.storage.store import Store
from tools.bench_prefilter import load_val, sketch_exact_search
from tools.common import emit

KINDS = ("flat", "sq8", "ivf", "ivf-l2aug", "pqfs", "pqfs<M>", "pqfs<M>r<F>", "opqfs<M>r<F>")


class Kind:
    """One index under test: how its rows and queries are shaped, and how it is made."""

    def __init__(self, name: str, dim: int, nlist: int, nprobe: int, refine: int):
        import faiss

        self.name, self.dim, self.nprobe, self.refine = name, dim, nprobe, refine
        self.aug_max = None
        ip = faiss.METRIC_INNER_PRODUCT
        if name == "flat":
            self.index = faiss.IndexFlatIP(dim)
        elif name == "sq8":
            self.index = faiss.index_factory(dim, "SQ8", ip)
        elif name == "ivf":  # (FAISS trains inner-product lists on the unit sphere already: cp.spherical)
            self.index = faiss.index_factory(dim, f"IVF{nlist},SQ8", ip)
        elif name == "ivf-l2aug":
            self.index = faiss.index_factory(dim + 1, f"IVF{nlist},SQ8", faiss.METRIC_L2)
        elif name.startswith(("pqfs", "opqfs")):  # [o]pqfs[M][rF]
            m, _, f = name.split("pqfs", 1)[1].partition("r")
            self.refine, m = (int(f) if f else refine), int(m or dim // 4)
            rotate = f"OPQ{m}," if name.startswith("o") else ""
            self.index = faiss.index_factory(dim, f"{rotate}PQ{m}x4fs,Refine(SQ8)", ip)
        else:
            raise SystemExit(f"unknown kind {name!r}; one of {', '.join(KINDS)}")
        self.train_s = self.add_s = 0.0

    def rows(self, x: np.ndarray) -> np.ndarray:
        if self.aug_max is None:
            return x
        extra = np.sqrt(np.maximum(self.aug_max**2 - np.einsum("ij,ij->i", x, x), 0.0)).astype(np.float32)
        return np.ascontiguousarray(np.concatenate([x, extra[:, None]], 1))

    def queries(self, q: np.ndarray) -> np.ndarray:
        if self.aug_max is None:
            return q
        return np.ascontiguousarray(np.concatenate([q, np.zeros((len(q), 1), np.float32)], 1))

    def train(self, sample: np.ndarray) -> None:
        t0 = time.perf_counter()
        if self.name == "ivf-l2aug":  # rows above the sample's largest norm get 0 (still exact after the rerank)
            self.aug_max = float(np.sqrt(np.einsum("ij,ij->i", sample, sample).max())) * 1.05
        if not self.index.is_trained:
            self.index.train(self.rows(sample))
        self.train_s = time.perf_counter() - t0

    def add(self, block: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.index.add(self.rows(block))
        self.add_s += time.perf_counter() - t0

    def search(self, q: np.ndarray, c: int) -> np.ndarray:
        import faiss

        params = None
        if self.name.startswith("ivf"):
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        elif "pqfs" in self.name:
            params = faiss.IndexRefineSearchParameters(k_factor=float(self.refine))
        return self.index.search(self.queries(q), c, params=params)[1]

    def nbytes(self) -> int:
        import faiss

        return int(faiss.serialize_index(self.index).size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_index_kinds", description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--exact-cache", type=Path, required=True, help="the .npz of tools.bench_prefilter --exact-only")
    p.add_argument("--validation", type=Path, default=None, help="validation .npz (default STORE/validation.npz)")
    p.add_argument("--kinds", default="flat,sq8,ivf,ivf-l2aug,pqfs", help=f"comma list of {KINDS}")
    p.add_argument("--candidates", default="1000,2000")
    p.add_argument("--nlist", type=int, default=0, help="inverted lists (0: the product's choice for the rows)")
    p.add_argument("--nprobe", default="", help="comma list (default: the product's nlist/16)")
    p.add_argument("--refine", type=int, default=4, help="pqfs: 8-bit re-rank of this many times the candidates")
    p.add_argument("--train-rows", type=int, default=65536)
    p.add_argument("--block-rows", type=int, default=65536)
    p.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait, after building, for --exact-cache to appear"
    )
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    from forvalue.engine.prefilter import validation_sketches
    from forvalue.indexer.sketch import SketchSpec
    from forvalue.storage.sketch_basis import load_basis, load_heavy_ids

    store = Store.open(a.store)
    rows, dim = store.count(), int(store.manifest.sketch_dim)
    nlist = a.nlist or faiss_index.ivf_lists(rows)
    nprobes = [int(x) for x in a.nprobe.split(",") if x] or [max(1, nlist // 16)]
    kinds = [Kind(n, dim, nlist, nprobes[0], a.refine) for n in a.kinds.split(",")]

    sample = faiss_index.training_sketches(store, min(rows, a.train_rows), a.block_rows)
    for kind in kinds:
        kind.train(sample)
        print(f"{kind.name}: trained in {kind.train_s:.1f}s", flush=True)
    del sample
    t0 = time.perf_counter()
    for block in faiss_index._sketch_blocks(store, 0, a.block_rows):
        for kind in kinds:
            kind.add(block)
    print(f"column read and added in {time.perf_counter() - t0:.0f}s", flush=True)
    waited = time.perf_counter()
    while not a.exact_cache.exists() and time.perf_counter() - waited < a.wait:  # an exact scan still running
        time.sleep(10)
    ex = np.load(a.exact_cache)
    exact_rows, k = ex["rows"], int(ex["key"][2])
    if int(ex["key"][0]) != rows:
        raise SystemExit(f"{a.exact_cache}: made for {int(ex['key'][0])} rows, the store has {rows}")
    val, _ = load_val(a.validation or a.store / "validation.npz")
    val = val.subset(list(range(len(exact_rows))))
    q = validation_sketches(
        val, SketchSpec.from_manifest(store.manifest), "none", load_basis(store.path), load_heavy_ids(store.path)
    )
    q = np.ascontiguousarray(q, np.float32)

    cands = [int(x) for x in a.candidates.split(",")]
    lines = [
        f"Store `{a.store}`: {rows} rows, sketch D = {dim} ({store.manifest.sketch_vocab_buckets} x "
        f"{store.manifest.sketch_hidden_cols}); {len(q)} validation samples, exact top-{k}; nlist {nlist}.",
        "",
        f"| index | nprobe | candidates | Recall@{k} mean / median / min | search p50 ms | p95 ms | train s | add s | "
        "MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    t0 = time.perf_counter()
    found = sketch_exact_search(store, val, max(cands))
    ceiling_s = time.perf_counter() - t0
    for c in cands:
        rec = [len(set(found[j, :c].tolist()) & set(exact_rows[j].tolist())) / k for j in range(len(q))]
        lines.append(
            f"| sketch, exact search (streamed, {ceiling_s:.0f} s for all) | - | {c} | {np.mean(rec):.3f} / "
            f"{np.median(rec):.3f} / {np.min(rec):.3f} | - | - | - | - | - |"
        )
        print(lines[-1], flush=True)
    for kind in kinds:
        mb = kind.nbytes() / 1e6
        for nprobe in nprobes if kind.name.startswith("ivf") else [None]:
            if nprobe:
                kind.nprobe = nprobe
            for c in cands:
                lat, rec = [], []
                for j in range(len(q)):
                    t0 = time.perf_counter()
                    found = kind.search(q[j : j + 1], c)[0]
                    lat.append(time.perf_counter() - t0)
                    rec.append(len(set(found.tolist()) & set(exact_rows[j].tolist())) / k)
                lines.append(
                    f"| {kind.name} | {nprobe or '-'} | {c} | {np.mean(rec):.3f} / {np.median(rec):.3f} / "
                    f"{np.min(rec):.3f} | {1000 * np.median(lat):.0f} | {1000 * np.percentile(lat, 95):.0f} | "
                    f"{kind.train_s:.1f} | {kind.add_s:.1f} | {mb:.0f} |"
                )
                print(lines[-1], flush=True)
    emit("\n".join(lines) + "\n", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
