"""Benchmark of start-up: wall time of the commands that load no model, and what their imports cost.

Builds a small store with the tiny offline model (``tools.tiny_models``; the store's contents do
not matter here), runs an audit on it, then times each light command ``--reps`` times in a fresh
process (``forvalue index info``, ``index check``, ``audit list``, ``audit show``, ``select``,
``--help``) next to ``python -c pass`` and the bare imports of the heavy libraries the light
commands avoid (torch, transformers, lancedb). Also lists the slowest imports of ``forvalue
index info`` (``python -X importtime``). The goal (issue 12): every light command under 1 s.

Usage::

    python -m tools.bench startup --out DIR [-- --reps 5]
    python -m tools.bench_startup [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.common import START_LOAD, _loadavg, cpu_model, emit, md_table


def _forvalue(*args: str) -> list[str]:
    return [sys.executable, "-m", "forvalue", *args]


def _time(cmd: list[str], reps: int) -> tuple[float, float]:
    """Median and min wall seconds of ``reps`` runs of ``cmd`` (each must exit 0)."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return statistics.median(times), min(times)


def slowest_imports(cmd_args: list[str], n: int = 8) -> list[tuple[str, float]]:
    """The ``n`` top-level packages with the largest cumulative import time (seconds) under ``-X importtime``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "forvalue", *cmd_args], capture_output=True, text=True
    )
    by_package: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if not cumulative.isdigit() or name.startswith(" "):
            continue
        if name == name.lstrip():  # a module imported at top level of the tree (no indentation)
            top = name.split(".")[0]
            by_package[top] = by_package.get(top, 0.0) + int(cumulative) / 1e6
    return sorted(by_package.items(), key=lambda kv: -kv[1])[:n]


def make_store(work: Path) -> Path:
    """A 40-sample store of the tiny model with one audit ``a``; returns the store path."""
    from forvalue.audit import run_audit
    from forvalue.indexer.build import build_index
    from forvalue.schemas.config import AuditConfig, BuildConfig, ModelConfig
    from tools.tiny_models import make_model_dir

    model = make_model_dir(work / "model")
    rows = [
        {"id": f"s{i}", "prompt": f"question {i} ->", "response": f" answer {i % 7}", "label": f"c{i % 3}"}
        for i in range(40)
    ]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    config = BuildConfig(model=ModelConfig(path=str(model), device="cpu"), progress=False)
    build_index([work / "train.jsonl"], work / "store", config)
    run_audit(work / "store", [work / "val.jsonl"], "a", AuditConfig(progress=False, device="cpu"))
    return work / "store"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_startup", description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="runs per command (median reported)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fv-startup-"))
    try:
        store = str(make_store(work))
        subset = str(work / "subset.jsonl")
        commands = [
            ("python -c pass (interpreter floor)", [sys.executable, "-c", "pass"]),
            ("forvalue --help", _forvalue("--help")),
            ("forvalue index info", _forvalue("index", "info", "--store", store)),
            ("forvalue index check", _forvalue("index", "check", "--store", store)),
            ("forvalue audit list", _forvalue("audit", "list", "--store", store)),
            ("forvalue audit show", _forvalue("audit", "show", "--store", store, "a")),
            (
                "forvalue select --top 50%",
                _forvalue("select", "--store", store, "--audit", "a", "--top", "50%", "-o", subset),
            ),
            ("import torch (avoided)", [sys.executable, "-c", "import torch"]),
            ("import transformers (avoided)", [sys.executable, "-c", "import transformers"]),
            ("import lancedb (avoided)", [sys.executable, "-c", "import lancedb"]),
            ("import lance (used)", [sys.executable, "-c", "import lance"]),
        ]
        rows = []
        for label, cmd in commands:
            med, best = _time(cmd, args.reps)
            rows.append((label, f"{med:.2f}", f"{best:.2f}"))
            print(f"{label}: median {med:.2f} s, min {best:.2f} s", file=sys.stderr, flush=True)
        imports = slowest_imports(["index", "info", "--store", store])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = "\n\n".join(
        [
            "## Start-up of the commands that load no model",
            f"`python -m tools.bench startup` ({args.reps} runs per command, each a fresh process; median and min).",
            md_table(["command", "median s", "min s"], rows),
            "Slowest top-level imports of `forvalue index info` (`python -X importtime`, cumulative; the "
            "instrumentation itself inflates these):",
            md_table(["package", "s"], [(name, f"{sec:.3f}") for name, sec in imports]),
            f"Machine: cores {os.cpu_count()}, CPU {cpu_model()}, python {sys.version.split()[0]}, "
            f"load avg (1/5/15 min) at start {START_LOAD}, at end {_loadavg()}.",
        ]
    )
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
