"""Tests for forvalue.tasks.text."""

import json
import math
from collections import Counter
from fractions import Fraction

import pytest

from forvalue.tasks import text as dd
from tools import generate_tasks as gen

SENT = "the quick fox jumped"
EXPECTED = {
    "reverse word order": "jumped fox quick the",
    "capitalise every other letter": "ThE qUiCk FoX jUmPeD",
    "insert 1 between words": "the 1 quick 1 fox 1 jumped",
    "replace vowels with star": "th* q**ck f*x j*mp*d",
    "double consonants": "tthhe qquicckk ffoxx jjummppedd",
    "capitalise every word": "The Quick Fox Jumped",
    "remove vowels": "th qck fx jmpd",
    "add ly to each word": "thely quickly foxly jumpedly",
    "remove consonants": "e ui o ue",
    "repeat each word twice": "the the quick quick fox fox jumped jumped",
}


def small(name, **kw):
    return dd.generate_task(name, **{"n_train": 12, "n_test": 3, **kw})


@pytest.mark.parametrize("rule", dd.RULES, ids=[r[0] for r in dd.RULES])
def test_rule_on_known_sentence(rule):
    assert rule[2](SENT) == EXPECTED[rule[0]]


def test_rule_names_distinct():
    names = [n for r in dd.RULES for n in r[3]]
    assert len(names) == len(set(names)) and all(3 <= len(r[3]) <= 5 for r in dd.RULES)
    assert len(dd.RULES) == len(dd.MATH_TEMPLATES) == 10


@pytest.mark.parametrize("name", dd.ALL_TASKS)
def test_counts_ids_and_uniqueness(name):
    train, test = dd.generate_task(name)
    per_train = Counter(r.get("true_label", r["label"]) for r in train)
    per_test = Counter(r["label"] for r in test)
    assert len(per_train) == len(per_test) == 10
    assert set(per_train.values()) == {90} and set(per_test.values()) == {10}
    assert len({r["id"] for r in train + test}) == 1000
    assert train[0]["id"] == f"{name}-train-0-0" and test[-1]["id"] == f"{name}-test-9-9"
    train_prompts = [r["prompt"] for r in train]
    assert len(set(train_prompts)) == len(train_prompts)
    assert not set(train_prompts) & {r["prompt"] for r in test}
    for r in train + test:
        assert {"id", "prompt", "response", "label"} <= r.keys()
        assert all(isinstance(r[k], str) for k in ("id", "prompt", "response", "label"))


@pytest.mark.parametrize("name", dd.ALL_TASKS)
def test_determinism(name, tmp_path):
    a, b, c = small(name, seed=3), small(name, seed=3), small(name, seed=4)
    assert a == b and a != c
    for d, rows in (("x", a), ("y", b)):
        dd.write_jsonl(rows[0], tmp_path / d / "train.jsonl")
    assert (tmp_path / "x/train.jsonl").read_bytes() == (tmp_path / "y/train.jsonl").read_bytes()


def test_n_classes_is_prefix():
    full, _ = small("math_no_reasoning")
    part, _ = small("math_no_reasoning", n_classes=3)
    assert part == full[:36]


def test_sentence_prompt_format_and_response():
    train, test = small("sentence_transformations")
    for r in train + test:
        c = int(r["id"].split("-")[-2])
        label, desc, fn, bots = dd.RULES[c]
        s = r["meta"]["sentence"]
        assert r["meta"]["chatbot"] in bots
        assert r["prompt"] == (
            f"{r['meta']['chatbot']} is a chatbot that performs a specific "
            f"transformation on sentences: {desc}\n    For example:\n    {s} -> "
        )
        assert r["response"] == fn(s) and r["label"] == label
        assert 5 <= len(s.split()) <= 10 and s == s.lower()


def test_sentence_rules_have_one_chatbot_name_unless_asked():
    """Reference protocol: every sample of a rule shares the rule's one name; the variant mixes 4."""

    def names(rows):
        out = {}
        for r in rows:
            out.setdefault(r["label"], set()).add(r["meta"]["chatbot"])
        return out

    train, _ = dd.generate_task("sentence_transformations", n_train=20, n_test=2)
    assert all(len(v) == 1 for v in names(train).values()) and len(names(train)) == 10
    assert {next(iter(v)) for v in names(train).values()} == {rule[3][0] for rule in dd.RULES}
    harder, _ = dd.generate_task("sentence_transformations", n_train=20, n_test=2, chatbot_names=4)
    assert all(len(v) > 1 for v in names(harder).values())
    with pytest.raises(ValueError, match="chatbot_names"):
        dd.generate_task("sentence_transformations", chatbot_names=5)


def _answer(label, m):
    """Independent recomputation of each template's answer from its numbers."""
    return {
        "pizza slices": lambda: m["pizzas"] * m["slices_per_pizza"] - m["eaten"],
        "chaperones needed": lambda: math.ceil(m["students"] / m["students_per_chaperone"]),
        "total after purchase": lambda: m["start"] + m["packs"] * m["per_pack"],
        "game points": lambda: m["points_per_round"] * m["rounds"] + m["bonus"],
        "reading hours": lambda: Fraction(m["minutes_per_day"] * m["days"], 60),
        "shirt discount": lambda: Fraction(m["price"]) * (100 - m["discount_pct"]) / 100,
        "garden area": lambda: m["length"] * m["width"],
        "total savings": lambda: m["start"] + m["per_week"] * m["weeks"],
        "cupcake boxes": lambda: m["cupcakes"] // m["per_box"],
        "interest earned": lambda: Fraction(m["principal"] * m["rate_pct"] * m["years"], 100),
    }[label]()


@pytest.mark.parametrize("name", ["math_no_reasoning", "math_with_reasoning"])
def test_math_answers(name):
    train, test = dd.generate_task(name, n_train=30, n_test=5, seed=1)
    for r in train + test:
        ans = r["response"].rsplit("Answer: ", 1)[1]
        assert Fraction(ans) == _answer(r["label"], r["meta"]), r
        assert r["prompt"].startswith("Solve the following math problem. ")
        assert r["prompt"].endswith(" -> ")
        for v in r["meta"].values():
            assert str(v) in r["prompt"] or v == r["meta"]["answer"]
        if name == "math_no_reasoning":
            assert r["response"] == f"Answer: {ans}"
        else:
            assert r["response"].startswith("Reason: ") and " Answer: " in r["response"]


def test_math_variants_share_problems():
    a, _ = small("math_no_reasoning")
    b, _ = small("math_with_reasoning")
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]


def test_math_reasons_name_their_steps_unless_asked():
    """Named reasons open with a label ("Slices left = ...") that belongs to one template;
    bare reasons are the same problems and answers with the arithmetic alone."""

    def opening(r):  # the words before the first "=", or None where they hold a number
        first = r["response"].removeprefix("Reason: ").split(" = ", 1)[0]
        return None if any(ch.isdigit() for ch in first) else first

    named, _ = dd.generate_task("math_with_reasoning", n_train=20, n_test=2)
    by_class = {}
    for r in named:
        by_class.setdefault(r["label"], set()).add(opening(r))
    assert len(by_class) == 10 and all(None not in v for v in by_class.values())
    labels = [w for v in by_class.values() for w in v]
    assert len(labels) == len(set(labels)), "a reason label is used by several templates"
    bare, _ = dd.generate_task("math_with_reasoning", n_train=20, n_test=2, math_reasons="bare")
    assert [r["prompt"] for r in bare] == [r["prompt"] for r in named]
    assert [r["response"].rsplit(" Answer: ", 1)[1] for r in bare] == [
        r["response"].rsplit(" Answer: ", 1)[1] for r in named
    ]
    assert {opening(r) for r in bare} == {None}
    with pytest.raises(ValueError, match="math_reasons"):
        dd.generate_task("math_with_reasoning", math_reasons="verbose")


def test_fmt_number():
    assert dd.fmt_number(12) == "12" and dd.fmt_number(Fraction(15, 2)) == "7.5"
    assert dd.fmt_number(Fraction(3735, 100)) == "37.35"
    with pytest.raises(ValueError):
        dd.fmt_number(Fraction(1, 3))


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.33, 1.0])
@pytest.mark.parametrize("name", dd.MISLABELED_TASKS)
def test_mislabeled(name, noise):
    train, test = dd.generate_task(name, n_train=20, n_test=4, seed=2, n_classes=5, noise_rate=noise)
    flipped = [r for r in train if r["flipped"]]
    assert len(flipped) == round(noise * len(train))
    classes = {r["true_label"] for r in train}
    assert len(classes) == 5
    for r in train:
        assert r["response"] == r["label"] and r["label"] in classes
        assert (r["label"] != r["true_label"]) == r["flipped"]
    assert all(not r["flipped"] and r["label"] == r["true_label"] == r["response"] for r in test)
    if name == "mislabeled_math":
        assert all(r["prompt"].startswith("Which kind of problem is this? ") for r in train)


def test_mislabeled_function_matches_generate_task():
    assert dd.mislabeled("math", 0.2, 5, 10, 2, 4) == dd.generate_task("mislabeled_math", 10, 2, 5, 4, noise_rate=0.2)


def test_errors():
    with pytest.raises(ValueError, match="sentence_transformations"):
        dd.generate_task("nope")
    with pytest.raises(ValueError):
        dd.generate_task("math_no_reasoning", n_classes=11)
    with pytest.raises(ValueError):
        dd.mislabeled("math", noise_rate=1.5)


def test_cli(tmp_path):
    out = tmp_path / "out"
    dd.main(
        [
            "--task",
            "sentence_transformations",
            "--out",
            str(out),
            "--n-train",
            "4",
            "--n-test",
            "2",
            "--n-classes",
            "3",
            "--seed",
            "7",
        ]
    )
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len((out / "test.jsonl").read_text().splitlines()) == 6
    assert rows == dd.generate_task("sentence_transformations", 4, 2, 7, 3)[0]


def test_generate_tasks_script_writes_every_task(tmp_path):
    small_args = ["--n-train", "3", "--n-test", "1", "--n-classes", "2"]
    assert gen.main(["--out", str(tmp_path / "a"), *small_args]) == 0
    folders = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert folders == [
        "math_no_reasoning",
        "math_with_reasoning",
        "mislabeled_math-noise0.2",
        "mislabeled_math-noise0.5",
        "sentence_transformations",
    ]
    lines = (tmp_path / "a" / "mislabeled_math-noise0.5" / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 6 and sum(r["flipped"] for r in rows) == 3
    assert all({"id", "prompt", "response", "label"} <= r.keys() for r in rows)
    gen.main(["--out", str(tmp_path / "b"), *small_args])
    for f in (tmp_path / "a").rglob("*.jsonl"):  # seeded: byte-identical on a second run
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_generate_tasks_script_bad_size_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gen.main(["--out", str(tmp_path), "--tasks", "math_no_reasoning", "--n-classes", "11"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "n_classes must be in [1, 10]" in err[-1]


def test_hard_tasks_name_no_class_and_are_seeded():
    from tools.generate_tasks import HARD_PROMPT, hard_task

    for task in ("hard_sentence", "hard_math", "hard_mixed"):
        train, test = hard_task(task, 4, 2, seed=3)
        assert (train, test) == hard_task(task, 4, 2, seed=3)
        assert hard_task(task, 4, 2, seed=4)[0] != train
        labels = {r["label"] for r in train}
        assert len(labels) == (20 if task == "hard_mixed" else 10) and len(train) == 4 * len(labels)
        assert len({r["id"] for r in train + test}) == len(train) + len(test)
        for r in train + test:
            text = (r["prompt"] + r["response"]).lower()
            assert not any(label in text for label in labels), (task, r)  # no class name anywhere
            if task == "hard_mixed":
                assert r["prompt"].startswith(HARD_PROMPT.split("{")[0])
    math_train, _ = hard_task("hard_math", 3, 1, seed=0)
    for r in math_train:  # no story: the prompt holds numbers only, the reasoning no nouns
        assert r["prompt"].startswith("Solve the following problem with the numbers ")
        assert not any(w in r["response"] for w in ("slices", "hours", "minutes", "points", "meters", "boxes"))
    with pytest.raises(ValueError):
        hard_task("hard_poetry")
