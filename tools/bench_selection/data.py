"""The pools: the paper's text tasks mixed (targeted) and the classification task with flipped labels."""

from __future__ import annotations

import math

from tools.bench_selection.settings import Settings


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
