"""What a user installs: one ``forvalue`` package, a documented public API, no import circles, cheap imports."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

import forvalue

ROOT = Path(__file__).resolve().parents[1]


def _source_modules() -> dict[str, Path]:
    """Every module the distribution should ship, from pyproject's package list and package-dir map."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    where = setup["package-dir"]
    out = {}
    for package in setup["packages"]:
        parts = package.split(".")
        prefix = next(".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in where)
        folder = ROOT / where[prefix] / Path(*parts[len(prefix.split(".")) :])
        for file in folder.glob("*.py"):
            out[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return out


def test_every_source_folder_with_modules_is_a_listed_package():
    listed = {p.parent for p in _source_modules().values()}
    for top in ("query", "indexer", "storage", "schemas"):
        for init in (ROOT / top).rglob("__init__.py"):
            assert init.parent in listed, f"{init.parent} is a package folder missing from pyproject's packages"


def test_wheel_holds_only_the_forvalue_package(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves no build/ folder in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("query", "indexer", "storage", "schemas"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("forvalue-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    version = importlib.metadata.version("forvalue")
    assert tops == {"forvalue", f"forvalue-{version}.dist-info"}
    shipped = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    assert shipped == set(_source_modules())
    entry_points = zipfile.ZipFile(wheel).read(f"forvalue-{version}.dist-info/entry_points.txt").decode()
    assert "forvalue = forvalue.cli:main" in entry_points


def test_version_comes_from_the_package_metadata():
    assert forvalue.__version__ == importlib.metadata.version("forvalue")


def _imports(file: Path, known: set[str]) -> set[str]:
    """forvalue modules that ``file`` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("forvalue"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                out.add(name if name in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("forvalue"))
    return out & known


def test_no_module_imports_a_module_that_imports_it_back():
    modules = _source_modules()
    graph = {name: _imports(file, set(modules)) - {name} for name, file in modules.items()}

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == goal:
                    return path + [goal]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    for name in graph:
        cycle = reaches(name, name)
        assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from forvalue.b import g\n")
    b.write_text("from forvalue.a import f\n")
    known = {"forvalue.a", "forvalue.b"}
    assert _imports(a, known) == {"forvalue.b"} and _imports(b, known) == {"forvalue.a"}


@pytest.mark.parametrize("name", forvalue.__all__)
def test_public_names_resolve_and_are_documented(name):
    obj = getattr(forvalue, name)
    if name == "__version__":
        return
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"forvalue.{name} has no docstring"
    if inspect.isfunction(obj):
        assert "Example" in doc, f"forvalue.{name}'s docstring has no worked example"


def test_import_forvalue_is_cheap_and_the_light_commands_load_no_model_stack():
    code = (
        "import sys, forvalue, forvalue.cli, forvalue.maintenance, forvalue.audit;"
        "print(sorted(m for m in ('torch', 'transformers', 'lancedb', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# What each stage folder may import: the flow schemas -> storage <- indexer -> query (the indexer writes
# through storage; nothing below query imports query, storage never imports the indexer).
ALLOWED = {
    "forvalue.schemas": ("forvalue.schemas",),
    "forvalue.storage": ("forvalue.schemas", "forvalue.storage"),
    "forvalue.indexer": ("forvalue.schemas", "forvalue.storage", "forvalue.indexer"),
}


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_folders_import_only_earlier_stages(stage):
    modules = _source_modules()
    for name, file in modules.items():
        if name != stage and not name.startswith(stage + "."):
            continue
        for target in _imports(file, set(modules)):
            assert target.startswith(tuple(p + "." for p in ALLOWED[stage])) or target in ALLOWED[stage], (
                f"{name} imports {target}"
            )
