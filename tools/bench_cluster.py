"""Benchmark of a store on an object store and of a two-node Ray cluster on this machine (issue 30).

Starts a local S3-compatible server (moto, :mod:`tools.moto_server`; it keeps objects in memory, so
its rates stand for S3's API through the network stack, not for S3's bandwidth), then:

1. **One node vs two nodes.** The same ``--samples`` generated rows (the paper's three tasks, the
   real SmolLM2-135M-Instruct) are built into an ``s3://`` store with ``--engine ray``, 2 workers x 1
   thread, on (a) one Ray node with 2 CPUs and (b) two Ray nodes of 1 CPU each
   (``ray.cluster_utils.Cluster``: two raylets, the actors spread over both); then an audit and an
   exact query of that store on the same engine. Both runs must give the same rows, audit values
   and top-k. Same cores, same work: the ratio is the cost of spreading over nodes.
2. **Read rate: object store vs local disk.** A synthetic store of ``--read-rows`` rows
   (``tools.make_synthetic_store``, no model) is read in full (the scoring columns, as an audit's
   scan reads them) from its local folder and from its copy at ``s3://``, alternately, ``--reps``
   times each.

Usage::

    python -m tools.bench cluster --out DIR [-- --samples 24 --read-rows 20000]
    python -m tools.bench_cluster [--samples 24] [--read-rows 20000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.common import add_common_args, emit, human_bytes, machine_info, md_table, quiet_transformers


def _ray_run(label: str, engine, data: Path, val: list, uri: str, cfg) -> dict:
    """Build, audit and exact query of ``uri`` on the connected Ray; seconds of each and the results."""
    import forvalue
    from forvalue import AuditConfig, QueryConfig
    from forvalue.indexer.build import build_index

    out = {"label": label}
    t = time.perf_counter()
    report = build_index([data], uri, cfg, engine=engine)
    out["build"] = time.perf_counter() - t
    out["written"] = report.written
    st = forvalue.open(uri)
    t = time.perf_counter()
    audit = st.audit(val, "bench", AuditConfig(progress=False), engine=engine)
    out["audit"] = time.perf_counter() - t
    t = time.perf_counter()
    query = st.query(val, QueryConfig(top_k=5, exact=True, progress=False), engine=engine)
    out["query"] = time.perf_counter() - t
    out["ids"] = st.to_arrow(["id"]).column("id").to_pylist()
    out["audit_table"] = audit.to_arrow()
    out["top"] = query.top.column("train_id").to_pylist()
    print(f"{label}: build {out['build']:.1f} s, audit {out['audit']:.1f} s, query {out['query']:.1f} s", flush=True)
    return out


def cluster_part(args, work: Path, endpoint: str) -> str:
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from forvalue import BuildConfig, EngineConfig, ModelConfig
    from tools.bench_build import make_rows

    rows = make_rows(args.samples + args.val)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.samples]))
    val = rows[args.samples :]
    cfg = BuildConfig(model=ModelConfig(device="cpu"), write_every=args.write_every, progress=False)
    engine = EngineConfig(engine="ray", workers=2, cpus_per_worker=1)

    def one_node(k: int) -> tuple[dict, float]:
        t = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        init = time.perf_counter() - t
        try:
            return _ray_run(f"one node (2 CPUs), run {k}", engine, data, val, f"s3://bench/one-{k}", cfg), init
        finally:
            ray.shutdown()

    def two_nodes(k: int) -> tuple[dict, float]:
        t = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
        init = time.perf_counter() - t
        try:
            nodes = len([n for n in ray.nodes() if n["Alive"]])
            label = f"two nodes (1 CPU each, {nodes} alive), run {k}"
            return _ray_run(label, engine, data, val, f"s3://bench/two-{k}", cfg), init
        finally:
            ray.shutdown()
            cluster.shutdown()

    # ABBA order (one, two, two, one, ...): a load that drifts during the run weighs on both alike
    runs: dict[str, list] = {"one": [], "two": []}
    for k in range(args.cluster_reps):
        order = ("one", "two") if k % 2 == 0 else ("two", "one")
        for which in order:
            runs[which].append(one_node(k) if which == "one" else two_nodes(k))
    one, init_one = runs["one"][0]
    two, init_two = runs["two"][0]
    if one["ids"] != two["ids"] or one["top"] != two["top"]:
        raise SystemExit("the two runs stored or ranked different rows")
    a, b = one["audit_table"], two["audit_table"]
    ref = np.asarray(a.column("score_mean").to_numpy())
    diff = float(np.max(np.abs(np.asarray(b.column("score_mean").to_numpy()) - ref)) / max(np.max(np.abs(ref)), 1e-30))
    for which in ("one", "two"):
        for r, _ in runs[which]:
            if r["ids"] != one["ids"] or r["top"] != one["top"]:
                raise SystemExit("the runs stored or ranked different rows")
    table = md_table(
        ["Ray", "samples written", "build s", "audit s", "exact query s"],
        [
            (r["label"], r["written"], f"{r['build']:.1f}", f"{r['audit']:.1f}", f"{r['query']:.1f}")
            for which in ("one", "two")
            for r, _ in runs[which]
        ],
    )

    def mean(which: str, key: str) -> float:
        return sum(r[key] for r, _ in runs[which]) / len(runs[which])

    ratios = ", ".join(f"{key} {mean('two', key) / mean('one', key):.2f}x" for key in ("build", "audit", "query"))
    return "\n\n".join(
        [
            f"Build of {args.samples} generated rows (SmolLM2-135M-Instruct, CPU, write_every {args.write_every}) into "
            f"an s3:// store on the local moto server, then an audit and an exact top-5 query against {args.val} "
            f"validation rows, all with --engine ray, 2 workers x 1 thread; {args.cluster_reps} run(s) of each "
            "configuration in ABBA order:",
            table,
            f"Two nodes / one node (means): {ratios} the time. Same ids in the same order and the same top-5 in "
            f"every run; audit values max relative difference {diff:.1e}. Starting Ray (not in the rows): one node "
            f"{init_one:.1f} s, two-node cluster {init_two:.1f} s.",
        ]
    )


def read_part(args, work: Path) -> str:
    import pyarrow.fs as pafs

    from forvalue.storage.location import store_location
    from forvalue.storage.store import Store
    from tools.bench_gform import plain_read

    local = work / "synth"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.make_synthetic_store",
            "--out",
            str(local),
            "--rows",
            str(args.read_rows),
            "--sketch-dim",
            "0",
            "--n-val",
            "2",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    remote = store_location("s3://bench/synth")
    t = time.perf_counter()
    pafs.copy_files(str(local), remote.fs_path, destination_filesystem=remote.fs)
    upload = time.perf_counter() - t
    size = sum(f.stat().st_size for f in (local / "samples.lance").rglob("*") if f.is_file())
    times: dict[str, list[float]] = {"local disk": [], "s3:// (moto)": []}
    tokens = 0
    for _ in range(args.reps):
        for name, where in (("local disk", local), ("s3:// (moto)", remote)):
            store = Store.open(where)
            seconds, _cpu, tokens = plain_read(store, 1024, decode=False)
            times[name].append(seconds)
            print(f"read {name}: {seconds:.2f} s", flush=True)
    rows = []
    for name, ts in times.items():
        best = min(ts)
        rows.append(
            (
                name,
                " / ".join(f"{t:.2f}" for t in ts),
                f"{args.read_rows / best:,.0f}",
                f"{size / best / 1e6:,.0f}",
            )
        )
    ratio = min(times["s3:// (moto)"]) / min(times["local disk"])
    return "\n\n".join(
        [
            f"Full read of the scoring columns of a synthetic store ({args.read_rows:,} samples, {tokens:,} scored "
            f"tokens, d = 256, float16 hidden, {human_bytes(size)} of Lance data), as an audit's scan reads them "
            f"(no scoring), alternately from the local folder and from its copy on the moto server (upload "
            f"{upload:.1f} s); rates from the best of {args.reps}:",
            md_table(["store", "seconds (each rep)", "samples/s", "MB/s"], rows),
            f"The object store took {ratio:.2f}x the local disk's time.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_cluster", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--samples", type=int, default=24, help="training rows built by each Ray configuration")
    ap.add_argument("--val", type=int, default=5, help="validation rows of the audit and query")
    ap.add_argument("--write-every", type=int, default=8, help="samples per chunk / commit")
    ap.add_argument("--read-rows", type=int, default=20000, help="rows of the synthetic store read (0: skip)")
    ap.add_argument("--reps", type=int, default=3, help="reads of each store in the read-rate part")
    ap.add_argument("--skip-cluster", action="store_true", help="only the read-rate part")
    ap.add_argument("--cluster-reps", type=int, default=1, help="runs of each Ray configuration (ABBA order)")
    args = ap.parse_args(argv)

    from tools import moto_server

    quiet_transformers()
    proc, endpoint = moto_server.start()
    os.environ.update(moto_server.s3_env(endpoint))
    moto_server.make_bucket(endpoint, "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        parts = []
        if not args.skip_cluster:
            parts.append(cluster_part(args, work, endpoint))
        if args.read_rows:
            parts.append(read_part(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        proc.terminate()
    load = os.getloadavg()[0]
    parts.append(
        f"Command: python -m tools.bench_cluster --samples {args.samples} --read-rows {args.read_rows} "
        f"--reps {args.reps} --cluster-reps {args.cluster_reps}; load average at the end {load:.1f}."
    )
    parts.append(machine_info("cpu"))
    emit("\n\n".join(parts), args.out)


if __name__ == "__main__":
    main()
