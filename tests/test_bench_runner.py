"""The benchmark runner ``python -m tools.bench``: listing, usage errors, and one small suite end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tools import bench

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m tools.bench ARGS`` in a fresh interpreter, from the repository root as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "tools.bench", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_list_names_every_suite_with_its_runtime():
    proc = run_bench("--list")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line and not line[0].isspace()][1:]
    assert listed == list(bench.SUITES)
    for name in (
        "build",
        "query",
        "quality",
        "top_m",
        "store_size",
        "prefilter",
        "sketch_real",
        "audit",
        "vlm",
        "probe",
        "offsets",
        "distill",
    ):
        assert name in bench.SUITES
    assert proc.stdout.count("runtime: ") == len(bench.SUITES)


def test_every_suite_module_exists():
    import importlib.util

    for name, suite in bench.SUITES.items():
        assert importlib.util.find_spec(f"tools.{suite.module}") is not None, name


def test_unknown_suite_is_a_one_line_error(tmp_path):
    proc = run_bench("query", "no_such_suite", "--out", tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "no_such_suite" in err, err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_missing_out_is_a_one_line_error():
    proc = run_bench("offsets")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "--out" in err, err


def test_suite_help_is_the_suites_own():
    proc = run_bench("offsets", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "python -m tools.analyse_offsets" in proc.stdout and "--method" in proc.stdout


def test_suite_args_fill_in_outputs_unless_given(tmp_path):
    quality = bench.SUITES["quality"]
    assert bench.suite_args("quality", quality, tmp_path, ["--repro", "none"]) == [
        "--repro",
        "none",
        "--out",
        str(tmp_path / "quality.md"),
        "--json",
        str(tmp_path / "quality.json"),
    ]
    given = ["--out=x.md", "--json", "y.json"]
    assert bench.suite_args("quality", quality, tmp_path, given) == given
    sketch = bench.SUITES["sketch_real"]
    assert bench.suite_args("sketch_real", sketch, tmp_path, [])[-2:] == [
        "--workdir",
        str(tmp_path / "sketch_real.work"),
    ]


def _fake_quality_workdir(root: Path) -> Path:
    """One task folder as the quality suite leaves it: rows, and a method folder with scores + result.json."""
    task = root / "work" / "toy"
    (task / "forvalue").mkdir(parents=True)
    train = [{"id": f"t{i}", "label": "ab"[i % 2]} for i in range(6)]
    val = [{"id": f"v{j}", "label": "ab"[j % 2]} for j in range(2)]
    (task / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    rng = np.random.default_rng(0)
    same = np.array([[v["label"] == t["label"] for t in train] for v in val], float)
    np.save(task / "forvalue" / "scores-0.npy", same + 0.1 * rng.random(same.shape))
    (task / "forvalue" / "result.json").write_text(
        json.dumps({"outputs": {"forvalue": {"file": "scores-0.npy"}}, "train_ids": [r["id"] for r in train]})
    )
    return root / "work"


def test_runner_writes_the_suites_markdown_under_out(tmp_path):
    workdir = _fake_quality_workdir(tmp_path)
    out = tmp_path / "results"
    proc = run_bench("offsets", "--out", out, "--", workdir)
    assert proc.returncode == 0, proc.stderr
    text = (out / "offsets.md").read_text()
    assert "| toy | raw |" in text and text in proc.stdout + "\n"


def test_failing_suite_gives_exit_1(tmp_path):
    proc = run_bench("offsets", "--out", tmp_path, "--", tmp_path / "missing")
    assert proc.returncode == 1
    assert "offsets" in proc.stderr.strip().splitlines()[-1]
