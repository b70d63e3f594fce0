"""Distilled value models: how well a cheap student predicts exact For-Value values, and how fast.

For each task (the paper's three text tasks and the mislabeled math task), generates the data,
builds a store with the real default model (SmolLM2-135M-Instruct), audits it against the
validation split, then for each labelled fraction and student distils a value model on a random
labelled subset of the audited rows and compares its values with the exact ``score_mean`` on the
held-out rest: Spearman correlation and top-10% precision. The estimate throughput (the student
valuing the training file from disk, ``forvalue.estimates.estimate``) is compared with the build
throughput measured in the same run (samples encoded per second, model load excluded).

    python -m tools.bench distill --out DIR   # the table of docs/benchmarks.md, written to DIR/distill.md
    python -m tools.bench_distill             # the same suite on its own; --out FILE also writes it
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from forvalue.audit import run_audit
from forvalue.distill import distill_value_model
from forvalue.estimates import estimate
from forvalue.indexer.build import build_index
from forvalue.indexer.model_runner import load_runner
from forvalue.schemas.config import AuditConfig, BuildConfig, DistillConfig, ModelConfig
from forvalue.tasks.text import generate_task, write_jsonl
from tools.common import emit, machine_info, md_table

TASKS = ("sentence_transformations", "math_no_reasoning", "math_with_reasoning", "mislabeled_math")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench_distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--n-train", type=int, default=50, help="training samples per class (10 classes)")
    ap.add_argument("--n-test", type=int, default=3, help="validation samples per class")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.25])
    ap.add_argument("--students", nargs="+", default=["ngram", "embed", "auto"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="labelled-subset seeds (mean reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    runner = load_runner(ModelConfig(device=args.device))
    quality, speed = [], []
    for task in args.tasks:
        train, test = generate_task(task, n_train=args.n_train, n_test=args.n_test, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            write_jsonl(train, tmp / "train.jsonl")
            write_jsonl(test, tmp / "val.jsonl")
            t0 = time.perf_counter()
            rep = build_index([tmp / "train.jsonl"], tmp / "store", BuildConfig(progress=False), runner=runner)
            build_rate = rep.written / (time.perf_counter() - t0)
            run_audit(
                tmp / "store", [tmp / "val.jsonl"], "v1", AuditConfig(progress=False, device=args.device), runner=runner
            )
            rates = {}
            for frac in args.fractions:
                for student in args.students:
                    res = []
                    for seed in args.seeds:
                        r = distill_value_model(
                            tmp / "store",
                            "v1",
                            tmp / f"vm_{student}",
                            DistillConfig(student=student, fraction=frac, seed=seed),
                        )
                        res.append((r.heldout["spearman"], r.heldout["top10_precision"], r.student, r.n_labelled))
                        if frac == max(args.fractions) and seed == args.seeds[0] and student != "auto":
                            est = estimate([tmp / "train.jsonl"], tmp / f"vm_{student}", tmp / "values.parquet")
                            rates[student] = est.samples_per_s
                    rho = np.array([x[0] for x in res], np.float64)
                    p10 = np.array([x[1] for x in res], np.float64)
                    picked = "/".join(sorted({x[2] for x in res})) if student == "auto" else ""
                    quality.append(
                        [
                            task,
                            f"{frac:.0%}",
                            res[0][3],
                            student + (f" ({picked})" if picked else ""),
                            f"{np.nanmean(rho):.3f} ± {np.nanstd(rho):.3f}",
                            f"{np.nanmean(p10):.2f} ± {np.nanstd(p10):.2f}",
                        ]
                    )
                    print(" | ".join(map(str, quality[-1])), flush=True)
            for student, rate in rates.items():
                speed.append([task, student, f"{build_rate:.2f}", f"{rate:.0f}", f"{rate / build_rate:.0f}x"])
                print(" | ".join(map(str, speed[-1])), flush=True)
    n = args.n_train * 10
    text = "\n\n".join(
        [
            f"{len(args.tasks)} tasks x {n} training samples (10 classes x {args.n_train}), validation 10 x "
            f"{args.n_test}; "
            "exact values = audit `score_mean` (SmolLM2-135M-Instruct, default store settings). Held-out = the "
            "audited "
            f"rows not labelled; mean ± std over seeds {args.seeds}. `auto (x)` names the students auto picked.",
            md_table(
                ["task", "labelled", "n labelled", "student", "Spearman (held-out)", "top-10% precision"], quality
            ),
            "Throughput: build = samples encoded per second by `index build` (model loaded once, excluded); estimate = "
            "the student valuing the training file (read, tokenize/hash, predict, write Parquet).",
            md_table(["task", "student", "build samples/s", "estimate samples/s", "estimate / build"], speed),
            machine_info(args.device),
        ]
    )
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
