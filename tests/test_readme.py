"""The README's Python block runs as written (on the tiny offline model instead of SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import write_jsonl

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    text = README.read_text()
    start = text.index("Python API (`import forvalue`)")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_python_block_runs(tmp_path, monkeypatch, tiny_model_dir, toy_rows, capsys):
    code = _python_block()
    assert "forvalue.build(" in code and "st.query(" in code and "st.audit(" in code
    write_jsonl(tmp_path / "train.jsonl", toy_rows[:8])
    write_jsonl(tmp_path / "more.jsonl", toy_rows[8:])
    write_jsonl(tmp_path / "val.jsonl", [dict(toy_rows[0], id="v0"), dict(toy_rows[1], id="v1")])
    monkeypatch.chdir(tmp_path)
    # the one change: the tiny offline model instead of the default SmolLM2
    tiny = f"forvalue.BuildConfig(model=forvalue.ModelConfig(path={str(tiny_model_dir)!r}), "
    code = code.replace("forvalue.BuildConfig(", tiny, 1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    st = scope["st"]
    assert len(st) == len(toy_rows)
    assert scope["result"].scores.shape == (2, len(toy_rows))
    assert (tmp_path / "subset.jsonl").read_text().count("\n") == len(toy_rows) // 2
    assert (tmp_path / "why.html").stat().st_size > 0
    assert "StoreInfo(runs/store: 12 samples" in capsys.readouterr().out
    small = scope["small"]
    assert small.manifest.hidden_dtype == "int8" and len(small) == len(toy_rows) and small.check().clean
