"""The ``forvalue`` command line: help, info, query outputs, and one-line errors on bad models, stores and outputs."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, cli, make_model_dir, write_jsonl

from forvalue.api import build_index, run_query
from forvalue.indexer.build import manifest_for
from forvalue.indexer.data import Sample
from forvalue.indexer.model_runner import CausalLMRunner
from forvalue.indexer.tokenize import tokenize_sample
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import BadValuesError, ManifestMismatchError
from forvalue.storage.store import Store

TRAIN = [
    {"id": f"t{i}", "prompt": f"{p} {i} ->", "response": r, "label": label}
    for i, (p, r, label) in enumerate(
        [
            ("reverse the words: the quick fox", " fox quick the", "reverse"),
            ("solve the math problem", " answer 42", "math"),
            ("cats and dogs", " are friends", "animals"),
            ("reverse the words: a lazy dog", " dog lazy a", "reverse"),
            ("solve the problem", " answer 7", "math"),
            ("the garden", " has cats", "animals"),
            ("numbers 1 2 3", " 4 5 6", "math"),
        ]
    )
]
VAL = [
    {"id": "v-rev", "prompt": "reverse the words: the brown fox ->", "response": " fox brown the"},
    {"id": "v-math", "prompt": "solve the math problem 9 ->", "response": " answer 63"},
]
QCFG = QueryConfig(progress=False, device="cpu")


def store_state(path: Path) -> tuple:
    store = Store.open(path)
    return sorted(store.ids()), store.count(), store.version()


def folder_state(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_runner, tiny_model_dir):
    """A store of TRAIN, the validation file, and the API's full result for it."""
    tmp = tmp_path_factory.mktemp("cli")
    train, val = write_jsonl(tmp / "train.jsonl", TRAIN), write_jsonl(tmp / "val.jsonl", VAL)
    cfg = BuildConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False, write_every=3)
    build_index([train], tmp / "store", cfg, runner=tiny_runner)
    result = run_query(
        tmp / "store", [val], QueryConfig(top_k=3, progress=False, device="cpu"), runner=tiny_runner, keep_scores=True
    )
    return tmp / "store", val, result


@pytest.fixture
def store_copy(built, tmp_path) -> Path:
    shutil.copytree(built[0], tmp_path / "store")
    return tmp_path / "store"


# -- help ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        ([], ["index", "query", "demo"]),
        (["index"], ["build", "add", "info"]),
        (
            ["index", "build"],
            [
                "--store",
                "--model",
                "--max-length",
                "--top-m",
                "--on-bad",
                "--write-every",
                "--shard",
                "--prompt-column",
                "--text-column",
                "resumes",
            ],
        ),
        (["index", "add"], ["--store", "Append", "store's model"]),
        (["query"], ["--store", "--validation", "--top-k", "--output", "--all-scores", "--aggregate", "--normalize"]),
        (["audit", "run"], ["--whiten NUMBER|auto"]),  # as typed: 'AUTO' is no value of --whiten
    ],
)
def test_help(args, needles):
    result = cli(*args, "--help")
    assert result.exit_code == 0, result.output
    for needle in needles:
        assert needle in result.output, needle
    # one default per option, never Python's None (index add's --model said "(default: SmolLM2 ...; queries and
    # audits: the store's). (default: the store's, else None)")
    text = " ".join(result.output.split())
    assert "else None" not in text and not re.search(r"\(default: [^()]*\)\.? \(default:", text), text


# -- index info -----------------------------------------------------------------------
def test_index_info_prints_sample_count(built):
    store = built[0]
    result = cli("index", "info", "--store", store)
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.output.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in lines.items()}
    assert int(fields["samples"]) == len(TRAIN) == Store.open(store).count()
    as_json = json.loads(cli("index", "info", "--store", store, "--json").output)
    assert as_json["samples"] == len(TRAIN)
    assert as_json["labels"] == {"animals": 2, "math": 3, "reverse": 2}
    assert as_json["manifest"]["hidden_size"] == 32


# -- query outputs ----------------------------------------------------------------------
def _read(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".csv":
        return pcsv.read_csv(path).to_pylist()
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_query_output_formats(built, tmp_path, suffix):
    store, val, expected = built
    out = tmp_path / f"out{suffix}"
    result = cli("query", "--store", store, "-v", val, "--top-k", "3", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    rows = _read(out)
    want = expected.top.to_pylist()
    assert len(rows) == len(want) == 3 * len(VAL)
    for got, exp in zip(rows, want):
        assert {"validation_id", "rank", "train_id", "score"} <= set(got)
        assert (got["validation_id"], int(got["rank"]), str(got["train_id"])) == (
            exp["validation_id"],
            exp["rank"],
            exp["train_id"],
        )
        assert got["score"] == pytest.approx(exp["score"], rel=1e-9)


def test_query_warns_when_validation_ids_repeat(built, tmp_path):
    """Two validation samples with one id: their rankings share it in the output, which a reader cannot tell apart
    (hostile pass: no warning). A warning names the id; distinct ids get none."""
    store, val, _ = built
    twice = write_jsonl(tmp_path / "twice.jsonl", [VAL[0], {**VAL[1], "id": VAL[0]["id"]}])
    out = tmp_path / "top.jsonl"
    result = cli("query", "--store", store, "-v", twice, "--top-k", "3", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"validation ids given to more than one sample ({VAL[0]['id']})" in result.stderr
    assert [r["validation_id"] for r in _read(out)] == [VAL[0]["id"]] * 6
    result = cli("query", "--store", store, "-v", val, "--top-k", "3", "-o", tmp_path / "other.jsonl")
    assert result.exit_code == 0 and "more than one sample" not in result.stderr


def test_query_jsonl_on_stdout(built):
    store, val, expected = built
    result = cli("query", "--store", store, "-v", val, "--top-k", "3", "--quiet")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["validation_id"], r["train_id"]) for r in rows] == [
        (r["validation_id"], r["train_id"]) for r in expected.top.to_pylist()
    ]


def test_query_all_scores_matrix(built, tmp_path):
    store, val, expected = built
    path = tmp_path / "all.parquet"
    result = cli(
        "query",
        "--store",
        store,
        "-v",
        val,
        "--all-scores",
        path,
        "-o",
        tmp_path / "top.jsonl",
        "--quiet",
        "--read-rows",
        "3",
    )  # several row groups
    assert result.exit_code == 0, result.output
    table = pq.read_table(path)
    assert table.num_rows == len(TRAIN)
    assert table.column_names == ["train_id", "train_label"] + [v["id"] for v in VAL]
    assert sorted(table.column("train_id").to_pylist()) == sorted(t["id"] for t in TRAIN)
    order = [expected.train_ids.index(i) for i in table.column("train_id").to_pylist()]
    for j, v in enumerate(VAL):
        np.testing.assert_allclose(table.column(v["id"]).to_numpy(), expected.scores[j, order], rtol=1e-9)
    labels = dict(zip(table.column("train_id").to_pylist(), table.column("train_label").to_pylist()))
    assert labels == {t["id"]: t["label"] for t in TRAIN}


def test_query_aggregate_mean(built, tmp_path):
    store, val, expected = built
    out = tmp_path / "mean.jsonl"
    result = cli("query", "--store", store, "-v", val, "--aggregate", "mean", "--top-k", "4", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    rows = _read(out)
    assert [r["validation_id"] for r in rows] == ["mean"] * 4
    mean = expected.scores.mean(axis=0)
    best = np.argsort(-mean, kind="stable")[:4]
    assert [r["train_id"] for r in rows] == [expected.train_ids[i] for i in best]
    np.testing.assert_allclose([r["score"] for r in rows], mean[best], rtol=1e-6)


def test_unknown_output_format_fails_before_scoring(built, tmp_path):
    store, val, _ = built
    result = cli(
        "query",
        "--store",
        store,
        "-v",
        val,
        "-o",
        tmp_path / "top.txt",
        "--all-scores",
        tmp_path / "all.parquet",
        "--quiet",
    )
    assert_one_line_error(result, "top.txt", "unknown output format")
    assert not (tmp_path / "all.parquet").exists() and not (tmp_path / "top.txt").exists()


# -- bad models ------------------------------------------------------------------------
def _train_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", TRAIN[:2])


def test_unknown_model_path(tmp_path):
    result = cli(
        "index",
        "build",
        _train_file(tmp_path),
        "--store",
        tmp_path / "s",
        "--model",
        tmp_path / "no-such-model",
        "--quiet",
    )
    assert_one_line_error(result, "no-such-model", "does not exist")
    assert not (tmp_path / "s").exists()


def test_model_folder_without_config(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").unlink()
    result = cli("index", "build", _train_file(tmp_path), "--store", tmp_path / "s", "--model", folder, "--quiet")
    assert_one_line_error(result, "config.json")
    assert not (tmp_path / "s").exists()


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "gguf" else real(name, *a, **k)
    )
    result = cli("index", "build", _train_file(tmp_path), "--store", tmp_path / "s", "--model", gguf, "--quiet")
    assert_one_line_error(result, "gguf", "pip install gguf")
    assert not (tmp_path / "s").exists()


def test_model_that_differs_from_the_store(built, store_copy, tmp_path_factory, tiny_runner):
    other = make_model_dir(tmp_path_factory.mktemp("other-model"), seed=1)
    store, val, _ = built
    with pytest.raises(ManifestMismatchError) as info:
        run_query(store, [val], QCFG, model=ModelConfig(path=str(other), device="cpu"))
    message = str(info.value)
    assert "model_weights_sha256" in message and "\n" not in message
    assert Store.open(store).manifest.model_weights_sha256 in message
    differing = {
        name
        for name in ("tokenizer_sha256", "hidden_size", "vocab_size", "dtype", "top_m", "max_length")
        if name in message
    }
    assert not differing, f"only the weights differ, message names {differing}"
    assert_one_line_error(
        cli("query", "--store", store, "-v", val, "--model", other, "--quiet"), "model_weights_sha256"
    )
    # appending with another model is refused too, and the store is left as it was
    before = store_state(store_copy)
    new = write_jsonl(store_copy.parent / "new.jsonl", [{"id": "n1", "prompt": "new ->", "response": " row"}])
    assert_one_line_error(
        cli("index", "add", new, "--store", store_copy, "--model", other, "--quiet"),
        "model_weights_sha256",
        "leave out --model",
    )
    # (the advice is not the build's "use 'forvalue index add'": that is the command refused)
    assert "use 'forvalue index add'" not in cli("index", "add", new, "--store", store_copy, "--model", other).stderr
    assert store_state(store_copy) == before


# -- bad stores ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "missing", "file"])
def test_path_that_is_not_a_store(built, tmp_path, kind):
    path = tmp_path / "not-a-store"
    if kind == "folder":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    elif kind == "file":
        path.write_text("hello")
    before = folder_state(path) if kind == "folder" else None
    val = built[1]
    assert_one_line_error(cli("query", "--store", path, "-v", val, "--quiet"), "not-a-store", "store")
    assert_one_line_error(cli("index", "info", "--store", path), "not-a-store", "store")
    assert_one_line_error(cli("index", "add", val, "--store", path, "--quiet"), "not-a-store", "store")
    if kind == "folder":
        assert folder_state(path) == before
    elif kind == "missing":
        assert not path.exists()
    else:
        assert path.read_text() == "hello"


def test_store_killed_before_its_first_rows_says_how_to_resume(built, tmp_path):
    """A build or convert killed between publishing its manifest and creating the samples table leaves a folder
    with only manifest.json. Re-running the command resumes it, so the error says so (it said 'the store is
    damaged', which --repair cannot fix; hostile pass)."""
    store, val = built[0], built[1]
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(Path(store) / "manifest.json", half / "manifest.json")
    for args in (["index", "check", "--store", half], ["index", "info", "--store", half]):
        err = assert_one_line_error(cli(*args), "half", "re-run")
        assert "damaged" not in err
    assert_one_line_error(cli("query", "--store", half, "-v", val, "--quiet"), "half", "re-run")


def test_query_against_empty_store(tmp_path, tiny_runner, built):
    Store.create(tmp_path / "empty", manifest_for(tiny_runner, DataConfig(), EncodeConfig()))
    result = cli("query", "--store", tmp_path / "empty", "-v", built[1], "--quiet")
    assert_one_line_error(result, "empty", "no samples")
    info = json.loads(cli("index", "info", "--store", tmp_path / "empty", "--json").output)
    assert info["samples"] == 0
    assert Store.open(tmp_path / "empty").count() == 0


def test_validation_sample_longer_than_store_max_length(tmp_path, tiny_runner, tiny_model_dir):
    max_length = 12
    cfg = BuildConfig(
        data=DataConfig(max_length=max_length),
        model=ModelConfig(path=str(tiny_model_dir), device="cpu"),
        progress=False,
    )
    build_index([write_jsonl(tmp_path / "train.jsonl", TRAIN[:3])], tmp_path / "store", cfg, runner=tiny_runner)
    short = {"id": "short", "prompt": "cats ->", "response": " dogs"}
    long = {
        "id": "long",
        "prompt": "reverse the words: the quick brown fox jumps over the lazy dog ->",
        "response": " dog lazy the",
    }
    assert len(tiny_runner.tokenizer(long["prompt"] + long["response"])["input_ids"]) > max_length
    val = write_jsonl(tmp_path / "val.jsonl", [short, long])
    assert_one_line_error(
        cli("query", "--store", tmp_path / "store", "-v", val, "--quiet"),
        "val.jsonl:2",
        "'long'",
        f"max length ({max_length}",
    )
    ok = cli("query", "--store", tmp_path / "store", "-v", write_jsonl(tmp_path / "ok.jsonl", [short]), "--quiet")
    assert ok.exit_code == 0, ok.output


# -- NaN / inf in model outputs ---------------------------------------------------------
def _poison(monkeypatch, tokenizer, bad_row: dict, value: float, whole_sample: bool) -> None:
    """Make the model's hidden states non-finite for the sample ``bad_row`` only (whole sample or one position)."""
    sample = Sample(bad_row["id"], bad_row["prompt"], bad_row["response"], None, None, "test")
    bad_ids = tokenize_sample(tokenizer, sample, "all", 512, False).input_ids
    original = CausalLMRunner.hidden_states

    def hidden_states(self, input_ids, attention_mask):
        hidden = original(self, input_ids, attention_mask).clone()
        for row in range(input_ids.shape[0]):
            n = int(attention_mask[row].sum())
            if input_ids[row, :n].tolist() == bad_ids:
                if whole_sample:
                    hidden[row, :n] = value
                else:
                    hidden[row, n // 2, 0] = value
        return hidden

    monkeypatch.setattr(CausalLMRunner, "hidden_states", hidden_states)


NEW = [{"id": f"n{i}", "prompt": f"fresh prompt number {i} ->", "response": " fresh"} for i in range(4)]


def test_nan_errors_by_default_and_leaves_the_store_intact(store_copy, monkeypatch, tiny_runner):
    _poison(monkeypatch, tiny_runner.tokenizer, NEW[2], float("nan"), whole_sample=True)
    before = store_state(store_copy)
    new = write_jsonl(store_copy.parent / "new.jsonl", NEW)
    err = assert_one_line_error(
        cli("index", "add", new, "--store", store_copy, "--quiet"), "new.jsonl:3", "'n2'", "NaN", "--on-bad skip"
    )
    assert store_state(store_copy) == before, err


def test_on_bad_skip_counts_the_sample(store_copy, monkeypatch, tiny_runner, tmp_path):
    _poison(monkeypatch, tiny_runner.tokenizer, NEW[1], float("inf"), whole_sample=False)  # one position is enough
    new = write_jsonl(tmp_path / "new.jsonl", NEW)
    result = cli("index", "add", new, "--store", store_copy, "--quiet", "--on-bad", "skip", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["bad_skipped"], report["written"]) == (1, len(NEW) - 1)
    assert Store.open(store_copy).ids() == {t["id"] for t in TRAIN} | {"n0", "n2", "n3"}
    # the API: EncodeConfig(on_bad=...) and BuildReport.bad_skipped
    cfg = BuildConfig(model=ModelConfig(device="cpu"), progress=False)
    with pytest.raises(BadValuesError, match="--on-bad skip"):
        build_index([new], tmp_path / "api-error", cfg, runner=tiny_runner)
    skip = BuildConfig(model=ModelConfig(device="cpu"), encode=EncodeConfig(on_bad="skip"), progress=False)
    report = build_index([new], tmp_path / "api", skip, runner=tiny_runner)
    assert (report.bad_skipped, report.written, report.total_rows) == (1, 3, 3)
    assert "n1" not in Store.open(tmp_path / "api").ids()
    # the skipped sample is retried (and skipped again) by the next run; nothing else is rewritten
    again = build_index([new], tmp_path / "api", skip, runner=tiny_runner)
    assert (again.bad_skipped, again.written, again.already_stored) == (1, 0, 3)


def test_nan_in_validation_sample_is_an_error(built, monkeypatch, tiny_runner):
    store, val, _ = built
    _poison(monkeypatch, tiny_runner.tokenizer, VAL[1], float("nan"), whole_sample=True)
    assert_one_line_error(cli("query", "--store", store, "-v", val, "--quiet"), "val.jsonl:2", "'v-math'", "NaN")


def test_demo_runs_end_to_end_on_a_given_model(tmp_path, tiny_model_dir):
    workdir = tmp_path / "demo"
    res = cli("demo", "--workdir", workdir, "--train-per-class", 2, "--model", tiny_model_dir, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "data: 20 training and 10 validation samples" in res.output
    assert "over all 10 validation samples: AUC" in res.output
    top = [json.loads(line) for line in (workdir / "top5.jsonl").read_text().splitlines()]
    assert len(top) == 50 and {r["rank"] for r in top} == {1, 2, 3, 4, 5}
    assert Store.open(workdir / "store").count() == 20


def test_demo_refuses_a_bad_count_before_any_work(tmp_path):
    res = cli("demo", "--workdir", tmp_path / "demo", "--train-per-class", 0)
    assert_one_line_error(res, "--train-per-class")
    assert not (tmp_path / "demo").exists()


def test_ctrl_c_is_one_line_with_status_130(monkeypatch, tmp_path):
    import forvalue.store

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(forvalue.store.Store, "__init__", interrupted)
    res = cli("index", "info", "--store", tmp_path)
    assert res.exit_code == 130
    err = res.stderr.strip()
    assert err.startswith("error: interrupted;") and "\n" not in err, err
