"""Benchmark of ``--engine ray`` on one machine: build throughput and Ray's fixed costs (issue 14).

On the real default model (SmolLM2-135M-Instruct) and ``--samples`` rows of the paper's three
generated tasks, each configuration builds a fresh store from the same rows:

- ``plain``: the single-process build (:func:`forvalue.build`), ``--threads`` torch threads;
- ``ray 1 x T``: ``--engine ray`` with one actor of ``T = --threads`` CPUs (and torch threads);
- ``ray W x 1``: ``W = --threads`` actors of one CPU each.

Ray's fixed costs are timed apart: starting a local instance (``ray.init``), and a re-run of a
finished build (nothing to encode: the actors start and load the model, the driver reads the
stored ids). Then an audit of the plain store against ``--val`` validation rows, single-process
and on ``W`` Ray actors (both scans; on a store this small the Ray scan's time is its overhead).
The stores are built with ``write_every = --write-every`` and the default batch size, so every
configuration runs the same forward passes.

With ``--scan-store S`` (a store of ``tools.make_synthetic_store``, e.g. 10^6 rows) it times the audit
scan alone instead, with the validation encodings of the store's ``validation.npz`` (no model): a plain
read of the scoring columns, the single-process scan, and the scan on Ray with 1 worker x ``--threads``
threads and ``--threads`` workers x 1 thread (``ray.init`` timed apart), checking that every scan gives
the single-process scores.

Usage::

    python -m tools.bench ray --out DIR [-- --samples 32 --threads 2]
    python -m tools.bench_ray [--samples 32] [--threads 2] [--out FILE]
    python -m tools.bench_ray --scan-store S [--val 10] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from tools.common import add_common_args, emit, machine_info, md_table, quiet_transformers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_ray", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--samples", type=int, default=32, help="training rows built by each configuration")
    ap.add_argument("--val", type=int, default=10, help="validation rows of the audit")
    ap.add_argument("--write-every", type=int, default=16, help="samples per chunk / commit")
    ap.add_argument("--scan-store", type=Path, default=None, help="time only the audit scan of this synthetic store")
    ap.set_defaults(threads=2)
    args = ap.parse_args(argv)
    if args.scan_store is not None:
        return scan_main(args)

    import ray
    import torch

    from forvalue import AuditConfig, BuildConfig, EngineConfig, ModelConfig
    from forvalue.audit import run_audit
    from forvalue.indexer.build import build_index
    from tools.bench_build import make_rows

    quiet_transformers()
    torch.set_num_threads(args.threads)
    rows = make_rows(args.samples + args.val)
    train, val = rows[: args.samples], rows[args.samples :]
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        import json

        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in train))
        cfg = BuildConfig(model=ModelConfig(device=args.device), write_every=args.write_every, progress=False)
        results = []

        def build(name: str, store: Path, engine=None) -> float:
            t = time.perf_counter()
            report = build_index([data], store, cfg, engine=engine)
            seconds = time.perf_counter() - t
            results.append(
                (name, report.written, f"{seconds:.1f}", f"{report.written / seconds:.2f}" if report.written else "-")
            )
            print(f"{name}: {report.written} samples in {seconds:.1f} s", flush=True)
            return seconds

        build(f"plain (1 process x {args.threads} threads)", work / "plain")
        t = time.perf_counter()
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
        init_seconds = time.perf_counter() - t
        print(f"ray.init: {init_seconds:.1f} s", flush=True)
        one = EngineConfig(engine="ray", workers=1, cpus_per_worker=args.threads)
        many = EngineConfig(engine="ray", workers=args.threads, cpus_per_worker=1)
        build(f"ray 1 worker x {args.threads} threads", work / "ray1", one)
        build(f"ray {args.threads} workers x 1 thread", work / "rayW", many)
        rerun = build(f"ray {args.threads} workers, re-run (nothing new)", work / "rayW", many)

        audit_rows = []
        for name, engine in (("single process", None), (f"ray {args.threads} workers x 1 thread", many)):
            t = time.perf_counter()
            s = run_audit(
                work / "plain",
                val,
                f"bench-{len(audit_rows)}",
                AuditConfig(progress=False, device=args.device),
                engine=engine,
            )
            audit_rows.append((name, s.n_train, f"{time.perf_counter() - t:.1f}", f"{s.scan_seconds:.1f}", s.form))
            print(f"audit {name}: {s.scan_seconds:.1f} s scan", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = "\n\n".join(
        [
            f"Build of {args.samples} generated rows (the three paper tasks), SmolLM2-135M-Instruct, CPU, "
            f"write_every {args.write_every}, default batch size:",
            md_table(["configuration", "written", "seconds", "samples/s"], results),
            f"Ray's fixed costs: `ray.init` of a local instance (num_cpus={args.threads}) {init_seconds:.1f} s; "
            f"a re-run with nothing new (actors start, load the model; the driver reads the stored ids) {rerun:.1f} s.",
            f"Audit of the plain store against {args.val} validation rows:",
            md_table(["audit", "training rows", "total seconds", "scan seconds", "form"], audit_rows),
            f"Command: python -m tools.bench ray --out DIR -- --samples {args.samples} --threads {args.threads}",
            machine_info(args.device),
        ]
    )
    emit(text, args.out)


def scan_main(args) -> None:
    """The audit scan of a synthetic store: plain read, single process, Ray 1 x T and T x 1."""
    import numpy as np
    import ray
    import torch

    from forvalue import EngineConfig
    from forvalue.engine.ray_scan import ray_audit_scan
    from forvalue.engine.scan import audit_scan
    from forvalue.storage.store import Store
    from tools.bench_gform import load_validation, plain_read

    torch.set_num_threads(args.threads)
    store = Store.open(args.scan_store)
    val, labels = load_validation(args.scan_store / "validation.npz", args.val)
    n = store.count()
    read_s, read_cpu, tokens = plain_read(store, 1024, decode=False)
    print(f"plain read: {read_s:.1f} s ({tokens:,} tokens)", flush=True)
    rows = [("plain read of the scoring columns", f"{read_s:.1f}", f"{n / read_s:,.0f}", "-")]
    t = time.perf_counter()
    ref = audit_scan(store, val, labels, [], "cpu", form="gform")
    single = time.perf_counter() - t
    rows.append(("single process (G-form)", f"{single:.1f}", f"{n / single:,.0f}", "-"))
    print(f"single process: {single:.1f} s", flush=True)
    t = time.perf_counter()
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_seconds = time.perf_counter() - t
    try:
        for name, engine in (
            (
                f"ray 1 worker x {args.threads} threads",
                EngineConfig(engine="ray", workers=1, cpus_per_worker=args.threads),
            ),
            (
                f"ray {args.threads} workers x 1 thread",
                EngineConfig(engine="ray", workers=args.threads, cpus_per_worker=1),
            ),
        ):
            t = time.perf_counter()
            got = ray_audit_scan(store, val, labels, [], "cpu", engine, form="gform")
            seconds = time.perf_counter() - t
            if got.ids != ref.ids:
                raise SystemExit(f"{name}: the rows differ from the single-process scan")
            diff = float(np.max(np.abs(got.mean - ref.mean)) / max(np.max(np.abs(ref.mean)), 1e-30))
            rows.append((name, f"{seconds:.1f}", f"{n / seconds:,.0f}", f"{diff:.1e}"))
            print(f"{name}: {seconds:.1f} s, max rel diff {diff:.1e}", flush=True)
    finally:
        ray.shutdown()
    m = store.manifest
    text = "\n\n".join(
        [
            f"Audit scan of {args.scan_store} ({n:,} samples, {tokens:,} tokens, d={m.hidden_size}, hidden "
            f"{m.hidden_dtype}) against its first {args.val} validation samples (mean aggregate, G-form, encodings "
            "cached: no model); seconds are wall time, Ray's include the actors' start:",
            md_table(["scan", "seconds", "samples/s", "max rel diff vs single"], rows),
            f"`ray.init` of a local instance (num_cpus={args.threads}): {init_seconds:.1f} s (not in the rows). "
            f"Command: python -m tools.bench_ray --scan-store S --val {args.val} --threads {args.threads}",
            machine_info("cpu"),
        ]
    )
    emit(text, args.out)


if __name__ == "__main__":
    main()
