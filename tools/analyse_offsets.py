"""Why does For-Value miss the recall bar? Per-class recall and the per-training-sample offset.

Reads the score matrices that ``python -m tools.bench_quality --workdir DIR`` keeps (no model, no
forward pass) and prints, per task, AUC and recall of:

* ``raw``: the product's score ``<G_v, G_i>`` as ranked by ``forvalue query``;
* ``minus validation mean``: ``<G_v, G_i> - mean_v' <G_v', G_i>`` = ``<G_v - mean_v' G_v', G_i>``,
  i.e. the part of the score that is not shared by every validation sample;
* ``over validation norm``: each training sample's scores divided by their norm over the
  validation set.

If the two corrected rankings recover most of the missed recall, the misses come from a
training-sample-specific offset (a component of ``G_i`` that scores high against every
validation sample), not from missing class signal. Per-class recall of the raw ranking and the
class that most often takes the misses are printed too.

Usage::

    python -m tools.bench offsets --out DIR -- /tmp/bq3/work [--method forvalue]
    python -m tools.analyse_offsets /tmp/bq3/work [--method forvalue] [--out offsets.md]   # on its own
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from tools.common import emit


def load_task(task_dir: Path, method_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (n_val, n_train) in ``train_ids`` order, training labels, validation labels."""
    result = json.loads((task_dir / method_dir / "result.json").read_text())
    scores = np.load(task_dir / method_dir / result["outputs"][next(iter(result["outputs"]))]["file"])
    train = {
        json.loads(line)["id"]: json.loads(line)["label"]
        for line in (task_dir / "train.jsonl").read_text().splitlines()
        if line.strip()
    }
    val = [json.loads(line)["label"] for line in (task_dir / "test.jsonl").read_text().splitlines() if line.strip()]
    return scores, np.array([train[i] for i in result["train_ids"]]), np.array(val)


def variants(scores: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "raw": scores,
        "minus validation mean": scores - scores.mean(axis=0, keepdims=True),
        "over validation norm": scores / np.maximum(np.linalg.norm(scores, axis=0, keepdims=True), 1e-30),
    }


def crowding(scores: np.ndarray, train_labels: np.ndarray, val_labels: np.ndarray) -> tuple[str, float]:
    """The training class that takes most wrong slots in the top lists, and its share of them."""
    wrong: dict[str, int] = {}
    for v, label in enumerate(val_labels):
        k = int((train_labels == label).sum())
        for c in train_labels[np.argsort(-scores[v], kind="stable")[:k]]:
            if c != label:
                wrong[c] = wrong.get(c, 0) + 1
    if not wrong:
        return "-", 0.0
    worst = max(wrong, key=wrong.get)
    return str(worst), wrong[worst] / sum(wrong.values())


def main(argv: list[str] | None = None) -> int:
    from forvalue.metrics import class_retrieval, recall_at_class_size

    ap = argparse.ArgumentParser(prog="python -m tools.analyse_offsets", description=__doc__.splitlines()[0])
    ap.add_argument("workdir", help="a `python -m tools.bench_quality --workdir` folder")
    ap.add_argument("--method", default="forvalue", help="method folder inside each task folder")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)

    lines = ["| task | ranking | AUC | recall |", "|---|---|---|---|"]
    notes = []
    for task_dir in sorted(p for p in Path(args.workdir).iterdir() if (p / args.method / "result.json").exists()):
        scores, train_labels, val_labels = load_task(task_dir, args.method)
        for name, s in variants(scores).items():
            m = class_retrieval(s, list(train_labels), list(val_labels))
            lines.append(f"| {task_dir.name} | {name} | {m['auc_mean']:.3f} | {m['recall_mean']:.3f} |")
        per_class: dict[str, list[float]] = {}
        for row, label in zip(scores, val_labels):
            per_class.setdefault(label, []).append(recall_at_class_size(row, train_labels == label))
        worst, share = crowding(scores, train_labels, val_labels)
        notes.append(
            f"- {task_dir.name}: all scores positive: {bool((scores > 0).all())}; raw per-class recall: "
            + ", ".join(f"{c} {np.mean(r):.2f}" for c, r in sorted(per_class.items()))
            + f"; the class taking most wrong top-list slots: {worst} ({share:.0%} of them)."
        )
    report = "\n".join(lines + [""] + notes)
    emit(report, Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
