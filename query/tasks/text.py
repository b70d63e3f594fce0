"""Seeded, dependency-free generators for the For-Value text benchmark tasks.

The three tasks follow the DataInf protocol used by For-Value (Deng et al.,
2025): ``sentence_transformations``, ``math_no_reasoning`` and
``math_with_reasoning``, each with 10 classes.  ``mislabeled_math`` and
``mislabeled_sentence_transformations`` are classification-style variants
("which class is this?") in which a fraction of training labels is flipped,
for mislabeled-data detection experiments.

Rows are dicts ``{"id", "prompt", "response", "label", "meta"}``; mislabeled
rows also carry ``true_label`` and ``flipped``.  Every class draws from its
own ``random.Random`` stream seeded by ``(seed, family, class)``, so output is
byte-identical for a given seed and taking the first ``n_classes`` classes
does not change their rows.  The three math variants share the same
underlying problems.

Usage::

    python -m forvalue.tasks.text --task sentence_transformations --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import random
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable

TASKS = ("sentence_transformations", "math_no_reasoning", "math_with_reasoning")
MISLABELED_TASKS = ("mislabeled_math", "mislabeled_sentence_transformations")
ALL_TASKS = TASKS + MISLABELED_TASKS

# --------------------------------------------------------------------------
# Sentence transformations
# --------------------------------------------------------------------------

VOWELS = set("aeiouAEIOU")


def _is_consonant(ch: str) -> bool:
    return ch.isalpha() and ch not in VOWELS


def _alternate_caps(s: str) -> str:
    out, k = [], 0
    for ch in s:
        if ch.isalpha():
            ch = ch.upper() if k % 2 == 0 else ch.lower()
            k += 1
        out.append(ch)
    return "".join(out)


# (class name, rule description, transformation, invented chatbot names: the first is the
# rule's name in the reference protocol, the others serve the harder ``chatbot_names > 1`` variant)
RULES: tuple[tuple[str, str, Callable[[str], str], tuple[str, ...]], ...] = (
    (
        "reverse word order",
        "Reverse the order of the words.",
        lambda s: " ".join(reversed(s.split())),
        ("Zorblax", "Quindle", "Vextra", "Mubbo"),
    ),
    (
        "capitalise every other letter",
        "Capitalise every other letter, starting with the first letter.",
        _alternate_caps,
        ("Plinkett", "Draxsy", "Yurvo", "Snazzle"),
    ),
    (
        "insert 1 between words",
        "Insert the number 1 between every pair of words.",
        lambda s: " 1 ".join(s.split()),
        ("Fembic", "Glorptron", "Tavvi", "Krendle"),
    ),
    (
        "replace vowels with star",
        "Replace every vowel with an asterisk (*).",
        lambda s: "".join("*" if c in VOWELS else c for c in s),
        ("Wuzzle", "Ombrix", "Jettaro", "Fluvia"),
    ),
    (
        "double consonants",
        "Double every consonant.",
        lambda s: "".join(c * 2 if _is_consonant(c) else c for c in s),
        ("Brimbo", "Xanthor", "Pellix", "Quorra"),
    ),
    (
        "capitalise every word",
        "Capitalise the first letter of every word.",
        lambda s: " ".join(w[:1].upper() + w[1:] for w in s.split()),
        ("Nimbrik", "Zaffle", "Orvix", "Trundly"),
    ),
    (
        "remove vowels",
        "Remove all vowels.",
        lambda s: "".join(c for c in s if c not in VOWELS),
        ("Klepso", "Vimmer", "Hazzlo", "Ruxbee"),
    ),
    (
        "add ly to each word",
        "Add the suffix 'ly' to the end of every word.",
        lambda s: " ".join(w + "ly" for w in s.split()),
        ("Gorbin", "Sprocka", "Tindle", "Welloq"),
    ),
    (
        "remove consonants",
        "Remove all consonants.",
        lambda s: "".join(c for c in s if not _is_consonant(c)),
        ("Yazzo", "Frimble", "Dextrel", "Pomby"),
    ),
    (
        "repeat each word twice",
        "Repeat every word twice.",
        lambda s: " ".join(f"{w} {w}" for w in s.split()),
        ("Luxtor", "Mimbral", "Quaffo", "Zentik"),
    ),
)

_W = {
    "noun": "dog cat farmer teacher robot pilot child baker rabbit sailor artist doctor "
    "fox owl student painter horse king queen knight".split(),
    "adj": "quick lazy happy tiny brave quiet clever old young curious gentle angry sleepy bright shy proud".split(),
    "tverb": "chased painted found carried watched pushed followed cleaned opened "
    "fixed dropped lifted hid borrowed".split(),
    "iverb": "walked slept danced waited sang rested wandered laughed jumped stood".split(),
    "adv": "slowly quickly quietly happily carefully suddenly gladly".split(),
    "prep": "near behind inside under beside across".split(),
    "place": "river garden market castle forest kitchen station library bridge village harbor meadow".split(),
    "name": "anna bruno clara diego elena felix grace hugo iris jonas".split(),
    "time": "today yesterday again tonight".split(),
}
_SENTENCE_TEMPLATES = (
    "the {adj} {noun} {tverb} the {noun2}",
    "a {noun} {iverb} {prep} the {place}",
    "my {adj} {noun} {tverb} a {adj2} {noun2} {prep} the {place}",
    "the {noun} {adv} {tverb} the {adj} {noun2}",
    "{name} {tverb} the {noun} {prep} the {place}",
    "every {noun} {tverb} the {noun2} {time}",
    "the {adj} {noun} and the {noun2} {iverb} {prep} the {place}",
    "our {noun} {iverb} {adv} near the {adj} {place}",
)


def random_sentence(rng: random.Random) -> str:
    """Draw a short lowercase English sentence (5-10 words) from built-in templates.

    Parameters
    ----------
    rng : random.Random
        Source of randomness.

    Returns
    -------
    str
        Space-separated lowercase words without punctuation.
    """
    fields = {k: rng.choice(v) for k, v in _W.items()}
    fields["noun2"] = rng.choice([w for w in _W["noun"] if w != fields["noun"]])
    fields["adj2"] = rng.choice([w for w in _W["adj"] if w != fields["adj"]])
    return rng.choice(_SENTENCE_TEMPLATES).format(**fields)


def _sentence_item(c: int, rng: random.Random, chatbot_names: int = 1) -> tuple[str, dict]:
    sentence = random_sentence(rng)
    return sentence, {"chatbot": rng.choice(RULES[c][3][:chatbot_names]), "sentence": sentence}


def sentence_prompt(name: str, description: str, sentence: str) -> str:
    """Format a sentence-transformation prompt exactly as in the DataInf protocol."""
    return (
        f"{name} is a chatbot that performs a specific transformation on sentences: "
        f"{description}\n    For example:\n    {sentence} -> "
    )


# --------------------------------------------------------------------------
# Math word problems
# --------------------------------------------------------------------------

PEOPLE = (
    "Ava Ben Chloe Daniel Emma Farid Grace Hiro Isla Jamal Kira Leo Maya Noah Olivia "
    "Priya Quinn Rosa Sam Tara Umar Vera Wes Ximena Yusuf Zoe"
).split()
ITEMS = ("stickers", "marbles", "pencils", "baseball cards", "beads", "stamps")


def fmt_number(x: int | Fraction) -> str:
    """Format an exact answer: integers plainly, finite decimals without trailing zeros.

    Parameters
    ----------
    x : int or Fraction
        Exact value; non-integers must have at most two decimal places.

    Returns
    -------
    str
        E.g. ``"12"``, ``"7.5"``, ``"37.35"``.
    """
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    if 100 % x.denominator:
        raise ValueError(f"{x} is not a finite two-decimal number")
    return f"{float(x):.2f}".rstrip("0")


# Each template returns (problem, (named reason, bare reason), exact answer, meta). The named
# reason labels every step with the quantity it computes ("Slices left = ..."), as the reference
# generator's reasons do, so the reasoning text itself is specific to the problem type; the bare
# reason is the arithmetic alone (this generator's reasons before 2026-11-25, kept as the
# ``math_reasons="bare"`` variant), which reads the same for several templates.


def _pizza(r, n):
    p, s = r.randint(2, 6), r.choice([6, 8, 10, 12])
    e = r.randint(1, p * s - 1)
    ans = p * s - e
    return (
        f"{n} ordered {p} pizzas, and each pizza was cut into {s} slices. {n}'s friends "
        f"ate {e} slices. How many slices are left?",
        (
            f"Total slices = {p} x {s} = {p * s}. Slices left = {p * s} - {e} = {ans}.",
            f"{p} x {s} = {p * s} slices, and {p * s} - {e} = {ans}.",
        ),
        ans,
        {"pizzas": p, "slices_per_pizza": s, "eaten": e},
    )


def _chaperones(r, n):
    k, per = r.randint(12, 150), r.randint(5, 12)
    ans, left = -(-k // per), k % per
    named = f"Chaperones needed = {k} / {per} = " + (
        f"{ans}." if not left else f"{k // per} with {left} students left over, rounded up to {ans}."
    )
    bare = (
        f"{k} / {per} = {ans}."
        if not left
        else f"{k} / {per} is {k // per} with {left} left over, so round up to {ans}."
    )
    reason = (named, bare)
    return (
        f"{n}'s school is taking {k} students on a field trip and needs one chaperone "
        f"for every {per} students. How many chaperones are needed?",
        reason,
        ans,
        {"students": k, "students_per_chaperone": per},
    )


def _purchase(r, n):
    item, a, b, c = r.choice(ITEMS), r.randint(5, 60), r.randint(2, 9), r.randint(3, 12)
    ans = a + b * c
    return (
        f"{n} has {a} {item}. {n} buys {b} packs with {c} {item} in each pack. How many {item} does {n} have now?",
        (
            f"{item.capitalize()} bought = {b} x {c} = {b * c}. {item.capitalize()} in total = {a} + {b * c} = {ans}.",
            f"{b} x {c} = {b * c} new {item}, and {a} + {b * c} = {ans}.",
        ),
        ans,
        {"start": a, "packs": b, "per_pack": c},
    )


def _points(r, n):
    a, k, b = r.randint(5, 50), r.randint(3, 10), r.randint(5, 40)
    ans = a * k + b
    return (
        f"In a video game, {n} scores {a} points in each of {k} rounds and then earns a "
        f"bonus of {b} points. How many points does {n} have in total?",
        (
            f"Points from rounds = {a} x {k} = {a * k}. Total points with bonus = {a * k} + {b} = {ans}.",
            f"{a} x {k} = {a * k} points, and {a * k} + {b} = {ans}.",
        ),
        ans,
        {"points_per_round": a, "rounds": k, "bonus": b},
    )


def _reading(r, n):
    m, d = r.choice([30, 45, 60, 90, 120, 150]), r.randint(2, 14)
    ans = Fraction(m * d, 60)
    return (
        f"{n} reads for {m} minutes every day for {d} days. How many hours does {n} spend reading in total?",
        (
            f"Minutes read = {m} x {d} = {m * d}. Hours read = {m * d} / 60 = {fmt_number(ans)}.",
            f"{m} x {d} = {m * d} minutes, and {m * d} / 60 = {fmt_number(ans)} hours.",
        ),
        ans,
        {"minutes_per_day": m, "days": d},
    )


def _shirt(r, n):
    p, d = r.randint(12, 80), r.choice([10, 15, 20, 25, 30, 40, 50])
    disc = Fraction(p * d, 100)
    ans = p - disc
    return (
        f"A shirt costs ${p}. {n} buys it during a sale with {d}% off. How much does {n} pay for the shirt?",
        (
            f"Discount = {d}% of ${p} = ${fmt_number(disc)}. Price after discount = ${p} - "
            f"${fmt_number(disc)} = ${fmt_number(ans)}.",
            f"{d}% of {p} is {fmt_number(disc)}, and {p} - {fmt_number(disc)} = {fmt_number(ans)}.",
        ),
        ans,
        {"price": p, "discount_pct": d},
    )


def _garden(r, n):
    length, width = r.randint(3, 30), r.randint(2, 20)
    ans = length * width
    return (
        f"{n}'s rectangular garden is {length} meters long and {width} meters wide. "
        f"What is the area of the garden in square meters?",
        (
            f"Garden area = length x width = {length} x {width} = {ans} square meters.",
            f"The area is {length} x {width} = {ans} square meters.",
        ),
        ans,
        {"length": length, "width": width},
    )


def _savings(r, n):
    a, s, w = r.randint(0, 100), r.randint(5, 50), r.randint(2, 20)
    ans = a + s * w
    return (
        f"{n} already has ${a} and saves ${s} every week for {w} weeks. How much money does {n} have saved in total?",
        (
            f"Saved from weekly deposits = ${s} x {w} weeks = ${s * w}. Total savings = ${a} + ${s * w} = ${ans}.",
            f"{s} x {w} = {s * w}, and {a} + {s * w} = {ans}.",
        ),
        ans,
        {"start": a, "per_week": s, "weeks": w},
    )


def _cupcakes(r, n):
    b = r.choice([4, 6, 8, 12])
    c = r.randint(b, 120)
    ans, left = c // b, c % b
    named = f"Boxes filled = {c} cupcakes / {b} per box = {ans}" + (
        "." if not left else f" full boxes, with {left} cupcakes left over."
    )
    bare = f"{c} / {b} = {ans}." if not left else f"{c} / {b} is {ans} with {left} left over, so {ans} full boxes."
    reason = (named, bare)
    return (
        f"{n} baked {c} cupcakes and packs them into boxes that hold {b} cupcakes each. "
        f"How many boxes can {n} fill completely?",
        reason,
        ans,
        {"cupcakes": c, "per_box": b},
    )


def _interest(r, n):
    p, rate, t = r.randint(5, 100) * 100, r.randint(1, 8), r.randint(1, 6)
    yearly = p * rate // 100
    ans = yearly * t
    return (
        f"{n} deposits ${p} in a savings account that pays {rate}% simple interest per "
        f"year. How much interest does {n} earn after {t} years?",
        (
            f"Interest per year = {rate}% of ${p} = ${yearly}. Interest earned = ${yearly} x {t} years = ${ans}.",
            f"{rate}% of {p} is {yearly} per year, and {yearly} x {t} = {ans}.",
        ),
        ans,
        {"principal": p, "rate_pct": rate, "years": t},
    )


# (class name, generator(rng, person) -> (problem, (named, bare) reasons, exact answer, meta))
MATH_TEMPLATES = (
    ("pizza slices", _pizza),
    ("chaperones needed", _chaperones),
    ("total after purchase", _purchase),
    ("game points", _points),
    ("reading hours", _reading),
    ("shirt discount", _shirt),
    ("garden area", _garden),
    ("total savings", _savings),
    ("cupcake boxes", _cupcakes),
    ("interest earned", _interest),
)


MATH_REASONS = ("named", "bare")


def _math_item(c: int, rng: random.Random, math_reasons: str = "named") -> tuple[str, dict]:
    problem, reasons, ans, meta = MATH_TEMPLATES[c][1](rng, rng.choice(PEOPLE))
    return problem, {
        **meta,
        "person_problem": problem,
        "reason": reasons[MATH_REASONS.index(math_reasons)],
        "answer": fmt_number(ans),
    }


# --------------------------------------------------------------------------
# Task assembly
# --------------------------------------------------------------------------


def _draw(family, maker, c, n_train, n_test, seed):
    """Draw ``n_train + n_test`` items with unique keys for class ``c``."""
    rng, seen, items = random.Random(f"{seed}:{family}:{c}"), set(), []
    need, attempts = n_train + n_test, 0
    while len(items) < need:
        attempts += 1
        if attempts > 100 * need + 1000:
            raise RuntimeError(f"could not draw {need} unique items for {family} class {c}")
        key, meta = maker(c, rng)
        if key not in seen:
            seen.add(key)
            items.append(meta)
    return items[:n_train], items[n_train:]


def _row(task, split, c, i, prompt, response, label, meta):
    return {"id": f"{task}-{split}-{c}-{i}", "prompt": prompt, "response": response, "label": label, "meta": meta}


def _build(task, n_train, n_test, seed, n_classes, chatbot_names=1, math_reasons="named"):
    base = task.removeprefix("mislabeled_")
    family = "sentence" if base == "sentence_transformations" else "math"
    maker = (
        functools.partial(_sentence_item, chatbot_names=chatbot_names)
        if family == "sentence"
        else functools.partial(_math_item, math_reasons=math_reasons)
    )
    classes = RULES if family == "sentence" else MATH_TEMPLATES
    train, test = [], []
    for c in range(n_classes):
        label = classes[c][0]
        for split, metas, out in zip(("train", "test"), _draw(family, maker, c, n_train, n_test, seed), (train, test)):
            for i, m in enumerate(metas):
                if task == "sentence_transformations":
                    prompt = sentence_prompt(m["chatbot"], RULES[c][1], m["sentence"])
                    response = RULES[c][2](m["sentence"])
                elif task == "mislabeled_sentence_transformations":
                    prompt = (
                        f"Which transformation turns the first sentence into the second? "
                        f"{m['sentence']} => {RULES[c][2](m['sentence'])} -> "
                    )
                    response = label
                elif task == "mislabeled_math":
                    prompt = f"Which kind of problem is this? {m['person_problem']} -> "
                    response = label
                else:
                    prompt = f"Solve the following math problem. {m['person_problem']} -> "
                    response = (
                        f"Answer: {m['answer']}"
                        if task == "math_no_reasoning"
                        else f"Reason: {m['reason']} Answer: {m['answer']}"
                    )
                meta = {k: v for k, v in m.items() if k not in ("person_problem", "reason")}
                out.append(_row(task, split, c, i, prompt, response, label, meta))
    return train, test


def mislabeled(
    task_name: str = "math",
    noise_rate: float = 0.2,
    seed: int = 0,
    n_train: int = 90,
    n_test: int = 10,
    n_classes: int = 10,
) -> tuple[list[dict], list[dict]]:
    """Build a classification-style instruction set with flipped training labels.

    Parameters
    ----------
    task_name : {"math", "sentence_transformations"}
        Source of the 10 classes: the math templates or the transformation rules.
    noise_rate : float
        Fraction of training rows whose ``response`` and ``label`` are replaced by
        a different, uniformly chosen class name; exactly
        ``round(noise_rate * len(train))`` rows are flipped.
    seed : int
        Random seed (also selects which rows are flipped).
    n_train, n_test : int
        Rows per class in the training and test splits.
    n_classes : int
        Use the first ``n_classes`` classes.

    Returns
    -------
    train, test : list of dict
        Rows with extra fields ``true_label`` and ``flipped``; test rows are clean.
    """
    if task_name not in ("math", "sentence_transformations"):
        raise ValueError(f"unknown mislabeled base task {task_name!r}; valid: 'math', 'sentence_transformations'")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    _check_sizes(n_train, n_test, n_classes)
    task = f"mislabeled_{task_name}"
    train, test = _build(task, n_train, n_test, seed, n_classes)
    for row in train + test:
        row.update(true_label=row["label"], flipped=False)
    k = round(noise_rate * len(train))
    if k and n_classes < 2:
        raise ValueError("label flipping needs n_classes >= 2")
    names = [cls[0] for cls in (MATH_TEMPLATES if task_name == "math" else RULES)[:n_classes]]
    rng = random.Random(f"{seed}:{task}:flip")
    for idx in sorted(rng.sample(range(len(train)), k)):
        row = train[idx]
        new = rng.choice([c for c in names if c != row["true_label"]])
        row.update(label=new, response=new, flipped=True)
    return train, test


def _check_sizes(n_train, n_test, n_classes):
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be non-negative")
    if not 1 <= n_classes <= 10:
        raise ValueError(f"n_classes must be in [1, 10], got {n_classes}")


def generate_task(
    name: str,
    n_train: int = 90,
    n_test: int = 10,
    seed: int = 0,
    n_classes: int = 10,
    noise_rate: float = 0.2,
    chatbot_names: int = 1,
    math_reasons: str = "named",
) -> tuple[list[dict], list[dict]]:
    """Generate the train and test splits of a benchmark task.

    Parameters
    ----------
    name : str
        One of ``TASKS`` or ``MISLABELED_TASKS``.
    n_train, n_test : int
        Rows per class in each split (defaults 90 and 10).
    seed : int
        Random seed; equal seeds give identical rows.
    n_classes : int
        Use only the first ``n_classes`` of the 10 classes.
    noise_rate : float
        Label-flip fraction, used only by the mislabeled tasks.
    chatbot_names : int, 1 to 4
        Sentence transformations only: how many invented chatbot names each rule draws its
        prompt prefix from. 1 (default) is the reference protocol (DataInf's generator gives
        every rule one name, shared by all its samples); more names weaken the name as a
        cue for the rule and make the task harder.
    math_reasons : {"named", "bare"}
        Math with reasoning only. ``"named"`` (default) labels each step of the reason with
        the quantity it computes (``"Slices left = 24 - 5 = 19."``), as the reference
        generator does; ``"bare"`` writes the arithmetic alone (``"24 - 5 = 19."``), which
        reads alike across templates and makes the task harder.

    Returns
    -------
    train, test : list of dict
        Rows ``{"id", "prompt", "response", "label", "meta"}`` ordered by class.
        Training prompts are unique and no test prompt occurs in training.

    Raises
    ------
    ValueError
        For an unknown task name or invalid sizes.
    """
    if name not in ALL_TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(ALL_TASKS)}")
    if name in MISLABELED_TASKS:
        return mislabeled(name.removeprefix("mislabeled_"), noise_rate, seed, n_train, n_test, n_classes)
    _check_sizes(n_train, n_test, n_classes)
    if not 1 <= chatbot_names <= len(RULES[0][3]):
        raise ValueError(f"chatbot_names must be in [1, {len(RULES[0][3])}], got {chatbot_names}")
    if math_reasons not in MATH_REASONS:
        raise ValueError(f"math_reasons must be one of {MATH_REASONS}, got {math_reasons!r}")
    return _build(name, n_train, n_test, seed, n_classes, chatbot_names, math_reasons)


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSON Lines (one object per line), creating parent folders.

    Parameters
    ----------
    rows : iterable of dict
        JSON-serialisable rows.
    path : str or Path
        Destination file.

    Returns
    -------
    Path
        The written path.
    """
    from forvalue.storage.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: write ``OUT/train.jsonl`` and ``OUT/test.jsonl``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True, choices=ALL_TASKS)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n-train", type=int, default=90)
    ap.add_argument("--n-test", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-classes", type=int, default=10)
    ap.add_argument("--noise-rate", type=float, default=0.2)
    ap.add_argument(
        "--chatbot-names",
        type=int,
        default=1,
        help="sentence transformations: names per rule (1 = reference protocol, up to 4 = harder)",
    )
    ap.add_argument(
        "--math-reasons",
        choices=MATH_REASONS,
        default="named",
        help="math with reasoning: 'named' steps (reference protocol) or 'bare' arithmetic (harder)",
    )
    a = ap.parse_args(argv)
    train, test = generate_task(
        a.task, a.n_train, a.n_test, a.seed, a.n_classes, a.noise_rate, a.chatbot_names, a.math_reasons
    )
    for split, rows in (("train", train), ("test", test)):
        print(write_jsonl(rows, a.out / f"{split}.jsonl"), len(rows))


if __name__ == "__main__":
    main()
