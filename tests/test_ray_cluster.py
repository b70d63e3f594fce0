"""Two Ray nodes on this machine, a store on an S3-compatible server: build, audit and exact query across nodes.

``ray.cluster_utils.Cluster`` starts a head node and a worker node (separate raylets, each with its own
CPUs, as two machines would have); the actors are spread over both (``scheduling_strategy="SPREAD"``)
and reach the store only through the object store (moto, tests/s3_server.py): nothing is shared through
a local folder but the model files. Results must equal a local single-process build, audit and query.
A worker node removed mid-build: its actor is restarted on the head and its chunk retried, the build
ends complete with no sample twice.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import BUCKET, word_rows, word_val, write_jsonl

from forvalue.schemas.config import AuditConfig, BuildConfig, EncodeConfig, EngineConfig, ModelConfig, QueryConfig

pytestmark = pytest.mark.ray

ENCODE = EncodeConfig(sketch_dim=256, sketch_vocab_buckets=64, sketch_hidden_cols=4)
TWO = EngineConfig(engine="ray", workers=2)


_rows, _val = word_rows, word_val


def _config(model, write_every: int = 32, batch_size: int = 4, sketch: bool = True) -> BuildConfig:
    return BuildConfig(
        model=ModelConfig(path=str(model), device="cpu"),
        encode=ENCODE if sketch else EncodeConfig(sketch_dim=0),
        batch_size=batch_size,
        write_every=write_every,
        progress=False,
    )


@pytest.fixture(scope="module")
def cluster(s3):
    """A head node (2 CPUs) and a worker node (1 CPU, resource ``node_b``), joined by this process."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"node_a": 1},
            "include_dashboard": False,
            # a removed node is noticed in ~1 s, not the default ~30 s
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2},
        },
    )
    worker = c.add_node(num_cpus=1, resources={"node_b": 1})
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield {"ray": ray, "cluster": c, "worker": worker}
    ray.shutdown()
    c.shutdown()


def _busy_nodes(ray) -> set[str]:
    """Ids of the nodes where some of the CPUs are taken now (by our actors: nothing else runs on the cluster)."""
    from ray._private import state

    total, free = state.total_resources_per_node(), state.available_resources_per_node()
    return {node for node, res in total.items() if free.get(node, {}).get("CPU", 0.0) < res.get("CPU", 0.0)}


def test_two_nodes_build_audit_query_equal_single_process(cluster, tmp_path, tiny_model_dir):
    import forvalue
    from forvalue.indexer.build import build_index

    ray = cluster["ray"]
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    data = write_jsonl(tmp_path / "train.jsonl", _rows(48))
    val = write_jsonl(tmp_path / "val.jsonl", _val())
    build_index([data], tmp_path / "local", _config(tiny_model_dir))  # single process, local folder
    uri = f"s3://{BUCKET}/cluster/s1"
    seen: set[str] = set()
    stop = threading.Event()

    def watch():  # which nodes the encoding actors run on, while the build runs
        while not stop.is_set():
            seen.update(_busy_nodes(ray))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        report = build_index([data], uri, _config(tiny_model_dir), engine=TWO)
    finally:
        stop.set()
        watcher.join()
    assert report.written == report.total_rows == 48
    local, remote = forvalue.open(tmp_path / "local"), forvalue.open(uri)
    a, b = local.to_arrow(), remote.to_arrow()
    assert a.equals(b)  # same ids, same order, same text columns
    assert len(seen) == 2, seen  # the encoding actors held CPUs on both nodes
    # audit and exact query on the two nodes, against the single-process ones on the local store
    audit_l = local.audit(str(val), "v1", AuditConfig(progress=False)).to_arrow()
    audit_r = remote.audit(str(val), "v1", AuditConfig(progress=False), engine=TWO).to_arrow()
    assert audit_l.column("id").to_pylist() == audit_r.column("id").to_pylist()
    for name in ("score_mean", "score_max"):
        np.testing.assert_allclose(audit_r.column(name).to_numpy(), audit_l.column(name).to_numpy(), rtol=1e-4)
    cfg = QueryConfig(top_k=5, exact=True, progress=False)
    q_l, q_r = local.query(str(val), cfg), remote.query(str(val), cfg, engine=TWO)
    assert q_l.top.column("train_id").to_pylist() == q_r.top.column("train_id").to_pylist()
    np.testing.assert_allclose(q_r.top.column("score").to_numpy(), q_l.top.column("score").to_numpy(), rtol=1e-4)
    assert remote.check().clean


def test_worker_node_removed_mid_build(cluster, tmp_path, tiny_model_dir):
    """The worker node dies while the build runs: the build finishes on the head node, every sample once."""
    import lance

    from forvalue.indexer.build import build_index
    from forvalue.storage.location import lance_options, store_location

    n = 240  # enough chunks that the build still runs when the first commits land
    data = write_jsonl(tmp_path / "train.jsonl", _rows(n))
    uri = f"s3://{BUCKET}/cluster/killed"
    result: dict = {}

    def run():
        try:
            result["report"] = build_index(
                [data], uri, _config(tiny_model_dir, write_every=4, batch_size=2, sketch=False), engine=TWO
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    table = str(store_location(uri) / "samples.lance")
    options = lance_options(store_location(uri))
    driver = threading.Thread(target=run)
    driver.start()
    removed = False
    deadline = time.monotonic() + 300
    while driver.is_alive() and time.monotonic() < deadline and not removed:
        try:
            committed = lance.dataset(table, storage_options=options).count_rows()
        except (OSError, ValueError, RuntimeError):
            committed = 0
        if committed >= 8:
            cluster["cluster"].remove_node(cluster["worker"], allow_graceful=False)
            removed = True
        time.sleep(0.1)
    driver.join(max(1.0, deadline - time.monotonic()))
    assert removed, "the build ended before the worker node could be removed"
    assert not driver.is_alive(), "the build did not finish after the node was removed"
    assert "error" not in result, result.get("error")
    report = result["report"]
    ids = lance.dataset(table, storage_options=options).to_table(columns=["id"]).column(0).to_pylist()
    assert report.written == report.total_rows == n
    assert len(ids) == len(set(ids)) == n
