"""Every docstring example of the product runs, against a tiny store built here (no ``+SKIP`` anywhere).

Each module's examples run in a fresh working folder with these names: ``forvalue``, ``np``,
``model_path`` (the tiny offline model), ``store_path`` (a copy of a 12-sample store built with it),
``train_path`` (its data) and ``validation_path`` (2 validation samples).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

import forvalue

PRODUCT_FOLDERS = ("query", "indexer", "storage", "schemas")
ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    """Every module of the package, the stage subpackages included (they live in their own folders)."""
    import forvalue.indexer
    import forvalue.schemas
    import forvalue.storage

    names = {"forvalue", "forvalue.indexer", "forvalue.schemas", "forvalue.storage"}
    for package in (forvalue, forvalue.indexer, forvalue.schemas, forvalue.storage):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):
                names.add(info.name)
    return sorted(names)


def _examples() -> list[str]:
    """Modules whose docstrings hold at least one example."""
    out = []
    finder = doctest.DocTestFinder()
    for name in _modules():
        if any(t.examples for t in finder.find(importlib.import_module(name))):
            out.append(name)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    from forvalue.indexer.build import build_index
    from forvalue.schemas.config import BuildConfig, ModelConfig

    rows = []
    for i in range(6):
        rows.append({"id": f"rev-{i}", "prompt": f"reverse the words {i}: the quick fox ->", "response": " fox quick"})
        rows[-1]["label"] = "reverse"
        rows.append({"id": f"math-{i}", "prompt": f"solve {i} ->", "response": f" answer {i * 7}", "label": "math"})
    root = tmp_path_factory.mktemp("doc")
    train = write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "val.jsonl", [dict(rows[0], id="v0"), dict(rows[1], id="v1")])
    cfg = BuildConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False)
    build_index([train], root / "store", cfg)
    return root, str(tiny_model_dir)


def test_no_example_is_skipped():
    """An example that never runs can be wrong without anyone noticing (one was)."""
    skipped = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in PRODUCT_FOLDERS
        for path in (ROOT / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "doctest: +SKIP" in line
    ]
    assert not skipped, skipped


def test_examples_are_found():
    names = _examples()
    expected = ("forvalue", "forvalue.store", "forvalue.metrics", "forvalue.api", "forvalue.distill")
    for expected in expected + ("forvalue.storage.files", "forvalue.schemas.config", "forvalue.indexer.build"):
        assert expected in names


@pytest.mark.parametrize("module", _examples())
def test_docstring_examples_run(module, built, tmp_path, monkeypatch):
    root, model_path = built
    shutil.copytree(root / "store", tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    globs = {
        "forvalue": forvalue,
        "np": np,
        "model_path": model_path,
        "store_path": str(tmp_path / "store"),
        "train_path": str(root / "train.jsonl"),
        "validation_path": str(root / "val.jsonl"),
    }
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(mod, globs=dict(globs, **vars(mod)) if module != "forvalue" else dict(globs)):
        test.globs.update(globs)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module} failed (output above)"
