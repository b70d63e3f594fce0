"""Linear datamodeling score (LDS; TRAK, dattri, Bergson's leaderboard) of For-Value and the cheap baselines.

    python -m tools.bench lds --out runs/b                 # the full run (M = 50 subsets of a 300-sample pool)
    python -m tools.bench lds --out runs/b -- --quick      # < 10 min: a 60-sample pool, M = 20

Protocol. A pool is drawn from the paper's three text tasks (``--classes`` classes x ``--per-class``
training samples per task) and a validation set from their test splits (``--val-per-class``). M random
halves ``S_1..S_M`` of the pool are drawn (seeded); on each, fresh LoRA adapters on SmolLM2 are trained
with the selection suite's fine-tune (:meth:`tools.bench_baselines.LoraGradients.finetune`, the same
rank, learning rate, epochs and batch as ``tools.bench_selection``), and each validation sample's loss
(mean NLL of its response tokens and EOS) is measured. For a method with scores ``s(v, i)`` (higher =
more helpful), the prediction for subset ``S_j`` is ``sum_{i in S_j} s(v, i)``; LDS of ``v`` is the
Spearman correlation over ``j`` between the prediction and ``-L_v(S_j)``; the suite reports the mean over
validation samples and a 95% bootstrap interval (validation samples resampled).

Methods (all scored once, on the pretrained model, the way each tool would be used):
``forvalue`` (raw score of the product's exact query), ``forvalue-cos`` (``--normalize cosine``),
``forvalue-ctr`` / ``forvalue-ctr-cos`` (``--center mean``, docs/variants.md),
``forvalue-wauto`` (``--whiten auto``) / ``forvalue-auto`` (``--validation-tokens auto --whiten auto``: chosen from
the validation samples' labels, here their task, since each class has one validation sample; docs/variants.md),
``forvalue-resp`` / ``forvalue-resp-cos`` (a store with ``--score-tokens response``: the tokens whose loss LDS
measures),
``grad-cos`` (TracIn-style cosine of per-sample LoRA gradients at the pretrained model; the gradient
baseline of the quality and selection suites), ``bm25``, ``rds`` (RDS+: cosine of mean-pooled last
hidden states, Ivison et al. 2025), ``emb`` (the paper's Emb ablation: inner product of summed hidden
states) and any score matrix given with ``--extra NAME=FILE.npy`` (shape (n_val, n_pool), in the
order of ``DIR/pool.jsonl`` and ``DIR/val.jsonl``; the peers suite writes Bergson's there).

Every fine-tune's losses and every score matrix are cached under ``--workdir``; a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from forvalue.metrics import spearman
from tools.common import LazyModel

METHODS = (
    "forvalue",
    "forvalue-cos",
    "forvalue-ctr",
    "forvalue-ctr-cos",
    "forvalue-wauto",
    "forvalue-auto",
    "forvalue-resp",
    "forvalue-resp-cos",
    "grad-cos",
    "bm25",
    "rds",
    "emb",
)


@dataclass(frozen=True)
class LdsSettings:
    classes: int = 10
    per_class: int = 10  # training samples per class and task: pool = 3 x classes x per_class
    val_per_class: int = 1
    subsets: int = 50
    fraction: float = 0.5
    seed: int = 0
    # the selection suite's fine-tune (tools.bench_selection.settings.Settings)
    rank: int = 8
    lr: float = 1e-3
    epochs: int = 2
    batch: int = 4
    max_length: int = 160
    bootstrap: int = 1000


QUICK = LdsSettings(classes=4, per_class=5, val_per_class=1, subsets=20, epochs=1)


# --------------------------------------------------------------------------- the metric


def subset_masks(n_pool: int, m: int, fraction: float, seed: int) -> np.ndarray:
    """(m, n_pool) bool: row j marks subset S_j, ``round(fraction * n_pool)`` samples drawn without replacement."""
    rng = np.random.default_rng([seed, 29])
    k = max(1, int(round(fraction * n_pool)))
    masks = np.zeros((m, n_pool), bool)
    for j in range(m):
        masks[j, rng.choice(n_pool, k, replace=False)] = True
    return masks


def lds_per_sample(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LDS of each validation sample: Spearman over subsets of ``masks @ scores[v]`` against ``-losses[:, v]``.

    ``scores`` (n_val, n_pool), ``masks`` (m, n_pool), ``losses`` (m, n_val). NaN where a side is constant.
    """
    pred = masks.astype(np.float64) @ np.asarray(scores, np.float64).T  # (m, n_val)
    return np.array([spearman(pred[:, v], -losses[:, v]) for v in range(pred.shape[1])])


def bootstrap_interval(values: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of the mean of ``values`` (NaN dropped) over ``reps`` resamples."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# --------------------------------------------------------------------------- data


def lds_data(s: LdsSettings) -> tuple[list[dict], list[dict]]:
    """The pool and validation rows (``id``, ``prompt``, ``response``, ``label``), seeded."""
    from forvalue.tasks.text import TASKS, generate_task

    pool, val = [], []
    for task in TASKS:
        train, test = generate_task(task, n_train=s.per_class, n_test=s.val_per_class, seed=s.seed, n_classes=s.classes)
        pool += [{k: r[k] for k in ("id", "prompt", "response")} | {"label": f"{task}/{r['label']}"} for r in train]
        val += [{k: r[k] for k in ("id", "prompt", "response")} | {"label": f"{task}/{r['label']}"} for r in test]
    return pool, val


def _samples(rows):
    from forvalue.indexer.data import Sample

    return [
        Sample(id=r["id"], prompt=r["prompt"], response=r["response"], text=None, label=r["label"], source="lds")
        for r in rows
    ]


def _write_atomic(path: Path, text: str) -> None:
    """Write through a per-process temporary file: two runs filling one cache never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Lds(LazyModel):
    """The run's cached state under ``workdir``: subsets' losses and methods' score matrices."""

    def __init__(self, s: LdsSettings, workdir: Path, model: str | None, device: str):
        from tools.bench_selection.settings import sha, write_rows

        self.s, self.workdir, self.model_path, self.device = s, workdir, model, device
        self.cache = workdir / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.pool, self.val = lds_data(s)
        self.pool_file = write_rows(self.pool, workdir / "pool.jsonl")
        self.val_file = write_rows(self.val, workdir / "val.jsonl")
        self.data_key = sha([[r["id"] for r in self.pool], [r["id"] for r in self.val], model or "default"])
        self.masks = subset_masks(len(self.pool), s.subsets, s.fraction, s.seed)
        self.fine_tunes_run = 0
        self.ft_seconds: list[float] = []
        self.method_seconds: dict[str, float] = {}

    # -- measured losses --------------------------------------------------------------------------
    def subset_losses(self, j: int) -> np.ndarray:
        """Validation losses (n_val,) after a fine-tune on subset j (cached)."""
        from tools.bench_selection.settings import sha

        hp = {k: getattr(self.s, k) for k in ("rank", "lr", "epochs", "batch", "max_length", "seed")}
        ids = [r["id"] for r, keep in zip(self.pool, self.masks[j]) if keep]
        key = {"data": self.data_key, "hp": hp, "train": sha(ids)}
        path = self.cache / f"ft-{sha(key)}.json"
        if path.exists():
            got = json.loads(path.read_text())
            if got["key"] == key:
                return np.array(got["losses"])
        from tools.selection_lora import Lora, sample_losses

        rows = [r for r, keep in zip(self.pool, self.masks[j]) if keep]
        lora = Lora(self.runner.model, self.s.rank, self.s.seed + j)
        seconds = lora.finetune(self.tok(rows), self.s.epochs, self.s.lr, self.s.batch, self.s.seed + j)
        with lora.active():
            losses = sample_losses(self.runner.model, self.tok(self.val))
        self.fine_tunes_run += 1
        self.ft_seconds.append(seconds)
        _write_atomic(path, json.dumps({"key": key, "losses": losses.tolist(), "seconds": seconds}))
        return losses

    def base_losses(self) -> np.ndarray:
        from tools.selection_lora import sample_losses

        path = self.cache / f"base-{self.data_key}.json"
        if path.exists():
            return np.array(json.loads(path.read_text()))
        losses = sample_losses(self.runner.model, self.tok(self.val))
        _write_atomic(path, json.dumps(losses.tolist()))
        return losses

    # -- scores -------------------------------------------------------------------------------------
    def scores(self, method: str) -> np.ndarray:
        """(n_val, n_pool) scores of ``method`` (cached, with the seconds it took)."""
        path = self.cache / f"scores-{method}-{self.data_key}.npy"
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():
            self.method_seconds[method] = json.loads(meta.read_text())["seconds"]
            return np.load(path)
        t0 = time.perf_counter()
        out = self._compute(method)
        self.method_seconds[method] = time.perf_counter() - t0
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
        _write_atomic(meta, json.dumps({"seconds": self.method_seconds[method]}))
        return out

    def _store(self, score_tokens: str = "auto") -> Path:
        from forvalue import BuildConfig, ModelConfig
        from forvalue.indexer.build import build_index
        from forvalue.schemas.config import EncodeConfig

        name = "store" if score_tokens == "auto" else f"store-{score_tokens}"
        store, done = self.workdir / name, self.workdir / f"{name}-{self.data_key}.done"
        if not done.exists():
            import shutil

            shutil.rmtree(store, ignore_errors=True)
            build_index(
                [self.pool_file],
                store,
                BuildConfig(
                    model=ModelConfig(path=self.model_path, device=self.device),
                    encode=EncodeConfig(score_tokens=score_tokens),
                    progress=False,
                ),
                runner=self.runner,
            )
            done.write_text("built\n")
        return store

    def _compute(self, method: str) -> np.ndarray:
        if method.startswith("forvalue"):
            from forvalue import QueryConfig
            from forvalue.api import run_query

            auto = method in ("forvalue-wauto", "forvalue-auto")
            res = run_query(
                self._store("response" if "-resp" in method else "auto"),
                # the auto settings choose by the validation samples' labels: the task (each class has one sample)
                _samples([r | {"label": r["label"].split("/")[0]} for r in self.val]) if auto else [self.val_file],
                QueryConfig(
                    device=self.device,
                    progress=False,
                    exact=True,
                    normalize="cosine" if method.endswith("-cos") else "none",
                    center="mean" if "-ctr" in method else "none",
                    whiten="auto" if auto else None,
                    validation_tokens="auto" if method == "forvalue-auto" else "store",
                ),
                runner=self.runner,
                keep_scores=True,
            )
            if res.auto_settings:
                from forvalue.engine.variant import describe_auto

                print(f"{method}: {describe_auto(res.auto_settings)}", file=sys.stderr, flush=True)
            order = {i: k for k, i in enumerate(res.train_ids)}
            return np.asarray(res.scores, np.float64)[:, [order[r["id"]] for r in self.pool]]
        if method == "bm25":
            from tools.bench_selection.bm25 import bm25

            return bm25(
                [r["prompt"] + r["response"] for r in self.val], [r["prompt"] + r["response"] for r in self.pool]
            )
        if method in ("emb", "rds"):
            from tools.bench_baselines import emb_vectors, rds_vectors, tokenize_rows

            tok = self.runner.tokenizer
            fn = emb_vectors if method == "emb" else rds_vectors
            p = fn(self.runner, tokenize_rows(tok, _samples(self.pool), "all"))
            v = fn(self.runner, tokenize_rows(tok, _samples(self.val), "all"))
            return v @ p.T
        if method == "grad-cos":
            from tools.bench_baselines import LoraGradients

            lg = LoraGradients(self.runner.model, rank=self.s.rank, seed=self.s.seed)
            g = lg.compute(self.tok(self.pool)).astype(np.float64)
            gv = lg.compute(self.tok(self.val)).astype(np.float64)
            g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)
            gv /= np.maximum(np.linalg.norm(gv, axis=1, keepdims=True), 1e-30)
            return gv @ g.T
        raise ValueError(f"unknown method {method!r}")


def report(s: LdsSettings, results: dict[str, np.ndarray], lds: Lds, wall: float, quick: bool) -> str:
    from tools.common import machine_info, md_table

    rows = []
    for name, per in results.items():
        mean, lo, hi = bootstrap_interval(per, s.bootstrap, s.seed)
        secs = lds.method_seconds.get(name)
        rows.append(
            [
                name,
                f"{mean:.3f}",
                f"[{lo:.3f}, {hi:.3f}]",
                f"{np.nanmedian(per):.3f}",
                f"{int(np.sum(~np.isnan(per)))}/{len(per)}",
                "-" if secs is None else f"{secs:.1f}",
            ]
        )
    losses = np.array([lds.subset_losses(j) for j in range(s.subsets)])
    base = lds.base_losses()
    spread = float(np.mean(losses.std(axis=0)))
    ft = lds.ft_seconds
    lines = [
        f"## LDS ({'--quick' if quick else 'full'})",
        "",
        f"Pool {len(lds.pool)} samples (3 paper tasks x {s.classes} classes x {s.per_class}), {len(lds.val)} "
        f"validation samples, M = {s.subsets} random {s.fraction:.0%} subsets (seed {s.seed}); LoRA rank {s.rank}, "
        f"lr {s.lr}, {s.epochs} epoch(s), batch {s.batch} per subset. Validation loss: pretrained "
        f"{base.mean():.3f}, after fine-tunes {losses.mean():.3f} (mean over subsets); std over subsets per "
        f"validation sample {spread:.4f} (mean).",
        "",
        md_table(["method", "LDS (mean)", "95% bootstrap", "median", "defined", "score s"], rows),
        "",
        f"Fine-tunes run now {lds.fine_tunes_run} (the rest from the cache)"
        + (f", {np.mean(ft):.1f} s each on average" if ft else "")
        + f"; whole run {wall:.0f} s.",
        "",
        machine_info(lds.device),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tools.common import add_common_args, apply_threads, emit

    ap = argparse.ArgumentParser(prog="python -m tools.bench_lds", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workdir", type=Path, required=True, help="cache of fine-tunes and scores (resumable)")
    ap.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--quick", action="store_true", help="a 60-sample pool, M = 20, 1 epoch (< 10 min)")
    ap.add_argument("--subsets", type=int, default=None, help="M, the number of random subsets")
    ap.add_argument("--per-class", type=int, default=None, help="pool samples per class and task")
    ap.add_argument("--classes", type=int, default=None, help="classes per task (at most 10)")
    ap.add_argument("--val-per-class", type=int, default=None, help="validation samples per class and task")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tune epochs per subset")
    ap.add_argument(
        "--reverse",
        action="store_true",
        help="fine-tune the subsets last to first: a second process on the same --workdir fills the cache from "
        "the other end (each subset's result is one file, written atomically)",
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=FILE.npy", help="more score matrices")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-sample LDS as JSON")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    s = QUICK if args.quick else LdsSettings()
    for field in ("subsets", "per_class", "classes", "val_per_class", "epochs"):
        if getattr(args, field) is not None and getattr(args, field) < 1:
            ap.error(f"--{field.replace('_', '-')} {getattr(args, field)}: give a positive number")
        if getattr(args, field) is not None:
            s = replace(s, **{field: getattr(args, field)})
    extra = {}
    for spec in args.extra:
        name, sep, file = spec.partition("=")
        if not sep or not Path(file).is_file():
            ap.error(f"--extra {spec}: give NAME=FILE.npy with an existing file")
        extra[name] = Path(file)
    started = time.perf_counter()
    lds = Lds(s, args.workdir, args.model, args.device)
    for j in reversed(range(s.subsets)) if args.reverse else range(s.subsets):
        lds.subset_losses(j)
        _log(f"lds: subset {j + 1}/{s.subsets} done")
    losses = np.array([lds.subset_losses(j) for j in range(s.subsets)])
    results = {}
    for m in args.methods:
        results[m] = lds_per_sample(lds.scores(m), lds.masks, losses)
        _log(f"lds: {m} {np.nanmean(results[m]):.3f}")
    for name, file in extra.items():
        sc = np.load(file)
        if sc.shape != (len(lds.val), len(lds.pool)):
            ap.error(f"--extra {name}: shape {sc.shape}, expected {(len(lds.val), len(lds.pool))}")
        results[name] = lds_per_sample(sc, lds.masks, losses)
    text = report(s, results, lds, time.perf_counter() - started, args.quick)
    emit(text, args.out)
    if args.json:
        args.json.write_text(
            json.dumps({"settings": asdict(s), "lds": {k: v.tolist() for k, v in results.items()}}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
