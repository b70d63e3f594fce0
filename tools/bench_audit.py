"""Audit benchmark: mislabeled-sample detection and the cost of a repeated audit.

For each noise rate, generates the mislabeled task (training labels flipped at that rate,
clean validation set), indexes it with the real default model, runs an audit, and reports
the detection AUC (flipped samples should have the lowest mean score) and the time of a
second audit with the unchanged validation set (validation encodings cached: no forward
pass) relative to the first, measured in the same run.

    python -m tools.bench audit --out DIR [-- --n-train 30 --n-test 3]
    python -m tools.bench_audit --n-train 30 --n-test 3 [--out FILE]   # the same suite on its own
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from forvalue.api import build_index
from forvalue.audit import AuditConfig, load_audit, run_audit
from forvalue.engine.variant import variant_flags
from forvalue.indexer.model_runner import load_runner
from forvalue.metrics import roc_auc
from forvalue.schemas.config import BuildConfig, EncodeConfig, ModelConfig
from forvalue.tasks.text import generate_task, write_jsonl
from tools.common import emit, machine_short

# name -> AuditConfig fields of each score variant (the first two are the suite's historical rows)
VARIANTS = {
    "none": {},
    "cosine": {"normalize": "cosine"},
    "centred": {"center": "mean"},
    "auto": {"validation_tokens": "auto", "whiten": "auto"},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench_audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--task", default="mislabeled_math")
    ap.add_argument("--noise-rates", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--n-train", type=int, default=30, help="training samples per class")
    ap.add_argument("--n-test", type=int, default=3, help="validation samples per class")
    ap.add_argument("--n-classes", type=int, default=10)
    ap.add_argument(
        "--variants",
        choices=list(VARIANTS),
        nargs="+",
        default=["none", "cosine"],
        help="score variants audited on each store (docs/variants.md): none = the paper's score, cosine = "
        "--normalize cosine, centred = --center mean, auto = --validation-tokens auto --whiten auto",
    )
    ap.add_argument(
        "--score-tokens",
        choices=["all", "response"],
        default="response",
        help="response: the label lives in the response, so only its tokens are scored (as in the paper's VLM "
        "mislabel setting)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    runner = load_runner(ModelConfig(device=args.device))
    lines = [
        f"Machine: {machine_short()}; model SmolLM2-135M-Instruct; task {args.task}, {args.n_classes} classes x "
        f"{args.n_train} train, clean validation {args.n_classes} x {args.n_test}; scored tokens: {args.score_tokens}. "
        "The first audit of each store includes loading the model and encoding the validation set; "
        "the repeated audit finds every validation encoding in the cache (no model load, no forward pass).",
        "",
        "| noise | variant | flipped / train | detection AUC (mean score) | AUC (max score) | AUC (mean vs own "
        "label) | first audit (s) | repeated audit (s) | repeated / first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in args.noise_rates:
        train, test = generate_task(
            args.task, n_train=args.n_train, n_test=args.n_test, n_classes=args.n_classes, seed=0, noise_rate=rate
        )
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            write_jsonl(train, tmp / "train.jsonl")
            write_jsonl(test, tmp / "val.jsonl")
            cfg = BuildConfig(progress=False, encode=EncodeConfig(score_tokens=args.score_tokens))
            build_index([tmp / "train.jsonl"], tmp / "store", cfg, runner=runner)
            flipped = {r["id"]: bool(r["flipped"]) for r in train}
            for n, norm in enumerate(args.variants):
                # flag_by max: score_max is computed (per-sample token form, as these rows were recorded); the
                # other flag scores leave it out when the G-form is the cheaper scan (docs/gform.md)
                cfg = AuditConfig(**VARIANTS[norm], progress=False, device=args.device, flag_by="max")
                name = f"a_{norm}"
                t0 = time.perf_counter()
                first = run_audit(tmp / "store", [tmp / "val.jsonl"], name, cfg)  # loads the model: a user's first run
                t1 = time.perf_counter()
                second = run_audit(tmp / "store", [tmp / "val.jsonl"], name, cfg)
                t2 = time.perf_counter()
                assert second.encoded_now == 0
                table, _ = load_audit(tmp / "store", name)
                scores = table.column("score_mean").to_numpy()
                is_flipped = np.array([flipped[i] for i in table.column("id").to_pylist()])
                auc = roc_auc(-scores, is_flipped)
                auc_max = roc_auc(-table.column("score_max").to_numpy(), is_flipped)
                own = np.array([row[f"mean_vs_label:{row['label']}"] for row in table.to_pylist()])
                auc_own = roc_auc(-own, is_flipped)
                timing = (
                    f"{t1 - t0:.2f} | {t2 - t1:.2f} | {(t2 - t1) / (t1 - t0):.3f}"
                    if n == 0
                    else "cached | cached | (validation encodings shared with the row above)"
                )
                shown = norm
                if first.auto_settings is not None:  # what auto chose, as the flags that give it
                    shown += f" ({variant_flags(first.auto_settings['chosen'])})"
                lines.append(
                    f"| {rate:.0%} | {shown} | {is_flipped.sum()} / {len(train)} | {auc:.3f} | {auc_max:.3f} | "
                    f"{auc_own:.3f} | {timing} |"
                )
                print(lines[-1], flush=True)
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
