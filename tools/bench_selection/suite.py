"""The suite's state: cached fine-tunes and selections (Suite), and one pool's methods (PoolContext)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.bench_selection.bm25 import bm25
from tools.bench_selection.settings import (
    AUDIT_VARIANTS,
    FORVALUE_METHODS,
    METHOD_VARIANT,
    Settings,
    n_of,
    sha,
    write_rows,
)
from tools.common import LazyModel


@dataclass
class Counts:
    run: int = 0
    reused: int = 0
    selections_run: int = 0
    selections_reused: int = 0
    skipped: int = 0  # rows (or whole parts of a seed) left out by --cached-only because they have not run


class NotCached(Exception):
    """``--cached-only``: a selection or fine-tune that has not run yet."""


class Suite(LazyModel):
    """Runs the parts, caching every selection and fine-tune under ``out/cache``."""

    def __init__(self, s: Settings, out: Path, model: str | None, device: str):
        self.s, self.out, self.model_path, self.device = s, out, model, device
        self.cache = out / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.work = out / "work"
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

    def audit(self, store: Path, val: list[dict], variant: str = "none") -> tuple[str, float]:
        """(audit name, audit seconds) of ``val`` against ``store``: run once, then reused (also by a resumed run).

        The caller charges the returned seconds to its method, whether the audit ran now or before.
        """
        from forvalue import AuditConfig
        from forvalue.audit import run_audit

        name = f"a{sha([r['id'] for r in val])[:10]}" + ("" if variant == "none" else f"_{variant}")
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
            AuditConfig(
                flag_by="label", progress=False, device=self.suite.device, flag_fraction=None, **AUDIT_VARIANTS[variant]
            ),
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

    def rds_pool(self):
        from tools.bench_baselines import rds_vectors, tokenize_rows

        return self._once(
            "rds",
            lambda: rds_vectors(
                self.suite.runner,
                tokenize_rows(self.suite.runner.tokenizer, [self._sample(r) for r in self.pool], "all"),
            ),
        )

    def rds_val(self, val: list[dict]) -> np.ndarray:
        from tools.bench_baselines import rds_vectors, tokenize_rows

        return rds_vectors(
            self.suite.runner, tokenize_rows(self.suite.runner.tokenizer, [self._sample(r) for r in val], "all")
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
        elif method in FORVALUE_METHODS:
            from forvalue.audit import load_audit, select_subset

            store, shared = self.store()
            t_audit = time.perf_counter()
            name, audit_seconds = self.audit(store, val, METHOD_VARIANT[method])
            t0 += time.perf_counter() - t_audit  # the audit is charged by its recorded time, run now or before
            shared += audit_seconds
            table, _ = load_audit(store, name)
            order = {i: k for k, i in enumerate(table.column("id").to_pylist())}
            col = "flag_score" if method.startswith("forvalue-label") else "score_mean"
            raw = table.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            if col == "flag_score":  # a row whose label no validation sample has: its mean (the audit leaves it null)
                raw = np.where(np.isnan(raw), table.column("score_mean").to_numpy(), raw)
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
        elif method == "rds":  # mean cosine over the validation set = dot with the mean unit vector
            pool_rds, shared = self.rds_pool()
            values = pool_rds @ self.rds_val(val).mean(axis=0)
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
        if method == "rds":
            pool_rds, _ = self.rds_pool()
            return self.rds_val(val) @ pool_rds.T
        if method == "bm25":
            return bm25([r["prompt"] + r["response"] for r in val], [r["prompt"] + r["response"] for r in self.pool])
        if method == "grad":
            g = lora.gradients(self.suite.tok(self.pool), 8)
            gv = lora.gradients(self.suite.tok(val), 8)
            g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)
            gv = gv / np.maximum(np.linalg.norm(gv, axis=1, keepdims=True), 1e-30)
            return gv.astype(np.float64) @ g.astype(np.float64).T
        raise ValueError(method)
