"""Prefilter sketches on a real store: candidate recall and the metrics of the prefiltered ranking.

    python -m tools.bench sketch_real --out DIR [-- --workdir runs/sketch_real]   # workdir default DIR/sketch_real.work
    python -m tools.bench_sketch_real --workdir runs/sketch_real --out runs/sketch_real.md   # on its own

Builds (once, through the product's ``build_index``) a store of the three generated benchmark
tasks (``forvalue.tasks.text``; default 10 classes x 30 train + 2 validation per class and task,
900 training samples, 30 classes) with the default SmolLM2, encodes the validation samples
and scores them exactly (``forvalue.engine.scan.score_all``). Then, for each sketch variant
(``basis:R:c``; the hidden basis fitted from the store's first hidden states with
``forvalue.storage.sketch_basis.fit_basis``, as a build does), with the product's ``Sketcher``:

* ``corr``: Pearson correlation of sketch and exact scores (mean over validation samples);
* ``R@k``: share of the exact top-k among the top-C rows by sketch score (C = a fraction of
  the store), i.e. the recall of prefilter + exact rerank;
* ``dAUC`` / ``drecall``: the paper's retrieval metrics (same-class AUC and recall at class
  size) of the *prefiltered ranking* (the C candidates by exact score, then every other row by
  sketch score) minus those of the exact ranking.

Finally the store is re-sketched with the product defaults (``forvalue.maintenance.sketch_store``)
and the product's own path (``run_query(candidates=C)``, FAISS + rerank) is compared with
``run_query(exact=True)`` (Recall@k), so the numbers cover the shipped code end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

from tools.common import emit

TASKS = ["sentence_transformations", "math_no_reasoning", "math_with_reasoning"]


def make_data(workdir: Path, n_classes: int, n_train: int, n_test: int) -> None:
    from forvalue.tasks.text import generate_task, write_jsonl

    train, test = [], []
    for task in TASKS:
        tr, te = generate_task(task, n_train=n_train, n_test=n_test, seed=0, n_classes=n_classes)
        for row in tr + te:
            row["label"] = f"{task}/{row['label']}"
        train += tr
        test += te
    write_jsonl(train, workdir / "train.jsonl")
    write_jsonl(test, workdir / "val.jsonl")


@contextlib.contextmanager
def _second_stage(on: bool):
    """The prefilter with its index's second stage (the product's path) or, for the comparison, without it (the
    path of an index written before the stage existed)."""
    import forvalue.engine.prefilter as qp

    real = qp.second_stage_of
    if not on:
        qp.second_stage_of = lambda index: None
    try:
        yield
    finally:
        qp.second_stage_of = real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_sketch_real", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--n-classes", type=int, default=10)
    ap.add_argument("--n-train", type=int, default=30)
    ap.add_argument("--n-test", type=int, default=2)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["gaussian:256:4", "fitted:256:4", "fitted:512:4", "fitted:1024:2", "fitted:2048:1", "fitted:1024:4"],
    )
    ap.add_argument("--fractions", default="0.02,0.05,0.1,0.2")
    ap.add_argument("--top-k", default="10,30")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from forvalue.api import build_index, run_query
    from forvalue.engine.scan import score_all
    from forvalue.engine.scorer import decode_block
    from forvalue.engine.validation import encode_validation, load_validation_samples
    from forvalue.indexer.build import BASIS_FIT_TOKENS
    from forvalue.indexer.sketch import Sketcher, SketchSpec
    from forvalue.maintenance import _first_tokens, sketch_store
    from forvalue.metrics import class_retrieval
    from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
    from forvalue.schemas.tables import SCORING_COLUMNS
    from forvalue.session import load_store_runner
    from forvalue.storage.sketch_basis import fit_basis
    from forvalue.storage.store import Store

    a.workdir.mkdir(parents=True, exist_ok=True)
    store_path = a.workdir / "store"
    if not (a.workdir / "train.jsonl").exists():
        make_data(a.workdir, a.n_classes, a.n_train, a.n_test)
    t0 = time.perf_counter()
    build_index([a.workdir / "train.jsonl"], store_path, BuildConfig(model=ModelConfig(device="cpu")))
    build_s = time.perf_counter() - t0
    store = Store.open(store_path)
    runner = load_store_runner(store)
    samples = load_validation_samples([a.workdir / "val.jsonl"], DataConfig())
    val = encode_validation(runner, samples, store.manifest, DataConfig())
    vlab = [s.label for s in samples]
    cfg = QueryConfig(top_k=10, progress=False)
    parts, labels = [], []
    for batch in store.scan(SCORING_COLUMNS + ["label"], batch_size=1024):
        parts.append(decode_block(batch, store.manifest.hidden_size))
        labels += batch.column("label").to_pylist()
    exact = np.concatenate([s for _, _, _, s in score_all(store, val, cfg, torch.device("cpu"))]).T  # (n_val, N)
    n_val, n = exact.shape
    hidden = np.concatenate([p.hidden for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    values = np.concatenate([p.values for p in parts])
    lengths = np.concatenate([p.lengths for p in parts])
    ref = class_retrieval(exact, labels, vlab)
    basis_all = fit_basis(
        _first_tokens(store, BASIS_FIT_TOKENS, 1024)[0], max(int(v.split(":")[2]) for v in a.variants)
    )
    fractions = [float(x) for x in a.fractions.split(",")]
    ks = [int(x) for x in a.top_k.split(",")]
    exact_top = {k: np.argsort(-exact, axis=1, kind="stable")[:, :k] for k in ks}

    lines = [
        f"Store: {n} training samples ({len(TASKS)} tasks x {a.n_classes} classes x {a.n_train}), "
        f"{int(lengths.sum())} scored tokens, d={store.manifest.hidden_size}; {n_val} validation samples; "
        f"exact ranking AUC {ref['auc_mean']:.4f}, recall {ref['recall_mean']:.4f}. Build {build_s:.0f} s (0 when "
        "reused).",
        "",
        "| basis | R | c | D | corr | "
        + " | ".join(
            f"C={f:.0%} ({max(1, int(f * n))}): " + " / ".join(f"R@{k}" for k in ks) + " / dAUC / drecall"
            for f in fractions
        )
        + " |",
        "|---|---|---|---|---|" + "---|" * len(fractions),
    ]
    for variant in a.variants:
        basis_kind, r, c = variant.split(":")
        r, c = int(r), int(c)
        spec = SketchSpec(r * c, r, c, 0, store.manifest.vocab_size, store.manifest.hidden_size, basis_kind)
        sk = Sketcher(spec, basis=basis_all[:, :c] if basis_kind == "fitted" else None)
        approx = (
            sk.sketch(val.hidden, val.ids, val.values, val.lengths).astype(np.float64)
            @ sk.sketch(hidden, ids, values, lengths).astype(np.float64).T
        )
        corr = np.mean([np.corrcoef(approx[j], exact[j])[0, 1] for j in range(n_val)])
        cells = []
        for f in fractions:
            c_rows = max(1, int(f * n))
            cand = np.argsort(-approx, axis=1, kind="stable")[:, :c_rows]
            rec = [np.mean([len(set(cand[j]) & set(exact_top[k][j])) / k for j in range(n_val)]) for k in ks]
            # prefiltered ranking: candidates by exact score above every other row (those by sketch score)
            span = np.ptp(approx, axis=1, keepdims=True) + 1e-12
            ranked = exact.min(axis=1, keepdims=True) - 1.0 - (approx.max(axis=1, keepdims=True) - approx) / span
            rows = np.arange(n_val)[:, None]
            ranked[rows, cand] = exact[rows, cand]
            m = class_retrieval(ranked, labels, vlab)
            cells.append(
                " / ".join(f"{x:.3f}" for x in rec)
                + f" / {m['auc_mean'] - ref['auc_mean']:+.4f} / {m['recall_mean'] - ref['recall_mean']:+.4f}"
            )
        lines.append(f"| {basis_kind} | {r} | {c} | {r * c} | {corr:.3f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)

    # the shipped path: store re-sketched with the defaults, FAISS + exact rerank through run_query
    d = EncodeConfig()
    report = sketch_store(
        store_path,
        rebuild=True,
        dim=d.sketch_dim,
        vocab_buckets=d.sketch_vocab_buckets,
        hidden_cols=d.sketch_hidden_cols,
        basis=d.sketch_basis,
    )
    lines += [
        "",
        f"Product path (`index sketch --rebuild` defaults: D={report.sketch_dim}, R={report.vocab_buckets}, "
        f"c={report.hidden_cols}, {report.sketch_basis} basis, FAISS {report.faiss}): "
        "`run_query(candidates=max(C, k), max_candidates=max(C, k))` (a fixed count) against "
        "`run_query(exact=True)`: Recall@k mean / min, through the index's second stage (its pool holds every row "
        "of a store this small) and through the sketch's order alone (an index without the stage).",
        "",
        "| C | % of store | " + " | ".join(f"Recall@{k} second stage | Recall@{k} sketch alone" for k in ks) + " |",
        "|---|---|" + "---|---|" * len(ks),
    ]
    for f in fractions:
        c_rows = max(1, int(f * n))
        cells = []
        for k in ks:
            ex = run_query(
                store_path, [a.workdir / "val.jsonl"], QueryConfig(top_k=k, exact=True, progress=False), runner=runner
            )
            fixed = QueryConfig(top_k=k, candidates=max(c_rows, k), max_candidates=max(c_rows, k), progress=False)
            for staged in (True, False):
                with _second_stage(staged):
                    ap_ = run_query(store_path, [a.workdir / "val.jsonl"], fixed, runner=runner)
                top_e, top_a = {}, {}
                for row in ex.top.to_pylist():
                    top_e.setdefault(row["validation_id"], set()).add(row["train_id"])
                for row in ap_.top.to_pylist():
                    top_a.setdefault(row["validation_id"], set()).add(row["train_id"])
                rec = [len(top_e[v] & top_a.get(v, set())) / len(top_e[v]) for v in top_e]
                cells.append(f"{np.mean(rec):.3f} / {np.min(rec):.2f}")
        lines.append(f"| {c_rows} | {100 * f:.0f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    emit("\n".join(lines) + "\n", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
