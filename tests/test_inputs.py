"""Input formats, column names, content-hash ids, and bad data files (one-line CLI errors, store untouched)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, cli, write_jsonl

from forvalue.api import build_index, run_query
from forvalue.indexer.data import iter_samples
from forvalue.schemas.config import BuildConfig, DataConfig, ModelConfig, QueryConfig
from forvalue.storage.store import Store

# Quotes, commas, newlines and non-ASCII exercise CSV quoting and UTF-8 handling; two rows have no label.
ROWS = [
    {"id": "r0", "prompt": 'say "hi", then stop ->', "response": " hi", "label": "greet"},
    {"id": "r1", "prompt": "reverse the words: the quick fox ->", "response": " fox quick the", "label": "reverse"},
    {"id": "r2", "prompt": "solve the math problem 3 ->", "response": " answer 21", "label": "math"},
    {"id": "r3", "prompt": "café, crème ->", "response": " brûlée", "label": None},
    {"id": "r4", "prompt": "two\nlines ->", "response": " one line", "label": "reverse"},
    {"id": "r5", "prompt": "cats and dogs ->", "response": " are friends in the garden", "label": None},
    {"id": "r6", "prompt": "numbers 1 2 3 ->", "response": " 4 5 6", "label": "math"},
]
VAL = [
    {"id": "v0", "prompt": "reverse the words: the lazy dog ->", "response": " dog lazy the"},
    {"id": "v1", "prompt": "solve the math problem 5 ->", "response": " answer 35"},
]
FLOAT_COLUMNS = ("hidden", "topk_probs", "target_probs", "tail_mass", "sq_norm", "sketch")


def _strip(rows, drop=()):
    """Rows as a JSONL writer would give them: keys in ``drop`` removed, None values left out."""
    return [{k: v for k, v in r.items() if k not in drop and v is not None} for r in rows]


def write_csv(path: Path, rows: list[dict], bom: bool = False) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", encoding="utf-8-sig" if bom else "utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows])
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.table({k: pa.array([r.get(k) for r in rows], pa.string()) for k in columns}), path)
    return path


def write_arrow_folder(path: Path, rows: list[dict], files: int = 2) -> Path:
    """A ``datasets.Dataset.save_to_disk`` folder, written without ``datasets``: Arrow stream files + state.json."""
    path.mkdir()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    schema = pa.schema([(k, pa.string()) for k in columns])
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    per_file = -(-len(rows) // files)
    for i, name in enumerate(names):
        part = rows[i * per_file : (i + 1) * per_file]
        table = pa.table({k: pa.array([r.get(k) for r in part], pa.string()) for k in columns}, schema=schema)
        with pa.OSFile(str(path / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table, max_chunksize=2)  # several record batches per file
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": "0" * 16,
        "_format_type": None,
        "_split": None,
    }
    (path / "state.json").write_text(json.dumps(state))
    (path / "dataset_info.json").write_text("{}")
    return path


WRITERS = {
    "jsonl": lambda d, rows: write_jsonl(d / "train.jsonl", _strip(rows)),
    "parquet": lambda d, rows: write_parquet(d / "train.parquet", rows),
    "csv": lambda d, rows: write_csv(d / "train.csv", rows),
    "arrow": lambda d, rows: write_arrow_folder(d / "train_ds", rows),
}


def snapshot(store_path: Path) -> dict[str, dict]:
    """Every stored row by id (all columns)."""
    store = Store.open(store_path)
    table = pa.Table.from_batches(list(store.scan(store._dataset().schema.names)))
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "ids are not unique in the store"
    return {r["id"]: r for r in rows}


def assert_same_store(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert sorted(a) == sorted(b)
    for sid in a:
        for col, value in a[sid].items():
            if col in FLOAT_COLUMNS:
                np.testing.assert_allclose(
                    np.asarray(b[sid][col], float),
                    np.asarray(value, float),
                    rtol=1e-6,
                    atol=1e-7,
                    err_msg=f"{sid}.{col}",
                )
            else:
                assert b[sid][col] == value, f"{sid}.{col}"


def store_state(store_path: Path) -> tuple:
    store = Store.open(store_path)
    return sorted(store.ids()), store.count(), store.version()


def _build(tmp: Path, inputs, model_dir, runner, name="store", data=DataConfig()) -> Path:
    cfg = BuildConfig(
        data=data, model=ModelConfig(path=str(model_dir), device="cpu"), progress=False, write_every=3, batch_size=2
    )
    build_index([inputs], tmp / name, cfg, runner=runner)
    return tmp / name


def _scores(store: Path, runner) -> dict[str, np.ndarray]:
    res = run_query(store, VAL, QueryConfig(progress=False, device="cpu", top_k=3), runner=runner, keep_scores=True)
    return dict(zip(res.train_ids, res.scores.T))


# -- formats --------------------------------------------------------------------------
@pytest.mark.parametrize("with_ids", [True, False], ids=["ids", "no-ids"])
def test_all_formats_give_identical_stores(tmp_path, tiny_runner, tiny_model_dir, with_ids):
    rows = ROWS if with_ids else [{k: v for k, v in r.items() if k != "id"} for r in ROWS]
    snaps, scores = {}, {}
    for fmt, write in WRITERS.items():
        folder = tmp_path / fmt
        folder.mkdir()
        store = _build(folder, write(folder, rows), tiny_model_dir, tiny_runner)
        snaps[fmt], scores[fmt] = snapshot(store), _scores(store, tiny_runner)
    ref = snaps["jsonl"]
    assert len(ref) == len(ROWS)
    if with_ids:
        assert sorted(ref) == sorted(r["id"] for r in ROWS)
    assert {r["prompt"]: (r["response"], r["label"]) for r in ref.values()} == {
        r["prompt"]: (r["response"], r["label"]) for r in ROWS
    }
    for fmt in WRITERS:
        assert_same_store(ref, snaps[fmt])
        assert sorted(scores[fmt]) == sorted(scores["jsonl"])
        for sid, col in scores["jsonl"].items():
            np.testing.assert_allclose(scores[fmt][sid], col, rtol=1e-6, err_msg=f"{fmt}:{sid}")
    assert np.abs(np.concatenate(list(scores["jsonl"].values()))).max() > 0


def test_csv_with_byte_order_mark_reads_the_id_column(tmp_path):
    plain = list(iter_samples([write_csv(tmp_path / "a.csv", ROWS)], DataConfig()))
    bom = list(iter_samples([write_csv(tmp_path / "b.csv", ROWS, bom=True)], DataConfig()))
    assert [s.id for s in bom] == [s.id for s in plain] == [r["id"] for r in ROWS]


def test_empty_optional_cells_are_missing_values(tmp_path):
    """An empty id or label cell (CSV has no null) means missing: content-hash id and no label, as in JSONL."""
    rows = [
        {"id": "", "prompt": "p one", "response": " r", "label": ""},
        {"id": "  ", "prompt": "p two", "response": " r", "label": "x"},
    ]
    from_csv = list(iter_samples([write_csv(tmp_path / "a.csv", rows)], DataConfig()))
    from_jsonl = list(iter_samples([write_jsonl(tmp_path / "a.jsonl", _strip(rows, drop=("id",)))], DataConfig()))
    assert [(s.id, s.label) for s in from_csv] == [(s.id, s.label) for s in from_jsonl]
    assert all(len(s.id) == 16 for s in from_csv) and from_csv[0].id != from_csv[1].id
    assert from_csv[0].label is None and from_jsonl[0].label is None


# -- text mode and column names -----------------------------------------------------
def test_single_text_column(tmp_path, tiny_runner, tiny_model_dir):
    rows = [{"id": r["id"], "text": r["prompt"] + r["response"], "label": r["label"]} for r in ROWS]
    samples = list(iter_samples([write_jsonl(tmp_path / "t.jsonl", _strip(rows))], DataConfig()))
    assert all(s.prompt is None and s.response is None and s.text is not None for s in samples)
    store = _build(tmp_path, tmp_path / "t.jsonl", tiny_model_dir, tiny_runner)
    snap = snapshot(store)
    tok = tiny_runner.tokenizer
    for r in rows:
        stored = snap[r["id"]]
        assert stored["text"] == r["text"] and stored["prompt"] is None
        n = len(tok(r["text"], add_special_tokens=True)["input_ids"])
        assert stored["n_tokens"] == n and stored["n_scored"] == n - 1  # every next-token prediction is scored

    # --text-column names another column, and wins over prompt/response present in the same rows
    other = [
        {"key": r["id"], "body": r["text"], "prompt": "ignored ->", "response": " ignored", "cls": r["label"]}
        for r in rows
    ]
    write_jsonl(tmp_path / "body.jsonl", _strip(other))
    result = cli(
        "index",
        "build",
        tmp_path / "body.jsonl",
        "--store",
        tmp_path / "s2",
        "--model",
        tiny_model_dir,
        "--quiet",
        "--text-column",
        "body",
        "--id-column",
        "key",
        "--label-column",
        "cls",
        "--batch-size",
        "2",
        "--write-every",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert_same_store(snap, snapshot(tmp_path / "s2"))


def test_custom_column_names_match_default_names(tmp_path, tiny_runner, tiny_model_dir):
    ref = snapshot(_build(tmp_path, write_jsonl(tmp_path / "a.jsonl", _strip(ROWS)), tiny_model_dir, tiny_runner))
    renamed = [
        {"q": r["prompt"], "a": r["response"], "key": r["id"], "cls": r["label"], "prompt": "decoy"} for r in ROWS
    ]
    write_csv(tmp_path / "renamed.csv", renamed)
    result = cli(
        "index",
        "build",
        tmp_path / "renamed.csv",
        "--store",
        tmp_path / "s2",
        "--model",
        tiny_model_dir,
        "--quiet",
        "--prompt-column",
        "q",
        "--response-column",
        "a",
        "--id-column",
        "key",
        "--label-column",
        "cls",
        "--batch-size",
        "2",
        "--write-every",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert_same_store(ref, snapshot(tmp_path / "s2"))
    # the same names drive the query's validation file
    val = [{"q": v["prompt"], "a": v["response"], "key": v["id"]} for v in VAL]
    write_jsonl(tmp_path / "val.jsonl", val)
    result = cli(
        "query",
        "--store",
        tmp_path / "s2",
        "-v",
        tmp_path / "val.jsonl",
        "--quiet",
        "--top-k",
        "2",
        "--prompt-column",
        "q",
        "--response-column",
        "a",
        "--id-column",
        "key",
        "-o",
        tmp_path / "top.jsonl",
    )
    assert result.exit_code == 0, result.output
    top = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    assert sorted({t["validation_id"] for t in top}) == ["v0", "v1"]


# -- ids without an id column ---------------------------------------------------------
def test_missing_id_gets_stable_content_hash(tmp_path, tiny_runner, tiny_model_dir):
    rows = _strip(ROWS, drop=("id",)) + [_strip(ROWS, drop=("id",))[0]]  # last row repeats the first
    path = write_jsonl(tmp_path / "noid.jsonl", rows)
    ids = [s.id for s in iter_samples([path], DataConfig())]
    assert ids == [s.id for s in iter_samples([path], DataConfig())]
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids[:-1])
    assert len(set(ids)) == len(rows) and ids[-1] == ids[0] + "-1"  # the repeat is its own sample
    # a label does not take part in the content
    relabelled = write_jsonl(tmp_path / "relabel.jsonl", [{**r, "label": "other"} for r in rows])
    assert [s.id for s in iter_samples([relabelled], DataConfig())] == ids
    # same ids in another process with another hash seed (no use of Python's salted hash())
    code = (
        "import json, sys; from forvalue.indexer.data import iter_samples; from forvalue.schemas.config import "
        "DataConfig; "
        "print(json.dumps([s.id for s in iter_samples([sys.argv[1]], DataConfig())]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    assert json.loads(out.stdout) == ids
    # the repeated row is stored as a second sample, and a second build finds every id already stored
    cfg = BuildConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False)
    first = build_index([path], tmp_path / "store", cfg, runner=tiny_runner)
    again = build_index([path], tmp_path / "store", cfg, runner=tiny_runner)
    assert (first.written, first.duplicate_ids, first.repeats_kept) == (len(rows), 0, 1)
    assert (again.written, again.already_stored) == (0, len(rows))
    assert sorted(Store.open(tmp_path / "store").ids()) == sorted(ids)


# -- bad data files through the CLI ---------------------------------------------------
@pytest.fixture(scope="module")
def base_store(tmp_path_factory, tiny_runner, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("base")
    return _build(tmp, write_jsonl(tmp / "train.jsonl", _strip(ROWS[:4])), tiny_model_dir, tiny_runner)


def _new_row(i):
    return {"id": f"new-{i}", "prompt": f"fresh prompt {i} ->", "response": " fresh"}


def _bad_jsonl_malformed(d):
    p = write_jsonl(d / "bad.jsonl", [_new_row(0), _new_row(1)])
    with p.open("a") as f:
        f.write('{"id": "x", "prompt": "a", \n')
    return p, ("bad.jsonl:3", "malformed JSON")


def _bad_missing_column(d):
    return write_jsonl(d / "bad.jsonl", [_new_row(0), {"id": "x", "prompt": "no response here"}]), (
        "bad.jsonl:2",
        "field 'response'",
        "missing column",
    )


def _bad_empty_value(d):
    return write_jsonl(d / "bad.jsonl", [_new_row(0), {"id": "x", "prompt": "   ", "response": " r"}]), (
        "bad.jsonl:2",
        "field 'prompt'",
        "empty value",
    )


def _bad_null_value(d):
    return write_jsonl(d / "bad.jsonl", [{"id": "x", "prompt": "p", "response": None}]), (
        "bad.jsonl:1",
        "field 'response'",
        "missing value",
    )


def _bad_csv_empty(d):
    return write_csv(d / "bad.csv", [_new_row(0), {"id": "x", "prompt": "", "response": " r"}]), (
        "bad.csv:3",
        "field 'prompt'",
        "empty value",
    )  # line 1 is the header


def _bad_parquet_null(d):
    return write_parquet(d / "bad.parquet", [_new_row(0), {"id": "x", "prompt": None, "response": " r"}]), (
        "bad.parquet:2",
        "field 'prompt'",
    )


def _bad_not_utf8(d):
    p = write_jsonl(d / "bad.jsonl", [_new_row(0)])
    with p.open("ab") as f:
        f.write(b'{"id": "x", "prompt": "caf\xe9", "response": " r"}\n')
    return p, ("bad.jsonl:2", "UTF-8")


def _bad_suffix(d):
    p = d / "bad.txt"
    p.write_text(json.dumps(_new_row(0)) + "\n")
    return p, ("bad.txt", "unknown format '.txt'")


def _bad_missing_file(d):
    return d / "nope.jsonl", ("nope.jsonl", "no such file")


def _bad_arrow_missing_shard(d):
    folder = write_arrow_folder(d / "ds", [_new_row(i) for i in range(4)])
    (folder / "data-00001-of-00002.arrow").unlink()
    return folder, ("data-00001-of-00002.arrow", "missing")


BAD = [
    _bad_jsonl_malformed,
    _bad_missing_column,
    _bad_empty_value,
    _bad_null_value,
    _bad_csv_empty,
    _bad_parquet_null,
    _bad_not_utf8,
    _bad_suffix,
    _bad_missing_file,
    _bad_arrow_missing_shard,
]


@pytest.mark.parametrize("make_bad", BAD, ids=[f.__name__[5:] for f in BAD])
def test_bad_data_is_a_one_line_error_and_leaves_the_store_intact(tmp_path, base_store, make_bad):
    store = tmp_path / "store"
    shutil.copytree(base_store, store)
    before = store_state(store)
    path, needles = make_bad(tmp_path)
    result = cli("index", "add", path, "--store", store, "--quiet")
    assert_one_line_error(result, *needles)
    assert store_state(store) == before


@pytest.mark.parametrize("make_bad", [_bad_suffix, _bad_missing_file], ids=["suffix", "missing_file"])
def test_unreadable_input_creates_no_store(tmp_path, tiny_model_dir, make_bad):
    path, needles = make_bad(tmp_path)
    result = cli("index", "build", path, "--store", tmp_path / "new-store", "--model", tiny_model_dir, "--quiet")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "new-store").exists()


def test_missing_text_column_names_the_field(tmp_path, base_store):
    store = tmp_path / "store"
    shutil.copytree(base_store, store)
    before = store_state(store)
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": "hello there"}])
    result = cli("index", "add", path, "--store", store, "--quiet", "--text-column", "body")
    assert_one_line_error(result, "t.jsonl:1", "field 'body'", "missing column")
    assert store_state(store) == before


def test_jsonl_with_a_byte_order_mark_reads(tmp_path):
    from forvalue.indexer.data import iter_samples
    from forvalue.schemas.config import DataConfig

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "q", "response": " r"}\n{"id": "b", "text": "t"}\n')
    samples = list(iter_samples([path], DataConfig()))
    assert [s.id for s in samples] == ["a", "b"] and samples[0].prompt == "q"
