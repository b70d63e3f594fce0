"""Stores on an object store (``s3://``), against a local S3-compatible server (moto, started here).

The same tiny store is built in a local folder and at ``s3://BUCKET/...``: queries, audits, checks and
info must agree; every file of the store lives at the URI (nothing is written locally); the three
access failures (no bucket, denied credentials, an unreachable endpoint) are one line each; outputs at
URIs, a prefix holding something else, other schemes and two writers at once are refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BUCKET, assert_one_line_error, cli, write_jsonl

from forvalue.schemas.config import AuditConfig, BuildConfig, EncodeConfig, ModelConfig, QueryConfig
from tools import moto_server as s3_server

pytest.importorskip("moto.server", reason="the object-store tests need moto[server] (the test extra)")

ENCODE = EncodeConfig(sketch_dim=256, sketch_vocab_buckets=64, sketch_hidden_cols=4)


def _rows(n: int) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    return [
        {
            "id": f"s{i:03d}",
            "prompt": f"{words[i % 6]} question {i} ->",
            "response": f" answer {i * 7} {words[(i * 5) % 6]}",
            "label": "ab"[i % 2],
        }
        for i in range(n)
    ]


def _val() -> list[dict]:
    return [
        {"id": f"v{i}", "prompt": f"beta question {i} ->", "response": f" answer {i}", "label": "ab"[i % 2]}
        for i in range(4)
    ]


def _config(model: Path) -> BuildConfig:
    return BuildConfig(
        model=ModelConfig(path=str(model), device="cpu"), encode=ENCODE, batch_size=4, write_every=8, progress=False
    )


def _objects(prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    from forvalue.storage.location import store_location

    loc = store_location(prefix)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.fs_path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(loc.fs_path) + 1 :] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def pair(s3, tmp_path_factory, tiny_model_dir):
    """The same 24 rows built locally and at s3://, each audited (v1) once; the work folder is the cwd."""
    import forvalue

    root = tmp_path_factory.mktemp("s3-pair")
    data = write_jsonl(root / "train.jsonl", _rows(24))
    val = write_jsonl(root / "val.jsonl", _val())
    local = forvalue.build(str(data), str(root / "local"), _config(tiny_model_dir))
    before = sorted(p.name for p in root.iterdir())
    remote = forvalue.build(str(data), f"s3://{BUCKET}/stores/s1", _config(tiny_model_dir))
    for st in (local, remote):
        st.audit(str(val), "v1", AuditConfig(progress=False))
    assert sorted(p.name for p in root.iterdir()) == before  # nothing of the remote store lands locally
    return {"root": root, "data": data, "val": val, "local": local, "remote": remote}


def test_store_lives_at_the_uri(pair):
    names = _objects(f"s3://{BUCKET}/stores/s1")
    assert "manifest.json" in names and "sketch_basis.npy" in names and "prefilter/prefilter.json" in names
    staged = [n for n in names if n.startswith("prefilter/rerank-")]  # the prefilter's second stage, uploaded whole
    assert len(staged) == 3 and not [n for n in names if n.endswith(".tmp")], names
    for table in ("samples", "audit_v1", "validation_cache"):
        assert any(n.startswith(f"{table}.lance/_versions/") for n in names), (table, names)
    assert ".writer.lease" not in names  # released at the end of the build
    assert str(pair["remote"].path) == f"s3://{BUCKET}/stores/s1"


def test_remote_store_equals_local(pair):
    import forvalue

    local, remote = pair["local"], forvalue.open(f"s3://{BUCKET}/stores/s1")
    assert len(remote) == len(local) == 24
    a, b = local.to_arrow(), remote.to_arrow()
    assert a.equals(b)
    configs = (QueryConfig(top_k=5, progress=False), QueryConfig(top_k=5, exact=True, progress=False))
    for cfg in (*configs, QueryConfig(top_k=5, candidates=6, max_candidates=6, progress=False)):
        ql, qr = local.query(str(pair["val"]), cfg), remote.query(str(pair["val"]), cfg)
        assert ql.pools == qr.pools and (ql.pools is not None) == bool(cfg.candidates)  # read from s3 whole
        assert ql.top.column("train_id").to_pylist() == qr.top.column("train_id").to_pylist()
        np.testing.assert_allclose(qr.top.column("score").to_numpy(), ql.top.column("score").to_numpy(), rtol=1e-6)
    al, ar = local.audits["v1"].to_arrow(), remote.audits["v1"].to_arrow()
    assert al.column("id").to_pylist() == ar.column("id").to_pylist()
    assert al.column("rank").to_pylist() == ar.column("rank").to_pylist()
    for name in ("score_mean", "score_max", "mean_vs_label:a", "mean_vs_label:b"):
        np.testing.assert_allclose(ar.column(name).to_numpy(), al.column(name).to_numpy(), rtol=1e-6)
    check = remote.check()
    assert check.clean and check.rows == 24
    il, ir = local.info(), remote.info()
    assert (il.samples, il.scored_tokens) == (ir.samples, ir.scored_tokens)
    # the audit's validation encodings came from the store's cache on the second run
    again = remote.audit(str(pair["val"]), "v2", AuditConfig(progress=False))
    assert again is not None and sorted(remote.audits) == ["v1", "v2"]


def test_cli_on_s3_store(pair, tmp_path, s3, monkeypatch):
    store = f"s3://{BUCKET}/stores/s1"
    out = tmp_path / "top.jsonl"
    r = cli("query", "--store", store, "-v", pair["val"], "--top-k", "3", "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    local = tmp_path / "top-local.jsonl"
    r = cli("query", "--store", pair["local"].path, "-v", pair["val"], "--top-k", "3", "-o", local, "--quiet")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["train_id"] for x in out.read_text().splitlines()] == [
        json.loads(x)["train_id"] for x in local.read_text().splitlines()
    ]
    r = cli("index", "check", "--store", store)
    assert r.exit_code == 0 and "clean (24 rows" in r.output, r.output
    r = cli("audit", "list", "--store", store)
    assert r.exit_code == 0 and "v1" in r.output, r.output
    r = cli("select", "--store", store, "--audit", "v1", "--top", "50%", "-o", tmp_path / "sel.jsonl")
    assert r.exit_code == 0 and len((tmp_path / "sel.jsonl").read_text().splitlines()) == 12, r.output
    # the endpoint given as --storage-option instead of the environment
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    r = cli("index", "info", "--store", store, "--storage-option", f"endpoint={s3}", "--storage-option", "allow_http=1")
    assert r.exit_code == 0 and "24" in r.output, r.output
    assert_one_line_error(cli("index", "info", "--store", store, "--storage-option", "colour=blue"), "colour")
    assert_one_line_error(cli("index", "info", "--store", store, "--storage-option", "region"), "KEY=VALUE")


def test_cli_build_and_convert_to_s3(pair, tiny_model_dir, tmp_path):
    store = f"s3://{BUCKET}/stores/cli"
    r = cli("index", "build", pair["data"], "--store", store, "--model", tiny_model_dir, "--device", "cpu", "--quiet")
    assert r.exit_code == 0 and "wrote 24 samples" in r.output, r.output
    r = cli("index", "convert", "--store", store, "--out", f"s3://{BUCKET}/stores/cli-int8", "--hidden-dtype", "int8")
    assert r.exit_code == 0 and "converted 24 samples" in r.output, r.output
    r = cli("index", "check", "--store", f"s3://{BUCKET}/stores/cli-int8")
    assert r.exit_code == 0, r.output
    assert_one_line_error(
        cli("index", "convert", "--store", store, "--out", store + "/inner"), "inside the source store"
    )


def test_outputs_at_uris_are_refused(pair):
    store = f"s3://{BUCKET}/stores/s1"
    for args in (
        ("query", "--store", store, "-v", pair["val"], "-o", f"s3://{BUCKET}/out.jsonl"),
        ("query", "--store", store, "-v", pair["val"], "-o", f"{store}/manifest.json"),
        ("audit", "show", "--store", store, "v1", "--report", f"s3://{BUCKET}/r.html"),
        ("select", "--store", store, "--audit", "v1", "--top", "3", "-o", f"{store}/x.jsonl"),
        ("distill", "--store", store, "--audit", "v1", "--out", f"{store}/vm"),
    ):
        assert_one_line_error(cli(*args), "outputs are local files")
    assert "x.jsonl" not in _objects(store) and "out.jsonl" not in _objects(f"s3://{BUCKET}")


def test_prefix_holding_something_else(s3, pair, tiny_model_dir):
    import forvalue
    from forvalue.storage.location import store_location

    (store_location(f"s3://{BUCKET}/other/data.csv")).write_bytes(b"a,b\n1,2\n")
    assert_one_line_error(cli("index", "info", "--store", f"s3://{BUCKET}/other"), "not a forvalue store")
    r = cli("index", "build", pair["data"], "--store", f"s3://{BUCKET}/other", "--model", tiny_model_dir, "--quiet")
    assert_one_line_error(r, "not a forvalue store")
    assert _objects(f"s3://{BUCKET}/other") == ["data.csv"]
    assert_one_line_error(cli("index", "info", "--store", f"s3://{BUCKET}/nothing-here"), "no such store")
    r = cli("index", "build", pair["data"], "--store", f"s3://{BUCKET}/stores/s1/inner", "--model", tiny_model_dir)
    assert_one_line_error(r, "is inside the store s3://")
    assert not any(n.startswith("inner/") for n in _objects(f"s3://{BUCKET}/stores/s1"))
    with pytest.raises(forvalue.ForValueError, match="not supported"):
        forvalue.open("gs://bucket/store")


def test_missing_bucket_is_one_line(s3, pair, tiny_model_dir):
    assert_one_line_error(cli("index", "info", "--store", "s3://no-such-bucket/s"), "no bucket 'no-such-bucket'")
    r = cli("index", "build", pair["data"], "--store", "s3://no-such-bucket/s", "--model", tiny_model_dir)
    assert_one_line_error(r, "no bucket 'no-such-bucket'")


def test_unreachable_endpoint_is_one_line_not_a_hang(s3, monkeypatch):
    from forvalue.storage import location

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3_server.free_port()}")  # nothing listens there
    monkeypatch.setattr(location, "_FILESYSTEMS", {})
    started = time.perf_counter()
    assert_one_line_error(cli("index", "info", "--store", f"s3://{BUCKET}/stores/s1"), "cannot reach the object store")
    print(f"unreachable endpoint answered in {time.perf_counter() - started:.1f} s")


def test_denied_credentials_are_one_line(monkeypatch):
    """A server that checks credentials (moto with authentication on) refuses unknown keys: one line."""
    proc, endpoint = s3_server.start({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        for k, v in s3_server.s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        assert_one_line_error(cli("index", "info", "--store", f"s3://{BUCKET}/stores/s1"), "denied access")
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_writers_at_once(pair):
    """The writer lease on an object store: a second writer is refused, naming the first; a dead writer's lease
    expires and is taken over; a released lease is gone."""
    from forvalue.schemas.errors import StoreError
    from forvalue.storage.object_lease import ObjectLease
    from forvalue.storage.store import WriterLease

    store = pair["remote"].path
    first = WriterLease.acquire(store)
    try:
        with pytest.raises(StoreError, match=r"another build is writing to s3://.*pid \d+"):
            WriterLease.acquire(store)
        r = cli("index", "sketch", "--store", str(store), "--rebuild")
        assert_one_line_error(r, "another build is writing")
        with pytest.raises(StoreError, match="--shard"):
            WriterLease.acquire(store, (0, 2))
    finally:
        first.release()
    assert ".writer.lease" not in _objects(str(store))
    # a writer that dies holding a short lease: its lease expires and the next writer takes it over
    dead = ObjectLease.acquire(store / ".writer.lease", busy=str, ttl=1.0)
    dead._stop.set()  # no more renewals, nothing released: as after kill -9
    with pytest.raises(StoreError):
        ObjectLease.acquire(store / ".writer.lease", busy=lambda h: f"busy {h}")
    time.sleep(1.5)
    with ObjectLease.acquire(store / ".writer.lease", busy=str) as taker:
        assert not taker.lost
    # a holder that renews keeps it past its ttl
    with ObjectLease.acquire(store / ".writer.lease", busy=str, ttl=1.5) as alive:
        time.sleep(2.0)
        with pytest.raises(StoreError, match="busy"):
            ObjectLease.acquire(store / ".writer.lease", busy=lambda h: f"busy {h}")
        assert not alive.lost


def test_concurrent_appends_keep_every_row(pair):
    """Two handles appending to one s3:// table at once (no lease): Lance's conditional commits keep both."""
    import threading

    import pyarrow as pa

    from forvalue.storage.store import Store

    source = Store.open(f"s3://{BUCKET}/stores/s1")
    target = f"s3://{BUCKET}/stores/concurrent"
    Store.create(target, source.manifest)
    a, b = Store.open(target), Store.open(target)
    base = source._snapshot.to_table(limit=2)

    def renamed(prefix):
        return base.set_column(0, "id", pa.array([f"{prefix}{i}" for i in range(base.num_rows)]))

    threads = [threading.Thread(target=h.append, args=(renamed(p),)) for h, p in ((a, "a"), (b, "b"))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    got = sorted(Store.open(target).ids())
    assert got == ["a0", "a1", "b0", "b1"]


def test_inputs_at_uris_stream_like_local_files(pair, tiny_model_dir, tmp_path):
    """Training data on the object store (a Parquet glob, a JSONL object, a prefix): the same samples as from disk."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    import forvalue
    from forvalue.indexer.data import iter_samples
    from forvalue.schemas.config import DataConfig
    from forvalue.storage.location import store_location

    rows = _rows(24)
    local = tmp_path / "part.parquet"
    for k, part in enumerate((rows[:10], rows[10:])):
        pq.write_table(pa.Table.from_pylist(part), local)
        store_location(f"s3://{BUCKET}/data/p/part-{k}.parquet").write_bytes(local.read_bytes())
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    store_location(f"s3://{BUCKET}/data/j/train.jsonl").write_bytes(jsonl)
    store_location(f"s3://{BUCKET}/data/j/sub/train.jsonl.gz").write_bytes(gzip.compress(jsonl))
    expected = [s.id for s in iter_samples([pair["data"]], DataConfig())]
    for given in (
        [f"s3://{BUCKET}/data/p/*.parquet"],
        [f"s3://{BUCKET}/data/j/train.jsonl"],
        [f"s3://{BUCKET}/data/j/**/*.jsonl.gz"],
        [f"s3://{BUCKET}/data/p"],  # a prefix: its data files, sorted
    ):
        assert [s.id for s in iter_samples(given, DataConfig())] == expected, given
    # a build from the object store into the object store equals the local one
    st = forvalue.build(f"s3://{BUCKET}/data/p/*.parquet", f"s3://{BUCKET}/stores/from-s3", _config(tiny_model_dir))
    assert st.to_arrow().equals(pair["local"].to_arrow())
    r = cli("index", "build", f"s3://{BUCKET}/data/p/*.csv", "--store", tmp_path / "s", "--model", tiny_model_dir)
    assert_one_line_error(r, "matches no object")
    r = cli("index", "build", f"s3://{BUCKET}/data/none", "--store", tmp_path / "s", "--model", tiny_model_dir)
    assert_one_line_error(r, "no such object or prefix")
    assert not (tmp_path / "s").exists()


def test_every_command_on_an_s3_store(pair, tiny_model_dir, tmp_path):
    """add, sketch, check --repair, explain, audit show/compare, distill, estimate: the s3:// store as a folder."""
    import forvalue
    from forvalue.indexer.build import build_index

    store = f"s3://{BUCKET}/stores/every"
    build_index([pair["data"]], store, _config(tiny_model_dir))
    more = write_jsonl(tmp_path / "more.jsonl", _rows(30)[24:])
    steps = [
        ("index", "add", more, "--store", store, "--quiet"),
        ("index", "sketch", "--store", store, "--rebuild", "--sketch-dim", "512", "--sketch-vocab-buckets", "64"),
        ("index", "check", "--store", store, "--repair"),
        ("audit", "run", "--store", store, "-v", pair["val"], "--name", "a1", "--quiet"),
        ("audit", "run", "--store", store, "-v", pair["val"], "--name", "a2", "--quiet", "--normalize", "cosine"),
        ("audit", "show", "--store", store, "a1", "--report", tmp_path / "a1.html"),
        ("audit", "compare", "--store", store, "a1", "a2"),
        (
            "explain",
            "--store",
            store,
            "-v",
            pair["val"],
            "--val-index",
            "0",
            "--train-id",
            "s001",
            "-o",
            tmp_path / "e.jsonl",
        ),
        ("query", "--store", store, "-v", pair["val"], "--top-k", "2", "-o", tmp_path / "q.jsonl", "--quiet"),
        ("distill", "--store", store, "--audit", "a1", "--out", tmp_path / "vm", "--fraction", "0.5"),
        ("estimate", "--value-model", tmp_path / "vm", "--store", store, "--audit", "a1"),
        ("index", "info", "--store", store),
    ]
    for args in steps:
        r = cli(*args)
        assert r.exit_code == 0, (args, r.output)
    st = forvalue.open(store)
    assert len(st) == 30 and st.manifest.sketch_dim == 512 and sorted(st.audits) == ["a1", "a2"]
    assert st.check().clean
