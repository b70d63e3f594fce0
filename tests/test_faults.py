"""Fault injection: kill -9 at random moments, concurrent writers, I/O failures and hostile input.

Every scenario ends by checking that the store opens, holds each input id at most once (exactly
once after a resume) and that ``forvalue index check`` finds it clean; every error a user can
meet is one line on stderr with exit status 2 and leaves the store as it was (same files, same
rows, same query scores). Builds run in real subprocesses, forked from a server that has imported
torch and transformers (:class:`Zygote`) and running the ``forvalue`` CLI's ``main``, so a
``kill -9`` hits a real build without paying torch's import for every kill.

Run with ``pytest -m faults -s`` to see the figures (kills survived, kills inside an append,
concurrent scenarios, bad inputs tried) quoted in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, cli, write_jsonl

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
KILLS = 12  # kill -9 points in one build
TALLY: dict[str, int] = {}

# The fork server behind every build subprocess: it imports the heavy libraries once, then forks one
# child per command; the child redirects its output, runs the real CLI's main and writes its exit status.
# Nothing has run yet when it forks; the only thread is jemalloc's (pyarrow/Lance), which is fork-safe.
# LanceDB is left to the children: importing it starts an event-loop thread that a fork would lose.
ZYGOTE = r"""
import json, os, signal, sys
import torch, transformers, transformers.models.llama.modeling_llama, tokenizers
import lance_namespace, pyarrow, pyarrow.parquet, lance, faiss
torch.set_num_threads(1)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.environ.update(job["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    sys.stdin = open(os.devnull)
    code = 1
    try:
        from forvalue.cli import main
        main(job["args"], prog_name="forvalue")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        with open(job["rc"] + ".tmp", "w") as handle:
            handle.write(str(code))
        os.replace(job["rc"] + ".tmp", job["rc"])
        os._exit(code)
"""


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


class Zygote:
    """The fork server (:data:`ZYGOTE`); :meth:`spawn` starts one ``forvalue`` CLI process."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(folder / "zygote.err").open("wb"),
            cwd=REPO,
            env=_env(),
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", (folder / "zygote.err").read_text()[-2000:]
        self.count = 0

    def spawn(self, args: list, **env) -> "Build":
        self.count += 1
        name = self.folder / f"job{self.count}"
        job = {
            "args": [str(a) for a in args],
            "env": env,
            "out": f"{name}.out",
            "err": f"{name}.err",
            "rc": f"{name}.rc",
        }
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return Build(int(self.proc.stdout.readline()), name)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Build:
    """One forked ``forvalue`` CLI process (a child of the fork server, not of the test)."""

    def __init__(self, pid: int, name: Path):
        self.pid, self.out, self.err, self.rc = pid, Path(f"{name}.out"), Path(f"{name}.err"), Path(f"{name}.rc")

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return not self.rc.exists()

    def poll(self) -> int | None:
        """The exit status, None while running, -9 when it died without one (killed)."""
        if self.rc.exists():
            return int(self.rc.read_text())
        if self.alive():
            return None
        # it may have written its status and exited between the two checks above: look again before calling it killed
        return int(self.rc.read_text()) if self.rc.exists() else -signal.SIGKILL

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            assert time.monotonic() < deadline, f"process {self.pid} did not end in time"
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:  # reaped by the kernel (the fork server ignores SIGCHLD): gone from the process table
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.01)

    def report(self) -> dict:
        return json.loads(self.out.read_text().splitlines()[-1])

    def stderr_lines(self) -> list[str]:
        return [line for line in self.err.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    server = Zygote(tmp_path_factory.mktemp("zygote"))
    yield server
    server.close()


# -- data and inspection helpers -----------------------------------------------------------------
WORDS = ["the quick brown fox", "reverse the words", "solve the math problem", "cats and dogs", "numbers 1 2 3"]


def make_rows(n: int, start: int = 0, repeats: int = 0) -> list[dict]:
    """``n`` labelled prompt/response rows ``s{start}``..., then ``repeats`` rows repeating earlier ids."""
    out = [
        {"id": f"s{i}", "prompt": f"{WORDS[i % 5]} {i} ->", "response": f" answer {i * 7}", "label": f"c{i % 3}"}
        for i in range(start, start + n)
    ]
    out += [{**out[(7 * k) % n], "prompt": f"a repeated id {k} ->"} for k in range(repeats)]
    return out


VALIDATION = [
    {"id": "v0", "prompt": "reverse the words 3 ->", "response": " answer 21"},
    {"id": "v1", "prompt": "cats and dogs 4 ->", "response": " answer 28"},
]


def store_ids(path: Path) -> list[str]:
    from forvalue.storage.store import Store

    return sorted(Store.open(path).ids()) if (path / "samples.lance" / "_versions").is_dir() else []


def assert_sound(path: Path, expected_ids=None) -> int:
    """The store opens, ids are unique (and equal ``expected_ids`` when given), ``check_store`` is clean."""
    from forvalue.maintenance import check_store
    from forvalue.storage.store import Store

    store = Store.open(path)
    ids = [i for b in store.scan(["id"]) for i in b.column(0).to_pylist()]
    assert len(ids) == len(set(ids)), "a sample is stored twice"
    if expected_ids is not None:
        assert sorted(ids) == sorted(set(expected_ids))
    report = check_store(path)
    assert report.clean, report.problems
    return len(ids)


def scores_by_id(path: Path, runner) -> dict[str, np.ndarray]:
    """Exact scores of every stored sample against :data:`VALIDATION`: id -> float64 (n_val,)."""
    from forvalue.api import run_query
    from forvalue.schemas.config import QueryConfig

    result = run_query(path, VALIDATION, QueryConfig(exact=True, progress=False), runner=runner, keep_scores=True)
    return dict(zip(result.train_ids, result.scores.T))


def assert_same_scores(got: dict, want: dict, rtol: float = 1e-6) -> None:
    assert set(got) <= set(want)
    for key, value in got.items():
        np.testing.assert_allclose(value, want[key], rtol=rtol, atol=rtol * np.abs(want[key]).max(), err_msg=key)


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``path`` but the lease's lock files: relative name -> (size, mtime_ns)."""
    return {
        str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(path.rglob("*"))
        if f.is_file() and not f.name.startswith(".writer.")
    }


def lance_files(path: Path) -> tuple[set[str], set[str]]:
    """(data files present, data files the latest version references) of the samples table."""
    import lance

    uri = path / "samples.lance"
    present = set(os.listdir(uri / "data")) if (uri / "data").is_dir() else set()
    if not (uri / "_versions").is_dir():
        return present, set()
    referenced = {d.path for f in lance.dataset(str(uri)).get_fragments() for d in f.data_files()}
    return present, referenced


def commits(path: Path) -> int:
    versions = path / "samples.lance" / "_versions"
    return len(os.listdir(versions)) if versions.is_dir() else 0


def build_args(data, store, model, *extra) -> list:
    return ["index", "build", data, "--store", store, "--model", model, "--device", "cpu", "--quiet", "--json", *extra]


@pytest.fixture(scope="module", autouse=True)
def figures():
    """Prints the suite's figures at the end (``pytest -m faults -s``; quoted in docs/reliability.md)."""
    TALLY.clear()
    yield TALLY
    print("\nfault-injection figures: " + ", ".join(f"{k}={v}" for k, v in sorted(TALLY.items())))


def count(key: str, n: int = 1) -> None:
    TALLY[key] = TALLY.get(key, 0) + n


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_model_dir, tiny_runner):
    """A 30-sample store (3 fragments), built in-process, with its exact scores; tests must not change it."""
    folder = tmp_path_factory.mktemp("small")
    data = write_jsonl(folder / "train.jsonl", make_rows(30))
    store = folder / "store"
    result = cli(*build_args(data, store, tiny_model_dir, "--write-every", "10"))
    assert result.exit_code == 0, result.output
    return store, scores_by_id(store, tiny_runner)


def copy_store(small_store, tmp_path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(small_store[0], target)
    return target


# -- kill -9 ---------------------------------------------------------------------------------------
def test_kill_9_at_random_points_then_resume(tmp_path, tiny_model_dir, tiny_runner, zygote):
    """KILLS kill -9 at random moments of one build (start-up, encoding, inside appends, the final
    FAISS index); after each the store opens, is sound and holds a subset of the input; the resumed
    build ends with exactly the input's distinct ids and the scores of a store built in one go."""
    rng = random.Random(13)
    rows = make_rows(200, repeats=30)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    distinct = {r["id"] for r in rows}
    store = tmp_path / "store"
    args = build_args(data, store, tiny_model_dir, "--write-every", "2", "--batch-size", "2")
    orphans: set[str] = set()
    killed_inside_append = killed_partial = 0
    progress: list[int] = []  # rows stored after each kill
    for k in range(KILLS):
        before = commits(store)
        current = zygote.spawn(args)
        if k % 4 == 0:  # an early kill: start-up, input check, lease, model load
            time.sleep(rng.uniform(0.0, 3.0))
        else:  # a kill after this run's first commit, while it encodes and commits
            while current.poll() is None and commits(store) == before:
                time.sleep(0.01)
            if k % 4 == 2:  # aimed at a commit: kill once a new data file is on disk before its version is
                _wait_for_a_commit_in_flight(store, timeout=3.0)
            else:
                time.sleep(rng.uniform(0.0, 0.3))
        if current.poll() is not None:  # the build finished first: nothing left to kill
            assert current.poll() == 0, current.err.read_text()[-2000:]
            break
        current.kill()
        count("kill9_during_build")
        if k % 4:  # it had committed, so it held the lease: its note stays, its lock died with it (no stale lease)
            assert json.loads((store / ".writer.lock").read_text())["pid"] == current.pid
        present, referenced = lance_files(store)
        new_orphans = present - referenced - orphans
        killed_inside_append += bool(new_orphans)  # a data file written, its commit not (or half) done
        orphans |= new_orphans
        ids = store_ids(store)
        assert set(ids) <= distinct
        killed_partial += 0 < len(ids) < len(distinct)
        progress.append(len(ids))
        if ids:
            assert_sound(store)
    count("kill9_inside_an_append", killed_inside_append)
    print(f"\nkill -9 test: rows stored after each kill {progress} of {len(distinct)}")
    assert killed_partial >= 1, "no kill interrupted a build that had committed rows"
    last = zygote.spawn(args)
    assert last.wait() == 0, last.err.read_text()[-2000:]
    report = last.report()
    assert report["total_rows"] == len(distinct)
    assert report["written"] + report["already_stored"] + report["duplicate_ids"] == len(rows)
    assert_sound(store, distinct)
    result = cli("index", "check", "--store", store)
    assert result.exit_code == 0 and "clean" in result.stdout, result.output
    # nothing corrupted: every row scores as in a store built in one go (batches differ, so a float tolerance)
    clean = tmp_path / "clean"
    assert cli(*build_args(data, clean, tiny_model_dir)).exit_code == 0
    assert_same_scores(scores_by_id(store, tiny_runner), scores_by_id(clean, tiny_runner), rtol=1e-3)
    count("kill9_resumed_distinct_ids", len(distinct))


def _wait_for_a_commit_in_flight(store: Path, timeout: float) -> None:
    """Busy-wait until an append has written its data file but not yet its version (or ``timeout``)."""
    data, versions = store / "samples.lance" / "data", store / "samples.lance" / "_versions"
    files, done = len(os.listdir(data)), len(os.listdir(versions))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(os.listdir(data)) - files > len(os.listdir(versions)) - done:
            return


# -- concurrent writers ----------------------------------------------------------------------------
def test_two_unsharded_builds_started_together(tmp_path, tiny_model_dir, zygote):
    """Into a new store, then into the existing one: one refuses in one line or both end without duplicates."""
    first, second = make_rows(60), make_rows(60, start=40)
    store = tmp_path / "store"
    for round_, data_rows in enumerate([first, second]):
        data = write_jsonl(tmp_path / f"train{round_}.jsonl", data_rows)
        args = build_args(data, store, tiny_model_dir, "--write-every", "4", "--batch-size", "4")
        drivers = [zygote.spawn(args) for _ in range(2)]
        codes = [d.wait() for d in drivers]
        assert 0 in codes, [d.err.read_text()[-2000:] for d in drivers]
        for d, code in zip(drivers, codes):
            if code == 2:
                [line] = d.stderr_lines()
                assert line.startswith(f"error: another build is writing to {store} (pid ") and "--shard" in line, line
                count("concurrent_unsharded_refused")
            else:
                assert code == 0, d.err.read_text()[-2000:]
        count("concurrent_unsharded_rounds")
    assert_sound(store, [r["id"] for r in first + second])


def test_held_lease_refuses_build_add_repair_and_sketch(small_store, tmp_path):
    """While a writer holds the lease, build/add/check --repair/sketch refuse in one line naming its pid."""
    from forvalue.storage.store import WriterLease

    store = copy_store(small_store, tmp_path)
    before = tree(store)
    data = write_jsonl(tmp_path / "more.jsonl", make_rows(5, start=100))
    with WriterLease.acquire(store):
        for args in (
            ["index", "add", data, "--store", store, "--quiet"],
            ["index", "check", "--store", store, "--repair"],
            ["index", "sketch", "--store", store, "--rebuild"],
        ):
            err = assert_one_line_error(cli(*args), f"another build is writing to {store} (pid {os.getpid()} on ")
            assert ("--shard" in err) == (args[1] == "add"), err  # only a build can be given a shard
            count("lease_refusals")
    with WriterLease.acquire(store, (0, 2)):  # a sharded worker: other shards may write, an unsharded build may not
        assert_one_line_error(cli("index", "add", data, "--store", store), "another build is writing", "sharded worker")
        assert_one_line_error(cli("index", "add", data, "--store", store, "--shard", "0/2"), "shard 0/2")
        # a worker of another N would split the ids another way and write shared ones twice (hostile pass)
        assert_one_line_error(
            cli("index", "add", data, "--store", store, "--shard", "1/3"), "workers of 2 shards", "--shard 1/2"
        )
        count("lease_refusals", 3)
    with WriterLease.acquire(store, (1, 3)):  # once they are done, another N may start
        pass
    assert tree(store) == before


def test_sharded_workers_with_a_query_and_an_audit_during_the_build(tmp_path, tiny_model_dir, tiny_runner, zygote):
    """--shard 0/2 and 1/2 concurrently; meanwhile queries and an audit run on snapshots and an
    unsharded build is refused. Snapshot scores equal the final store's; the audit is consistent."""
    from forvalue.audit import load_audit, run_audit
    from forvalue.schemas.config import AuditConfig

    rows = make_rows(240)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    store = tmp_path / "store"
    drivers = [
        zygote.spawn(
            build_args(data, store, tiny_model_dir, "--shard", f"{k}/2", "--write-every", "1", "--batch-size", "1")
        )
        for k in range(2)
    ]
    snapshots, audited, refused = [], None, 0
    while any(d.poll() is None for d in drivers):
        if not store_ids(store):
            time.sleep(0.05)
            continue
        snapshots.append(scores_by_id(store, tiny_runner))
        if audited is None:
            run_audit(store, VALIDATION, "during", AuditConfig(progress=False), runner=tiny_runner)
            audited = len(load_audit(store, "during")[0])
        result = cli("index", "build", data, "--store", store, "--model", tiny_model_dir, "--quiet")
        if result.exit_code == 2:
            assert_one_line_error(result, f"another build is writing to {store}", "sharded worker")
            refused += 1
    for k, d in enumerate(drivers):
        assert d.wait() == 0, d.err.read_text()[-2000:]
    written = [d.report()["written"] for d in drivers]
    assert sum(written) == len(rows) and all(written)
    assert_sound(store, [r["id"] for r in rows])  # also: the audit names only stored ids
    final = scores_by_id(store, tiny_runner)
    partial = [s for s in snapshots if len(s) < len(rows)]
    print(f"\nsharded build: queries saw {[len(s) for s in snapshots]} of {len(rows)} rows; audit saw {audited}")
    assert partial, "no query ran while the workers were writing"
    for snap in snapshots:
        assert_same_scores(snap, final)
    audit, _ = load_audit(store, "during")
    ids = audit.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == audited and set(ids) <= set(final)
    mean = dict(zip(ids, audit.column("score_mean").to_pylist()))
    np.testing.assert_allclose([mean[i] for i in ids], [final[i].mean() for i in ids], rtol=1e-6)
    count("concurrent_sharded_workers", 2)
    count("queries_on_a_partial_snapshot", len(partial))
    count("audits_during_a_build")
    count("unsharded_refused_during_sharded", refused)


# -- I/O failures ------------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """A mounted tmpfs (``mount(size)``), unmounted at the end; skips when mounting is not allowed."""
    mounted = []

    def mount(size: str, options: str = "") -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    def remount(point: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mount.remount = remount
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_disk_full_then_resume(tmp_path, tmpfs, tiny_model_dir, zygote):
    """A build that fills its disk ends in one line (exit 2), keeps its committed batches and resumes once
    space is freed."""
    disk = tmpfs("2m")
    rows = make_rows(200)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    store = disk / "store"
    args = build_args(data, store, tiny_model_dir, "--write-every", "5", "--batch-size", "5")
    d = zygote.spawn(args, FORVALUE_CACHE=str(tmp_path / "cache"))
    assert d.wait() == 2, d.err.read_text()[-3000:]
    [line] = d.stderr_lines()
    assert line.startswith("error: ") and str(store) in line and "disk is full" in line, line
    kept = store_ids(store)
    assert set(kept) < {r["id"] for r in rows}
    assert_sound(store, kept)
    # the full disk (filled to the last byte) meets an audit (it writes its table and validation cache)
    # and a query's output files
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    val = _validation_file(tmp_path / "x")
    for other in (
        ["audit", "run", "--store", store, "-v", val, "--name", "full", "--device", "cpu", "--quiet"],
        _query_args(store, "-o", disk / "top.jsonl", val_dir=tmp_path),
        _query_args(store, "--all-scores", disk / "all.parquet", val_dir=tmp_path),
    ):
        err = assert_one_line_error(cli(*other))
        assert "disk is full" in err or "No space left" in err, err
        count("disk_full_errors")
    assert not (disk / "top.jsonl").exists() and not (disk / "all.parquet").exists()
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "store"]  # no partial output files left behind
    assert_sound(store, kept)
    tmpfs.remount(disk, "size=64m")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert_sound(store, [r["id"] for r in rows])
    count("disk_full_scenarios")


def test_read_only_store(small_store, tmp_path, tiny_runner):
    """``index add`` into a read-only store: one line, exit 2, nothing changed; queries still answer."""
    store = copy_store(small_store, tmp_path)
    before = tree(store)
    data = write_jsonl(tmp_path / "more.jsonl", make_rows(5, start=100))
    if os.geteuid() == 0:  # root writes through file modes: use a read-only mount instead
        ro = tmp_path / "ro"
        ro.mkdir()
        done = subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(ro)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"root ignores file modes and a read-only bind mount fails: {done.stderr.decode().strip()}")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True)
        target = ro
    else:
        for f in [store, *store.rglob("*")]:
            f.chmod(f.stat().st_mode & ~0o222)
        target = store
    try:
        if os.access(target, os.W_OK) and _can_create(target):
            pytest.skip("the store stays writable (file modes do not bind this user)")
        val = _validation_file(tmp_path / "x")
        for args in (
            ["index", "add", data, "--store", target, "--quiet"],
            ["audit", "run", "--store", target, "-v", val, "--name", "ro", "--device", "cpu", "--quiet"],
            ["index", "sketch", "--store", target, "--rebuild"],
            ["index", "check", "--store", target, "--repair"],
        ):
            assert_one_line_error(cli(*args), str(target), "permission")
            count("read_only_refusals")
        assert_same_scores(scores_by_id(target, tiny_runner), small_store[1])
        assert sorted(scores_by_id(target, tiny_runner)) == sorted(small_store[1])  # reading needs no write access
    finally:
        if target != store:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        else:
            for f in [store, *store.rglob("*")]:
                f.chmod(f.stat().st_mode | 0o200)
    assert tree(store) == before


def _can_create(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def _query_args(store, *extra, val_dir: Path | None = None) -> list:
    val = _validation_file(val_dir / "x" if val_dir else store)
    return ["query", "--store", store, "-v", val, "--device", "cpu", "--quiet", "--exact", *extra]


def _validation_file(store: Path) -> Path:
    """:data:`VALIDATION` as a JSONL file next to ``store``."""
    return write_jsonl(store.parent / "val.jsonl", VALIDATION)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_damaged_data_file(small_store, tmp_path, damage):
    """A data file of the table deleted or truncated: query/info one line (exit 2); check names the fragment."""
    store = copy_store(small_store, tmp_path)
    files = sorted((store / "samples.lance" / "data").iterdir())
    victim = files[len(files) // 2]
    if damage == "deleted":
        victim.unlink()
    else:
        with victim.open("r+b") as handle:
            handle.truncate(victim.stat().st_size // 2)
    audit = [
        "audit",
        "run",
        "--store",
        store,
        "-v",
        _validation_file(store),
        "--name",
        "a",
        "--device",
        "cpu",
        "--quiet",
    ]
    for args in (_query_args(store), ["index", "info", "--store", store], audit):
        assert_one_line_error(cli(*args), str(store), "index check")
        count("damaged_file_errors")
    err = cli("index", "check", "--store", store)
    assert err.exit_code == 2 and f"data/{victim.name}" in err.stderr and "unreadable" in err.stderr, err.output
    assert all(line.startswith("error: ") for line in err.stderr.strip().splitlines())


@pytest.mark.parametrize("which", ["manifest.json", "manifest.json fields", "lance version"])
def test_corrupted_manifest(small_store, tmp_path, which):
    """A truncated or emptied store manifest, or a garbage Lance version file: one line (exit 2) everywhere."""
    store = copy_store(small_store, tmp_path)
    data = write_jsonl(tmp_path / "more.jsonl", make_rows(3, start=100))
    if which == "manifest.json":
        (store / "manifest.json").write_text('{"model_path": "x", "hidden_size": ')
    elif which == "manifest.json fields":
        (store / "manifest.json").write_text('{"model_path": 7, "hidden_size": "wide"}')
    else:
        import lance

        version = lance.dataset(str(store / "samples.lance")).version
        versions = store / "samples.lance" / "_versions"
        names = (f"{2**64 - 1 - version}.manifest", f"{version}.manifest")  # Lance's V2 and V1 naming
        latest = [versions / n for n in names if (versions / n).exists()]
        latest[0].write_bytes(b"\x00garbage" * 8)
    before = tree(store)
    for args in (
        _query_args(store),
        ["index", "info", "--store", store],
        ["index", "check", "--store", store],
        ["index", "add", data, "--store", store, "--quiet"],
    ):
        assert_one_line_error(cli(*args), str(store))
        count("corrupted_manifest_errors")
    assert tree(store) == before


def test_missing_prefilter_index_is_reported_and_rebuilt(small_store, tmp_path, tiny_runner):
    store = copy_store(small_store, tmp_path)
    from forvalue.storage import faiss_index
    from forvalue.storage.store import Store

    # the default exact index of float16 sketches has no file (made from the sketch column): an HNSW one has
    faiss_index.ensure(Store.open(store), kind="hnsw")
    [index_file] = list((store / "prefilter").glob("index-*.faiss"))
    index_file.unlink()
    result = cli("index", "check", "--store", store)
    assert result.exit_code == 2, result.output
    assert "prefilter index file" in result.stderr and "--repair" in result.stderr
    result = cli("index", "check", "--store", store, "--repair")
    assert result.exit_code == 0 and "rebuilt the prefilter index" in result.stdout, result.output
    assert faiss_index.load(Store.open(store)) is not None
    assert_sound(store, small_store[1])
    count("prefilter_indexes_rebuilt")


# -- hostile input and option values ---------------------------------------------------------------
def _bad_file(folder: Path, kind: str) -> tuple[Path, str]:
    """A bad input file and the text its error must name."""
    good = make_rows(3, start=200)
    path = folder / f"{kind}.jsonl"
    if kind == "number-text":
        write_jsonl(path, good[:1] + [{**good[1], "prompt": 5}])
        return path, f"{path}:2: field 'prompt'"
    if kind == "bool-text":
        write_jsonl(path, [{**good[0], "response": True}])
        return path, f"{path}:1: field 'response'"
    if kind == "empty":
        path.write_text("")
        return path, f"{path}: holds no rows"
    if kind == "bad-json":
        path.write_text(json.dumps(good[0]) + "\n{not json\n")
        return path, f"{path}:2"
    if kind == "missing-field":
        write_jsonl(path, [{"id": "x", "label": "c0"}])
        return path, f"{path}:1"
    if kind == "missing-file":
        return folder / "absent.jsonl", f"{folder / 'absent.jsonl'}"
    raise AssertionError(kind)


BAD_INPUTS = ["number-text", "bool-text", "empty", "bad-json", "missing-field", "missing-file"]

# (command, extra args, the flag or text the one-line error must name)
BAD_OPTIONS = [
    ("add", ["--batch-size", "0"], "--batch-size"),
    ("add", ["--write-every", "0"], "--write-every"),
    ("add", ["--shard", "2/2"], "--shard"),
    ("add", ["--shard", "x"], "--shard"),
    ("build", ["--max-length", "-5"], "--max-length"),
    ("build", ["--max-length", "0"], "--max-length"),
    ("build", ["--top-m", "0"], "--top-m"),
    ("build", ["--batch-size", "-1"], "--batch-size"),
    ("build", ["--hidden-dtype", "int3"], "--hidden-dtype"),
    ("query", ["--read-rows", "0"], "--read-rows"),
    ("query", ["--top-k", "0"], "--top-k"),
    ("query", ["--batch-size", "0"], "--batch-size"),
    ("query", ["--normalize", "l2"], "--normalize"),
    ("query", ["--all-scores", "{tmp}/scores.txt"], "scores.txt"),
    ("query", ["--all-scores", "{store}/manifest.json/scores.parquet"], "manifest.json"),
    ("query", ["-o", "{store}/manifest.json/top.jsonl"], "manifest.json"),
    ("query", ["-o", "{tmp}/top.xlsx"], "top.xlsx"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """Errors that must come before the model loads: loading it fails the test."""
    import forvalue.indexer.model_runner

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the bad value was refused")

    monkeypatch.setattr(forvalue.indexer.model_runner, "load_runner", refuse)  # what forvalue.session calls


def _assert_unchanged(store: Path, before: dict, runner, scores: dict) -> None:
    assert tree(store) == before
    now = scores_by_id(store, runner)
    assert sorted(now) == sorted(scores)
    assert_same_scores(now, scores, rtol=0)


@pytest.mark.parametrize("kind", BAD_INPUTS)
@pytest.mark.parametrize("command", ["add", "build"])
def test_bad_input_file(small_store, tmp_path, tiny_model_dir, tiny_runner, no_model_load, command, kind):
    store, scores = small_store
    before = tree(store)
    path, needle = _bad_file(tmp_path, kind)
    extra = ["--model", tiny_model_dir] if command == "build" else []
    assert_one_line_error(cli("index", command, path, "--store", store, "--quiet", *extra), needle)
    _assert_unchanged(store, before, tiny_runner, scores)
    count("bad_inputs_tried")


@pytest.mark.parametrize("command,extra,needle", BAD_OPTIONS)
def test_bad_option_value(small_store, tmp_path, tiny_model_dir, tiny_runner, no_model_load, command, extra, needle):
    store, scores = small_store
    before = tree(store)
    extra = [a.format(tmp=tmp_path, store=store) for a in extra]
    data = write_jsonl(tmp_path / "more.jsonl", make_rows(4, start=300))
    if command == "query":
        args = _query_args(store, *extra)
    else:
        args = ["index", command, data, "--store", store, "--quiet", *extra]
        args += ["--model", tiny_model_dir] if command == "build" else []
    assert_one_line_error(cli(*args), needle.format(tmp=tmp_path, store=store))
    _assert_unchanged(store, before, tiny_runner, scores)
    count("bad_option_values_tried")


@pytest.mark.parametrize("bad", ["empty", "bad-json", "--max-length=0", "--max-length=-5", "--batch-size=0"])
def test_refused_build_creates_no_store(tmp_path, tiny_model_dir, no_model_load, bad):
    """A new store is made only once inputs and options have passed their checks."""
    good = write_jsonl(tmp_path / "good.jsonl", make_rows(3))
    data, needle = (good, bad.split("=")[0]) if bad.startswith("--") else _bad_file(tmp_path, bad)
    extra = bad.split("=") if bad.startswith("--") else []
    store = tmp_path / "new" / "store"
    assert_one_line_error(cli("index", "build", data, "--store", store, "--model", tiny_model_dir, *extra), needle)
    assert not (tmp_path / "new").exists()
    count("bad_inputs_tried" if extra == [] else "bad_option_values_tried")


def test_all_scores_into_a_missing_folder_is_created(small_store, tmp_path, tiny_runner):
    store, scores = small_store
    target = tmp_path / "new" / "deeper" / "scores.parquet"
    result = cli(*_query_args(store, "--all-scores", target))
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    table = pq.read_table(target)
    assert sorted(table.column("train_id").to_pylist()) == sorted(scores)


# -- repair ------------------------------------------------------------------------------------------
def test_check_repair_removes_duplicates_atomically(small_store, tmp_path, tiny_runner):
    import lance

    store = copy_store(small_store, tmp_path)
    uri = str(store / "samples.lance")
    rows = lance.dataset(uri).to_table()
    lance.write_dataset(rows.slice(0, 12), uri, mode="append")  # 12 ids stored twice, as a racing writer would
    lance.write_dataset(rows.slice(5, 3), uri, mode="append")  # 3 of them three times
    result = cli("index", "check", "--store", store)
    assert result.exit_code == 2 and "15 duplicate rows of 12 ids" in result.stderr and "--repair" in result.stderr
    version = lance.dataset(uri).version
    result = cli("index", "check", "--store", store, "--repair")
    assert result.exit_code == 0, result.output
    assert "removed 15 duplicate rows" in result.stdout and "clean (30 rows" in result.stdout
    assert "rebuilt the prefilter index" in result.stdout  # row positions moved: the FAISS index follows
    assert lance.dataset(uri).version == version + 1  # one atomic commit
    assert_sound(store, small_store[1])
    assert_same_scores(scores_by_id(store, tiny_runner), small_store[1], rtol=0)
    count("duplicates_repaired", 15)


# -- model identity ------------------------------------------------------------------------------------
def test_weight_file_rewritten_in_place_with_its_mtime_restored_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    from forvalue.indexer.fingerprint import RACY_SECONDS

    monkeypatch.setenv("FORVALUE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    old = time.time_ns() - 3600 * 10**9
    os.utime(weights, ns=(old, old))
    time.sleep(RACY_SECONDS + 0.2)  # ctime too old for the racy-file rule: the hash is cached
    store = tmp_path / "store"
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(6))
    assert cli(*build_args(data, store, model)).exit_code == 0
    cached = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert any(key.startswith(f"{weights.resolve()}|") for key in cached), "the weights hash was not cached"
    before = tree(store)
    stat = weights.stat()
    with weights.open("r+b") as handle:  # change the last bytes of the tensor data, same size
        handle.seek(stat.st_size - 64)
        tail = handle.read(64)
        handle.seek(stat.st_size - 64)
        handle.write(bytes(255 - b for b in tail))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    more = write_jsonl(tmp_path / "more.jsonl", make_rows(3, start=50))
    assert_one_line_error(cli("index", "add", more, "--store", store, "--quiet"), "model_weights_sha256")
    assert_one_line_error(cli(*_query_args(store)), "model_weights_sha256")
    assert tree(store) == before
    count("rewritten_weights_refused")


# -- --debug -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["plain", "--debug", "FORVALUE_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, how):
    args = [sys.executable, "-m", "forvalue"] + (["--debug"] if how == "--debug" else [])
    env = (
        _env(FORVALUE_DEBUG="1")
        if how.startswith("FORVALUE")
        else {k: v for k, v in _env().items() if k != "FORVALUE_DEBUG"}
    )
    done = subprocess.run(
        args + ["index", "info", "--store", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    if how == "plain":
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
        assert done.stderr.startswith(f"error: {tmp_path / 'absent'}: no such store")
    else:
        assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr, done.stderr
        assert "StoreError" in done.stderr and "no such store" in done.stderr


# == issue 28: nothing a user types damages what they have ==========================================
# -- fixtures: a store with two audits, a value model, data and validation files ----------------------
@pytest.fixture(scope="module")
def valued(tmp_path_factory, small_store, tiny_runner):
    """A copy of the small store with audits 'a' and 'b', a value model 'vm' (fit on 'a'), the data and
    validation files and a values file; tests that refuse must leave all of it unchanged."""
    from forvalue.audit import run_audit
    from forvalue.distill import distill_value_model
    from forvalue.estimates import estimate
    from forvalue.schemas.config import AuditConfig, DistillConfig

    folder = tmp_path_factory.mktemp("valued")
    store = folder / "store"
    shutil.copytree(small_store[0], store)
    val = write_jsonl(folder / "val.jsonl", VALIDATION)
    train = write_jsonl(folder / "train.jsonl", make_rows(30))
    cfg = AuditConfig(progress=False, device="cpu")
    run_audit(store, [val], "a", cfg, runner=tiny_runner)
    run_audit(store, [write_jsonl(folder / "val_b.jsonl", VALIDATION[:1])], "b", cfg, runner=tiny_runner)
    distill_value_model(store, "a", folder / "vm", DistillConfig(student="ngram", ngram_dim=1024))
    estimate([train], folder / "vm", folder / "values.parquet")
    return {"folder": folder, "store": store, "val": val, "train": train, "vm": folder / "vm"}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (lock files aside) with its bytes."""
    return {
        str(f.relative_to(folder)): f.read_bytes()
        for f in sorted(folder.rglob("*"))
        if f.is_file() and not f.name.endswith(".lock")
    }


# command -> (args given the output path, the output's suffix, the files it reads)
def _output_commands(v: dict) -> dict:
    s, val, train, vm = v["store"], v["val"], v["train"], v["vm"]
    values = v["folder"] / "values.parquet"
    q = ["query", "--store", s, "-v", val, "--device", "cpu", "--quiet", "--exact"]
    audit_run = ["audit", "run", "--store", s, "-v", val, "--name", "c"]
    by_values = ["select", "--values", values, "--data", train, "--top", "5"]
    return {
        "query -o": (lambda o: [*q, "-o", o], ".jsonl", [val]),
        "query --all-scores": (lambda o: [*q, "--all-scores", o], ".parquet", [val]),
        "explain -o": (lambda o: ["explain", "--store", s, "-v", val, "--train-id", "s1", "-o", o], ".jsonl", [val]),
        "audit run --report": (lambda o: [*audit_run, "--report", o], ".html", [val]),
        "audit show --report": (lambda o: ["audit", "show", "--store", s, "a", "--report", o], ".html", []),
        "audit compare --report": (lambda o: ["audit", "compare", "--store", s, "a", "b", "--report", o], ".html", []),
        "select --audit -o": (lambda o: ["select", "--store", s, "--audit", "a", "--top", "5", "-o", o], ".jsonl", []),
        "select --values -o": (lambda o: [*by_values, "-o", o], ".jsonl", [train]),
        "estimate -o": (lambda o: ["estimate", train, "--value-model", vm, "-o", o], ".jsonl", [train]),
        "estimate -o (parquet)": (lambda o: ["estimate", train, "--value-model", vm, "-o", o], ".parquet", [train]),
        "distill --out": (lambda o: ["distill", "--store", s, "--audit", "a", "--out", o], "", []),
    }


OUTPUT_COMMANDS = [
    "query -o",
    "query --all-scores",
    "explain -o",
    "audit run --report",
    "audit show --report",
    "audit compare --report",
    "select --audit -o",
    "select --values -o",
    "estimate -o",
    "estimate -o (parquet)",
    "distill --out",
]


def _targets(v: dict, suffix: str, reads: list, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Output paths the policy must refuse, each with the text its one-line error must hold."""
    s = v["store"]
    (tmp / "elsewhere").mkdir(exist_ok=True)
    name = f"r{suffix or '.d'}"
    out = {
        "the store's manifest": (s / "manifest.json", str(s)),
        "a new file inside the store": (s / name, "inside the store"),
        "a new file deep inside the store's table": (s / "samples.lance" / "data" / name, "inside the store"),
        "the store itself": (s, "store"),
        "a store reached through a link": (_link(s, tmp / "store-link") / name, "inside the store"),
        "a file inside the value model": (v["vm"] / name, "inside the value model"),
    }
    for k, source in enumerate(f for f in reads if f.suffix == suffix):  # the inputs, by another name
        hard = tmp / f"hard{k}{suffix}"
        if not hard.exists():
            os.link(source, hard)
        out[f"input {source.name} respelled"] = (
            tmp / "elsewhere" / ".." / ".." / tmp.name / ".." / source.parent.name / source.name,
            "inputs",
        )
        out[f"a hard link to input {source.name}"] = (hard, "inputs")
    if suffix == ".parquet":
        out["an existing store-side parquet name"] = (s / "prefilter" / "x.parquet", "inside the store")
    return out


def _link(target: Path, link: Path) -> Path:
    if not link.exists():
        link.symlink_to(target)
    return link


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_outputs_never_replace_an_input_or_a_file_of_a_store(valued, tmp_path, no_model_load, command):
    """Every output of every command, pointed at a store (its manifest, its folder, a file inside it,
    through a link), at one of the command's inputs (other spelling, hard link) or into the value model:
    one line, exit 2, before the model loads, and every file of the store, the inputs and the value model
    is unchanged."""
    build, suffix, reads = _output_commands(valued)[command]
    before = snapshot(valued["folder"])
    targets = _targets(valued, suffix, reads, tmp_path)
    assert len(targets) >= 6
    for what, (target, needle) in targets.items():
        result = cli(*build(target))
        assert result.exit_code == 2, (command, what, result.output)
        assert_one_line_error(result, needle)
        count("output_paths_refused")
    assert snapshot(valued["folder"]) == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_two_outputs_of_one_command_never_collide(valued, tmp_path, no_model_load):
    v = valued
    q = ["query", "--store", v["store"], "-v", v["val"], "--device", "cpu", "--quiet"]
    cases = [
        [*q, "-o", tmp_path / "x.parquet", "--all-scores", tmp_path / "x.parquet"],
        [*q, "-o", tmp_path / "x.parquet", "--all-scores", tmp_path / "." / "x.parquet"],
        [*q, "-o", tmp_path / "t.jsonl", "--explain", "2", "--all-scores", tmp_path / "t.explain" / "s.parquet"],
        [
            *q,
            "-o",
            tmp_path / "t.jsonl",
            "--explain",
            "2",
            "--explain-dir",
            tmp_path,
            "--all-scores",
            tmp_path / "s.parquet",
        ],
    ]
    for args in cases:
        assert_one_line_error(cli(*args), "collides")
        count("output_paths_refused")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "target,needle",
    [("/dev/null", "unknown output format"), ("{tmp}/fifo.jsonl", "not a regular file"), ("-", "give a file path")]
    + [("/proc/out.jsonl", "cannot write into /proc")],  # (a folder that says it is writable: the message named
)  # the hidden temporary file the write failed on)
def test_devices_and_pipes_are_never_outputs(valued, tmp_path, no_model_load, target, needle):
    if "fifo" in target:
        os.mkfifo(tmp_path / "fifo.jsonl")
    target = target.format(tmp=tmp_path)
    args = ["select", "--store", valued["store"], "--audit", "a", "--top", "5", "-o", target]
    assert_one_line_error(cli(*args), needle)
    if "fifo" in target:
        assert Path(target).is_fifo()


def test_an_output_that_fails_while_written_names_the_target_not_the_temporary_file(tmp_path, monkeypatch):
    """A write that fails after the checks (a folder gone read-only, a full disk) is one line naming the output
    the user gave, not the hidden temporary file beside it; the old file stays."""
    from forvalue.storage import files

    target = tmp_path / "out.jsonl"
    target.write_text("old\n")

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(a[0]))

    with pytest.raises(files.OutputPathError) as info:
        with files.atomic_path(target) as tmp:
            monkeypatch.setattr(files.os, "replace", full)
            tmp.write_text("new\n")
    assert str(info.value).startswith(f"{target}: cannot be written (No space left on device)")
    assert ".tmp" not in str(info.value) and target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    monkeypatch.undo()

    # a full disk names no file at all (the CLI said "writing the output: ..." whichever of two outputs it was)
    with pytest.raises(files.OutputPathError, match=f"^{target}: cannot be written"):
        with files.atomic_path(target):
            raise OSError(28, "No space left on device")
    import pyarrow as pa

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    for table_path in (tmp_path / "t.jsonl", tmp_path / "t.parquet"):
        sink = files.TableSink(table_path, pa.schema([("a", pa.int64())]))
        if sink.handle is not None:
            sink.handle.close()
            sink.handle = Full()
        else:
            monkeypatch.setattr(sink.writer, "write", Full().write)
        with pytest.raises(files.OutputPathError, match=f"^{table_path}: cannot be written"):
            sink.write(pa.table({"a": [1, 2]}))
        sink.abort()
    # an error naming another file (an input read inside the block) is that file's, not the output's
    with pytest.raises(FileNotFoundError):
        with files.atomic_path(target):
            open(tmp_path / "missing-input.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_an_output_with_a_long_legal_name_is_written(tmp_path):
    """A 249-byte file name is legal (255 at most); the up-front probe and the temporary name were built from it
    and overflowed, refusing it as "cannot write into FOLDER (File name too long)" (hostile pass). Names at the
    limit are written, through the checks and the atomic writer, and leave no temporary file."""
    from forvalue.storage import files

    for target in (tmp_path / ("z" * 243 + ".jsonl"), tmp_path / ("é" * 121 + "z.jsonl")):
        assert len(target.name.encode()) <= 255
        files.check_outputs({"-o": (target, (".jsonl",))})
        files.write_text(target, "row\n")
        assert target.read_text() == "row\n"
    assert sorted(len(p.name.encode()) for p in tmp_path.iterdir()) == [249, 249]


def test_every_path_option_is_declared_input_or_output():
    """A new path option of any command must be declared in forvalue.cli.paths, or this test fails."""
    import click

    from forvalue.cli import main
    from forvalue.cli.paths import INPUTS, OUTPUTS, STORE_TARGETS

    undeclared = []

    def walk(group, prefix=""):
        for name, command in group.commands.items():
            path = f"{prefix} {name}".strip()
            if isinstance(command, click.Group):
                walk(command, path)
                continue
            for p in command.params:
                looks = isinstance(p.type, click.Path) or any(w in p.name for w in ("out", "report", "dir", "file"))
                declared = p.name in INPUTS or p.name in OUTPUTS.get(path, {}) or STORE_TARGETS.get(path) == p.name
                if looks and not declared:
                    undeclared.append(f"{path} {p.name}")

    walk(main)
    assert undeclared == []


@pytest.mark.parametrize("name", ["line\nbreak", "tab\tname", "bell\x07", "bad\udcffbyte"])
def test_store_names_lance_cannot_hold_are_refused_before_any_write(
    small_store, tiny_model_dir, tmp_path, no_model_load, name
):
    """Lance cannot make a table below a name with a control character or an undecodable byte: a build or a
    convert into one once left a half-made store (a manifest, no table) and an error of two lines."""
    data = write_jsonl(tmp_path / "d.jsonl", make_rows(2))
    for args in (
        build_args(data, tmp_path / name, tiny_model_dir),
        ["index", "convert", "--store", small_store[0], "--out", tmp_path / name],
    ):
        assert_one_line_error(cli(*args), "choose another name")
        assert not (tmp_path / name).exists()


def test_a_store_target_that_is_a_dangling_link_names_the_link(small_store, tiny_model_dir, tmp_path, no_model_load):
    """A build or convert into a link whose folder does not exist said only 'File exists'."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing" / "deeper")
    data = write_jsonl(tmp_path / "d.jsonl", make_rows(2))
    for args in (
        build_args(data, link, tiny_model_dir),
        ["index", "convert", "--store", small_store[0], "--out", link],
    ):
        assert_one_line_error(cli(*args), str(link), "missing", "does not exist")
    assert not (tmp_path / "missing").exists()


def test_a_relative_store_name_with_a_colon_is_a_folder_not_a_url_scheme(small_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("index", "convert", "--store", small_store[0], "--out", "run:1", "--quiet")
    assert res.exit_code == 0, res.output
    for spelling in ("run:1", "./run:1"):
        assert cli("index", "check", "--store", spelling).exit_code == 0


# -- the atomic writer --------------------------------------------------------------------------------
def _in_child(fn) -> int:
    """Run ``fn`` in a forked child; its exit status (-9 when it was killed)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_kill_9_while_streaming_an_output_keeps_the_old_file(tmp_path):
    """A ScoreWriter (the --all-scores sink) killed after some blocks: the old file is intact, and a hidden
    temporary file at most is left."""
    import pyarrow.parquet as pq

    from forvalue.present.output import ScoreWriter

    target = tmp_path / "scores.parquet"
    old = ScoreWriter(target, ["v0"])
    old.write(["a"], ["x"], np.ones((1, 1)))
    old.close()
    before = target.read_bytes()

    def write_then_die():
        w = ScoreWriter(target, ["v0", "train_id"])
        for k in range(5):
            w.write([f"r{k}"], [None], np.zeros((1, 2)))
        os.kill(os.getpid(), signal.SIGKILL)

    assert _in_child(write_then_die) == -signal.SIGKILL
    assert target.read_bytes() == before
    assert pq.read_table(target).column_names == ["train_id", "train_label", "v0"]
    count("kills_in_output_writes")


def test_validation_ids_equal_to_score_columns_give_a_readable_all_scores_file(small_store, tmp_path, tiny_runner):
    import pyarrow.parquet as pq

    from forvalue.api import run_query
    from forvalue.schemas.config import QueryConfig

    rows = [{**VALIDATION[0], "id": i} for i in ("train_id", "train_label", "train_id", "train_id#1")]
    target = tmp_path / "all.parquet"
    run_query(small_store[0], rows, QueryConfig(exact=True, progress=False), runner=tiny_runner, all_scores_path=target)
    table = pq.read_table(target)
    names = table.column_names
    assert names[:2] == ["train_id", "train_label"] and len(set(names)) == len(names) == 6
    assert sorted(table.column("train_id").to_pylist()) == sorted(small_store[1])


# -- value models ---------------------------------------------------------------------------------------
def _two_models(valued, tmp_path):
    from forvalue.distill import distill_value_model
    from forvalue.schemas.config import DistillConfig
    from forvalue.value_model import ValueModel

    distill_value_model(valued["store"], "b", tmp_path / "vm_b", DistillConfig(student="ngram", ngram_dim=512))
    return ValueModel.load(valued["vm"]), ValueModel.load(tmp_path / "vm_b")


def _save_hooked(model, folder: Path, kill_at: int, tally: Path) -> None:
    """``model.save(folder)`` with every file-system step it takes (temporary writes, syncs, renames, links,
    removals) counted; the process kills itself (SIGKILL) just before step ``kill_at`` (0: never) and
    writes the count to ``tally`` when it finishes. Runs in a forked child: the hooks die with it."""
    import forvalue.storage.files as files

    steps = [0]

    def hooked(real):
        def call(*args, **kwargs):
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call

    for name in ("replace", "fsync", "link"):
        setattr(files.os, name, hooked(getattr(files.os, name)))
    Path.unlink = hooked(Path.unlink)
    Path.write_bytes = hooked(Path.write_bytes)
    model.save(folder)
    tally.write_text(str(steps[0]))


def test_kill_9_at_every_step_of_a_value_model_rewrite(valued, tmp_path):
    """A value model folder being replaced (distill onto an existing --out), killed just before each
    file-system step of the save: the folder always loads as the whole old model or the whole new one,
    predictions and manifest together, never a mix and never an error."""
    from forvalue.value_model import ValueModel

    old, new = _two_models(valued, tmp_path)
    texts = [r["prompt"] + r["response"] for r in make_rows(12)]
    want = {"old": old.predict(texts), "new": new.predict(texts)}
    assert not np.allclose(want["old"], want["new"])
    folder, tally = tmp_path / "m", tmp_path / "steps.txt"
    old.save(folder)
    assert _in_child(lambda: _save_hooked(new, folder, 0, tally)) == 0
    total = int(tally.read_text())
    assert total >= 6, total
    outcomes = {"old": 0, "new": 0}
    for k in range(1, total + 1):
        shutil.rmtree(folder)
        old.save(folder)
        assert _in_child(lambda: _save_hooked(new, folder, k, tally)) == -signal.SIGKILL, k
        loaded = ValueModel.load(folder)
        got = loaded.predict(texts)
        which = "old" if np.array_equal(got, want["old"]) else "new"
        np.testing.assert_array_equal(got, want[which])
        assert loaded.meta["audit"]["name"] == {"old": "a", "new": "b"}[which]
        outcomes[which] += 1
        count("kills_in_value_model_saves")
    assert outcomes["old"] and outcomes["new"], outcomes


def test_a_killed_first_save_does_not_block_the_next_distill(valued, tmp_path):
    """A first save killed before its manifest leaves data files (and the lock) in a folder with no model:
    loading it is one line, and distilling into it again goes ahead."""
    from forvalue.distill import distill_value_model
    from forvalue.schemas.config import DistillConfig
    from forvalue.value_model import ValueModel

    old, _ = _two_models(valued, tmp_path)
    folder, tally = tmp_path / "first", tmp_path / "steps.txt"
    assert _in_child(lambda: _save_hooked(old, folder, 3, tally)) == -signal.SIGKILL
    assert folder.is_dir() and not (folder / "value_model.json").exists()
    assert_one_line_error(cli("estimate", valued["train"], "--value-model", folder, "-o", tmp_path / "v.parquet"))
    distill_value_model(valued["store"], "a", folder, DistillConfig(student="ngram", ngram_dim=1024))
    texts = [r["prompt"] for r in make_rows(4)]
    np.testing.assert_array_equal(ValueModel.load(folder).predict(texts), old.predict(texts))
    count("kills_in_value_model_saves")


def test_two_saves_into_one_value_model_folder_at_once(valued, tmp_path):
    """Two processes saving different models into one folder at the same moment, five times: the folder
    always loads as one of the two models, whole."""
    from forvalue.value_model import ValueModel

    a, b = _two_models(valued, tmp_path)
    texts = [r["prompt"] for r in make_rows(6)]
    want = [a.predict(texts), b.predict(texts)]
    folder = tmp_path / "shared"
    for _ in range(5):
        pids = []
        for model in (a, b):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    model.save(folder)
                except BaseException:  # noqa: BLE001
                    code = 3
                os._exit(code)
            pids.append(pid)
        assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
        got = ValueModel.load(folder).predict(texts)
        assert any(np.array_equal(got, w) for w in want)
        count("concurrent_value_model_saves", 2)


def _damage(folder: Path, how: str) -> str:
    """Damage a copied value model folder ``how``; returns text the one-line error must hold."""
    manifest = folder / "value_model.json"
    meta = json.loads(manifest.read_text())
    weights = folder / meta["files"]["weights"]["name"]

    def rewrite(**changes):
        meta.update(changes)
        manifest.write_text(json.dumps(meta))

    def save_arrays(arrays):
        from safetensors.numpy import save_file

        save_file(arrays, str(weights))
        import hashlib

        data = weights.read_bytes()
        meta["files"]["weights"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        manifest.write_text(json.dumps(meta))

    from safetensors.numpy import load_file

    arrays = load_file(str(weights))
    if how == "manifest truncated":
        manifest.write_text(manifest.read_text()[:40])
    elif how == "manifest a list":
        manifest.write_text("[1, 2]")
    elif how == "manifest nested 100000 deep":
        manifest.write_text("[" * 100000 + "]" * 100000)
    elif how == "manifest not UTF-8":
        manifest.write_bytes(b"\xff\xfe{}")
    elif how == "targets empty":
        rewrite(targets=[])
    elif how == "targets not names":
        rewrite(targets=[1, None])
    elif how == "dim negative":
        meta["features"]["dim"] = -5
        rewrite()
    elif how == "dim a string":
        meta["features"]["dim"] = "wide"
        rewrite()
    elif how == "dim changed":
        meta["features"]["dim"] = 2048
        rewrite()
    elif how == "weights deleted":
        weights.unlink()
    elif how == "weights truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "weights bytes flipped":
        data = bytearray(weights.read_bytes())
        data[-8:] = bytes(255 - b for b in data[-8:])
        weights.write_bytes(bytes(data))
    elif how == "weights from another save":
        meta["files"]["weights"]["sha256"] = "0" * 64
        rewrite()
    elif how == "file name escapes the folder":
        meta["files"]["weights"]["name"] = "../vm/x.safetensors"
        rewrite()
    elif how == "weights hold NaN":
        arrays["bias"] = np.full_like(arrays["bias"], np.nan)
        save_arrays(arrays)
    elif how == "bias of another shape":
        arrays["bias"] = np.zeros(7, np.float32)
        save_arrays(arrays)
    elif how == "weights as integers":
        arrays["weight"] = arrays["weight"].astype(np.int32)
        save_arrays(arrays)
    elif how == "weight array missing":
        del arrays["weight"]
        save_arrays(arrays)
    elif how == "format version a string":
        rewrite(format_version="2")
    elif how == "files missing (format 2)":
        del meta["files"]
        rewrite()
    else:
        raise AssertionError(how)
    in_manifest = how.startswith(("manifest", "targets", "format", "files")) or how in ("dim negative", "dim a string")
    return "value_model.json" if in_manifest else str(folder)


VALUE_MODEL_DAMAGE = [
    "manifest truncated",
    "manifest a list",
    "manifest nested 100000 deep",
    "manifest not UTF-8",
    "targets empty",
    "targets not names",
    "dim negative",
    "dim a string",
    "dim changed",
    "weights deleted",
    "weights truncated",
    "weights bytes flipped",
    "weights from another save",
    "file name escapes the folder",
    "weights hold NaN",
    "bias of another shape",
    "weights as integers",
    "weight array missing",
    "format version a string",
    "files missing (format 2)",
]


@pytest.mark.parametrize("how", VALUE_MODEL_DAMAGE)
def test_damaged_value_model_is_one_line_never_a_number(valued, tmp_path, how):
    vm = tmp_path / "vm"
    shutil.copytree(valued["vm"], vm)
    needle = _damage(vm, how)
    out = tmp_path / "values.parquet"
    assert_one_line_error(cli("estimate", valued["train"], "--value-model", vm, "-o", out), needle)
    assert not out.exists()
    args = ["estimate", "--value-model", vm, "--store", valued["store"], "--audit", "a"]
    assert_one_line_error(cli(*args))
    count("damaged_value_models_refused")


# -- audit tables -------------------------------------------------------------------------------------
def _uncommitted_audit(store: Path, name: str) -> Path:
    """What a kill inside an audit table's first commit leaves: data files, no version."""
    folder = store / f"audit_{name}.lance"
    shutil.copytree(store / "audit_a.lance", folder)
    shutil.rmtree(folder / "_versions")
    return folder


def test_audit_table_without_a_committed_version_is_invisible_reported_and_repaired(valued, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(valued["store"], store)
    folder = _uncommitted_audit(store, "half")
    listed = cli("audit", "list", "--store", store)
    assert listed.exit_code == 0 and "half" not in listed.output and listed.output.startswith("a "), listed.output
    assert_one_line_error(cli("audit", "show", "--store", store, "half"), "no audit named 'half'")
    assert_one_line_error(cli("audit", "compare", "--store", store, "a", "half"), "no audit named 'half'")
    assert cli("audit", "compare", "--store", store, "a", "b").exit_code == 0
    check = cli("index", "check", "--store", store)
    assert check.exit_code == 2 and str(folder) in check.stderr and "--repair" in check.stderr, check.output
    repaired = cli("index", "check", "--store", store, "--repair")
    assert repaired.exit_code == 0 and "audit_half.lance" in repaired.stdout, repaired.output
    assert not folder.exists()
    assert_sound(store)
    count("uncommitted_audit_tables_repaired")


def test_audit_rerun_over_a_killed_first_commit_starts_clean(valued, tmp_path, tiny_runner):
    from forvalue.audit import load_audit, run_audit
    from forvalue.schemas.config import AuditConfig

    store = tmp_path / "store"
    shutil.copytree(valued["store"], store)
    _uncommitted_audit(store, "again")
    run_audit(store, [valued["val"]], "again", AuditConfig(progress=False, device="cpu"), runner=tiny_runner)
    table, meta = load_audit(store, "again")
    assert meta["version"] == 1 and table.num_rows == 30
    assert_sound(store)


AUDIT_WRITER = r"""
import os, signal, sys, threading, time
import lance  # imported first: the kill timer below starts right before Lance's commit
from forvalue.storage import audits
from forvalue.storage.store import Store

store, name, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
st = Store.open(store)
table, meta = audits.read_audit(st, "a")
write = lance.write_dataset

def write_then_die(*args, **kwargs):
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    return write(*args, **kwargs)

lance.write_dataset = write_then_die
audits.write_audit(st, name, table, {**meta, "name": name})
time.sleep(30)  # the timer kills the process here at the latest
"""


def test_kill_9_inside_audit_commits(valued, tmp_path):
    """write_audit killed at seeded random moments while Lance commits (first commits and overwrites), in
    fresh processes (Lance is not fork-safe): audit list never fails, every listed audit reads whole, index
    check reports only what --repair removes, and the store is clean afterwards."""
    from forvalue.audit import audits, load_audit
    from forvalue.maintenance import check_store
    from forvalue.storage import audits as audit_tables
    from forvalue.storage.store import Store

    store = tmp_path / "store"
    shutil.copytree(valued["store"], store)
    rows = load_audit(store, "a")[0].num_rows
    rng = random.Random(28)
    landed = 0
    for k in range(12):
        name = f"k{k % 6}"  # six first commits, then six overwrites
        child = subprocess.run(
            [sys.executable, "-c", AUDIT_WRITER, str(store), name, f"{rng.uniform(0.0, 0.006):.5f}"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
        for m in audits(store):
            assert load_audit(store, m.name)[0].num_rows == rows
        listed = cli("audit", "list", "--store", store)
        assert listed.exit_code == 0, listed.output
        landed += bool(audit_tables.uncommitted_tables(Store.open(store)))
        report = check_store(store)
        assert all("without a committed version" in p for p in report.problems), report.problems
        count("kills_in_audit_commits")
    assert cli("index", "check", "--store", store, "--repair").exit_code == 0
    assert_sound(store)
    count("kills_that_left_an_uncommitted_audit_table", landed)


# -- settings that change stored values ----------------------------------------------------------------
def test_every_build_setting_is_matched_or_declared_not_stored(monkeypatch):
    from dataclasses import dataclass, make_dataclass

    from forvalue.schemas import stored_settings

    assert stored_settings.undeclared() == []
    assert "lowest_likelihood_ratio" in stored_settings.BUILD_MUST_MATCH
    # a new field that is neither matched nor declared fails the check
    extra = make_dataclass("EncodeConfig", [("new_knob", int, 0)], bases=(), frozen=True)
    monkeypatch.setattr(stored_settings, "BUILD_CONFIGS", (*stored_settings.BUILD_CONFIGS, extra))
    assert stored_settings.undeclared() == ["EncodeConfig.new_knob"]
    assert dataclass  # imported for the reader: the configs are frozen dataclasses


@pytest.mark.parametrize(
    "flag,value,field",
    [
        ("--lowest-likelihood-ratio", "0.2", "lowest_likelihood_ratio"),
        ("--hidden-dtype", "float32", "hidden_dtype"),
        ("--sketch-dim", "0", "sketch_dim"),
        ("--sketch-basis", "gaussian", "sketch_basis"),
        ("--top-m", "8", "top_m"),
        ("--max-length", "64", "max_length"),
        ("--score-tokens", "response", "score_tokens"),
    ],
)
def test_build_on_a_store_with_other_stored_settings_is_refused(
    small_store, tmp_path, tiny_model_dir, flag, value, field
):
    store, scores = small_store
    before = tree(store)
    data = write_jsonl(tmp_path / "more.jsonl", make_rows(4, start=400))
    result = cli(*build_args(data, store, tiny_model_dir, flag, value))
    assert_one_line_error(result, field, "index add")
    assert tree(store) == before
    count("stored_settings_mismatches_refused")


# -- inputs of any shape ---------------------------------------------------------------------------------
def test_the_same_file_named_twice_is_read_once(tmp_path, tiny_model_dir):
    dd = tmp_path / "dd"
    dd.mkdir()
    write_jsonl(dd / "a.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in make_rows(5)])
    write_jsonl(dd / "b.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in make_rows(3, start=10)])
    os.link(dd / "a.jsonl", tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(dd / "b.jsonl")
    store = tmp_path / "store"
    names = [
        dd,
        f"{dd}/*.jsonl",
        dd / "a.jsonl",
        f"{dd}/../dd/a.jsonl",
        tmp_path / "hard.jsonl",
        tmp_path / "soft.jsonl",
    ]
    result = cli(*build_args(names[0], store, tiny_model_dir), *map(str, names[1:]))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["written"] == 8 and report["repeats_kept"] == 0 and report["read"] == 8, report
    assert_sound(store)
    count("inputs_named_twice_read_once")


def _fifo_unblocker(path: Path):
    """Opens ``path`` for writing after a while so that a reader that opened it (wrongly) cannot hang the test."""
    import threading

    def unblock():
        time.sleep(20)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass

    threading.Thread(target=unblock, daemon=True).start()


BAD_SHAPES = ["fifo", "dev-stdin", "deep-json", "lone-surrogate", "array-row"]


def _bad_shape(folder: Path, kind: str) -> tuple[str, str]:
    if kind == "fifo":
        path = folder / "pipe.jsonl"
        os.mkfifo(path)
        _fifo_unblocker(path)
        return str(path), "pipe"
    if kind == "dev-stdin":
        return "/dev/stdin", "/dev/stdin"
    path = folder / f"{kind}.jsonl"
    if kind == "deep-json":
        path.write_text('{"prompt": ' + "[" * 100000 + "]" * 100000 + ', "response": "x"}\n')
        return str(path), "nested too deeply"
    if kind == "lone-surrogate":
        path.write_text('{"id": "x", "prompt": "a \\ud800 b", "response": " c"}\n')
        return str(path), "lone surrogate"
    if kind == "array-row":
        path.write_text("[1, 2]\n")
        return str(path), "expected a JSON object"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", BAD_SHAPES)
@pytest.mark.parametrize("command", ["build", "query", "estimate", "select"])
def test_inputs_of_any_shape_are_one_line(valued, tmp_path, tiny_model_dir, no_model_load, command, kind):
    path, needle = _bad_shape(tmp_path, kind)
    v = valued
    before = snapshot(v["folder"])
    args = {
        "build": ["index", "build", path, "--store", tmp_path / "new", "--model", tiny_model_dir],
        "query": ["query", "--store", v["store"], "-v", path, "--device", "cpu", "--quiet"],
        "estimate": ["estimate", path, "--value-model", v["vm"], "-o", tmp_path / "e.parquet"],
        "select": [
            "select",
            "--values",
            v["folder"] / "values.parquet",
            "--data",
            path,
            "--top",
            "3",
            "-o",
            tmp_path / "s.jsonl",
        ],
    }[command]
    assert_one_line_error(cli(*args), needle)
    assert snapshot(v["folder"]) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "e.parquet").exists()
    count("bad_input_shapes_tried")


ABSURD = [
    ("build", ["--lowest-likelihood-ratio", "nan"], "--lowest-likelihood-ratio"),
    ("build", ["--lowest-likelihood-ratio", "inf"], "--lowest-likelihood-ratio"),
    ("build", ["--max-length", "99999999999999"], "--max-length"),
    ("build", ["--sketch-dim", str(1 << 40)], "--sketch-dim"),
    ("build", ["--batch-size", str(10**30)], "--batch-size"),
    ("query", ["--top-k", str(10**30)], "--top-k"),
    ("query", ["--candidates", str(10**12)], "--candidates"),
    ("audit", ["--flag-fraction", "nan"], "--flag-fraction"),
    ("audit", ["--flag-threshold", "-inf"], "--flag-threshold"),
    ("audit", ["--read-rows", str(1 << 40)], "--read-rows"),
    ("distill", ["--ngram-dim", str(10**12)], "--ngram-dim"),
    ("distill", ["--seed", "-1"], "--seed"),
    ("distill", ["--fraction", "nan"], "--fraction"),
    ("select", ["--top", "inf%"], "--top"),
    ("select", ["--top", "nan%"], "--top"),
    ("select", ["--top", "1e999%"], "--top"),
    ("select", ["--drop-bottom", "1e5"], "--drop-bottom"),
    ("show", ["--group-column", "label", "--bootstrap", str(10**12)], "--bootstrap"),
    ("show", ["--group-column", "label", "--confidence", "nan"], "--confidence"),
    ("estimate", ["--group-column", "id"], "--group-column"),
]


@pytest.mark.parametrize("command,extra,needle", ABSURD)
def test_absurd_option_values_are_one_line(valued, tmp_path, tiny_model_dir, no_model_load, command, extra, needle):
    v = valued
    before = snapshot(v["folder"])
    args = {
        "build": ["index", "build", v["train"], "--store", tmp_path / "new", "--model", tiny_model_dir],
        "query": ["query", "--store", v["store"], "-v", v["val"], "--device", "cpu", "--quiet"],
        "audit": ["audit", "run", "--store", v["store"], "-v", v["val"], "--name", "z", "--device", "cpu"],
        "distill": ["distill", "--store", v["store"], "--audit", "a", "--out", tmp_path / "vm"],
        "select": ["select", "--store", v["store"], "--audit", "a", "-o", tmp_path / "s.jsonl"],
        "show": ["audit", "show", "--store", v["store"], "a", "--data", v["train"]],
        "estimate": ["estimate", v["train"], "--value-model", v["vm"], "-o", tmp_path / "e.parquet"],
    }[command]
    if command == "select" and "--top" not in extra and "--drop-bottom" not in extra:
        args += ["--top", "3"]
    assert_one_line_error(cli(*args, *extra), needle)
    assert snapshot(v["folder"]) == before
    assert not list(tmp_path.iterdir())
    count("absurd_option_values_tried")


def test_model_folder_with_pickled_weights_is_refused(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    state = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(3))
    assert_one_line_error(cli(*build_args(data, tmp_path / "store", model)), "pytorch_model.bin", "pickle")
    assert not (tmp_path / "store").exists()
    count("pickled_models_refused")


def test_validation_labels_of_any_text_make_readable_audit_columns(small_store, tmp_path, tiny_runner):
    """Labels are user text: a '.', backticks, quotes, '%', line breaks and NUL in them once made an audit
    fail after its whole scan (Lance column names); now each is written as %XX and the audit, its
    distillation and estimates work."""
    from forvalue.audit import load_audit, run_audit
    from forvalue.distill import distill_value_model
    from forvalue.estimates import estimate
    from forvalue.schemas.config import AuditConfig, DistillConfig

    store = copy_store(small_store, tmp_path)
    labels = ["x.y", "a\nb", '`w` "q"', "100%", "z\x00", "plain label", "größe"]
    rows = [{**VALIDATION[k % 2], "id": f"v{k}", "label": label} for k, label in enumerate(labels)]
    run_audit(store, rows, "odd", AuditConfig(progress=False, device="cpu"), runner=tiny_runner)
    table, meta = load_audit(store, "odd")
    assert sorted(meta["validation_labels"]) == sorted(labels)
    columns = [c for c in table.column_names if c.startswith("mean_vs_label:")]
    assert len(columns) == len(labels) and "mean_vs_label:x%2Ey" in columns and "mean_vs_label:plain label" in columns
    distill_value_model(store, "odd", tmp_path / "vm", DistillConfig(student="ngram", ngram_dim=256))
    out = estimate([write_jsonl(tmp_path / "t.jsonl", make_rows(5))], tmp_path / "vm", tmp_path / "v.csv")
    assert out.n == 5
    assert_sound(store)
    count("odd_validation_labels_audited", len(labels))
