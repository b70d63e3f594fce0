"""Resume and append: nothing is written twice, nothing is lost, even after ``kill -9`` or with sharded workers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import write_jsonl

from forvalue.cli import main
from forvalue.storage.store import Store

REPO = Path(__file__).resolve().parents[1]


def rows(n: int, start: int = 0) -> list[dict]:
    words = ["the quick brown fox", "reverse the words", "solve the math problem", "cats and dogs", "numbers 1 2 3"]
    return [
        {"id": f"s{i}", "prompt": f"{words[i % 5]} {i} ->", "response": f" answer {i * 7}", "label": f"c{i % 3}"}
        for i in range(start, start + n)
    ]


def cli(*args) -> dict:
    """Run a build/add command in-process with --json; return its report."""
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--quiet", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def stored(path: Path) -> pa.Table:
    store = Store.open(path)
    table = pa.Table.from_batches(list(store.scan(["id", "prompt", "n_tokens", "n_scored", "truncated", "topk_ids"])))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == store.count(), "a sample is stored twice"
    return table


def forvalue_command() -> list[str]:
    script = Path(sys.executable).with_name("forvalue")
    return [str(script)] if script.exists() else [sys.executable, "-m", "forvalue.cli"]


def test_second_build_writes_nothing(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", rows(6))
    args = ("index", "build", data, "--store", tmp_path / "store", "--model", tiny_model_dir, "--write-every", "4")
    first = cli(*args)
    assert (first["written"], first["already_stored"], first["total_rows"]) == (6, 0, 6)
    version = Store.open(tmp_path / "store").version()
    second = cli(*args)
    assert (second["written"], second["already_stored"], second["total_rows"]) == (0, 6, 6)
    assert Store.open(tmp_path / "store").version() == version  # not even an empty commit


def _store_of_five(tmp_path, model_dir) -> None:
    """``tmp_path/store``: 'index build' of five rows (``tmp_path/a.jsonl``)."""
    data = write_jsonl(tmp_path / "a.jsonl", rows(5))
    cli("index", "build", data, "--store", tmp_path / "store", "--model", model_dir)


def test_add_to_a_store_without_its_sketch_column_says_rebuild_before_the_model(tmp_path, tiny_model_dir, monkeypatch):
    """An 'index sketch --rebuild' killed between dropping and rewriting the sketch column leaves the table without
    it; 'index add' failed after a batch's forward pass with Lance's schema message. Now one line naming the remedy,
    before the model loads (hostile pass)."""
    import lance
    from conftest import assert_one_line_error

    from forvalue.indexer import model_runner

    _store_of_five(tmp_path, tiny_model_dir)
    lance.dataset(str(tmp_path / "store" / "samples.lance")).drop_columns(["sketch"])
    monkeypatch.setattr(model_runner, "load_runner", lambda *a, **k: pytest.fail("the model loaded"))
    more = write_jsonl(tmp_path / "b.jsonl", rows(3, start=5))
    result = CliRunner().invoke(main, ["index", "add", str(more), "--store", str(tmp_path / "store"), "--quiet"])
    # (a rebuild running beside the command leaves the same: the message says to run it again first; hostile pass)
    assert_one_line_error(
        result, "no 'sketch' column", "ended while this command ran", "run the command again", "--rebuild"
    )
    assert Store.open(tmp_path / "store").count() == 5


def test_add_appends_only_new_rows(tmp_path, tiny_model_dir):
    _store_of_five(tmp_path, tiny_model_dir)
    before = stored(tmp_path / "store").to_pylist()
    both = write_jsonl(tmp_path / "b.jsonl", rows(5) + rows(3, start=5))
    report = cli("index", "add", both, "--store", tmp_path / "store")
    assert (report["read"], report["written"], report["already_stored"], report["total_rows"]) == (8, 3, 5, 8)
    after = {r["id"]: r for r in stored(tmp_path / "store").to_pylist()}
    assert sorted(after) == sorted(r["id"] for r in rows(8))
    assert all(after[r["id"]] == r for r in before)  # old rows untouched


def test_duplicate_ids_are_stored_once(tmp_path, tiny_model_dir):
    data = rows(4) + [{**rows(1, start=1)[0], "prompt": "a different prompt with a repeated id ->"}] + rows(2)
    report = cli(
        "index",
        "build",
        write_jsonl(tmp_path / "dup.jsonl", data),
        "--store",
        tmp_path / "store",
        "--model",
        tiny_model_dir,
    )
    assert (report["read"], report["written"], report["duplicate_ids"], report["already_stored"]) == (7, 4, 3, 0)
    table = {r["id"]: r for r in stored(tmp_path / "store").to_pylist()}
    assert sorted(table) == ["s0", "s1", "s2", "s3"]
    assert table["s1"]["prompt"] == rows(2)[1]["prompt"]  # the first row with an id wins


def test_truncation_is_counted(tmp_path, tiny_model_dir, tiny_runner):
    max_length = 10
    data = (
        [
            {"id": "short", "prompt": "cats ->", "response": " dogs"},
            {"id": "edge", "prompt": "the quick", "response": " fox"},
        ]
        + rows(2)
        + [
            {
                "id": "long",
                "prompt": "reverse the words of this sentence please the quick brown fox ->",
                "response": " x",
            }
        ]
    )
    lengths = {
        r["id"]: len(
            tiny_runner.tokenizer(r["prompt"])["input_ids"]
            + tiny_runner.tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        )
        for r in data
    }
    expected = sorted(i for i, n in lengths.items() if n > max_length)
    assert 0 < len(expected) < len(data)
    report = cli(
        "index",
        "build",
        write_jsonl(tmp_path / "t.jsonl", data),
        "--store",
        tmp_path / "store",
        "--model",
        tiny_model_dir,
        "--max-length",
        max_length,
    )
    assert report["truncated"] == len(expected)
    table = stored(tmp_path / "store").to_pylist()
    assert sorted(r["id"] for r in table if r["truncated"]) == expected
    assert all(r["n_tokens"] == min(lengths[r["id"]], max_length) for r in table)
    info = CliRunner().invoke(main, ["index", "info", "--store", str(tmp_path / "store"), "--json"])
    assert json.loads(info.stdout)["truncated_samples"] == len(expected)


def test_add_uses_the_stores_model_and_settings(tmp_path, tiny_model_dir):
    """``index add`` without options encodes like the build did: dtype, max length, top-m, position filter."""
    cli(
        "index",
        "build",
        write_jsonl(tmp_path / "a.jsonl", rows(3)),
        "--store",
        tmp_path / "store",
        "--model",
        tiny_model_dir,
        "--dtype",
        "bfloat16",
        "--max-length",
        "12",
        "--top-m",
        "4",
        "--lowest-likelihood-ratio",
        "0.5",
    )
    manifest = Store.open(tmp_path / "store").manifest
    long = {
        "id": "long",
        "prompt": "reverse the words of this sentence please the quick brown fox ->",
        "response": " x",
    }
    short = [
        {"id": "a1", "prompt": "cats ->", "response": " dogs"},
        {"id": "a2", "prompt": "the quick", "response": " fox"},
    ]
    report = cli("index", "add", write_jsonl(tmp_path / "b.jsonl", short + [long]), "--store", tmp_path / "store")
    assert (report["written"], report["truncated"]) == (3, 1)
    assert Store.open(tmp_path / "store").manifest == manifest
    for r in stored(tmp_path / "store").to_pylist():
        assert r["n_tokens"] <= 12
        assert r["n_scored"] == math.ceil(0.5 * (r["n_tokens"] - 1)), r["id"]
        assert len(r["topk_ids"]) == 4 * r["n_scored"]


def test_bad_row_after_committed_batches_then_resume(tmp_path, tiny_model_dir, monkeypatch):
    """A bad row stops the build; committed batches stay, and the fixed file completes the store."""
    monkeypatch.setattr("forvalue.indexer.data.FIRST_PASS_ROWS", 5)  # the bad row lies beyond the pre-model first pass
    good = rows(20)
    lines = [json.dumps(r) for r in good]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines[:12] + ["{not json}"] + lines[12:]) + "\n")
    args = [
        "index",
        "build",
        str(data),
        "--store",
        str(tmp_path / "store"),
        "--model",
        str(tiny_model_dir),
        "--batch-size",
        "1",
        "--write-every",
        "2",
        "--quiet",
    ]  # 8-sample read-ahead window: 8 rows commit before line 13 is read
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "train.jsonl:13" in result.stderr
    partial = set(stored(tmp_path / "store").column("id").to_pylist())
    assert partial and partial < {r["id"] for r in good[:12]}
    write_jsonl(data, good)
    report = cli(*args[:-1])
    assert (report["written"], report["already_stored"]) == (len(good) - len(partial), len(partial))
    assert sorted(stored(tmp_path / "store").column("id").to_pylist()) == sorted(r["id"] for r in good)


def _count(path: Path) -> int:
    try:
        return Store.open(path).count()
    except Exception:  # noqa: BLE001 - not created yet, or caught mid-creation: poll again
        return 0


def _env() -> dict:
    # one torch thread per worker process: two workers share the test machine's cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_kill_9_mid_build_then_resume(tmp_path, tiny_model_dir):
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {
                "id": f"k{i}",
                "prompt": f"reverse the words {i}: the quick brown fox jumps over the lazy dog ->",
                "response": " dog lazy the over jumps fox brown quick the",
            }
            for i in range(200)
        ],
    )
    store = tmp_path / "store"
    args = [
        "index",
        "build",
        str(data),
        "--store",
        str(store),
        "--model",
        str(tiny_model_dir),
        "--write-every",
        "10",
        "--batch-size",
        "4",
        "--quiet",
        "--device",
        "cpu",
    ]
    log = tmp_path / "build.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            forvalue_command() + args, cwd=REPO, env=_env(), stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and _count(store) == 0:
            assert time.monotonic() < deadline, "no batch was committed in time"
            time.sleep(0.02)
        assert proc.poll() is None, f"the build ended before it could be killed: {log.read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ids = stored(store).column("id").to_pylist()  # opens, ids unique
    assert 0 < len(ids) < 200 and len(ids) % 10 == 0  # whole commits only
    report = cli(*args[:-3])
    assert (report["written"], report["already_stored"], report["total_rows"]) == (200 - len(ids), len(ids), 200)
    assert sorted(stored(store).column("id").to_pylist()) == sorted(f"k{i}" for i in range(200))


def test_sharded_workers_build_the_union_once(tmp_path, tiny_model_dir):
    """Two concurrent worker processes (--shard 0/2 and 1/2) writing into one store."""
    data = write_jsonl(tmp_path / "train.jsonl", rows(40))
    store = tmp_path / "store"
    procs = []
    for k in range(2):
        with (tmp_path / f"out{k}").open("wb") as out, (tmp_path / f"err{k}").open("wb") as err:
            procs.append(
                subprocess.Popen(
                    forvalue_command()
                    + [
                        "index",
                        "build",
                        str(data),
                        "--store",
                        str(store),
                        "--model",
                        str(tiny_model_dir),
                        "--shard",
                        f"{k}/2",
                        "--write-every",
                        "3",
                        "--batch-size",
                        "2",
                        "--quiet",
                        "--json",
                        "--device",
                        "cpu",
                    ],
                    cwd=REPO,
                    env=_env(),
                    stdout=out,
                    stderr=err,
                )
            )
    reports = []
    for k, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"err{k}").read_text()[-2000:]
        reports.append(json.loads((tmp_path / f"out{k}").read_text()))
    written = [r["written"] for r in reports]
    assert all(w > 0 for w in written) and sum(written) == 40
    assert [r["other_shard"] for r in reports] == [40 - w for w in written]
    assert sorted(stored(store).column("id").to_pylist()) == sorted(r["id"] for r in rows(40))
    # an unsharded build over the same store finds everything stored
    again = cli("index", "build", data, "--store", store, "--model", tiny_model_dir)
    assert (again["written"], again["already_stored"]) == (0, 40)


def test_the_sketch_column_check_lets_a_table_being_created_by_a_twin_worker_through(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Sharded workers start together: one finds the manifest and the table's folder of the other before its first
    version, and opening it failed the worker ('samples.lance was not found'; the suite's sharded-workers test). The
    check before the model loads leaves such a table to the build's own create, which waits for its twin."""
    from forvalue.schemas.errors import StoreError

    _store_of_five(tmp_path, tiny_model_dir)
    real_open, calls = Store.open, []

    def first_open_fails(*args, **kwargs):  # the check's open meets the twin's table before its first version
        if sys._getframe(1).f_code.co_name == "_check_sketch_column":
            calls.append(1)
            raise StoreError("cannot open the store (Dataset at path samples.lance was not found)")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Store, "open", staticmethod(first_open_fails))
    more = write_jsonl(tmp_path / "b.jsonl", rows(3, start=5))
    report = cli("index", "add", more, "--store", tmp_path / "store")
    assert (report["written"], report["total_rows"]) == (3, 8) and calls == [1]


def test_a_new_build_that_stores_no_row_is_one_line_and_leaves_no_store(tmp_path, tiny_model_dir):
    """Rows none of which has a scored token (a conversation without an assistant turn): the build said "wrote 0
    samples", exit 0, and left an empty store whose manifest fixed the token rule resolved from that data (hostile
    pass). Now one line, exit 2, and the folder holds no store: the next build into it starts fresh."""
    from conftest import assert_one_line_error

    data = write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    store = tmp_path / "store"
    args = ["index", "build", str(data), "--store", str(store), "--model", str(tiny_model_dir), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert_one_line_error(result, "noasst.jsonl", "nothing was stored", "1 have no scored token", "assistant")
    assert not (store / "manifest.json").exists() and not (store / "samples.lance").exists()
    assert all(p.name.startswith(".writer.") for p in store.iterdir())
    good = write_jsonl(tmp_path / "a.jsonl", rows(3))
    assert cli("index", "build", good, "--store", store, "--model", tiny_model_dir)["total_rows"] == 3
