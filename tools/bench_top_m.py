"""Benchmark of the top-m error sparsification against the dense full-vocabulary score.

On a generated DataInf task (default: sentence transformations, 10 classes x
``--train-per-class`` training samples, ``--n-val`` validation samples spread over the
classes) with the default model (SmolLM2-135M-Instruct, float32 weights):

* dense: ``tools.reference.dense_scores`` (full-vocabulary softmax errors, float32
  hidden states, float64 sums);
* store path: one store per ``m`` in ``--m-values`` and per hidden storage dtype,
  built with ``build_index`` and queried with ``run_query(keep_scores=True)``.

Per store: Spearman rank correlation with the dense scores (per validation sample, then
mean), relative L2 error of the raw scores, top-10 overlap, mean dropped probability
mass (``tail_mass``), and the class-retrieval AUC / recall (``forvalue.metrics.class_retrieval``)
next to the dense scores' own.

Usage::

    python -m tools.bench top_m --out DIR [-- --m-values 8,32,128 --train-per-class 10 --n-val 5 --device cpu]
    python -m tools.bench_top_m [--m-values 8,32,128] ... [--out FILE]       # the same suite on its own
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from forvalue.metrics import spearman
from tools.common import add_common_args, apply_threads, emit, machine_info, md_table, quiet_transformers, resolve


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    sx = x[order]
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(sx)) + 1, [len(x)]])
    for s, e in zip(bounds[:-1], bounds[1:]):
        r[order[s:e]] = (s + e - 1) / 2.0
    return r


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    return len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k


class _OnDevice:
    """Lets ``tools.reference`` (which builds CPU tensors) drive a model on a GPU."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    @torch.no_grad()
    def __call__(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids.to(self.device), **kwargs)
        return SimpleNamespace(logits=out.logits.float().cpu(), hidden_states=[out.hidden_states[-1].float().cpu()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_top_m", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="sentence_transformations")
    p.add_argument("--m-values", default="8,32,128")
    p.add_argument("--hidden-dtypes", default="float16,float32")
    p.add_argument("--train-per-class", type=int, default=10)
    p.add_argument("--n-val", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    device = resolve(args.device)
    quiet_transformers()
    from forvalue.api import run_query
    from forvalue.indexer.build import build_index
    from forvalue.indexer.data import iter_samples
    from forvalue.indexer.model_runner import load_runner
    from forvalue.metrics import class_retrieval
    from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
    from forvalue.storage.store import Store
    from forvalue.tasks.text import generate_task, write_jsonl
    from tools.reference import dense_scores

    model_config = ModelConfig(device=str(device), dtype="float32")
    runner = load_runner(model_config)
    n_test = -(-args.n_val // 10)
    train, test = generate_task(args.task, n_train=args.train_per_class, n_test=n_test, seed=args.seed)
    # validation samples spread over the classes
    step = max(1, len(test) // args.n_val)
    val = test[::step][: args.n_val]
    rows_out, dense_metrics = [], None
    with tempfile.TemporaryDirectory(prefix="forvalue-bench-topm-") as tmp:
        tmp = Path(tmp)
        train_path, val_path = write_jsonl(train, tmp / "train.jsonl"), write_jsonl(val, tmp / "val.jsonl")
        train_samples = list(iter_samples([train_path], DataConfig()))
        val_samples = list(iter_samples([val_path], DataConfig()))
        train_labels = [s.label for s in train_samples]
        val_labels = [s.label for s in val_samples]

        t0 = time.perf_counter()
        dense = dense_scores(_OnDevice(runner.model, device), runner.tokenizer, train_samples, val_samples)
        dense_s = time.perf_counter() - t0
        print(f"  dense reference: {dense_s:.0f} s", file=sys.stderr, flush=True)
        dense_metrics = class_retrieval(dense, train_labels, val_labels)
        index = {s.id: i for i, s in enumerate(train_samples)}

        for hidden_dtype in args.hidden_dtypes.split(","):
            for m in [int(x) for x in args.m_values.split(",")]:
                store_path = tmp / f"store-{hidden_dtype}-{m}"
                config = BuildConfig(
                    model=model_config, encode=EncodeConfig(top_m=m, hidden_dtype=hidden_dtype), progress=False
                )
                build_index([train_path], store_path, config, runner=runner)
                result = run_query(
                    store_path,
                    [val_path],
                    QueryConfig(progress=False, device=str(device)),
                    runner=runner,
                    keep_scores=True,
                )
                order = np.array([index[i] for i in result.train_ids])
                scores = np.empty_like(result.scores)
                scores[:, order] = result.scores
                store = Store.open(store_path)
                tails = np.concatenate([b.column(0).flatten().to_numpy() for b in store.scan(["tail_mass"])])
                sp = [spearman(s, d) for s, d in zip(scores, dense)]
                rel = [float(np.linalg.norm(s - d) / np.linalg.norm(d)) for s, d in zip(scores, dense)]
                med_rel = float(np.median(np.abs(scores - dense) / np.maximum(np.abs(dense), 1e-30)))
                ov = [top_overlap(s, d) for s, d in zip(scores, dense)]
                met = class_retrieval(scores, train_labels, val_labels)
                rows_out.append(
                    [
                        f"top-{m}",
                        hidden_dtype,
                        f"{np.mean(tails):.4f}",
                        f"{np.mean(sp):.4f} (min {np.min(sp):.4f})",
                        f"{np.mean(rel):.4f}",
                        f"{med_rel:.4f}",
                        f"{np.mean(ov):.2f}",
                        f"{met['auc_mean']:.3f} ± {met['auc_std']:.3f}",
                        f"{met['recall_mean']:.3f} ± {met['recall_std']:.3f}",
                    ]
                )
                print(
                    f"  m={m} {hidden_dtype}: spearman {np.mean(sp):.4f} rel {np.mean(rel):.4f} auc "
                    f"{met['auc_mean']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
                shutil.rmtree(store_path, ignore_errors=True)
    rows_out.append(
        [
            "dense (full vocabulary)",
            "float32 (in memory)",
            "0",
            "1",
            "0",
            "0",
            "1.00",
            f"{dense_metrics['auc_mean']:.3f} ± {dense_metrics['auc_std']:.3f}",
            f"{dense_metrics['recall_mean']:.3f} ± {dense_metrics['recall_std']:.3f}",
        ]
    )
    text = "\n".join(
        [
            "## Top-m vs dense full-vocabulary score (`python -m tools.bench top_m`)",
            "",
            machine_info(device),
            "",
            f"Task `{args.task}` (seed {args.seed}): {len(train)} training samples ({args.train_per_class} per class), "
            f"{len(val)} validation samples (classes {', '.join(sorted(set(val_labels)))}); SmolLM2-135M-Instruct "
            "float32, "
            "whole text scored. Dense = `tools.reference.dense_scores` (full-vocabulary errors, float32 "
            "hidden, float64 sums). "
            "Spearman, relative L2 error (||s - s_dense|| / ||s_dense|| per validation sample) and top-10 overlap "
            "are means over validation samples; median rel. error is over all (validation, train) pairs; "
            "tail mass = mean probability mass per position outside top-m and the target (what the sparse error "
            "drops); "
            "AUC / recall (top class-size) are `forvalue.metrics.class_retrieval`, mean ± std over validation "
            "samples.",
            "",
            md_table(
                [
                    "errors",
                    "hidden",
                    "mean tail mass",
                    "Spearman vs dense",
                    "rel. L2 error",
                    "median rel. error",
                    "top-10 overlap",
                    "AUC",
                    "recall",
                ],
                rows_out,
            ),
            "",
        ]
    )
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
