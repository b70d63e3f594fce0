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
  ``flag_score``, the mean score over the validation samples with the sample's own label.
* ``random``          seeded uniform.
* ``emb``             alpha = 1 ablation (hidden states only): ``<mean_v sum_t h_vt, sum_t h_it>``
  (``tools.bench_baselines.emb_vectors``, as in ``tools/bench_quality.py``).
* ``loss``            perplexity filter: lowest response loss under the warm-up model.
* ``bm25``            Okapi BM25 (k1 = 1.5, b = 0.75) of each pool sample against each validation
  sample (word tokens, lower-cased), averaged over the validation set.
* ``grad``            LESS-style: LoRA warm-up fine-tune on a random ``warmup`` share of the pool,
  per-sample gradients w.r.t. the LoRA ``B`` factors (``tools.bench_baselines.LoraGradients``),
  mean cosine similarity to the validation gradients. Its time includes the warm-up.
* ``distill``         the distilled value model (``forvalue.distill``): build + audit a random
  ``distill_fraction`` of the pool, ``distill`` a student on it, ``estimate`` the whole pool.

Brittleness ranks per validation sample: ``forvalue`` (``run_query`` scores), ``emb``, ``bm25``,
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
import hashlib
import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METHODS = ("forvalue", "forvalue-label", "random", "emb", "loss", "bm25", "grad", "distill")
BRITTLE_METHODS = ("forvalue", "random", "emb", "bm25", "grad")
PARTS = ("targeted", "noisy", "brittle")


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration (``--quick`` or the full protocol); every field is in the report."""

    seeds: tuple[int, ...] = (0, 1, 2)
    parts: tuple[str, ...] = PARTS
    methods: tuple[str, ...] = METHODS
    # targeted: pool = 3 tasks x n_classes x pool_per_class
    n_classes: int = 10
    pool_per_class: int = 4
    targets: tuple[str, ...] = ("sentence_transformations", "math_no_reasoning:0,1,2")
    val_size: int = 10
    eval_size: int = 16
    ks: tuple[float, ...] = (5, 10, 25)
    # noisy: classification task with flipped labels
    noisy_task: str = "math"
    noisy_classes: int = 10
    noisy_per_class: int = 6
    noise_rates: tuple[float, ...] = (0.2, 0.5)
    noisy_ks: tuple[float, ...] = (25,)
    # brittle: clean classification task
    brittle_task: str = "math"
    brittle_classes: int = 10
    brittle_per_class: int = 6
    brittle_val_per_class: int = 1
    brittle_ks: tuple[int, ...] = (10, 20, 40)
    brittle_samples: int = 1
    # fine-tuning (the same for every subset)
    rank: int = 8
    lr: float = 1e-3
    epochs: int = 2
    batch: int = 4
    max_length: int = 160
    warmup: float = 0.1
    distill_fraction: float = 0.2


QUICK = Settings(
    seeds=(0,),
    n_classes=3,
    pool_per_class=4,
    targets=("sentence_transformations", "math_with_reasoning:0,1"),
    val_size=4,
    eval_size=6,
    noisy_classes=3,
    noisy_per_class=8,
    brittle_classes=3,
    brittle_per_class=6,
    brittle_val_per_class=2,
    brittle_ks=(2, 4, 8),
    brittle_samples=1,
    epochs=1,
    distill_fraction=0.34,
)


# --------------------------------------------------------------------------- small helpers


def sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_rows(rows: list[dict], path: Path) -> Path:
    """The columns the product reads (id, prompt, response, label) as JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = ("id", "prompt", "response", "label")
    path.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows))
    return path


def top_n(values: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` largest values (ties by position)."""
    return np.argsort(-np.asarray(values, np.float64), kind="stable")[:n].tolist()


def n_of(k: float, total: int) -> int:
    """k percent of ``total`` (at least 1)."""
    return max(1, int(round(k / 100.0 * total)))


# --------------------------------------------------------------------------- BM25

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25(queries: list[str], docs: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 scores (n_queries, n_docs): ``sum_t idf(t) tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))``.

    ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))`` (never negative); a query term counts once
    per occurrence in the query.
    """
    toks = [Counter(words(d)) for d in docs]
    lens = np.array([sum(c.values()) for c in toks], np.float64)
    avgdl = max(lens.mean(), 1e-9) if len(docs) else 1.0
    df = Counter(t for c in toks for t in c)
    n = len(docs)
    norm = k1 * (1.0 - b + b * lens / avgdl)
    out = np.zeros((len(queries), n))
    for qi, q in enumerate(queries):
        for term, qtf in Counter(words(q)).items():
            if term not in df:
                continue
            idf = math.log(1.0 + (n - df[term] + 0.5) / (df[term] + 0.5))
            tf = np.array([c.get(term, 0) for c in toks], np.float64)
            out[qi] += qtf * idf * tf * (k1 + 1.0) / (tf + norm)
    return out


# --------------------------------------------------------------------------- data


def target_classes(spec: str, n_classes: int) -> tuple[str, list[int]]:
    """``task`` or ``task:0,1,2`` -> (task, class indices)."""
    task, _, cls = spec.partition(":")
    idx = [int(c) for c in cls.split(",")] if cls else list(range(n_classes))
    return task, idx


def targeted_data(s: Settings, seed: int) -> tuple[list[dict], dict[str, tuple[list[dict], list[dict]]]]:
    """The mixed pool and, per target, (validation rows, evaluation rows)."""
    from forvalue.tasks.text import TASKS, generate_task

    per_target_class = {}
    for spec in s.targets:
        _, idx = target_classes(spec, s.n_classes)
        per_target_class[spec] = (math.ceil(s.val_size / len(idx)), math.ceil(s.eval_size / len(idx)))
    n_test = max(v + e for v, e in per_target_class.values())
    pool, tests = [], {}
    for task in TASKS:
        train, test = generate_task(task, n_train=s.pool_per_class, n_test=n_test, seed=seed, n_classes=s.n_classes)
        for r in train:
            pool.append({**r, "label": f"{task}/{r['label']}", "task": task, "class": r["id"].split("-")[-2]})
        tests[task] = [
            {**r, "label": f"{task}/{r['label']}", "task": task, "class": r["id"].split("-")[-2]} for r in test
        ]
    targets = {}
    for spec in s.targets:
        task, idx = target_classes(spec, s.n_classes)
        nv, ne = per_target_class[spec]
        val, ev = [], []
        for c in idx:
            rows = [r for r in tests[task] if r["class"] == str(c)]
            val += rows[:nv]
            ev += rows[nv : nv + ne]
        targets[spec] = (val[: s.val_size] if len(val) > s.val_size else val, ev)
    return pool, targets


def in_target(row: dict, spec: str, n_classes: int) -> bool:
    task, idx = target_classes(spec, n_classes)
    return row["task"] == task and int(row["class"]) in idx


def classification_data(task: str, noise: float, seed: int, n_classes: int, per_class: int, n_test: int):
    from forvalue.tasks.text import mislabeled

    return mislabeled(task, noise, seed, n_train=per_class, n_test=n_test, n_classes=n_classes)


# --------------------------------------------------------------------------- the suite


@dataclass
class Counts:
    run: int = 0
    reused: int = 0
    selections_run: int = 0
    selections_reused: int = 0
    skipped: int = 0  # rows (or whole parts of a seed) left out by --cached-only because they have not run


class NotCached(Exception):
    """``--cached-only``: a selection or fine-tune that has not run yet."""


class Suite:
    """Runs the parts, caching every selection and fine-tune under ``out/cache``."""

    def __init__(self, s: Settings, out: Path, model: str | None, device: str):
        self.s, self.out, self.model_path, self.device = s, out, model, device
        self.cache = out / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.work = out / "work"
        self._runner = None
        self.counts = Counts()
        self.cached_only = False
        self.hp = {
            "rank": s.rank,
            "lr": s.lr,
            "epochs": s.epochs,
            "batch": s.batch,
            "max_length": s.max_length,
            "model": model or "default",
        }

    # -- model -----------------------------------------------------------------------------------
    @property
    def runner(self):
        if self._runner is None:
            from forvalue.indexer.model_runner import load_runner
            from forvalue.schemas.config import ModelConfig
            from tools._bench_common import quiet_transformers

            quiet_transformers()
            self._runner = load_runner(ModelConfig(path=self.model_path, device=self.device))
        return self._runner

    def tok(self, rows):
        from tools.selection_lora import sft_tokenize

        return sft_tokenize(self.runner.tokenizer, rows, self.s.max_length)

    # -- caches ------------------------------------------------------------------------------------
    def _cached(self, kind: str, key: dict, compute):
        """The cached result of ``key``, else ``compute()`` saved (``--cached-only``: :class:`NotCached`)."""
        path = self.cache / f"{kind}-{sha(key)}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if data["key"] == json.loads(json.dumps(key, default=str)):
                if kind == "ft":
                    self.counts.reused += 1
                else:
                    self.counts.selections_reused += 1
                return data["result"]
        if self.cached_only:
            raise NotCached(kind)
        result = compute()
        if kind == "ft":
            self.counts.run += 1
        else:
            self.counts.selections_run += 1
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}, default=float))
        tmp.replace(path)
        return result

    def ft_key(self, key: dict, train_rows: list[dict], eval_rows: list[dict], seed: int) -> dict:
        """The cache key of a fine-tune: what it trains on and is evaluated on, not which method chose it.

        Two methods (or two k) that select the same training set share one fine-tune; the part and
        its pool (target, noise rate, sample) stay in the key because ids repeat across pools.
        """
        return {
            **{k: v for k, v in key.items() if k not in ("method", "k")},
            "hp": self.hp,
            "seed": seed,
            "train": sha([r["id"] for r in train_rows]),
            "eval": sha([r["id"] for r in eval_rows]),
        }

    def finetune_eval(
        self, key: dict, train_rows: list[dict], eval_rows: list[dict], seed: int, keep_adapters: bool = False
    ) -> dict:
        """Fine-tune fresh adapters on ``train_rows``, evaluate on ``eval_rows`` (cached by ``key``)."""
        key = self.ft_key(key, train_rows, eval_rows, seed)

        def compute():
            from tools.selection_lora import Lora, evaluate

            lora = Lora(self.runner.model, self.s.rank, seed)
            seconds = lora.finetune(self.tok(train_rows), self.s.epochs, self.s.lr, self.s.batch, seed)
            with lora.active():
                res = evaluate(self.runner.model, self.runner.tokenizer, eval_rows, self.tok(eval_rows))
            res.update(train_seconds=seconds, n_train=len(train_rows))
            if keep_adapters:
                import torch

                torch.save(lora.state(), self.cache / f"adapters-{sha(key)}.pt")
            return res

        return self._cached("ft", key, compute)

    def adapters(self, key: dict, train_rows: list[dict], eval_rows: list[dict], seed: int):
        """The adapters of a cached ``keep_adapters`` fine-tune (re-trained if the file is gone)."""
        import torch

        from tools.selection_lora import Lora

        full = self.ft_key(key, train_rows, eval_rows, seed)
        path = self.cache / f"adapters-{sha(full)}.pt"
        lora = Lora(self.runner.model, self.s.rank, seed)
        if not path.exists():
            lora.finetune(self.tok(train_rows), self.s.epochs, self.s.lr, self.s.batch, seed)
            torch.save(lora.state(), path)
        lora.load_state(torch.load(path))
        return lora

    # -- selection values --------------------------------------------------------------------------
    def values(self, ctx: PoolContext, method: str, val: list[dict], key: dict) -> dict:
        """``{"values": [...], "seconds": s}`` (higher = select first) for the pool of ``ctx``."""
        return self._cached(
            "sel",
            {**key, "method": method, "hp": self.hp, "pool": ctx.pool_sha, "val": sha([r["id"] for r in val])},
            lambda: ctx.compute(method, val),
        )


class PoolContext:
    """Everything a method needs about one pool, computed once on first use (with its time)."""

    def __init__(self, suite: Suite, pool: list[dict], workdir: Path, seed: int):
        self.suite, self.pool, self.workdir, self.seed = suite, pool, workdir, seed
        self.pool_sha = sha([r["id"] for r in pool])
        self._memo: dict = {}
        self.n_audits = 0

    def _once(self, name: str, fn):
        if name not in self._memo:
            t0 = time.perf_counter()
            out = fn()
            self._memo[name] = (out, time.perf_counter() - t0)
        return self._memo[name]

    # shared pieces
    def pool_file(self) -> Path:
        return write_rows(self.pool, self.workdir / "pool.jsonl")

    def store(self, name: str = "store", rows: list[dict] | None = None):
        """(path, build seconds) of a store of ``rows`` (default: the pool), built once per work folder.

        A finished build leaves ``<name>.done`` (the rows' ids hash and the build time), so a resumed run
        reuses the store and charges the methods that need it the time the build took.
        """
        rows = rows if rows is not None else self.pool
        path, done = self.workdir / name, self.workdir / f"{name}.done.json"
        if name not in self._memo and done.exists():
            mark = json.loads(done.read_text())
            if mark["ids"] == sha([r["id"] for r in rows]) and path.exists():
                self._memo[name] = (path, float(mark["seconds"]))

        def build():
            from forvalue import BuildConfig, ModelConfig
            from forvalue.indexer.build import build_index

            shutil.rmtree(path, ignore_errors=True)
            data = write_rows(rows, self.workdir / f"{name}.jsonl")
            build_index(
                [data],
                path,
                BuildConfig(model=ModelConfig(path=self.suite.model_path, device=self.suite.device), progress=False),
                runner=self.suite.runner,
            )
            return path

        fresh = name not in self._memo
        out = self._once(name, build)
        if fresh:
            done.write_text(json.dumps({"ids": sha([r["id"] for r in rows]), "seconds": out[1]}))
        return out

    def audit(self, store: Path, val: list[dict]) -> tuple[str, float]:
        """(audit name, audit seconds) of ``val`` against ``store``: run once, then reused (also by a resumed run).

        The caller charges the returned seconds to its method, whether the audit ran now or before.
        """
        from forvalue import AuditConfig
        from forvalue.audit import run_audit

        name = f"a{sha([r['id'] for r in val])[:10]}"
        done = store.parent / f"{store.name}.{name}.done.json"
        if done.exists():
            return name, float(json.loads(done.read_text())["seconds"])
        self.n_audits += 1
        vfile = write_rows(val, self.workdir / f"val-{name}.jsonl")
        t0 = time.perf_counter()
        run_audit(
            store,
            [vfile],
            name,
            AuditConfig(flag_by="label", progress=False, device=self.suite.device, flag_fraction=None),
            runner=self.suite.runner,
        )
        seconds = time.perf_counter() - t0
        done.write_text(json.dumps({"seconds": seconds}))
        return name, seconds

    def emb_pool(self):
        from tools.bench_baselines import emb_vectors, tokenize_rows

        return self._once(
            "emb",
            lambda: emb_vectors(
                self.suite.runner,
                tokenize_rows(self.suite.runner.tokenizer, [self._sample(r) for r in self.pool], "all"),
            ),
        )

    def warmup(self):
        def train():
            from tools.selection_lora import Lora

            rng = np.random.default_rng([self.seed, 7])
            n = max(2, int(round(self.suite.s.warmup * len(self.pool))))
            rows = [self.pool[i] for i in sorted(rng.choice(len(self.pool), n, replace=False))]
            lora = Lora(self.suite.runner.model, self.suite.s.rank, self.seed)
            lora.finetune(self.suite.tok(rows), self.suite.s.epochs, self.suite.s.lr, self.suite.s.batch, self.seed)
            return lora

        return self._once("warmup", train)

    def pool_losses(self):
        def run():
            from tools.selection_lora import sample_losses

            lora, _ = self.warmup()
            with lora.active():
                return sample_losses(self.suite.runner.model, self.suite.tok(self.pool))

        return self._once("losses", run)

    def pool_grads(self):
        def run():
            lora, _ = self.warmup()
            g = lora.gradients(self.suite.tok(self.pool), 8)
            return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)

        return self._once("grads", run)

    def distill_sub(self):
        rng = np.random.default_rng([self.seed, 11])
        n = max(8, int(round(self.suite.s.distill_fraction * len(self.pool))))
        idx = sorted(rng.choice(len(self.pool), min(n, len(self.pool)), replace=False))
        return [self.pool[i] for i in idx]

    @staticmethod
    def _sample(r: dict):
        from forvalue.indexer.data import Sample

        return Sample(
            id=r["id"],
            prompt=r["prompt"],
            response=r["response"],
            text=None,
            label=r.get("label"),
            source=f"bench:{r['id']}",
        )

    # one method
    def compute(self, method: str, val: list[dict]) -> dict:
        ids = [r["id"] for r in self.pool]
        t0 = time.perf_counter()
        shared = 0.0
        extra: dict = {}
        if method == "random":
            rng = np.random.default_rng([self.seed, int(sha([r["id"] for r in val]), 16) % (2**32)])
            values = rng.random(len(self.pool))
        elif method in ("forvalue", "forvalue-label"):
            from forvalue.audit import load_audit, select_subset

            store, shared = self.store()
            t_audit = time.perf_counter()
            name, audit_seconds = self.audit(store, val)
            t0 += time.perf_counter() - t_audit  # the audit is charged by its recorded time, run now or before
            shared += audit_seconds
            table, _ = load_audit(store, name)
            order = {i: k for k, i in enumerate(table.column("id").to_pylist())}
            col = "score_mean" if method == "forvalue" else "flag_score"
            raw = table.column(col).to_numpy(zero_copy_only=False)
            values = np.array([raw[order[i]] for i in ids])
            if method == "forvalue":  # the product's own selection path, for every k of the suite
                extra["select_subset"] = {
                    str(n): [r["id"] for r in select_subset(store, name, top=str(n)).rows()]
                    for n in {n_of(k, len(ids)) for k in self.suite.s.ks + self.suite.s.noisy_ks}
                }
        elif method == "emb":
            from tools.bench_baselines import emb_vectors, tokenize_rows

            pool_emb, shared = self.emb_pool()
            v = emb_vectors(
                self.suite.runner, tokenize_rows(self.suite.runner.tokenizer, [self._sample(r) for r in val], "all")
            )
            values = pool_emb @ v.mean(axis=0)
        elif method == "loss":
            (losses, t_loss), (_, t_warm) = self.pool_losses(), self.warmup()
            shared = t_loss + t_warm
            values = -losses
        elif method == "bm25":
            values = bm25(
                [r["prompt"] + r["response"] for r in val], [r["prompt"] + r["response"] for r in self.pool]
            ).mean(axis=0)
        elif method == "grad":
            (g, t_grads), (lora, t_warm) = self.pool_grads(), self.warmup()
            shared = t_grads + t_warm
            gv = lora.gradients(self.suite.tok(val), 8)
            gv = gv / np.maximum(np.linalg.norm(gv, axis=1, keepdims=True), 1e-30)
            values = g.astype(np.float64) @ gv.mean(axis=0).astype(np.float64)
        elif method == "distill":
            from forvalue import DistillConfig, estimate
            from forvalue.distill import distill_value_model

            sub = self.distill_sub()
            store, shared = self.store("distill-store", sub)
            t_audit = time.perf_counter()
            name, audit_seconds = self.audit(store, val)
            t0 += time.perf_counter() - t_audit
            shared += audit_seconds
            vm = self.workdir / f"vm-{name}"
            shutil.rmtree(vm, ignore_errors=True)
            rep = distill_value_model(store, name, vm, DistillConfig(seed=self.seed))
            est = estimate([self.pool_file()], vm)
            table = est.table
            got = dict(zip(table.column("id").to_pylist(), table.column("value").to_numpy(zero_copy_only=False)))
            values = np.array([got[i] for i in ids])
            extra["student"] = rep.student
            extra["audited"] = len(sub)
        else:
            raise ValueError(f"unknown method {method!r}")
        own = time.perf_counter() - t0
        return {"values": [float(x) for x in values], "seconds": own + shared, **extra}

    def matrix(self, method: str, val: list[dict], lora=None) -> np.ndarray:
        """Per-validation-sample scores (n_val, n_pool), higher = supports the sample more."""
        if method == "forvalue":
            from forvalue import QueryConfig
            from forvalue.api import run_query

            store, _ = self.store()
            vfile = write_rows(val, self.workdir / "brittle-val.jsonl")
            res = run_query(
                store,
                [vfile],
                QueryConfig(device=self.suite.device, progress=False, exact=True),
                runner=self.suite.runner,
                keep_scores=True,
            )
            order = {i: k for k, i in enumerate(res.train_ids)}
            return np.asarray(res.scores)[:, [order[r["id"]] for r in self.pool]]
        if method == "emb":
            from tools.bench_baselines import emb_vectors, tokenize_rows

            pool_emb, _ = self.emb_pool()
            v = emb_vectors(
                self.suite.runner, tokenize_rows(self.suite.runner.tokenizer, [self._sample(r) for r in val], "all")
            )
            return v @ pool_emb.T
        if method == "bm25":
            return bm25([r["prompt"] + r["response"] for r in val], [r["prompt"] + r["response"] for r in self.pool])
        if method == "grad":
            g = lora.gradients(self.suite.tok(self.pool), 8)
            gv = lora.gradients(self.suite.tok(val), 8)
            g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)
            gv = gv / np.maximum(np.linalg.norm(gv, axis=1, keepdims=True), 1e-30)
            return gv.astype(np.float64) @ g.astype(np.float64).T
        raise ValueError(method)


# --------------------------------------------------------------------------- parts


def selection_ids(sel: dict, method: str, n: int, pool: list[dict]) -> list[int]:
    if method == "forvalue" and str(n) in sel.get("select_subset", {}):
        pos = {r["id"]: k for k, r in enumerate(pool)}
        return [pos[i] for i in sel["select_subset"][str(n)]]
    return top_n(np.array(sel["values"]), n)


def run_targeted(suite: Suite, seed: int) -> list[dict]:
    s = suite.s
    pool, targets = targeted_data(s, seed)
    ctx = PoolContext(suite, pool, suite.work / f"targeted-s{seed}", seed)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec, (val, ev) in targets.items():
        for method in s.methods:
            try:
                sel = suite.values(ctx, method, val, {"part": "targeted", "seed": seed, "target": spec})
            except NotCached:
                suite.counts.skipped += len(s.ks)
                continue
            for k in s.ks:
                n = n_of(k, len(pool))
                chosen = selection_ids(sel, method, n, pool)
                train = [pool[i] for i in chosen]
                try:
                    res = suite.finetune_eval(
                        {"part": "targeted", "target": spec, "method": method, "k": k}, train, ev, seed
                    )
                except NotCached:
                    suite.counts.skipped += 1
                    continue
                row = {
                    "part": "targeted",
                    "seed": seed,
                    "target": spec,
                    "method": method,
                    "k": k,
                    "n": n,
                    "loss": res["loss"],
                    "acc": res["acc"],
                    "select_seconds": sel["seconds"],
                    "train_seconds": res["train_seconds"],
                    "in_target": float(np.mean([in_target(r, spec, s.n_classes) for r in train])),
                }
                rows.append(row)
                log(
                    f"  targeted s{seed} {spec} {method:<14} k={k:<4} n={n:<4} loss {row['loss']:.3f} "
                    f"acc {row['acc']:.3f} in-target {row['in_target']:.2f} select {sel['seconds']:.1f}s "
                    f"train {res['train_seconds']:.1f}s"
                )
    return rows


def run_noisy(suite: Suite, seed: int) -> list[dict]:
    from forvalue.metrics import roc_auc

    s = suite.s
    rows = []
    for noise in s.noise_rates:
        n_val = math.ceil(s.val_size / s.noisy_classes)
        n_ev = math.ceil(s.eval_size / s.noisy_classes)
        pool, test = classification_data(s.noisy_task, noise, seed, s.noisy_classes, s.noisy_per_class, n_val + n_ev)
        by_class: dict[str, list[dict]] = {}
        for r in test:
            by_class.setdefault(r["label"], []).append(r)
        val = [r for rs in by_class.values() for r in rs[:n_val]]
        ev = [r for rs in by_class.values() for r in rs[n_val:]]
        flipped = np.array([bool(r["flipped"]) for r in pool])
        ctx = PoolContext(suite, pool, suite.work / f"noisy{noise}-s{seed}", seed)
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        tag = f"{int(round(noise * 100))}% flipped"
        # the loss baseline for detection: a model fine-tuned on the whole noisy pool
        key = {"part": "noisy", "noise": noise, "method": "all", "k": 100}
        full = suite.finetune_eval(key, pool, ev, seed, keep_adapters=True)

        def pool_loss_under_full():
            from tools.selection_lora import sample_losses

            lora = suite.adapters(key, pool, ev, seed)
            t0 = time.perf_counter()
            with lora.active():
                losses = sample_losses(suite.runner.model, suite.tok(pool))
            return {"values": [float(-x) for x in losses], "seconds": time.perf_counter() - t0}

        full_loss = suite._cached(
            "sel",
            {**key, "seed": seed, "what": "pool-loss", "hp": suite.hp, "pool": ctx.pool_sha},
            pool_loss_under_full,
        )
        rows.append(
            {
                "part": "noisy",
                "seed": seed,
                "noise": tag,
                "method": "all (no selection)",
                "k": 100,
                "n": len(pool),
                "clean": float(1 - flipped.mean()),
                "acc": full["acc"],
                "loss": full["loss"],
                "detect_auc": roc_auc(-np.array(full_loss["values"]), flipped),
                "select_seconds": full["train_seconds"] + full_loss["seconds"],
                "train_seconds": full["train_seconds"],
            }
        )
        for method in s.methods:
            sel = suite.values(ctx, method, val, {"part": "noisy", "seed": seed, "noise": noise})
            auc = roc_auc(-np.array(sel["values"]), flipped) if method != "random" else float("nan")
            for k in s.noisy_ks:
                n = n_of(k, len(pool))
                chosen = selection_ids(sel, method, n, pool)
                train = [pool[i] for i in chosen]
                res = suite.finetune_eval({"part": "noisy", "noise": noise, "method": method, "k": k}, train, ev, seed)
                row = {
                    "part": "noisy",
                    "seed": seed,
                    "noise": tag,
                    "method": method,
                    "k": k,
                    "n": n,
                    "clean": float(1 - flipped[chosen].mean()),
                    "acc": res["acc"],
                    "loss": res["loss"],
                    "detect_auc": auc,
                    "select_seconds": sel["seconds"],
                    "train_seconds": res["train_seconds"],
                }
                rows.append(row)
                log(
                    f"  noisy s{seed} {tag} {method:<14} k={k} clean {row['clean']:.2f} acc {row['acc']:.3f} "
                    f"loss {row['loss']:.3f} detect AUC {auc:.3f} select {sel['seconds']:.1f}s"
                )
    return rows


def run_brittle(suite: Suite, seed: int) -> list[dict]:
    s = suite.s
    pool, val = classification_data(
        s.brittle_task, 0.0, seed, s.brittle_classes, s.brittle_per_class, s.brittle_val_per_class
    )
    ctx = PoolContext(suite, pool, suite.work / f"brittle-s{seed}", seed)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    base_key = {"part": "brittle", "method": "base", "k": 0}
    base = suite.finetune_eval(base_key, pool, val, seed, keep_adapters=True)
    correct = [j for j, c in enumerate(base["correct"]) if c]
    rng = np.random.default_rng([seed, 13])
    chosen = [int(j) for j in rng.permutation(correct)[: s.brittle_samples]]
    if len(chosen) < s.brittle_samples:  # too few correct answers: fill with the lowest-loss samples
        rest = [j for j in np.argsort(base["losses"]).tolist() if j not in chosen]
        chosen += rest[: s.brittle_samples - len(chosen)]
    vals = [val[j] for j in chosen]
    rows = []
    mats = {}
    for method in BRITTLE_METHODS:
        if method == "random":
            continue
        key = {
            "part": "brittle",
            "seed": seed,
            "method": method,
            "what": "matrix",
            "hp": suite.hp,
            "pool": ctx.pool_sha,
            "val": sha([r["id"] for r in vals]),
        }

        def compute(method=method):
            t0 = time.perf_counter()
            lora = suite.adapters(base_key, pool, val, seed) if method == "grad" else None
            m = ctx.matrix(method, vals, lora)
            return {"matrix": m.tolist(), "seconds": time.perf_counter() - t0}

        mats[method] = np.array(suite._cached("sel", key, compute)["matrix"])
    for vi, j in enumerate(chosen):
        v = val[j]
        for method in BRITTLE_METHODS:
            for k in s.brittle_ks:
                if method == "random":
                    removed = set(np.random.default_rng([seed, j, k, 17]).choice(len(pool), k, replace=False).tolist())
                else:
                    removed = set(top_n(mats[method][vi], k))
                train = [r for i, r in enumerate(pool) if i not in removed]
                res = suite.finetune_eval(
                    {"part": "brittle", "method": method, "k": k, "sample": v["id"]}, train, [v], seed
                )
                same_class = float(np.mean([pool[i]["label"] == v["label"] for i in removed]))
                row = {
                    "part": "brittle",
                    "seed": seed,
                    "sample": v["id"],
                    "method": method,
                    "k": k,
                    "was_correct": bool(base["correct"][j]),
                    "base_loss": base["losses"][j],
                    "delta_loss": res["loss"] - base["losses"][j],
                    "flipped": bool(base["correct"][j] and not res["correct"][0]),
                    "removed_same_class": same_class,
                }
                rows.append(row)
                log(
                    f"  brittle s{seed} {v['id']} {method:<8} k={k:<3} dloss {row['delta_loss']:+.3f} "
                    f"flip {row['flipped']} same-class removed {same_class:.2f}"
                )
    return rows


# --------------------------------------------------------------------------- report


def mean_std(xs) -> tuple[float, float, int]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan"), 0
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")), len(xs)


def pm(xs, digits: int = 3) -> str:
    m, sd, n = mean_std(xs)
    if n == 0:
        return "–"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


def group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def beats(a: list[float], b: list[float], lower_better: bool) -> str:
    """Margin of ``a`` over ``b`` in units of ``b``'s std over seeds."""
    ma, _, _ = mean_std(a)
    mb, sb, nb = mean_std(b)
    margin = (mb - ma) if lower_better else (ma - mb)
    if nb < 2 or not sb > 0:
        return f"{margin:+.3f} (std n/a)"
    return f"{margin:+.3f} = {margin / sb:+.1f} std"


def report(rows: list[dict], s: Settings, argv: list[str], seconds: float, counts: Counts, device: str) -> str:
    from tools._bench_common import machine_info, md_table

    lines = [
        "## Selection by value: fine-tune on what each method selects (issue 17)",
        "",
        f"Command: `python -m tools.bench_selection {' '.join(argv)}`; wall time {seconds:.0f} s; "
        f"fine-tunes run {counts.run}, reused from the cache {counts.reused}"
        + (f"; {counts.skipped} rows or parts not run yet, left out (--cached-only)" if counts.skipped else "")
        + ".",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items()) + ".",
        "",
    ]
    seeds = sorted({r["seed"] for r in rows})
    lines.append(f"Seeds: {seeds} (mean ± std over seeds where there are several).")
    lines.append("")
    tgt = [r for r in rows if r["part"] == "targeted"]
    if tgt:
        lines += [
            "### Targeted selection",
            "",
            "Held-out target loss (lower is better) and exact-match accuracy after fine-tuning on the "
            "selection; in-target = share of the selection from the target; select s = the method's wall "
            "time (shared pieces such as the store build or warm-up included).",
            "",
        ]
        table = []
        for (target, k, method), rs in group(tgt, ("target", "k", "method")).items():
            table.append(
                [
                    target,
                    f"{k:g}% ({rs[0]['n']})",
                    method,
                    pm([r["loss"] for r in rs]),
                    pm([r["acc"] for r in rs]),
                    pm([r["in_target"] for r in rs], 2),
                    pm([r["select_seconds"] for r in rs], 1),
                    pm([r["train_seconds"] for r in rs], 1),
                ]
            )
        lines.append(
            md_table(
                ["target", "k (n)", "method", "target loss", "accuracy", "in-target", "select s", "train s"], table
            )
        )
        lines.append("")
    noisy = [r for r in rows if r["part"] == "noisy"]
    if noisy:
        lines += [
            "### Noisy pool",
            "",
            "Clean fraction of the selection, fine-tuned accuracy / loss on the clean evaluation set, and the "
            "mislabeled-detection AUC of the method's values (flipped should score lowest). "
            "`all (no selection)`: fine-tuned on the whole noisy pool; its detection AUC ranks by that "
            "model's per-sample loss (the loss baseline).",
            "",
        ]
        table = []
        for (noise, k, method), rs in group(noisy, ("noise", "k", "method")).items():
            table.append(
                [
                    noise,
                    f"{k:g}% ({rs[0]['n']})",
                    method,
                    pm([r["clean"] for r in rs], 2),
                    pm([r["acc"] for r in rs]),
                    pm([r["loss"] for r in rs]),
                    pm([r["detect_auc"] for r in rs]),
                    pm([r["select_seconds"] for r in rs], 1),
                ]
            )
        lines.append(
            md_table(["pool", "k (n)", "method", "clean", "accuracy", "loss", "detect AUC", "select s"], table)
        )
        lines.append("")
    br = [r for r in rows if r["part"] == "brittle"]
    if br:
        lines += [
            "### Brittleness",
            "",
            "Remove the method's top-k training samples for one validation sample the fine-tuned model "
            "answers correctly, fine-tune again (same seed and budget): change of that sample's loss, share "
            "of answers that flip, share of removed samples with the sample's class. Mean ± std over "
            "samples x seeds.",
            "",
        ]
        table = []
        for (k, method), rs in group(br, ("k", "method")).items():
            was = [r for r in rs if r["was_correct"]]
            table.append(
                [
                    k,
                    method,
                    pm([r["delta_loss"] for r in rs]),
                    f"{sum(r['flipped'] for r in was)}/{len(was)}" if was else "–",
                    pm([r["removed_same_class"] for r in rs], 2),
                    len(rs),
                ]
            )
        lines.append(md_table(["k", "method", "Δ loss", "flips", "same-class removed", "n"], table))
        lines.append("")
    lines += [
        "### Goals",
        "",
        "Margins: positive = the first method did better (lower loss, higher accuracy or clean fraction), in units "
        "of the second method's std over seeds.",
        "",
    ]
    lines += goals(rows) + ["", machine_info(device)]
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    out = []
    tgt = [r for r in rows if r["part"] == "targeted"]
    g = group(tgt, ("target", "k", "method"))
    for target, k in sorted({(r["target"], r["k"]) for r in tgt}):
        rnd = g.get((target, k, "random"), [])
        for fv in ("forvalue", "forvalue-label"):
            mine = g.get((target, k, fv), [])
            if mine and rnd:
                out.append(
                    f"- targeted {target} k={k:g}%: {fv} vs random, loss "
                    f"{beats([r['loss'] for r in mine], [r['loss'] for r in rnd], True)}, accuracy "
                    f"{beats([r['acc'] for r in mine], [r['acc'] for r in rnd], False)}."
                )
        grad = g.get((target, k, "grad"), [])
        for fv in ("forvalue", "forvalue-label"):
            mine = g.get((target, k, fv), [])
            if grad and mine:
                ratio = mean_std([r["select_seconds"] for r in grad])[0] / max(
                    mean_std([r["select_seconds"] for r in mine])[0], 1e-9
                )
                out.append(
                    f"- targeted {target} k={k:g}%: {fv} vs grad, loss "
                    f"{beats([r['loss'] for r in mine], [r['loss'] for r in grad], True)}; grad takes "
                    f"{ratio:.1f}x {fv}'s time."
                )
    noisy = [r for r in rows if r["part"] == "noisy"]
    g = group(noisy, ("noise", "k", "method"))
    for noise, k in sorted({(r["noise"], r["k"]) for r in noisy if r["k"] != 100}):
        rnd = g.get((noise, k, "random"), [])
        for fv in ("forvalue", "forvalue-label"):
            mine = g.get((noise, k, fv), [])
            if mine and rnd:
                out.append(
                    f"- noisy {noise} k={k:g}%: {fv} vs random, accuracy "
                    f"{beats([r['acc'] for r in mine], [r['acc'] for r in rnd], False)}, clean fraction "
                    f"{beats([r['clean'] for r in mine], [r['clean'] for r in rnd], False)}."
                )
    for noise in sorted({r["noise"] for r in noisy}):
        loss_auc = mean_std([r["detect_auc"] for r in noisy if r["noise"] == noise and r["k"] == 100])[0]
        for fv in ("forvalue", "forvalue-label"):
            auc = mean_std([r["detect_auc"] for r in noisy if r["noise"] == noise and r["method"] == fv])[0]
            out.append(
                f"- detection {noise}: {fv} AUC {auc:.3f} vs loss of the pool-fine-tuned model "
                f"{loss_auc:.3f}: {'beats' if auc > loss_auc else 'does not beat'} it."
            )
    br = [r for r in rows if r["part"] == "brittle"]
    g = group(br, ("k", "method"))
    for k in sorted({r["k"] for r in br}):
        fv = mean_std([r["delta_loss"] for r in g.get((k, "forvalue"), [])])[0]
        rnd = mean_std([r["delta_loss"] for r in g.get((k, "random"), [])])[0]
        ratio = fv / rnd if rnd > 0 else float("nan")
        out.append(
            f"- brittleness k={k}: removing forvalue's top-k raises the loss by {fv:+.3f}, random k by "
            f"{rnd:+.3f}" + (f" ({ratio:.1f}x)" if rnd > 0 else " (random does not raise it)") + "."
        )
    return out


# --------------------------------------------------------------------------- main


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
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None)
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


if __name__ == "__main__":
    main()
