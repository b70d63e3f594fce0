"""Write the paper's text benchmark tasks as JSON Lines, one folder per task.

Usage::

    python -m tools.generate_tasks --out data/bench          # what `python -m tools.bench quality` runs on
    python -m tools.generate_tasks --out data/small --tasks sentence_transformations --n-train 30 --n-test 3

Tasks (10 classes each, ``--n-train`` training and ``--n-test`` validation samples per class):
``sentence_transformations`` (10 rules, one chatbot name per rule), ``math_no_reasoning`` and
``math_with_reasoning`` (10 word-problem templates), and ``mislabeled_math`` (the templates
answered with their class name), written once per ``--noise-rates`` value with that fraction
of training labels flipped (the validation set stays clean).

Each folder, ``OUT/TASK`` or ``OUT/TASK-noiseR``, holds ``train.jsonl`` and ``test.jsonl``:
one object per line with ``id``, ``prompt``, ``response``, ``label`` and ``meta`` (mislabeled
rows add ``true_label`` and ``flipped``). Equal seeds give byte-identical files. Index one with
``forvalue index build OUT/TASK/train.jsonl --store STORE``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from forvalue.tasks.text import ALL_TASKS, MATH_REASONS, generate_task, write_jsonl

DEFAULT_TASKS = ["math_no_reasoning", "math_with_reasoning", "sentence_transformations", "mislabeled_math"]
DEFAULT_NOISE_RATES = [0.2, 0.5]


def task_runs(tasks: list[str], noise_rates: list[float]) -> list[tuple[str, float | None]]:
    """``(task, noise rate)`` pairs: one per noise rate for mislabeled tasks, ``None`` otherwise."""
    runs = []
    for task in tasks:
        if task.startswith("mislabeled_"):
            runs.extend((task, r) for r in noise_rates)
        else:
            runs.append((task, None))
    return runs


def run_tag(task: str, noise: float | None) -> str:
    """``"task"`` or ``"task@0.2"``, the name a run goes by in reports."""
    return task if noise is None else f"{task}@{noise:g}"


def write_task(
    root: Path,
    task: str,
    noise: float | None,
    n_train: int = 90,
    n_test: int = 10,
    seed: int = 0,
    n_classes: int = 10,
    chatbot_names: int = 1,
    math_reasons: str = "named",
) -> tuple[Path, list[dict], list[dict]]:
    """Generate one task and write ``train.jsonl`` / ``test.jsonl`` under ``root``.

    Returns
    -------
    folder : Path
        ``root / task`` or ``root / f"{task}-noise{noise:g}"``.
    train, test : list of dict
        The rows written.
    """
    kwargs = (
        {"noise_rate": noise} if noise is not None else {"chatbot_names": chatbot_names, "math_reasons": math_reasons}
    )
    train, test = generate_task(task, n_train=n_train, n_test=n_test, seed=seed, n_classes=n_classes, **kwargs)
    folder = Path(root) / run_tag(task, noise).replace("@", "-noise")
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(test, folder / "test.jsonl")
    return folder, train, test


def add_data_options(ap: argparse.ArgumentParser) -> None:
    """The data options shared with ``tools.bench_quality``."""
    ap.add_argument(
        "--tasks",
        nargs="+",
        default=DEFAULT_TASKS,
        choices=ALL_TASKS,
        metavar="TASK",
        help=f"any of {', '.join(ALL_TASKS)} (default: %(default)s)",
    )
    ap.add_argument("--n-train", type=int, default=90, help="training samples per class")
    ap.add_argument("--n-test", type=int, default=10, help="validation samples per class")
    ap.add_argument("--n-classes", type=int, default=10)
    ap.add_argument(
        "--noise-rates",
        type=float,
        nargs="+",
        default=DEFAULT_NOISE_RATES,
        help="mislabeled tasks: fractions of flipped training labels",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--chatbot-names",
        type=int,
        default=1,
        help="sentence transformations: chatbot names per rule (1 = the reference protocol; "
        "4 = the harder variant of earlier runs)",
    )
    ap.add_argument(
        "--math-reasons",
        choices=MATH_REASONS,
        default="named",
        help="math with reasoning: 'named' steps as the reference generator (default) or "
        "'bare' arithmetic (the generator of earlier runs)",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.generate_tasks",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--out", required=True, type=Path, help="folder to write one sub-folder per task into")
    add_data_options(ap)
    args = ap.parse_args(argv)
    for task, noise in task_runs(args.tasks, args.noise_rates):
        try:
            folder, train, test = write_task(
                args.out,
                task,
                noise,
                args.n_train,
                args.n_test,
                args.seed,
                args.n_classes,
                args.chatbot_names,
                args.math_reasons,
            )
        except ValueError as exc:  # bad sizes or options: one line, exit 2
            ap.error(str(exc))
        print(f"{folder}: {len(train)} train, {len(test)} test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
