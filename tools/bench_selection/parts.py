"""The three parts: targeted selection, the noisy pool, brittleness."""

from __future__ import annotations

import math
import time

import numpy as np

from tools.bench_selection.data import classification_data, in_target, targeted_data
from tools.bench_selection.settings import BRITTLE_METHODS, log, n_of, sha, top_n
from tools.bench_selection.suite import NotCached, PoolContext, Suite


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
