"""Quality / cost benchmark of For-Value against Emb and gradient baselines (paper Table 1 protocol).

For every task it writes the data once (``tools.generate_tasks``), then runs
each method in its own subprocess on the same rows and the same model (the product's
default SmolLM2-135M-Instruct unless ``--model`` is given):

* ``forvalue``  -- the product's public API only: ``forvalue.api.build_index`` into a fresh
  temporary store, then ``forvalue.api.run_query(keep_scores=True)``. Variants for
  experiments: ``forvalue:top_m=8,score_tokens=response,normalize=cosine``.
* ``emb``       -- alpha = 1 ablation: ``<sum_k h_vk, sum_k' h_ik'>`` of last hidden states
  over the same scored positions (see ``tools.bench_baselines``).
* ``grad``      -- TracIn / Hessian-free inner products of per-sample gradients of the
  summed log-likelihood w.r.t. LoRA-style zero-initialised ``B`` factors (rank 8, q/v of all
  layers) of the pretrained model, no fine-tuning; ``datainf`` -- DataInf on the same
  gradients. ``grad`` and ``datainf`` share one gradient pass (one subprocess); the time of
  ``datainf`` is the gradient pass plus its own solve. ``grad:finetune=E`` first fine-tunes the
  LoRA adapters for ``E`` epochs on the training set (AdamW, ``lr=3e-4``; the paper's
  baselines are computed after fine-tuning) and includes that time. The default method list runs
  ``grad:finetune=10`` (DataInf's reference recipe: 10 epochs, lr 3e-4, r=8 on q/v; here with
  one AdamW step per micro-batch of 8) on the first task only, because it costs about 20 For-Value
  runs; ``accum=A`` makes one step per ``A`` micro-batches (``accum=128`` = the reference's one
  step per epoch at 900 samples: its batch 64 x 16 accumulation). A method spec ending in
  ``@PREFIX`` runs only on the tasks whose name starts with PREFIX.

Per method and task: AUC and recall (mean +- std over validation samples; AUC against
same-class pseudo-labels, recall = share of the top-(class size) training samples that have
the validation sample's class), wall time (after the model is loaded: every forward and
backward pass, indexing and query included; model load is listed separately and is the same
for all), peak memory (peak RSS of the worker process above its RSS when the method started,
sampled every 10 ms; plus the worker's absolute ``ru_maxrss``). For the mislabeled tasks the
detection AUC: each training sample's score is its mean score over the (clean) validation set;
flipped samples should score lowest, so it is ROC-AUC of ``-score`` against ``flipped``.
Reproducibility: For-Value is run twice with the same seed into two separate stores and the
two score matrices are compared.

Usage::

    python -m tools.bench quality --out DIR -- --n-classes 3 --n-train 10 --n-test 2   # smoke test
    python -m tools.bench quality --out DIR            # the whole table, full protocol: DIR/quality.md + .json
    python -m tools.bench_quality --out bench.md       # the same suite on its own
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tools.common import emit, machine_facts, run_module
from tools.generate_tasks import DEFAULT_TASKS, add_data_options, run_tag, task_runs, write_task

# DataInf's reference fine-tune (the defaults of its src/sft_trainer.py): LoRA r=8 on q/v, lr 3e-4, 10 epochs.
# It is the slowest method by far, so by default it runs on the first task only.
FINETUNE_EPOCHS = 10
DEFAULT_METHODS = [
    "forvalue",
    "emb",
    "grad",
    "datainf",
    f"grad:finetune={FINETUNE_EPOCHS}@{DEFAULT_TASKS[0]}",
    # the product's audit settings (README, `audit run`): response tokens, cosine
    "forvalue:score_tokens=response,normalize=cosine@mislabeled",
]


# --------------------------------------------------------------------------- measurement


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds; ``peak_delta`` above the start."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start


# --------------------------------------------------------------------------- methods (worker side)


def split_scope(spec: str) -> tuple[str, str | None]:
    """``method@PREFIX`` -> (method, PREFIX): the method runs only on tasks whose name starts with PREFIX."""
    method, _, scope = spec.partition("@")
    return method, scope or None


def parse_method(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (an ``@PREFIX`` scope is ignored)."""
    name, _, rest = split_scope(spec)[0].partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        opts[key.strip()] = value.strip()
    return name, opts


def _samples(path: Path):
    from forvalue.indexer.data import iter_samples
    from forvalue.schemas.config import DataConfig

    return list(iter_samples([path], DataConfig()))


def run_forvalue(runner, train_path: Path, test_path: Path, workdir: Path, opts: dict, device: str) -> dict:
    import dataclasses

    from forvalue.api import build_index, run_query
    from forvalue.schemas.config import BuildConfig, EncodeConfig, ModelConfig, QueryConfig

    encode = EncodeConfig()
    if "top_m" in opts:
        encode = dataclasses.replace(encode, top_m=int(opts["top_m"]))
    if "score_tokens" in opts:
        encode = dataclasses.replace(encode, score_tokens=opts["score_tokens"])
    if "llr" in opts:  # keep only this fraction of positions, those with the lowest target probability
        encode = dataclasses.replace(encode, lowest_likelihood_ratio=float(opts["llr"]))
    normalize = opts.get("normalize", "none")
    store = Path(tempfile.mkdtemp(prefix="store-", dir=workdir))
    build = BuildConfig(model=ModelConfig(device=device), encode=encode, progress=False)
    report = build_index([train_path], store, build, runner=runner)
    t_index = time.perf_counter()
    result = run_query(
        store,
        [test_path],
        QueryConfig(device=device, progress=False, normalize=normalize),
        runner=runner,
        keep_scores=True,
    )
    return {
        "scores": result.scores,
        "train_ids": result.train_ids,
        "store": str(store),
        "extra": {
            "index_seconds": report.seconds,
            "query_seconds": result.seconds,
            "tokens_scored": report.tokens_scored,
            "top_m": encode.top_m,
            "score_tokens": encode.score_tokens,
            "normalize": normalize,
            "lowest_likelihood_ratio": encode.lowest_likelihood_ratio,
        },
        "_t_index": t_index,
    }


def forvalue_aggregate(runner, store: str, test_path: Path, device: str, normalize: str) -> tuple[np.ndarray, list]:
    """Mislabeled detection through the product: run_query(aggregate='mean')."""
    from forvalue.api import run_query
    from forvalue.schemas.config import QueryConfig

    res = run_query(
        store,
        [test_path],
        QueryConfig(device=device, progress=False, aggregate="mean", normalize=normalize),
        runner=runner,
        keep_scores=True,
    )
    return res.scores[0], res.train_ids


def worker(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.config import ModelConfig

    out = Path(spec["out"])
    name, opts = parse_method(spec["method"])
    t0 = time.perf_counter()
    runner = load_runner(ModelConfig(path=spec.get("model"), device=spec["device"]))
    with torch.no_grad():  # page in lazily mapped weights so the RSS delta is the method's own
        for p in runner.model.parameters():
            float(p.float().sum())
    load_s = time.perf_counter() - t0
    train_path, test_path = Path(spec["train"]), Path(spec["test"])
    train, test = _samples(train_path), _samples(test_path)
    train_ids = [s.id for s in train]
    result: dict = {"method": spec["method"], "model_load_seconds": load_s, "outputs": {}}
    mem = PeakRSS()
    with mem:
        started = time.perf_counter()
        if name == "forvalue":
            fv = run_forvalue(runner, train_path, test_path, Path(spec["workdir"]), opts, spec["device"])
            seconds = time.perf_counter() - started
            order = {i: k for k, i in enumerate(fv["train_ids"])}
            scores = fv["scores"][:, [order[i] for i in train_ids]]
            outputs = {spec["method"]: (scores, seconds)}
            result["extra"] = fv["extra"]
        elif name == "emb":
            from tools.bench_baselines import emb_vectors, tokenize_rows

            score_tokens = opts.get("score_tokens", "all")
            bs = int(opts.get("batch", spec["batch_size"]))
            v = emb_vectors(runner, tokenize_rows(runner.tokenizer, test, score_tokens), bs)
            t = emb_vectors(runner, tokenize_rows(runner.tokenizer, train, score_tokens), bs)
            scores = v @ t.T
            outputs = {spec["method"]: (scores, time.perf_counter() - started)}
            result["extra"] = {"score_tokens": score_tokens}
        elif name == "grad":
            from tools.bench_baselines import LoraGradients, datainf_scores, tokenize_rows, tracin_scores

            score_tokens = opts.get("score_tokens", "all")
            rank = int(opts.get("rank", spec["lora_rank"]))
            bs = int(opts.get("batch", spec["grad_batch"]))
            lg = LoraGradients(runner.model, rank=rank, seed=spec["seed"])
            tok_train = tokenize_rows(runner.tokenizer, train, score_tokens)
            epochs, accum = int(opts.get("finetune", 0)), int(opts.get("accum", 1))
            if epochs:  # the paper's setting: gradients of a LoRA fine-tuned model
                lg.finetune(
                    tok_train, epochs, float(opts.get("lr", 3e-4)), bs, runner.device, spec["seed"], accum=accum
                )
            g_val = lg.compute(tokenize_rows(runner.tokenizer, test, score_tokens), bs, runner.device)
            g_train = lg.compute(tok_train, bs, runner.device)
            t_grads = time.perf_counter()
            tracin = tracin_scores(g_val, g_train)
            t_tracin = time.perf_counter()
            outputs = {spec["method"]: (tracin, t_tracin - started)}
            if spec.get("datainf", True):
                di = datainf_scores(g_val, g_train, lg.offsets)
                label = "datainf" + spec["method"][len("grad") :]
                outputs[label] = (di, (t_grads - started) + (time.perf_counter() - t_tracin))
            result["extra"] = {
                "n_params": lg.n_params,
                "rank": rank,
                "grad_batch": bs,
                "finetune_epochs": epochs,
                "finetune_accum": accum,
                "finetune_seconds": lg.finetune_seconds,
                "gradient_seconds": t_grads - started,
                "score_tokens": score_tokens,
            }
            if spec.get("save_grads"):
                np.save(out / "g_val.npy", g_val)
                np.save(out / "g_train.npy", g_train)
        else:
            raise SystemExit(f"unknown method {name!r}")
    result["peak_rss_delta_bytes"] = mem.peak_delta
    result["rss_at_start_bytes"] = mem.start
    result["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for label, (scores, seconds) in outputs.items():
        fname = f"scores-{len(result['outputs'])}.npy"
        np.save(out / fname, scores)
        result["outputs"][label] = {"file": fname, "seconds": seconds}
    if name == "forvalue" and spec.get("aggregate"):
        agg, agg_ids = forvalue_aggregate(runner, fv["store"], test_path, spec["device"], fv["extra"]["normalize"])
        order = {i: k for k, i in enumerate(agg_ids)}
        np.save(out / "aggregate.npy", agg[[order[i] for i in train_ids]])
    if name == "forvalue" and not spec.get("keep_store"):
        shutil.rmtree(fv["store"], ignore_errors=True)
    result["train_ids"] = train_ids
    (out / "result.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver


def run_worker(spec: dict, log) -> dict:
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    started = time.perf_counter()
    proc = run_module(
        "tools.bench_quality",
        ["--worker", out / "spec.json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        log(proc.stdout[-4000:])
        raise RuntimeError(f"worker {spec['method']} failed with exit code {proc.returncode}")
    result = json.loads((out / "result.json").read_text())
    result["process_seconds"] = time.perf_counter() - started
    for label, o in result["outputs"].items():
        o["scores"] = np.load(out / o["file"])
    if (out / "aggregate.npy").exists():
        result["aggregate"] = np.load(out / "aggregate.npy")
    return result


def own_label_score(scores: np.ndarray, train_labels: list, val_labels: list) -> np.ndarray:
    """Mean score of each training sample over the validation samples of its own (given) label.

    ``scores`` is (n_val, n_train); a training sample whose label no validation sample has gets
    its mean over all validation samples (``audit run --flag-by label`` leaves such a sample unflagged, its flag
    score empty; the benchmark's AUC needs a value for every sample).
    """
    same = np.asarray(val_labels)[:, None] == np.asarray(train_labels)[None, :]
    count = same.sum(axis=0)
    own = (scores * same).sum(axis=0) / np.maximum(count, 1)
    return np.where(count > 0, own, scores.mean(axis=0))


def fmt_pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench_quality",
        description="For-Value vs Emb vs gradient baselines on the paper's text tasks.",
    )
    add_data_options(ap)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="forvalue[:top_m=M,score_tokens=all|response,normalize=none|cosine,llr=R], emb, "
        "grad[:rank=R,batch=B,finetune=E,lr=LR,accum=A], datainf; a suffix @PREFIX runs a method only on "
        "the tasks whose name starts with PREFIX",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="model folder (default: the product's default model)")
    ap.add_argument(
        "--batch-size", type=int, default=8, help="forward batch of the Emb baseline (For-Value's default is 8)"
    )
    ap.add_argument("--grad-batch", type=int, default=8, help="samples per backward pass of the gradient baseline")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument(
        "--repro",
        choices=["none", "first", "all"],
        default="first",
        help="run For-Value a second time (separate store) on no / the first / every task",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    ap.add_argument("--workdir", default=None, help="keep data and results here (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--json", default=None, help="write all numbers as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0

    from forvalue.metrics import class_retrieval, roc_auc

    methods = list(args.methods)
    want_datainf = "datainf" in methods
    methods = [m for m in methods if m != "datainf"]
    if want_datainf and not any(parse_method(m)[0] == "grad" for m in methods):
        methods.append("grad")  # datainf needs the gradient pass
    want_grad = any(parse_method(m)[0] == "grad" for m in args.methods)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    info = machine_facts()
    load_start = os.getloadavg()
    started_all = time.perf_counter()
    rows, repro_rows, extras = [], [], []
    for run_no, (task, noise) in enumerate(task_runs(args.tasks, args.noise_rates)):
        tag = run_tag(task, noise)
        tdir, train, test = write_task(
            workdir,
            task,
            noise,
            args.n_train,
            args.n_test,
            args.seed,
            args.n_classes,
            args.chatbot_names,
            args.math_reasons,
        )
        train_label = {r["id"]: r["label"] for r in train}
        flipped = {r["id"]: bool(r.get("flipped", False)) for r in train}
        val_labels = [r["label"] for r in test]
        log(f"[{time.perf_counter() - started_all:7.1f}s] {tag}: {len(train)} train / {len(test)} validation")
        do_repro = args.repro == "all" or (args.repro == "first" and run_no == 0)
        planned = [
            (split_scope(m)[0],) * 2 for m in methods if split_scope(m)[1] is None or task.startswith(split_scope(m)[1])
        ]
        if do_repro:
            planned.append(("forvalue", "forvalue#2"))
        results = {}
        for method, key in planned:
            spec = {
                "method": method,
                "device": args.device,
                "model": args.model,
                "seed": args.seed,
                "train": str(tdir / "train.jsonl"),
                "test": str(tdir / "test.jsonl"),
                "workdir": str(tdir),
                "out": str(tdir / key.replace(":", "_").replace(",", "_").replace("=", "-").replace("#", "_run")),
                "batch_size": args.batch_size,
                "grad_batch": args.grad_batch,
                "lora_rank": args.lora_rank,
                "threads": args.threads,
                "datainf": want_datainf,
                "aggregate": noise is not None and method == "forvalue",
            }
            log(f"[{time.perf_counter() - started_all:7.1f}s]   {key} ...")
            res = run_worker(spec, log)
            results[key] = res
            ids = res["train_ids"]
            labels = [train_label[i] for i in ids]
            for label, o in res["outputs"].items():
                if key == "forvalue#2":
                    continue
                if label.startswith("grad") and not want_grad:
                    continue
                if label.startswith("datainf") and not want_datainf:
                    continue
                scores = o["scores"]
                m = class_retrieval(scores, labels, val_labels)
                row = {
                    "task": tag,
                    "method": label,
                    **m,
                    "seconds": o["seconds"],
                    "peak_rss_delta": res["peak_rss_delta_bytes"],
                    "ru_maxrss": res["ru_maxrss_bytes"],
                    "model_load": res["model_load_seconds"],
                    "shared_pass": label.startswith(("grad", "datainf")),
                }
                if noise is not None:
                    mean_score = scores.mean(axis=0)
                    flip = np.array([flipped[i] for i in ids])
                    row["detect_auc"] = roc_auc(-mean_score, flip)
                    row["detect_auc_own"] = roc_auc(-own_label_score(scores, labels, val_labels), flip)
                    if "aggregate" in res:
                        row["detect_auc_aggregate_api"] = roc_auc(-res["aggregate"], flip)
                        row["aggregate_vs_mean_max_rel_diff"] = float(
                            np.abs(res["aggregate"] - mean_score).max() / max(np.abs(mean_score).max(), 1e-30)
                        )
                rows.append(row)
                log(
                    f"      {label}: AUC {fmt_pm(m['auc_mean'], m['auc_std'])}  recall "
                    f"{fmt_pm(m['recall_mean'], m['recall_std'])}"
                    f"  {o['seconds']:.1f}s"
                    + (
                        f"  detect AUC {row['detect_auc']:.3f} / {row['detect_auc_own']:.3f}"
                        if noise is not None
                        else ""
                    )
                )
            if res.get("extra"):
                extras.append({"task": tag, "method": key, **res["extra"]})
        if do_repro:
            a = results["forvalue"]["outputs"]["forvalue"]["scores"]
            b = results["forvalue#2"]["outputs"]["forvalue"]["scores"]
            repro_rows.append(
                {
                    "task": tag,
                    "identical": bool(np.array_equal(a, b)),
                    "max_abs_diff": float(np.abs(a - b).max()),
                    "max_abs_score": float(np.abs(a).max()),
                    "seconds_run1": results["forvalue"]["outputs"]["forvalue"]["seconds"],
                    "seconds_run2": results["forvalue#2"]["outputs"]["forvalue"]["seconds"],
                }
            )
            log(
                f"      reproducibility: identical={repro_rows[-1]['identical']} max abs diff "
                f"{repro_rows[-1]['max_abs_diff']:.3g}"
            )
    total = time.perf_counter() - started_all
    load_end = os.getloadavg()

    # ---------------------------------------------------------------- report
    w = lines.append
    w("# For-Value quality benchmark (paper Table 1 protocol)")
    w("")
    w(
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM, torch {info['torch']} "
        f"(workers: {args.threads or info['torch_threads']} torch threads), transformers {info.get('transformers')}, "
        f"python {info['python']}, "
        f"device `{args.device}`{' (' + info['cuda'] + ')' if info['cuda'] else ''}. "
        f"Load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} (shared machine: timings are noisy; "
        "methods are compared within one run)."
    )
    w(
        f"Model: {args.model or 'default SmolLM2-135M-Instruct (float32)'}. Data: "
        f"`forvalue.tasks.text.generate_task`, seed {args.seed}, "
        f"{args.n_classes} classes x {args.n_train} train + {args.n_test} validation per class; noise rates "
        f"{args.noise_rates}; "
        f"chatbot names per sentence rule {args.chatbot_names}; math reasons {args.math_reasons}."
    )
    command = " ".join(argv if argv is not None else sys.argv[1:])
    w(f"Command: `python -m tools.bench_quality {command}`; total {total:.0f} s.")
    w("")
    w("| task | method | AUC | recall | time (s) | peak RSS Δ (MiB) | detect AUC: mean / own label |")
    w("|---|---|---|---|---|---|---|")
    for r in rows:
        det = f"{r['detect_auc']:.3f} / {r['detect_auc_own']:.3f}" if "detect_auc" in r else ""
        star = "*" if r["shared_pass"] else ""
        w(
            f"| {r['task']} | {r['method']} | {fmt_pm(r['auc_mean'], r['auc_std'])} | "
            f"{fmt_pm(r['recall_mean'], r['recall_std'])} "
            f"| {r['seconds']:.1f}{star} | {fmt_mib(r['peak_rss_delta'])}{star} | {det} |"
        )
    w("")
    w(
        "- AUC / recall: per validation sample, then mean ± std over the validation samples (labels of mislabeled "
        "tasks are "
        "the given, partly flipped, training labels)."
    )
    w(
        "- time: wall-clock seconds of the method after the model is loaded (For-Value: `build_index` + `run_query`, "
        "incl. "
        "writing the store; Emb: forward passes; grad: forward+backward passes and inner products). Model load "
        f"(same for all, not included): {np.mean([r['model_load'] for r in rows]):.1f} s on average."
    )
    w(
        "- peak RSS Δ: the worker's peak resident set size (sampled every 10 ms) minus its RSS when the method started "
        "(model already loaded). Absolute worker peaks (`ru_maxrss`): "
        + ", ".join(
            sorted({f"{r['method']} {fmt_mib(r['ru_maxrss'])} MiB" for r in rows if r["task"] == rows[0]["task"]})
        )
        + "."
    )
    w("- `*` grad and datainf share one gradient pass (one process); datainf's time = gradient pass + its own solve.")
    w(
        "- detect AUC (mislabeled tasks): ROC-AUC of -score against `flipped` (flipped samples should score lowest), "
        "each training sample scored by its mean score over the clean validation set (mean), or over the validation "
        "samples that have its given label (own label)."
    )
    agg = [r for r in rows if "detect_auc_aggregate_api" in r]
    if agg:
        w(
            "- For-Value detection through the product's `run_query(aggregate='mean')`: "
            + ", ".join(
                f"{r['task']} {r['method']}: AUC {r['detect_auc_aggregate_api']:.3f} (max rel. diff to the matrix mean "
                f"{r['aggregate_vs_mean_max_rel_diff']:.1e})"
                for r in agg
            )
            + "."
        )
    if repro_rows:
        w("")
        w("Reproducibility (For-Value twice, same seed, two separate stores, two processes):")
        w("")
        w("| task | identical | max abs diff | max abs score | time run 1 / run 2 (s) |")
        w("|---|---|---|---|---|")
        for r in repro_rows:
            w(
                f"| {r['task']} | {r['identical']} | {r['max_abs_diff']:.3g} | {r['max_abs_score']:.3g} | "
                f"{r['seconds_run1']:.1f} / {r['seconds_run2']:.1f} |"
            )
    fv = {r["task"]: r for r in rows if r["method"] == "forvalue"}
    baselines = sorted({r["method"] for r in rows if parse_method(r["method"])[0] in ("grad", "datainf")})
    for method in baselines:
        gr = {r["task"]: r for r in rows if r["method"] == method}
        if fv and gr:
            w("")
            w(
                f"Time ratio {method} / forvalue: "
                + ", ".join(f"{t} {gr[t]['seconds'] / fv[t]['seconds']:.2f}x" for t in fv if t in gr)
                + "."
            )
    w("")
    w(
        "Settings: "
        + "; ".join(
            sorted(
                {
                    f"{e['method']}: "
                    + ", ".join(
                        f"{k}={v}"
                        for k, v in e.items()
                        if k not in ("task", "method") and not k.endswith("seconds") and k != "tokens_scored"
                    )
                    for e in extras
                }
            )
        )
    )
    report = "\n".join(lines)
    emit(report, Path(args.out) if args.out else None)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": info, "rows": rows, "repro": repro_rows, "extras": extras, "total_seconds": total},
                indent=1,
                default=float,
            )
        )
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
