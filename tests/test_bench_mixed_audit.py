"""tools.bench_mixed_audit on the tiny offline model: the suite runs end to end, its audits find every validation
encoding cached, and its side-by-side G-form table agrees between the gather and the pairs."""

from __future__ import annotations

import json
import re

from tools import bench_mixed_audit as bm


def test_mixed_audit_suite_on_the_tiny_model(tiny_model_dir, tmp_path):
    work, out = tmp_path / "w", tmp_path / "mixed.md"
    args = ["--workdir", str(work), "--model", str(tiny_model_dir), "--per-class", "1", "--sizes", "2", "6"]
    assert bm.main([*args, "--reps", "1", "--forms", "--out", str(out)]) == 0
    text = out.read_text()
    sizes = [int(m) for m in re.findall(r"^\| (\d+) \| \d+ \| (?:token|gform) \|", text, re.M)]
    assert sizes == [2, 6]
    diffs = [float(d) for d in re.findall(r"\| ([0-9.]+e[-+]\d+) \|$", text, re.M)]
    assert len(diffs) == 2 and max(diffs) < 1e-5  # gather and pairs: the same scores
    res = json.loads((work / "result.json").read_text())
    assert set(res["fresh"]) == {"2", "6"} and all(m["rc"] == 0 for v in res["fresh"].values() for m in v)
    assert all(r["scan"] >= 0 and r["form"] in ("token", "gform") for v in res["inproc"].values() for r in v)
    # the validation sets are nested and mix the three tasks; the store is reused by a second run
    v6 = [json.loads(line) for line in (work / "val_6.jsonl").read_text().splitlines()]
    v2 = [json.loads(line) for line in (work / "val_2.jsonl").read_text().splitlines()]
    assert v6[:2] == v2 and len({r["label"].split("/")[0] for r in v6}) >= 2
    built = (work / "store.done.json").read_text()
    assert bm.main([*args, "--reps", "1"]) == 0
    assert (work / "store.done.json").read_text() == built
