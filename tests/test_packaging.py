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
    assert "forvalue = forvalue.__main__:run" in entry_points


def test_ctrl_c_while_the_cli_is_imported_is_one_line_and_status_130():
    """The ``forvalue`` program (``forvalue.__main__:run``): a KeyboardInterrupt raised while ``forvalue.cli`` is
    being imported (Ctrl-C on a loaded machine) ends with one line and status 130, not a traceback."""
    code = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'forvalue.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from forvalue.__main__ import run\n"
        "run()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 130
    assert res.stderr.splitlines() == ["error: interrupted before the command started; nothing was written"]


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


# Layers inside the package, lowest first; a module imports only modules of its own layer or lower ones
# (module level and inside functions). The README's "Code layout" describes the same layers.
LAYERS = (
    ("stages", ("forvalue.schemas", "forvalue.storage", "forvalue.indexer")),
    ("session", ("forvalue.session", "forvalue.metrics", "forvalue.results", "forvalue.present")),
    ("session", ("forvalue.value_model", "forvalue.ridge", "forvalue.value_features")),
    ("data", ("forvalue.tasks",)),  # the demo's generated task (pure data, imports nothing of the package)
    ("engine", ("forvalue.engine",)),
    ("workflows", ("forvalue.api", "forvalue.audit", "forvalue.maintenance", "forvalue.distill", "forvalue.pricing")),
    ("workflows", ("forvalue.explain_pages", "forvalue.estimates")),
    ("facade", ("forvalue.store",)),
    ("entry points", ("forvalue.demo", "forvalue.cli", "forvalue.__main__", "forvalue")),
)


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module == p or (p != "forvalue" and module.startswith(p + "."))
            if inside and (best is None or len(p) > len(best[1])):
                best = (rank, p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to the README's Code layout)"
    names = list(dict.fromkeys(layer for layer, _ in LAYERS))  # layers listed twice share a rank
    return names.index(LAYERS[best[0]][0])


def test_modules_import_only_their_own_or_lower_layers():
    modules = _source_modules()
    problems = []
    for name, file in modules.items():
        for target in _imports(file, set(modules)):
            if _layer(target) > _layer(name):
                problems.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not problems, "\n".join(problems)


def test_the_layer_check_knows_every_module_and_can_fail():
    for name in _source_modules():
        _layer(name)
    assert _layer("forvalue.engine.scorer") > _layer("forvalue.session")
    assert _layer("forvalue.audit") == _layer("forvalue.explain_pages") > _layer("forvalue.engine.gform")
    assert _layer("forvalue.store") > _layer("forvalue.audit")
