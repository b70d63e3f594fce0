"""The suite's settings (full and --quick), its methods and parts, and small shared helpers."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the default run's methods; FV_COSINE (the same audits with ``--normalize cosine``) only when named
METHODS = ("forvalue", "forvalue-label", "random", "emb", "rds", "loss", "bm25", "grad", "distill")
FV_COSINE = ("forvalue-cos", "forvalue-label-cos")
# the same audits with --validation-tokens auto --whiten auto (docs/variants.md), only when named
FV_AUTO = ("forvalue-auto", "forvalue-label-auto")
FORVALUE_METHODS = ("forvalue", "forvalue-label") + FV_COSINE + FV_AUTO
# the audit each For-Value method reads (its name's suffix: the audit's AuditConfig score fields)
AUDIT_VARIANTS = {
    "none": {},
    "cosine": {"normalize": "cosine"},
    "auto": {"validation_tokens": "auto", "whiten": "auto"},
}
METHOD_VARIANT = {m: "cosine" if m in FV_COSINE else "auto" if m in FV_AUTO else "none" for m in FORVALUE_METHODS}
BRITTLE_METHODS = ("forvalue", "random", "emb", "rds", "bm25", "grad")
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: a second process may be reading it
    tmp.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows))
    tmp.replace(path)
    return path


def top_n(values: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` largest values (ties by position)."""
    return np.argsort(-np.asarray(values, np.float64), kind="stable")[:n].tolist()


def n_of(k: float, total: int) -> int:
    """k percent of ``total`` (at least 1)."""
    return max(1, int(round(k / 100.0 * total)))
