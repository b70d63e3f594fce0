"""Score variants x tasks: AUC / recall of each For-Value variant on the paper's tasks and on their hard versions.

For each task one store is built (whole text, the product's defaults) under ``--workdir`` (re-runs reuse it),
the validation samples are scored exactly with each variant of the product (``QueryConfig``: ``center``,
``validation_tokens``, ``normalize``, ``whiten``), and the paper's retrieval metrics are reported per validation
sample (AUC and recall at the class size, mean over validation samples). ``--probes`` adds variants that are not
product options, computed from the stored rows in float64 by this script (IDF-weighted error entries, per-token
normalised hidden states, the response on both sides), so that what was tried and not kept is measured too.

    python -m tools.bench_variants --workdir runs/variants --n-train 30 --n-test 10 --out variants.md
    python -m tools.bench_variants --workdir runs/variants --tasks hard_sentence --probes
    python -m tools.bench_variants --workdir runs/variants --from-peers runs/peers/work --tasks shared_template

``--from-peers`` scores the paper-size stores a ``tools.bench peers`` run left in its work folder (each task's
``fv-store`` with its ``fv-train.jsonl`` / ``fv-val.jsonl``) instead of building new ones.

Tasks: the paper's ``sentence_transformations`` / ``math_with_reasoning`` / ``math_no_reasoning`` and the hard
versions of :data:`tools.generate_tasks.HARD_TASKS` (no text names the class; ``hard_mixed`` pools 20 classes
behind one template).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from tools.generate_tasks import HARD_TASKS, hard_task

PAPER_TASKS = ("sentence_transformations", "math_no_reasoning", "math_with_reasoning")
DEFAULT_TASKS = ("sentence_transformations", "math_with_reasoning", "hard_sentence", "hard_math", "hard_mixed")
# (name, center, validation_tokens, normalize, whiten): product options only
VARIANTS = (
    ("paper", "none", "store", "none", None),
    ("cosine", "none", "store", "cosine", None),
    ("centred", "mean", "store", "none", None),
    ("centred cosine", "mean", "store", "cosine", None),
    ("val response", "none", "response", "none", None),
    ("val response cosine", "none", "response", "cosine", None),
    ("val response centred", "mean", "response", "none", None),
    ("val response centred cosine", "mean", "response", "cosine", None),
    *((f"whitened {lam:g}", "mean", "store", "none", lam) for lam in (0.1, 1.0, 10.0)),
    *((f"val response whitened {lam:g}", "mean", "response", "none", lam) for lam in (0.1, 0.3, 1.0, 3.0, 10.0)),
    ("whitened auto", "mean", "store", "none", "auto"),
    ("val response whitened auto", "mean", "response", "none", "auto"),
    ("auto tokens, whitened auto", "mean", "auto", "none", "auto"),
)


def _chosen(chosen: dict) -> str:
    """What ``auto`` chose, short: ``response, 0.1`` / ``store, none``."""
    lam = chosen["whiten"]
    return f"{chosen['validation_tokens']}, {'none' if lam is None else f'{lam:g}'}"


def task_rows(task: str, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Rows of a paper task or a hard one (``n_train`` / ``n_test`` per class)."""
    if task in HARD_TASKS:
        return hard_task(task, n_train, n_test, seed)
    if task == "shared_template":  # the peers suite's: the ten transformations behind one prompt
        from tools.generate_tasks import shared_template_task

        return shared_template_task(n_train, n_test, seed)
    from forvalue.tasks.text import generate_task

    return generate_task(task, n_train=n_train, n_test=n_test, seed=seed)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def from_peers(task: str, peers: Path, log) -> dict:
    """The paper-size store of ``task`` in a ``tools.bench peers`` work folder (its newest run of the task)."""
    runs = sorted((peers / "tasks").glob(f"{task}-*"), key=lambda p: (p / "fv-store").stat().st_mtime)
    runs = [r for r in runs if (r / "fv-store").is_dir()]
    if not runs:
        raise SystemExit(f"{peers}/tasks: no {task}-* folder with an fv-store; run tools.bench peers for it first")
    folder = runs[-1]
    train, test = _read_jsonl(folder / "fv-train.jsonl"), _read_jsonl(folder / "fv-val.jsonl")
    log(f"{task}: {folder / 'fv-store'} ({len(train)} train, {len(test)} validation; from the peers run)")
    return {
        "store": folder / "fv-store",
        "train_path": folder / "fv-train.jsonl",
        "test_path": folder / "fv-val.jsonl",
        "train": train,
        "test": test,
    }


def prepare(task: str, workdir: Path, n_train: int, n_test: int, seed: int, model: str | None, log) -> dict:
    """Write the task's data and build (or reuse) its store; returns paths and labels."""
    import forvalue
    from forvalue.api import build_index
    from forvalue.tasks.text import write_jsonl

    folder = workdir / f"{task}-{n_train}x{n_test}-seed{seed}"
    train, test = task_rows(task, n_train, n_test, seed)
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(test, folder / "test.jsonl")
    store = folder / "store"
    started = time.perf_counter()
    cfg = forvalue.BuildConfig(model=forvalue.ModelConfig(path=model, device="cpu"), progress=False)
    report = build_index([folder / "train.jsonl"], store, cfg)  # resumes: a re-run writes nothing new
    seconds = time.perf_counter() - started
    log(
        f"{task}: {store} ({len(train)} train, {len(test)} validation; {report.written} written now in {seconds:.0f} s)"
    )
    return {
        "store": store,
        "train_path": folder / "train.jsonl",
        "test_path": folder / "test.jsonl",
        "train": train,
        "test": test,
    }


def run_variants(prep: dict, runner, variants, log) -> list[dict]:
    """AUC / recall of each product variant, with its scan time. The validation samples are encoded once per
    ``validation_tokens`` (what ``forvalue query`` does per call), then each variant is the product's exact scan
    (:func:`forvalue.engine.scan.score_all` after :func:`forvalue.engine.variant.apply_variant`)."""
    from forvalue.engine.scan import score_all
    from forvalue.engine.validation import encode_validation
    from forvalue.engine.variant import apply_variant, resolve_auto
    from forvalue.indexer.data import iter_samples
    from forvalue.metrics import class_retrieval
    from forvalue.schemas.config import DataConfig, QueryConfig
    from forvalue.storage.store import Store

    store = Store.open(prep["store"])
    labels_by_id = {r["id"]: r["label"] for r in prep["train"]}
    val_labels = [r["label"] for r in prep["test"]]
    samples = list(iter_samples([prep["test_path"]], DataConfig()))
    encoded = {}
    out = []

    def encode(which: str):  # once per validation positions, as each `forvalue query` call would
        if which not in encoded:
            encoded[which] = encode_validation(runner, samples, store.manifest, DataConfig(), tokens=which)
        return encoded[which]

    for name, center, tokens, normalize, whiten in variants:
        cfg = QueryConfig(
            exact=True,
            center=center,
            validation_tokens=tokens,
            normalize=normalize,
            whiten=whiten,
            progress=False,
            device="cpu",
        )
        t0 = time.perf_counter()
        # "auto": what the validation samples' own labels choose
        cfg, val, chosen = resolve_auto(cfg, store, encode, val_labels)
        val = apply_variant(val, store, cfg.center, cfg.whiten)  # whitened already when auto whitened
        ids, parts = [], []
        for _, block_ids, _, scores in score_all(store, val, cfg, runner.device):
            ids += block_ids
            parts.append(scores)
        seconds = time.perf_counter() - t0
        r = class_retrieval(np.concatenate(parts).T, [labels_by_id[i] for i in ids], val_labels)
        note = {} if chosen is None else {"note": _chosen(chosen["chosen"])}
        out.append({"variant": name, "seconds": seconds, **r, **note})
        log(f"  {name:30s} AUC {r['auc_mean']:.3f} recall {r['recall_mean']:.3f} ({seconds:.1f} s) {note}")
    return out


def run_probes(prep: dict, runner, log) -> list[dict]:
    """Variants that are not product options, from the stored rows in float64 (see the module docstring)."""
    import torch

    from forvalue.engine.scan import scan_blocks
    from forvalue.engine.scorer import ExactScorer
    from forvalue.engine.validation import ValidationSet, encode_validation
    from forvalue.indexer.convert import self_scores
    from forvalue.indexer.data import iter_samples
    from forvalue.metrics import class_retrieval
    from forvalue.schemas.config import DataConfig
    from forvalue.storage.rows import TrainBlock
    from forvalue.storage.store import Store

    store = Store.open(prep["store"])
    m = store.manifest
    parts, train_ids = [], []
    for _, batch, block in scan_blocks(store, 4096):
        parts.append(block)
        train_ids += batch.column("id").to_pylist()
    tr = {
        "h": np.concatenate([b.hidden for b in parts]).astype(np.float64),
        "ids": np.concatenate([b.ids for b in parts]),
        "v": np.concatenate([b.values for b in parts]).astype(np.float64),
        "L": np.concatenate([b.lengths for b in parts]),
    }
    samples = list(iter_samples([prep["test_path"]], DataConfig()))
    val = encode_validation(runner, samples, m, DataConfig())
    va = {"h": val.hidden.astype(np.float64), "ids": val.ids, "v": val.values.astype(np.float64), "L": val.lengths}
    by_id = {r["id"]: r for r in prep["train"]}
    train_samples = {s.id: s for s in iter_samples([prep["train_path"]], DataConfig())}

    def response_mask(side: dict, sample_list: list) -> np.ndarray:
        mask = []
        for s, n in zip(sample_list, side["L"]):
            r = runner.tokenize(s, "response", m.max_length, m.chat_template).n_scored
            mask.append(np.r_[np.zeros(n - r, bool), np.ones(r, bool)])
        return np.concatenate(mask)

    tr["resp"] = response_mask(tr, [train_samples[i] for i in train_ids])
    va["resp"] = response_mask(va, samples)
    mu = tr["h"].mean(0)
    seg = np.repeat(np.arange(tr["L"].size), tr["L"])
    pairs = np.unique(np.stack([np.repeat(seg, tr["ids"].shape[1]), tr["ids"].ravel()]), axis=1)
    df = np.bincount(pairs[1], minlength=int(max(tr["ids"].max(), va["ids"].max())) + 1)
    idf = np.log((1 + tr["L"].size) / (1 + df))

    def score(vh, vv, th, tv):
        v = ValidationSet(
            [None] * va["L"].size,
            vh.astype(np.float32),
            va["ids"],
            vv.astype(np.float32),
            va["L"],
            np.ones(va["L"].size),
        )
        block = TrainBlock(th.astype(np.float32), tr["ids"], tv.astype(np.float32), tr["L"], np.ones(tr["L"].size))
        return ExactScorer(v, torch.device("cpu")).score(block).T

    def self_norms(h, v):  # ||G_r||^2 per stored row under the probe's inner product, batched, float64
        return self_scores(h, tr["ids"], v, tr["L"])

    def token_normalised(h):
        return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)

    train_labels = [by_id[i]["label"] for i in train_ids]
    val_labels = [r["label"] for r in prep["test"]]
    root_idf = np.sqrt(idf[tr["ids"]])
    resp_v, resp_t = va["resp"][:, None], tr["resp"][:, None]
    tn_v, tn_t = token_normalised(va["h"] - mu), token_normalised(tr["h"] - mu)
    probes = {
        # name: (validation hidden, validation errors, train hidden, train errors), and the train side's own
        # (hidden, errors) whose self-score is its squared norm under the probe's inner product (cosine)
        "IDF-weighted errors": (va["h"], va["v"] * idf[va["ids"]], tr["h"], tr["v"], tr["h"], tr["v"] * root_idf),
        "centred, per-token normalised": (tn_v, va["v"], tn_t, tr["v"], tn_t, tr["v"]),
        "response both sides": (va["h"], va["v"] * resp_v, tr["h"], tr["v"] * resp_t, tr["h"], tr["v"] * resp_t),
        "response both sides, centred": (
            va["h"] - mu,
            va["v"] * resp_v,
            tr["h"] - mu,
            tr["v"] * resp_t,
            tr["h"] - mu,
            tr["v"] * resp_t,
        ),
    }
    out = []
    for name, (vh, vv, th, tv, nh, nv) in probes.items():
        s = score(vh, vv, th, tv)
        norms = self_norms(nh, nv)
        for normalize in ("none", "cosine"):
            scores = s if normalize == "none" else s / np.sqrt(np.maximum(norms, 1e-30))[None, :]
            r = class_retrieval(scores, train_labels, val_labels)
            label = name if normalize == "none" else f"{name}, cosine"
            out.append({"variant": f"probe: {label}", "seconds": float("nan"), **r})
            log(f"  probe {label:40s} AUC {r['auc_mean']:.3f} recall {r['recall_mean']:.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_variants", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=PAPER_TASKS + HARD_TASKS + ("shared_template",)
    )
    ap.add_argument("--n-train", type=int, default=30, help="training samples per class")
    ap.add_argument("--n-test", type=int, default=10, help="validation samples per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model folder (default: the product's default model)")
    ap.add_argument("--workdir", required=True, type=Path, help="data and stores (re-runs reuse the stores)")
    ap.add_argument(
        "--from-peers", type=Path, default=None, help="score the stores of this tools.bench peers work folder"
    )
    ap.add_argument(
        "--variants", nargs="+", default=None, choices=[v[0] for v in VARIANTS], help="only these product variants"
    )
    ap.add_argument("--probes", action="store_true", help="also the non-product variants (float64, from the rows)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--json", default=None, help="write all numbers as JSON here")
    args = ap.parse_args(argv)
    if args.n_train < 2 or args.n_test < 1:
        ap.error("--n-train must be >= 2 and --n-test >= 1")

    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.config import ModelConfig

    def log(msg: str) -> None:
        print(msg, flush=True)

    started = time.perf_counter()
    load = os.getloadavg()[0]
    runner = load_runner(ModelConfig(path=args.model, device="cpu"))
    results = {}
    for task in args.tasks:
        if args.from_peers is not None:
            prep = from_peers(task, args.from_peers, log)
        else:
            prep = prepare(task, args.workdir, args.n_train, args.n_test, args.seed, args.model, log)
        chosen = VARIANTS if args.variants is None else [v for v in VARIANTS if v[0] in args.variants]
        rows = run_variants(prep, runner, chosen, log)
        if args.probes:
            rows += run_probes(prep, runner, log)
        results[task] = {"n_train": len(prep["train"]), "n_test": len(prep["test"]), "rows": rows}
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU, shared with other "
        f"jobs (load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end). Model: "
        f"{args.model or 'default SmolLM2-135M-Instruct'}. "
        + (
            f"Stores of the peers run in {args.from_peers} (its training / validation sizes)"
            if args.from_peers is not None
            else f"Seed {args.seed}, {args.n_train} train + {args.n_test} validation per class"
        )
        + f"; total {time.perf_counter() - started:.0f} s.",
        f"Command: `python -m tools.bench_variants {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        "| variant | " + " | ".join(f"{t} AUC / recall" for t in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    names = [r["variant"] for r in next(iter(results.values()))["rows"]] if results else []
    for j, name in enumerate(names):
        cells = [
            f"{res['rows'][j]['auc_mean']:.3f} / {res['rows'][j]['recall_mean']:.3f}"
            + (f" (chose {res['rows'][j]['note']})" if "note" in res["rows"][j] else "")
            for res in results.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
