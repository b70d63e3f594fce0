"""Targeted For-Value experiments: which setting moves AUC / recall / mislabeled detection.

Builds one store per (top_m, score_tokens) setting through the public API and queries each
store with ``normalize`` none and cosine (the query is cheap; the build is the forward pass).
For mislabeled tasks it also reports detection AUCs: the mean score over the clean validation
set (``mean``; also through the product's ``run_query(aggregate='mean')``, ``api-mean``, which with
cosine normalizes by the norm of the *mean* validation G) and, as an extra diagnostic, the mean over
the validation samples that carry the training sample's *given* label (``own-class``).

    python -m tools.bench probe --out DIR -- --task sentence_transformations --settings 32:all 256:all 32:response
    python -m tools.bench_probe --task sentence_transformations ... [--out FILE]   # the same suite on its own
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tools.common import emit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--noise-rates", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--n-train", type=int, default=15)
    ap.add_argument("--n-test", type=int, default=3)
    ap.add_argument("--n-classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", nargs="+", default=["32:all"], help="top_m:score_tokens")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from forvalue.api import build_index, run_query
    from forvalue.indexer.model_runner import load_runner
    from forvalue.metrics import class_retrieval, roc_auc
    from forvalue.schemas.config import BuildConfig, EncodeConfig, ModelConfig, QueryConfig
    from forvalue.tasks.text import generate_task, write_jsonl

    runner = load_runner(ModelConfig(device=args.device))
    noises = args.noise_rates if args.task.startswith("mislabeled_") else [None]
    lines = [
        f"task {args.task}, {args.n_classes} classes x {args.n_train} train + {args.n_test} validation, seed "
        f"{args.seed}",
        "",
        "| data | top_m | tokens | normalize | AUC | recall | detect AUC (mean) | detect AUC (api-mean) | detect AUC "
        "(own-class) | build s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        for noise in noises:
            kw = {} if noise is None else {"noise_rate": noise}
            train, test = generate_task(
                args.task, n_train=args.n_train, n_test=args.n_test, seed=args.seed, n_classes=args.n_classes, **kw
            )
            d = Path(tmp) / f"data-{noise}"
            write_jsonl(train, d / "train.jsonl")
            write_jsonl(test, d / "test.jsonl")
            label = {r["id"]: r["label"] for r in train}
            flipped = {r["id"]: bool(r.get("flipped")) for r in train}
            val_labels = np.array([r["label"] for r in test])
            for setting in args.settings:
                top_m, tokens = setting.split(":")
                store = Path(tmp) / f"store-{noise}-{top_m}-{tokens}"
                t0 = time.perf_counter()
                build_index(
                    [d / "train.jsonl"],
                    store,
                    BuildConfig(
                        model=ModelConfig(device=args.device),
                        encode=EncodeConfig(top_m=int(top_m), score_tokens=tokens),
                        progress=False,
                    ),
                    runner=runner,
                )
                build_s = time.perf_counter() - t0
                for normalize in ("none", "cosine"):
                    res = run_query(
                        store,
                        [d / "test.jsonl"],
                        QueryConfig(device=args.device, progress=False, normalize=normalize),
                        runner=runner,
                        keep_scores=True,
                    )
                    ids = res.train_ids
                    m = class_retrieval(res.scores, [label[i] for i in ids], list(val_labels))
                    det = own = api = ""
                    if noise is not None:
                        flip = np.array([flipped[i] for i in ids])
                        det = f"{roc_auc(-res.scores.mean(axis=0), flip):.3f}"
                        own_scores = np.array([res.scores[val_labels == label[i], k].mean() for k, i in enumerate(ids)])
                        own = f"{roc_auc(-own_scores, flip):.3f}"
                        agg = run_query(
                            store,
                            [d / "test.jsonl"],
                            QueryConfig(device=args.device, progress=False, normalize=normalize, aggregate="mean"),
                            runner=runner,
                            keep_scores=True,
                        )
                        order = {i: k for k, i in enumerate(agg.train_ids)}
                        api = f"{roc_auc(-agg.scores[0][[order[i] for i in ids]], flip):.3f}"
                    line = (
                        f"| {'clean' if noise is None else f'noise {noise:g}'} | {top_m} | {tokens} | {normalize} | "
                        f"{m['auc_mean']:.3f} ± {m['auc_std']:.3f} | {m['recall_mean']:.3f} ± {m['recall_std']:.3f} | "
                        f"{det} | {api} | {own} | {build_s:.0f} |"
                    )
                    lines.append(line)
                    print(line, flush=True)
    report = "\n".join(lines)
    emit(report, Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
