"""Does selection by value train a better model? Fine-tune on what each method selects, and compare.

Counterfactual evidence for For-Value (issue 17): instead of asking whether the scores rank
same-class samples first, fine-tune the model (LoRA) on the data each method picks and measure
the fine-tuned model. Three parts, every fine-tune with the same budget (LoRA rank, epochs, batch,
learning rate) and the same seed:

targeted
    A pool mixing the paper's three text tasks (``forvalue.tasks.text``: sentence
    transformations, math without and with reasoning; labels ``task/class``). A target is one
    task or a few classes of one (``math_with_reasoning:0,1,2``) with a small validation set (the
    selection's query) and a disjoint held-out evaluation set. Each method selects k% of the pool;
    the fine-tuned model's held-out target loss (mean response NLL) and exact-match accuracy
    (greedy answer == response after strip) are reported, with the share of the selection that
    belongs to the target and the method's wall time.
noisy
    The classification-style task (``forvalue.tasks.text.mislabeled``: "which kind of problem is
    this?" -> class name) with 20% / 50% of the training labels flipped; clean validation and
    evaluation sets. Each method selects k%; reported: clean fraction selected, fine-tuned
    accuracy, and the mislabeled-detection AUC of each method's values against the loss baseline
    (per-sample loss of a model fine-tuned on the whole noisy pool: high loss = flipped).
brittle
    Fine-tune on a clean classification set; for validation samples the model gets right,
    remove the top-k training samples of each method for that sample (k = 10, 20, 40), fine-tune
    again and measure the change of the sample's loss and how often its answer flips, against
    removing k random samples.

Methods (each gives one value per pool sample; the top k% are selected):

* ``forvalue``        the product: ``build_index`` + ``run_audit``, then ``select_subset(top=k)``
  (ranks by the mean score over the validation set; normalize ``none``, all tokens scored: the
  defaults). Its time is build + audit.
* ``forvalue-label``  the same audit's per-label aggregate: ``AuditConfig(flag_by='label')``'s
  ``flag_score``, the mean score over the validation samples with the sample's own label (a sample whose label
  no validation sample has: its mean over all of them; the audit leaves its flag score empty).
* ``forvalue-cos``, ``forvalue-label-cos``  the same two with ``AuditConfig(normalize='cosine')``
  (named with ``--methods`` only).
* ``forvalue-auto``, ``forvalue-label-auto``  the same two with ``--validation-tokens auto --whiten auto``
  (``AuditConfig(validation_tokens='auto', whiten='auto')``, docs/variants.md; named with ``--methods`` only).
* ``random``          seeded uniform.
* ``emb``             alpha = 1 ablation (hidden states only): ``<mean_v sum_t h_vt, sum_t h_it>``
  (``tools.bench_baselines.emb_vectors``, as in ``tools/bench_quality.py``).
* ``rds``             RDS+ (Ivison et al. 2025): mean cosine of mean-pooled, L2-normalised last hidden
  states (``tools.bench_baselines.rds_vectors``), the strongest cheap selector of their study.
* ``loss``            perplexity filter: lowest response loss under the warm-up model.
* ``bm25``            Okapi BM25 (k1 = 1.5, b = 0.75) of each pool sample against each validation
  sample (word tokens, lower-cased), averaged over the validation set.
* ``grad``            LESS-style: LoRA warm-up fine-tune on a random ``warmup`` share of the pool,
  per-sample gradients w.r.t. the LoRA ``B`` factors (``tools.bench_baselines.LoraGradients``),
  mean cosine similarity to the validation gradients. Its time includes the warm-up.
* ``distill``         the distilled value model (``forvalue.distill``): build + audit a random
  ``distill_fraction`` of the pool, ``distill`` a student on it, ``estimate`` the whole pool.

Brittleness ranks per validation sample: ``forvalue`` (``run_query`` scores), ``emb``, ``rds``, ``bm25``,
``grad`` (cosine of per-sample gradients of the fine-tuned model itself) and ``random``.

Every fine-tune's result is saved as JSON under ``WORKDIR/cache`` keyed by what it trains and
evaluates on (part, its pool, seed, hyper-parameters, model, hashes of the training and
evaluation ids: two methods that select the same set share one fine-tune); selection values are
cached the same way, so a re-run continues where the last one stopped and an unchanged re-run
trains nothing. The report goes to stdout and ``--out``, all numbers to ``--json``.

    python -m tools.bench selection --out runs/sel                # full protocol: runs/sel/selection.md
    python -m tools.bench selection --out runs/sel-q -- --quick   # the small configuration
    python -m tools.bench_selection --workdir runs/sel/selection.work --parts targeted --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from tools.bench_selection.bm25 import bm25
from tools.bench_selection.data import targeted_data
from tools.bench_selection.parts import run_brittle, run_noisy, run_targeted
from tools.bench_selection.report import report
from tools.bench_selection.settings import (
    BRITTLE_METHODS,
    FV_AUTO,
    FV_COSINE,
    METHODS,
    PARTS,
    QUICK,
    Settings,
    log,
    n_of,
    top_n,
)
from tools.bench_selection.suite import NotCached, Suite

# what the tests and other tools use, besides main
__all__ = ["BRITTLE_METHODS", "METHODS", "QUICK", "Suite", "bm25", "main", "n_of", "parse_args", "settings_from"]
__all__ += ["targeted_data", "top_n"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_selection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here (also printed)")
    ap.add_argument(
        "--workdir",
        type=Path,
        required=True,
        help="cache of every selection and fine-tune (re-running with the same folder resumes)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write every number (rows, settings, counts) here")
    ap.add_argument("--quick", action="store_true", help="the small configuration (< 10 minutes)")
    ap.add_argument("--model", default=None, help="model folder (default: the product's default SmolLM2-135M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: report the selections and fine-tunes the work folder already holds",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=None)
    ap.add_argument("--methods", nargs="+", choices=METHODS + FV_COSINE + FV_AUTO, default=None)
    ap.add_argument("--ks", type=float, nargs="+", default=None, help="targeted selection sizes in percent")
    ap.add_argument("--targets", nargs="+", default=None, help="task or task:class,class,...")
    ap.add_argument("--noise-rates", type=float, nargs="+", default=None)
    ap.add_argument("--brittle-ks", type=int, nargs="+", default=None)
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    over = {
        "seeds": args.seeds,
        "parts": args.parts,
        "methods": args.methods,
        "ks": args.ks,
        "targets": args.targets,
        "noise_rates": args.noise_rates,
        "brittle_ks": args.brittle_ks,
    }
    return dataclasses.replace(s, **{k: tuple(v) for k, v in over.items() if v is not None})


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    s = settings_from(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    suite = Suite(s, args.workdir, args.model, args.device)
    suite.cached_only = args.cached_only
    started = time.perf_counter()
    rows: list[dict] = []
    runners = {"targeted": run_targeted, "noisy": run_noisy, "brittle": run_brittle}
    for seed in s.seeds:
        for part in s.parts:
            log(f"[{time.perf_counter() - started:7.1f}s] {part}, seed {seed}")
            try:
                rows += runners[part](suite, seed)
            except NotCached:  # noisy / brittle: reported once their shared fine-tune has run
                suite.counts.skipped += 1
                log(f"  {part} seed {seed}: not finished yet, left out (--cached-only)")
    seconds = time.perf_counter() - started
    text = report(rows, s, argv, seconds, suite.counts, args.device)
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summary = {
        "settings": dataclasses.asdict(s),
        "rows": rows,
        "seconds": seconds,
        "counts": dataclasses.asdict(suite.counts),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=float))
    return summary
