"""The peers suite (tools.bench_peers, issue 29) without installing Bergson (CI must not download 6 GB):
its measuring, metrics, Bergson store parsing and report, the harder task, and the whole suite on the tiny
model with a stand-in ``bergson build`` that writes Bergson's store layout (info.json + gradients.bin)."""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest

from tools import bench_peers as bp
from tools.generate_tasks import SHARED_TEMPLATE_PROMPT, shared_template_task


def test_run_measured_reports_the_childs_own_peak_memory_and_exit_status(tmp_path):
    big = bp.run_measured(
        [
            sys.executable,
            "-c",
            "import time; x = bytearray(200_000_000); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.5)",
        ],
        tmp_path / "a.log",
    )
    small = bp.run_measured([sys.executable, "-c", "pass"], tmp_path / "b.log")
    assert big["rc"] == 0 and big["peak_rss"] >= 200_000_000 > small["peak_rss"]
    assert big["cpu"] >= 0 and big["wall"] > 0
    failed = bp.run_measured([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "c.log")
    assert failed["rc"] == 3 and "boom" in (tmp_path / "c.log").read_text()
    with pytest.raises(RuntimeError, match="exit 3"):
        bp._check(failed, tmp_path / "c.log")


def test_detection_auc_uses_the_own_label_mean_and_falls_back_to_all():
    # 2 validation samples (labels a, b); train 0..3 with labels a, a, b, c; train 1 and 3 flipped
    scores = np.array([[5.0, 1.0, 0.0, 9.0], [0.0, 2.0, 4.0, -9.0]])
    # flags: 5, 1, 4, mean(9, -9) = 0 -> low flags (1, 0) are exactly the flipped ones
    assert bp.detection_auc(scores, ["a", "a", "b", "c"], ["a", "b"], [False, True, False, True]) == 1.0
    assert bp.detection_auc(-scores, ["a", "a", "b", "c"], ["a", "b"], [False, True, False, True]) == 0.0


def test_quality_switches_between_retrieval_and_detection():
    train = [{"label": "a"}, {"label": "a"}, {"label": "b"}]
    val = [{"label": "a"}]
    q = bp.quality(np.array([[3.0, 2.0, 1.0]]), train, val)
    assert q["auc_mean"] == 1.0 and q["recall_mean"] == 1.0 and "detect_auc" not in q
    flipped = [{**r, "flipped": f} for r, f in zip(train, (False, True, False))]
    assert set(bp.quality(np.array([[3.0, 2.0, 1.0]]), flipped, val)) == {"detect_auc"}


def test_matched_projection_and_cosine():
    # forvalue's 72.5 KB per math sample vs Bergson's 210 modules x P x P fp32: P = 9 (68 KB)
    assert bp.matched_projection(72_500, 210, 4) == 9
    assert bp.matched_projection(215_040, 210, 4) == 16
    c = bp.cosine(np.array([[2.0, -3.0]]), np.array([2.0]), np.array([1.0, 3.0]))
    assert c[0] == pytest.approx([1.0, -0.5])


def test_load_grads_reads_bergsons_layout(tmp_path):
    g = np.arange(12, dtype=np.float32).reshape(3, 4)
    g.tofile(tmp_path / "gradients.bin")
    info = {"num_grads": 3, "grad_sizes": {"m1": 1, "m2": 3}, "base_dtype": "float32"}
    (tmp_path / "info.json").write_text(json.dumps(info))
    assert np.array_equal(bp._load_grads(tmp_path), g.astype(np.float64))


def test_shared_template_task_hides_the_class_in_the_response_only():
    train, test = shared_template_task(3, 2, seed=1, n_classes=4)
    assert len(train) == 12 and len(test) == 8
    assert train == shared_template_task(3, 2, seed=1, n_classes=4)[0]
    assert train != shared_template_task(3, 2, seed=2, n_classes=4)[0]
    for r in train + test:
        assert r["prompt"] == SHARED_TEMPLATE_PROMPT.format(sentence=r["meta"]["sentence"])
    assert len({r["label"] for r in train}) == 4
    assert {r["prompt"] for r in test}.isdisjoint({r["prompt"] for r in train})
    assert train[0]["response"] == " ".join(reversed(train[0]["meta"]["sentence"].split()))
    with pytest.raises(ValueError):
        shared_template_task(1, 1, n_classes=11)


def test_render_tables_and_ratios():
    def tool(wall, rss, store, q):
        return {
            "build": {"wall": wall, "cpu": wall / 2, "peak_rss": rss, "store_bytes": store},
            "query": {"wall": wall / 10, "cpu": 1.0, "peak_rss": rss, **q},
        }

    fv = tool(10.0, 1e9, 2e6, {"auc_mean": 0.99, "recall_mean": 0.9})
    fv["cosine"] = {"auc_mean": 0.98, "recall_mean": 0.8}
    bg = tool(30.0, 4e9, 8e6, {"auc_mean": 0.97, "recall_mean": 0.7, "cos_auc_mean": 0.96, "cos_recall_mean": 0.6})
    text = bp.render([{"task": "t", "tools": {"forvalue": fv, "bergson P=16": bg}}], {"bergson": "2.5.1"})
    assert "| t | forvalue | 10.0 / 5.0 |" in text and "0.9900 / 0.9000 | 0.9800 / 0.8000 |" in text
    assert "0.9700 / 0.7000 | 0.9600 / 0.6000 |" in text
    assert "| t | bergson P=16 | 3.00x | 3.00x | 3.00x | 1.00x | 4.00x | 4.00x |" in text
    assert "bergson 2.5.1" in text


FAKE_BERGSON = """
import json, sys, hashlib
from pathlib import Path
import numpy as np
a = sys.argv[1:]
assert a[0] == "build", a
out = Path(a[1]); opts = dict(zip(a[2::2], a[3::2]))
p = int(opts["--projection_dim"]); rows = [json.loads(l) for l in open(opts["--dataset"])]
out.mkdir(parents=True, exist_ok=True)
g = np.zeros((len(rows), 3 * p * p), np.float32)
for n, r in enumerate(rows):
    for w in r["text"].split():
        g[n, int(hashlib.md5(w.encode()).hexdigest(), 16) % g.shape[1]] += 1
g.tofile(out / "gradients.bin")
sizes = {f"m{k}": p * p for k in range(3)}
(out / "info.json").write_text(json.dumps({"num_grads": len(rows), "grad_sizes": sizes, "base_dtype": "float32"}))
"""


def test_suite_on_the_tiny_model_with_a_stand_in_bergson(tiny_model_dir, tmp_path):
    fake = tmp_path / "fake"
    (fake / "bergson").mkdir(parents=True)
    (fake / "bergson" / "__init__.py").write_text("")
    (fake / "bergson" / "__main__.py").write_text(FAKE_BERGSON)
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nPYTHONPATH={fake} exec {sys.executable} "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "w"
    args = ["--workdir", str(work), "--model", str(tiny_model_dir), "--bergson-python", str(py)]
    args += ["--tasks", "mislabeled_math", "--n-train", "2", "--n-test", "1"]
    args += ["--projection", "4", "--out", str(tmp_path / "p.md"), "--json", str(tmp_path / "p.json")]
    assert bp.main(args) == 0
    res = json.loads((tmp_path / "p.json").read_text())["results"]
    assert [r["task"] for r in res] == ["mislabeled_math"]
    for r in res:
        tools = r["tools"]
        assert "forvalue" in tools and "bergson P=4" in tools
        assert r["n_train"] == 20 and r["n_val"] == 10
        b = tools["bergson P=4"]["build"]
        assert b["n_modules"] == 3 and b["itemsize"] == 4
        assert b["store_bytes"] >= 20 * 3 * 16 * 4  # gradients.bin at least
        matched = [t for t in tools if t.endswith("(matched)")]
        p = bp.matched_projection(tools["forvalue"]["build"]["store_bytes"] / 20, 3, 4)
        assert matched == ([f"bergson P={p} (matched)"] if p != 4 else [])
        for t in tools.values():
            assert t["build"]["wall"] > 0 and t["build"]["peak_rss"] > 0 and t["query"]["rc"] == 0
    assert 0.0 <= res[0]["tools"]["forvalue"]["query"]["detect_auc"] <= 1.0
    text = (tmp_path / "p.md").read_text()
    assert "| mislabeled_math | forvalue |" in text and "Bergson / forvalue" in text
    # resumed: every step from the work folder, nothing re-run (the logs keep their times)
    assert [p.name for p in (work / "results").iterdir()] == [
        f"mislabeled_math-2x1-seed0-noise0.2-{tiny_model_dir.name}"
    ]
    mtimes = {f: os.stat(f).st_mtime for f in (work / "results").rglob("*.json")}
    assert bp.main(args) == 0
    assert {f: os.stat(f).st_mtime for f in (work / "results").rglob("*.json")} == mtimes


def test_threads_reach_both_tools_children_and_key_the_cache(tmp_path):
    """--threads N sets OMP_NUM_THREADS for every measured child (CPU seconds are work, not spinning threads),
    and results at another thread count are cached apart."""
    import argparse

    def peers(threads):
        a = argparse.Namespace(workdir=tmp_path, model=str(tmp_path / "m"), threads=threads, n_train=2, n_test=1,
                               seed=0, noise=0.2)  # fmt: skip
        return bp.Peers(a, None)

    one, default = peers(1), peers(0)
    assert one._threads({"A": "b"}) == {"A": "b", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert default._threads({"A": "b"}) == {"A": "b"}
    assert one._fv_env()["OMP_NUM_THREADS"] == "1"
    assert one.tag("math_no_reasoning") != default.tag("math_no_reasoning")
