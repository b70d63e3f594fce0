"""--engine ray: distributed build, audit and exact query equal the single-process ones (tiny model, local Ray).

One local Ray instance (2 CPUs) serves every test marked ``ray`` (module fixture); the tests
without the mark check what needs no Ray: a plain build and the CLI never import it, and the
flags' one-line errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, cli, word_rows, word_val, write_jsonl

from forvalue.schemas.config import AuditConfig, BuildConfig, EncodeConfig, EngineConfig, ModelConfig, QueryConfig

RAY = EngineConfig(engine="ray", workers=2)
# Small sketch (fitted basis) so the prefilter index and the basis are exercised too.
# float16 stores here (the int8 test converts one; tests/test_ray_cluster.py builds the default int8 stores)
ENCODE = EncodeConfig(sketch_dim=256, sketch_vocab_buckets=64, sketch_hidden_cols=4, hidden_dtype="float16")


_rows, _val = word_rows, word_val


def _config(model: Path, write_every: int = 8) -> BuildConfig:
    return BuildConfig(
        model=ModelConfig(path=str(model), device="cpu"),
        encode=ENCODE,
        batch_size=4,
        write_every=write_every,
        progress=False,
    )


def _table(store: Path):
    import lance

    return lance.dataset(str(store / "samples.lance")).to_table()


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    # address="local": a new instance even when another Ray cluster runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dir, ray_instance):
    """The same 40 rows built in one process and on 2 Ray workers."""
    root = tmp_path_factory.mktemp("ray-build")
    data = write_jsonl(root / "train.jsonl", _rows(40))
    local = root / "local"
    from forvalue.indexer.build import build_index

    # write_every a multiple of the encoder's sort window (8 batches): the chunks are the single-process write
    # batches, so the first one fits the same sketch basis and rows land in the same order
    build_index([data], local, _config(tiny_model_dir, write_every=32))
    report = build_index([data], root / "ray", _config(tiny_model_dir, write_every=32), engine=RAY)
    return {"root": root, "data": data, "local": local, "ray": root / "ray", "report": report}


@pytest.mark.ray
def test_ray_build_equals_single_process(stores):
    from forvalue.maintenance import check_store
    from forvalue.schemas.manifest import Manifest
    from forvalue.storage import faiss_index
    from forvalue.storage.sketch_basis import load_basis
    from forvalue.storage.store import Store

    assert stores["report"].written == 40 and stores["report"].total_rows == 40
    assert stores["report"].tokens_scored > 0
    a, b = _table(stores["local"]), _table(stores["ray"])
    assert a.schema == b.schema
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert sorted(a.column("id").to_pylist()) == [r["id"] for r in _rows(40)]
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name in ("hidden", "topk_probs", "target_probs", "tail_mass", "sq_norm", "sketch"):
            for u, v in zip(x, y):
                np.testing.assert_allclose(np.asarray(v, float), np.asarray(u, float), rtol=1e-3, atol=1e-4)
        else:
            assert x == y, name
    assert (
        Manifest.load(stores["ray"] / "manifest.json").mismatches(Manifest.load(stores["local"] / "manifest.json"))
        == []
    )
    np.testing.assert_allclose(load_basis(stores["ray"]), load_basis(stores["local"]), rtol=1e-4, atol=1e-5)
    pre = faiss_index.load(Store.open(stores["ray"]))
    assert pre is not None and pre.index.ntotal == 40
    assert check_store(stores["ray"]).clean


@pytest.mark.ray
def test_ray_rerun_skips_stored(stores, tiny_model_dir, tmp_path):
    import shutil

    from forvalue.indexer.build import build_index

    store = tmp_path / "store"
    shutil.copytree(stores["ray"], store)
    more = write_jsonl(tmp_path / "more.jsonl", _rows(44)[38:])  # 2 stored, 4 new
    report = build_index([stores["data"], more], store, _config(tiny_model_dir), engine=RAY)
    assert (report.written, report.already_stored, report.duplicate_ids, report.total_rows) == (4, 42, 0, 44)
    ids = _table(store).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 44


@pytest.mark.ray
def test_ray_build_that_stores_no_row_is_one_line_and_leaves_no_store(tmp_path, tiny_model_dir, stores):
    """As the single-process build (tests/test_build_resume.py): rows none of which has a scored token made an
    empty store and exit 0 on Ray; now the same one line, and no store is left."""
    from forvalue.indexer.build import build_index
    from forvalue.schemas.errors import InputDataError

    data = write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    store = tmp_path / "store"
    with pytest.raises(InputDataError, match="nothing was stored: of 1 rows, 1 have no scored token"):
        build_index([data], store, _config(tiny_model_dir), engine=RAY)
    assert not (store / "manifest.json").exists() and not (store / "samples.lance").exists()


@pytest.mark.ray
def test_ray_build_after_killed_driver_has_no_duplicates(tmp_path, tiny_model_dir, ray_instance):
    """A driver killed (-9) after some commits: the re-run completes the store, no id twice, same ids."""
    import lance

    from forvalue.indexer.build import build_index

    data = write_jsonl(tmp_path / "train.jsonl", _rows(120))
    store = tmp_path / "store"
    address = ray_instance.get_runtime_context().gcs_address
    cmd = [
        sys.executable,
        "-m",
        "forvalue",
        "index",
        "build",
        str(data),
        "--store",
        str(store),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--write-every",
        "4",
        "--sketch-dim",
        "256",
        "--sketch-vocab-buckets",
        "64",
        "--hidden-dtype",
        ENCODE.hidden_dtype,  # the re-run below builds with ENCODE's settings
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--workers",
        "2",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    uri = str(store / "samples.lance")
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if lance.dataset(uri).count_rows() >= 8:  # at least two chunks committed
                    break
            except (OSError, ValueError, RuntimeError):
                pass
            time.sleep(0.2)
        assert proc.poll() is None, f"the build ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = lance.dataset(uri).count_rows()
    assert 8 <= partial < 120
    report = build_index([data], store, _config(tiny_model_dir), engine=RAY)
    assert report.already_stored == partial and report.written == 120 - partial
    ids = _table(store).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120
    assert set(ids) == {r["id"] for r in _rows(120)}


def _actor_pids(name: str) -> list[int]:
    """Pids of this machine's Ray worker processes running actor class ``name`` (their title is ``ray::NAME...``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"ray::{name}"):
                pids.append(int(entry.name))
    return pids


@pytest.mark.ray
def test_ray_build_survives_a_killed_worker(tmp_path, tiny_model_dir, ray_instance):
    """An actor killed (-9) mid-build is restarted by Ray, its chunk retried: the build ends complete, no duplicate."""
    import lance

    n = 400  # enough rows that the build is still running when the first commits land, on a fast machine too
    data = write_jsonl(tmp_path / "train.jsonl", _rows(n))
    store = tmp_path / "store"
    address = ray_instance.get_runtime_context().gcs_address
    cmd = [
        sys.executable,
        "-m",
        "forvalue",
        "index",
        "build",
        str(data),
        "--store",
        str(store),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--write-every",
        "4",
        "--sketch-dim",
        "0",
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--workers",
        "2",
        "--quiet",
        "--json",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    killed = None
    try:
        while time.monotonic() < deadline and proc.poll() is None and killed is None:
            try:
                committed = lance.dataset(str(store / "samples.lance")).count_rows()
            except (OSError, ValueError, RuntimeError):
                committed = 0
            pids = _actor_pids("Encoder")
            if committed >= 4 and pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert killed is not None, "no Encoder actor was seen while the build ran"
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(out.decode().strip().splitlines()[-1])
    ids = _table(store).column("id").to_pylist()
    assert report["written"] == report["total_rows"] == n
    assert len(ids) == len(set(ids)) == n


@pytest.mark.ray
@pytest.mark.parametrize(
    "flag_by, normalize, center",
    [
        ("mean", "none", "none"),
        ("max", "cosine", "none"),
        ("label", "none", "none"),
        ("max", "cosine", "mean"),
        ("label", "none", "whiten"),
    ],
)
def test_ray_audit_equals_single_process(stores, flag_by, normalize, center):
    from forvalue.audit import load_audit, run_audit

    variant = {"whiten": 0.3} if center == "whiten" else {"center": center}
    cfg = AuditConfig(progress=False, device="cpu", flag_by=flag_by, normalize=normalize, read_rows=7, **variant)
    a = run_audit(stores["local"], _val(), f"local-{flag_by}-{center}", cfg)
    b = run_audit(stores["local"], _val(), f"ray-{flag_by}-{center}", cfg, engine=RAY)
    assert (a.form, a.n_train, a.flagged) == (b.form, b.n_train, b.flagged)
    ta, _ = load_audit(stores["local"], f"local-{flag_by}-{center}")
    tb, _ = load_audit(stores["local"], f"ray-{flag_by}-{center}")
    assert ta.column_names == tb.column_names
    for name in ta.column_names:
        x, y = ta.column(name).to_pylist(), tb.column(name).to_pylist()
        if ta.schema.field(name).type == "double":
            np.testing.assert_allclose(np.array(y, float), np.array(x, float), rtol=1e-9, atol=1e-12)
        else:
            assert x == y, name


@pytest.mark.ray
@pytest.mark.parametrize(
    "aggregate, center", [("none", "none"), ("mean", "none"), ("none", "mean"), ("mean", "whiten")]
)
def test_ray_query_equals_single_process(stores, aggregate, center, tmp_path):
    import pyarrow.parquet as pq

    from forvalue.api import run_query

    variant = {"whiten": 0.3} if center == "whiten" else {"center": center}
    cfg = QueryConfig(top_k=7, progress=False, device="cpu", exact=True, aggregate=aggregate, read_rows=5, **variant)
    a = run_query(stores["local"], _val(), cfg, keep_scores=True, all_scores_path=tmp_path / "a.parquet")
    b = run_query(stores["local"], _val(), cfg, keep_scores=True, all_scores_path=tmp_path / "b.parquet", engine=RAY)
    assert a.top.column("train_id").to_pylist() == b.top.column("train_id").to_pylist()
    assert a.top.column("validation_id").to_pylist() == b.top.column("validation_id").to_pylist()
    np.testing.assert_allclose(b.top.column("score").to_numpy(), a.top.column("score").to_numpy(), rtol=1e-9)
    assert a.train_ids == b.train_ids
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-9, atol=1e-12)
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    # the top-k is the brute-force one of the full matrix (ties by storage position)
    for col in range(a.scores.shape[0]):
        best = np.lexsort((np.arange(a.scores.shape[1]), -b.scores[col]))[:7]
        got = b.top.column("train_id").to_pylist()[col * 7 : (col + 1) * 7]  # rows grouped by validation sample
        assert got == [b.train_ids[j] for j in best]


@pytest.mark.ray
def test_cli_engine_ray(stores, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", _rows(10))
    val = write_jsonl(tmp_path / "val.jsonl", _val())
    store = tmp_path / "store"
    r = cli(
        "index",
        "build",
        data,
        "--store",
        store,
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--sketch-dim",
        "0",
        "--engine",
        "ray",
        "--workers",
        "2",
        "--json",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert (report["written"], report["total_rows"]) == (10, 10)
    out = tmp_path / "top.jsonl"
    r = cli(
        "query",
        "--store",
        store,
        "--validation",
        val,
        "--top-k",
        "3",
        "--engine",
        "ray",
        "--workers",
        "2",
        "-o",
        out,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    local = tmp_path / "top-local.jsonl"
    assert cli("query", "--store", store, "--validation", val, "--top-k", "3", "-o", local, "--quiet").exit_code == 0
    assert [r["train_id"] for r in rows] == [json.loads(line)["train_id"] for line in local.read_text().splitlines()]
    r = cli("audit", "run", "--store", store, "--validation", val, "--name", "a", "--engine", "ray", "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("query", "--store", store, "--validation", val, "--engine", "ray", "--workers", "9", "--quiet")
    assert_one_line_error(r, "--workers", "9 actors", "2")
    # an error inside an actor (the model fails to load there) is the single-process one-line error
    r = cli(
        "index",
        "build",
        data,
        "--store",
        tmp_path / "other",
        "--model",
        tmp_path / "no-model",
        "--device",
        "cpu",
        "--engine",
        "ray",
        "--workers",
        "1",
        "--quiet",
    )
    plain = cli(
        "index",
        "build",
        data,
        "--store",
        tmp_path / "other",
        "--model",
        tmp_path / "no-model",
        "--device",
        "cpu",
        "--quiet",
    )
    assert assert_one_line_error(r) == assert_one_line_error(plain)


def test_engine_flags_errors(tmp_path, tiny_model_dir):
    """One-line errors, before any model load or Ray start."""
    data = write_jsonl(tmp_path / "train.jsonl", _rows(4))
    base = ["index", "build", data, "--store", tmp_path / "s", "--model", tiny_model_dir, "--device", "cpu", "--quiet"]
    assert_one_line_error(cli(*base, "--workers", "2"), "--workers", "--engine ray")
    assert_one_line_error(cli(*base, "--ray-address", "auto"), "--ray-address", "--engine ray")
    assert_one_line_error(cli(*base, "--engine", "ray", "--shard", "0/2"), "--shard", "drop --shard")
    assert not (tmp_path / "s").exists()


def test_plain_build_and_cli_do_not_import_ray(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", _rows(4))
    code = (
        "import sys\nimport forvalue.cli\nfrom forvalue.indexer.build import build_index\n"
        "from forvalue.schemas.config import BuildConfig, ModelConfig\n"
        f"build_index([{str(data)!r}], {str(tmp_path / 's')!r}, "
        f"BuildConfig(model=ModelConfig(path={str(tiny_model_dir)!r}, device='cpu'), progress=False))\n"
        "assert 'ray' not in sys.modules, 'ray imported'\nprint('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.ray
def test_ray_scans_read_int8_stores_natively(stores, tmp_path):
    """An int8 store (converted from the local one): the Ray audit and exact query equal the single-process ones."""
    from forvalue.api import run_query
    from forvalue.audit import run_audit
    from forvalue.indexer.convert import convert_store

    store = tmp_path / "int8"
    convert_store(stores["local"], store, hidden_dtype="int8", int8_block=0, progress=False)
    val = write_jsonl(tmp_path / "val.jsonl", _val())
    cfg = AuditConfig(progress=False, device="cpu", flag_by="mean", read_rows=7)
    a = run_audit(store, _val(), "local", cfg)
    b = run_audit(store, _val(), "ray", cfg, engine=RAY)
    assert (a.form, a.n_train, a.flagged) == (b.form, b.n_train, b.flagged)
    q = QueryConfig(progress=False, device="cpu", read_rows=7)
    single = run_query(store, [val], q, keep_scores=True)
    ray = run_query(store, [val], q, keep_scores=True, engine=RAY)
    np.testing.assert_allclose(ray.scores, single.scores, rtol=1e-9)
    f16 = run_query(stores["local"], [val], q, keep_scores=True)
    assert not np.array_equal(single.scores, f16.scores)  # int8 values were scored, not float16 ones
