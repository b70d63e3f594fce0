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
    assert report["clean"], report["problems"]
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
            assert_one_line_error(cli(*args), f"another build is writing to {store} (pid {os.getpid()} on ")
            count("lease_refusals")
    with WriterLease.acquire(store, (0, 2)):  # a sharded worker: other shards may write, an unsharded build may not
        assert_one_line_error(cli("index", "add", data, "--store", store), "another build is writing", "sharded worker")
        assert_one_line_error(cli("index", "add", data, "--store", store, "--shard", "0/2"), "shard 0/2")
        count("lease_refusals", 2)
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
    [index_file] = [f for f in (store / "prefilter").iterdir() if f.suffix != ".json"]
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
    import forvalue.api
    import forvalue.indexer.model_runner

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the bad value was refused")

    monkeypatch.setattr(forvalue.api, "load_runner", refuse)
    monkeypatch.setattr(forvalue.indexer.model_runner, "load_runner", refuse)


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
