"""The selection benchmark (tools.bench_selection, issue 17): its LoRA primitives, BM25, and the --quick
suite end to end on the tiny offline model, including a resumed re-run that trains nothing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tools import bench_selection as bs
from tools.selection_lora import Lora, greedy_answers, sample_losses, sft_tokenize

ROWS = [
    {"id": "r0", "prompt": "reverse the words: the quick fox -> ", "response": "fox quick the", "label": "rev"},
    {"id": "r1", "prompt": "solve the math problem 3 -> ", "response": "answer 21", "label": "math"},
    {
        "id": "r2",
        "prompt": "a chatbot that performs a transformation: cats and dogs -> ",
        "response": "dogs and cats",
        "label": "rev",
    },
    {"id": "r3", "prompt": "numbers 0 1 2 -> ", "response": "2 1 0", "label": "math"},
]


# --------------------------------------------------------------------------- BM25 and small helpers


def test_bm25_matches_the_okapi_formula_by_hand():
    scores = bs.bm25(["c"], ["a b", "a c c"])
    idf = math.log(1.0 + (2 - 1 + 0.5) / (1 + 0.5))
    norm = 1.5 * (1 - 0.75 + 0.75 * 3 / 2.5)
    assert scores.shape == (1, 2)
    assert scores[0, 0] == 0.0
    assert scores[0, 1] == pytest.approx(idf * 2 * 2.5 / (2 + norm))
    # a repeated query term counts twice; an unknown term adds nothing
    assert bs.bm25(["c c zzz"], ["a b", "a c c"])[0, 1] == pytest.approx(2 * scores[0, 1])


def test_top_n_and_n_of():
    assert bs.top_n(np.array([0.1, 3.0, -1.0, 3.0, 2.0]), 3) == [1, 3, 4]
    assert bs.n_of(5, 120) == 6 and bs.n_of(25, 120) == 30 and bs.n_of(1, 10) == 1


def test_fine_tune_cache_key_ignores_which_method_chose_the_set():
    suite = bs.Suite.__new__(bs.Suite)
    suite.hp = {"rank": 8}
    a = suite.ft_key({"part": "targeted", "target": "t", "method": "bm25", "k": 5}, ROWS[:2], ROWS[2:], 0)
    b = suite.ft_key({"part": "targeted", "target": "t", "method": "grad", "k": 10}, ROWS[:2], ROWS[2:], 0)
    assert a == b
    assert a != suite.ft_key({"part": "targeted", "target": "t"}, ROWS[:3], ROWS[2:], 0)
    assert a != suite.ft_key({"part": "targeted", "target": "u"}, ROWS[:2], ROWS[2:], 0)
    assert a != suite.ft_key({"part": "targeted", "target": "t"}, ROWS[:2], ROWS[2:], 1)


# --------------------------------------------------------------------------- LoRA primitives (tiny model)


def test_sft_tokenize_scores_the_response_and_eos(tiny_runner):
    tok = tiny_runner.tokenizer
    out = sft_tokenize(tok, ROWS, 160)
    for r, t in zip(ROWS, out):
        assert t.input_ids[-1] == tok.eos_token_id
        prompt = tok(r["prompt"], add_special_tokens=True)["input_ids"]
        assert t.first_target == len(prompt)
        assert tok.decode(t.input_ids[t.first_target : -1]).strip() == r["response"]


def test_sample_losses_are_the_mean_response_nll(tiny_runner):
    model = tiny_runner.model
    toks = sft_tokenize(tiny_runner.tokenizer, ROWS, 160)
    got = sample_losses(model, toks, batch_size=3)
    for j, t in enumerate(toks):
        ids = torch.tensor([t.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        nll = [-logp[p - 1, ids[0, p]].item() for p in range(t.first_target, len(t.input_ids))]
        assert got[j] == pytest.approx(np.mean(nll), rel=1e-4, abs=1e-5)


def test_fresh_adapters_are_the_pretrained_model_and_training_lowers_the_loss(tiny_runner):
    model = tiny_runner.model
    toks = sft_tokenize(tiny_runner.tokenizer, ROWS, 160)
    before = sample_losses(model, toks)
    lora = Lora(model, rank=4, seed=0)
    with lora.active():
        np.testing.assert_allclose(sample_losses(model, toks), before, rtol=1e-6)
    lora.finetune(toks, epochs=8, lr=1e-2, batch_size=2, seed=0)
    with lora.active():
        after = sample_losses(model, toks)
    assert after.mean() < before.mean() - 0.5, (before, after)
    np.testing.assert_allclose(sample_losses(model, toks), before, rtol=1e-6)  # hooks gone after the block
    # the saved state reproduces the trained adapters on a fresh object; the same seed trains the same adapters
    other = Lora(model, rank=4, seed=5)
    other.load_state(lora.state())
    with other.active():
        np.testing.assert_allclose(sample_losses(model, toks), after, rtol=1e-5)
    again = Lora(model, rank=4, seed=0)
    again.finetune(toks, epochs=8, lr=1e-2, batch_size=2, seed=0)
    for x, y in zip(again.state()["B"], lora.state()["B"]):
        torch.testing.assert_close(x, y)


def test_batched_greedy_answers_match_one_prompt_at_a_time(tiny_runner):
    model, tok = tiny_runner.model, tiny_runner.tokenizer
    batched = greedy_answers(model, tok, ROWS, batch_size=4)
    single = [greedy_answers(model, tok, [r], batch_size=1)[0] for r in ROWS]
    assert batched == single
    assert any(a for a in single)


# --------------------------------------------------------------------------- the --quick suite end to end


def test_quick_suite_runs_every_part_and_a_rerun_trains_nothing(tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    # the --quick configuration, every method and part, with fewer sizes so the test stays short on a loaded machine
    small = ["--targets", "math_no_reasoning:0,1", "--ks", "10", "25", "--noise-rates", "0.5", "--brittle-ks", "2", "8"]
    args = [
        "--workdir",
        str(work),
        "--quick",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "sel.md"),
        "--json",
        str(tmp_path / "sel.json"),
        *small,
    ]
    first = bs.main(args)
    s = bs.settings_from(bs.parse_args(args))
    assert s.methods == bs.METHODS and s.seeds == bs.QUICK.seeds
    rows = first["rows"]
    assert first["counts"]["run"] > 0
    tgt = [r for r in rows if r["part"] == "targeted"]
    assert {(r["target"], r["method"], r["k"]) for r in tgt} == {
        (t, m, k) for t in s.targets for m in s.methods for k in s.ks
    }
    pool, targets = bs.targeted_data(s, 0)
    for r in tgt:
        assert r["n"] == bs.n_of(r["k"], len(pool))
        assert 0.0 <= r["in_target"] <= 1.0 and r["loss"] > 0 and 0.0 <= r["acc"] <= 1.0
    # the product's select_subset picks exactly the top-n of the values the suite recorded for forvalue
    sels = [json.loads(p.read_text()) for p in (work / "cache").glob("sel-*.json")]
    fv = [d for d in sels if d["key"].get("method") == "forvalue" and d["key"].get("part") == "targeted"]
    assert len(fv) == len(s.targets)
    ids = [r["id"] for r in pool]
    for d in fv:
        for n, chosen in d["result"]["select_subset"].items():
            assert set(chosen) == {ids[i] for i in bs.top_n(np.array(d["result"]["values"]), int(n))}
    noisy = [r for r in rows if r["part"] == "noisy"]
    for noise in s.noise_rates:
        tag = f"{int(round(noise * 100))}% flipped"
        full = [r for r in noisy if r["noise"] == tag and r["k"] == 100]
        assert len(full) == 1 and full[0]["clean"] == pytest.approx(1 - noise, abs=0.05)
        assert {r["method"] for r in noisy if r["noise"] == tag and r["k"] != 100} == set(s.methods)
        assert all(0.0 <= r["detect_auc"] <= 1.0 for r in noisy if r["noise"] == tag and r["method"] != "random")
    br = [r for r in rows if r["part"] == "brittle"]
    assert {(r["method"], r["k"]) for r in br} == {(m, k) for m in bs.BRITTLE_METHODS for k in s.brittle_ks}
    text = (tmp_path / "sel.md").read_text()
    for heading in ("### Targeted selection", "### Noisy pool", "### Brittleness", "### Goals"):
        assert heading in text
    assert json.loads((tmp_path / "sel.json").read_text())["rows"] == json.loads(json.dumps(rows, default=float))

    # --cached-only reports what a work folder holds and trains nothing: all of it here, none of an empty one
    cached = bs.main([*args, "--cached-only"])
    assert cached["counts"]["run"] == 0 and cached["counts"]["skipped"] == 0
    assert json.dumps(cached["rows"], default=float) == json.dumps(rows, default=float)
    empty = bs.main(["--workdir", str(tmp_path / "empty"), "--quick", "--cached-only", *small])
    assert empty["rows"] == [] and empty["counts"]["run"] == 0 and empty["counts"]["selections_run"] == 0
    assert empty["counts"]["skipped"] == len(s.methods) * len(s.ks) + 2  # targeted rows, then noisy and brittle

    again = bs.main(args)  # resumed: every selection and fine-tune comes from the work folder
    assert again["counts"]["run"] == 0 and again["counts"]["selections_run"] == 0
    assert again["counts"]["reused"] >= first["counts"]["run"]
    assert json.dumps(again["rows"], default=float) == json.dumps(rows, default=float)


def test_goals_compare_forvalue_with_rds_in_std_of_rds():
    """Issue 29's bar (RDS+ beaten at 10% by > 2 std) is printed: margin = rds mean - forvalue mean, over rds's std."""
    from tools.bench_selection.report import goals

    def row(method, loss):
        return {"part": "targeted", "target": "t", "k": 10.0, "method": method, "loss": loss, "acc": 0.0}

    rows = [row("forvalue", x) for x in (1.0, 1.2, 1.1)] + [row("rds", x) for x in (2.0, 2.2, 2.1)]
    lines = [line for line in goals(rows) if "vs rds" in line]
    # rds std over seeds is 0.1, its mean 2.1; forvalue's mean 1.1: 1.0 better = 10 std
    assert lines == ["- targeted t k=10%: forvalue vs rds (RDS+), loss +1.000 = +10.0 std."]


@pytest.mark.parametrize(
    "method,variant,settings",
    [
        ("forvalue-cos", "cosine", {"normalize": "cosine"}),
        ("forvalue-auto", "auto", {"validation_tokens": "auto", "whiten": "auto"}),
    ],
)
def test_variant_methods_select_by_the_products_audit_of_that_variant(
    tiny_model_dir, tmp_path, method, variant, settings
):
    """forvalue-cos / forvalue-auto values are the mean over the validation set of the product's scores with those
    settings (a query of the same store), and they differ from the raw audit's."""
    from forvalue.api import run_query
    from forvalue.schemas.config import QueryConfig

    work = tmp_path / "work"
    args = ["--workdir", str(work), "--quick", "--model", str(tiny_model_dir), "--parts", "targeted"]
    args += ["--targets", "math_no_reasoning:0,1", "--ks", "25", "--methods", "forvalue", method]
    bs.main(args)
    sels = [json.loads(p.read_text()) for p in (work / "cache").glob("sel-*.json")]
    values = {d["key"]["method"]: np.array(d["result"]["values"]) for d in sels}
    assert set(values) == {"forvalue", method}
    assert not np.allclose(values["forvalue"], values[method])
    s = bs.settings_from(bs.parse_args(args))
    pool, _ = bs.targeted_data(s, 0)
    ctx = work / "work" / "targeted-s0"
    (vfile,) = ctx.glob(f"val-*_{variant}.jsonl")
    res = run_query(ctx / "store", [vfile], QueryConfig(**settings, progress=False), keep_scores=True)
    where = {i: j for j, i in enumerate(res.train_ids)}
    expected = res.scores.mean(axis=0)[[where[r["id"]] for r in pool]]
    np.testing.assert_allclose(values[method], expected, rtol=1e-5, atol=1e-7)
