"""The shape of the house: the library never needs Ray, imports go one way, no circles,
files stay readable, and the installed package list matches the folders."""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 420  # "no source file over about 400 lines"


def _modules(package_dir: Path, package: str) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(package_dir)], prefix=package + "."):
        names.append(info.name)
    return names


def test_every_thinkfast_module_imports_without_ray():
    names = _modules(REPO / "thinkfast", "thinkfast")
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'thinkfast_pipelines', 'benchmarks')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _source_files() -> dict[str, Path]:
    """module name -> file, for both packages (pipelines/ installs as thinkfast_pipelines)."""
    out = {}
    for folder, package in ((REPO / "thinkfast", "thinkfast"), (REPO / "pipelines", "thinkfast_pipelines")):
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def test_no_import_circles_at_module_level():
    """Module-level imports only (function-level imports are how heavy modules load late)."""
    files = _source_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set()
        for node in tree.body:  # top level only
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            deps.update(c for c in candidates if c in files and c != name)
        graph[name] = deps
    # a package's __init__ re-exporting its own submodules is not a circle
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (files[name].name == "__init__.py" and d.startswith(name + "."))}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_library_never_imports_the_ray_layer():
    for name, path in _source_files().items():
        if name.startswith("thinkfast."):
            bad = [m for m in _imports(path) if m.split(".")[0] in ("ray", "thinkfast_pipelines", "pipelines", "benchmarks")]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_source_files_stay_readable():
    long = {str(p.relative_to(REPO)): n for p in _source_files().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_installed_packages_match_the_folders():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {"thinkfast_pipelines": "pipelines"}
    found = set()
    for folder, package in ((REPO / "thinkfast", "thinkfast"), (REPO / "pipelines", "thinkfast_pipelines")):
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert listed == found, f"pyproject lists {sorted(listed - found)} extra, misses {sorted(found - listed)}"


def test_nothing_installs_a_top_level_pipelines_package():
    import importlib.util

    assert importlib.util.find_spec("thinkfast_pipelines") is not None
    spec = importlib.util.find_spec("pipelines")
    # only the source folder itself, when the repository root is on sys.path
    assert spec is None or Path(spec.origin or "").resolve().parent == (REPO / "pipelines").resolve()
    assert os.path.isdir(REPO / "pipelines")
