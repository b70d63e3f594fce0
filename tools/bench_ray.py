"""Benchmark of ``--engine ray`` on one machine: build throughput and Ray's fixed costs (issue 14).

On the real default model (SmolLM2-135M-Instruct) and ``--samples`` rows of the paper's three
generated tasks, each configuration builds a fresh store from the same rows:

- ``plain``: the single-process build (:func:`forvalue.build_index`), ``--threads`` torch threads;
- ``ray 1 x T``: ``--engine ray`` with one actor of ``T = --threads`` CPUs (and torch threads);
- ``ray W x 1``: ``W = --threads`` actors of one CPU each.

Ray's fixed costs are timed apart: starting a local instance (``ray.init``), and a re-run of a
finished build (nothing to encode: the actors start and load the model, the driver reads the
stored ids). Then an audit of the plain store against ``--val`` validation rows, single-process
and on ``W`` Ray actors (both scans; on a store this small the Ray scan's time is its overhead).
The stores are built with ``write_every = --write-every`` and the default batch size, so every
configuration runs the same forward passes.

Usage::

    python -m tools.bench ray --out DIR [-- --samples 32 --threads 2]
    python -m tools.bench_ray [--samples 32] [--threads 2] [--out FILE]
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
    ap.set_defaults(threads=2)
    args = ap.parse_args(argv)

    import ray
    import torch

    from forvalue import AuditConfig, BuildConfig, EngineConfig, ModelConfig, build_index, run_audit
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


if __name__ == "__main__":
    main()
