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

from forvalue.tasks.text import ALL_TASKS, MATH_REASONS, RULES, generate_task, write_jsonl

SHARED_TEMPLATE_PROMPT = "Transform the following sentence. {sentence} -> "

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


def shared_template_task(
    n_train: int = 90, n_test: int = 10, seed: int = 0, n_classes: int = 10
) -> tuple[list[dict], list[dict]]:
    """A harder retrieval task: the ten sentence transformations behind ONE prompt template.

    Every class's prompt is ``"Transform the following sentence. SENTENCE -> "``: no chatbot name, no
    rule description, so the prompt says nothing about the class; only the response (the sentence
    transformed by the class's rule) does. Sentences come from the paper task's generator with their
    own seeded stream per class (``seed``), so equal seeds give identical rows. Rows are
    ``{"id", "prompt", "response", "label", "meta"}`` with ids ``shared_template-{split}-{class}-{i}``.
    """
    import random

    from forvalue.tasks.text import random_sentence

    if not 1 <= n_classes <= len(RULES):
        raise ValueError(f"n_classes must be in [1, {len(RULES)}], got {n_classes}")
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be non-negative")
    train, test = [], []
    for c in range(n_classes):
        name, _, rule, _ = RULES[c]
        rng, seen, sentences = random.Random(f"{seed}:shared_template:{c}"), set(), []
        while len(sentences) < n_train + n_test:
            s = random_sentence(rng)
            if s not in seen:
                seen.add(s)
                sentences.append(s)
        for i, s in enumerate(sentences):
            split, k, out = ("train", i, train) if i < n_train else ("test", i - n_train, test)
            out.append(
                {
                    "id": f"shared_template-{split}-{c}-{k}",
                    "prompt": SHARED_TEMPLATE_PROMPT.format(sentence=s),
                    "response": rule(s),
                    "label": name,
                    "meta": {"sentence": s},
                }
            )
    return train, test


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
