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
import re
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


HARD_PROMPT = "Transform the input. {input} -> "
HARD_TASKS = ("hard_sentence", "hard_math", "hard_mixed")


def hard_math_task(
    n_train: int = 90, n_test: int = 10, seed: int = 0, n_classes: int = 10
) -> tuple[list[dict], list[dict]]:
    """The ten math word-problem types without the words: a harder retrieval task (issue 31).

    The paper's math prompts tell the class in their story (pizzas, chaperones, ...). Here every class's
    prompt is ``"Solve the following problem with the numbers N1, N2, ... -> "`` (the story's numbers in
    order, no story), and the response is the template's bare arithmetic without its nouns
    (``"Reason: 4 x 8 = 32, and 32 - 5 = 27. Answer: 27"``: the ``math_reasons="bare"`` reasoning, which
    reads alike across several templates, with "slices", "hours", ... dropped): only what the computation
    does tells the class. Problems come from the paper task's
    generator (same seeded streams), so equal seeds give identical rows.
    """
    train, test = generate_task("math_with_reasoning", n_train, n_test, seed, n_classes, math_reasons="bare")
    return _hard_math_rows(train, "train"), _hard_math_rows(test, "test")


def _hard_math_rows(rows: list[dict], split: str) -> list[dict]:
    out = []
    for row in rows:
        problem = row["prompt"].removeprefix("Solve the following math problem. ").removesuffix(" -> ")
        numbers = re.findall(r"\d+(?:\.\d+)?", problem)
        c, k = row["id"].split("-")[-2:]
        out.append(
            {
                "id": f"hard_math-{split}-{c}-{k}",
                "prompt": f"Solve the following problem with the numbers {', '.join(numbers)}. -> ",
                "response": _without_nouns(row["response"]),
                "label": row["label"],
                "meta": {**row["meta"], "problem": problem},
            }
        )
    return out


# Words of the bare reasoning kept in hard_math: the arithmetic's own; nouns (slices, hours, square meters, ...)
# are dropped because they name the problem type.
_ARITHMETIC_WORDS = {"Reason:", "Answer:", "x", "and", "is", "of", "with", "left", "over", "so", "round", "up", "to"}


def _without_nouns(text: str) -> str:
    """``text`` with every word that is neither a number, an operator nor an arithmetic word dropped (its
    trailing punctuation kept): ``"5 x 12 = 60 slices, and"`` -> ``"5 x 12 = 60, and"``."""
    kept: list[str] = []
    for token in text.split():
        core = token.rstrip(".,")
        if core in _ARITHMETIC_WORDS or token in _ARITHMETIC_WORDS or re.fullmatch(r"[\d.%/+\-=]+", core):
            kept.append(token)
        elif kept and token != core:
            kept[-1] += token[len(core) :]
    return " ".join(kept)


def hard_task(
    task: str, n_train: int = 90, n_test: int = 10, seed: int = 0, n_classes: int = 10
) -> tuple[list[dict], list[dict]]:
    """One of :data:`HARD_TASKS`: the paper's tasks with no text that names the class (issue 31).

    ``hard_sentence`` is :func:`shared_template_task` (the ten transformations behind one prompt),
    ``hard_math`` is :func:`hard_math_task`; ``hard_mixed`` pools both (``n_classes`` of each, so twice
    as many classes) behind ONE template, ``"Transform the input. INPUT -> "`` (INPUT the sentence, or
    the problem's numbers), so neither the task nor the class is named anywhere.
    """
    if task == "hard_sentence":
        return shared_template_task(n_train, n_test, seed, n_classes)
    if task == "hard_math":
        return hard_math_task(n_train, n_test, seed, n_classes)
    if task != "hard_mixed":
        raise ValueError(f"unknown hard task {task!r}; choose one of {', '.join(HARD_TASKS)}")
    sentence = shared_template_task(n_train, n_test, seed, n_classes)
    math = hard_math_task(n_train, n_test, seed, n_classes)
    split_rows = []
    for s_rows, m_rows, split in zip(sentence, math, ("train", "test")):
        rows = []
        for row in s_rows:
            rows.append({**row, "prompt": HARD_PROMPT.format(input=row["meta"]["sentence"])})
        for row in m_rows:
            numbers = row["prompt"].removeprefix("Solve the following problem with the numbers ").removesuffix(". -> ")
            rows.append({**row, "prompt": HARD_PROMPT.format(input=numbers)})
        for j, row in enumerate(rows):
            row["id"] = f"hard_mixed-{split}-{j}"
        split_rows.append(rows)
    return split_rows[0], split_rows[1]


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
