"""The runtime never imports torch, heavy imports stay lazy, the project's modules import each
other without circles (lazy imports included), and ``node/`` stays a small house of stages
(docs/design.md, "Layout")."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import node

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "tensorrt", "pycuda", "rclpy", "matplotlib")


def _node_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(node.__path__, "node.")
                  if not m.name.endswith("__main__"))


def test_every_node_module_imports_without_heavy_packages():
    mods = _node_modules()
    assert "node.infer.crop" in mods and "node.infer.preprocess" in mods
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = [h for h in {HEAVY!r} if h in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported by node: {out.stdout}"


def test_export_and_calib_packages_import_light():
    code = ("import sys, export, calib, export.synth\n"
            "print(','.join(h for h in ('torch', 'tensorrt', 'pycuda') if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=False,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


PACKAGES = ("node", "export", "calib")
MAX_TOP_LEVEL_NODE_MODULES = 8


def _module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its body (top level, inside
    functions, under ``if TYPE_CHECKING``): each import counts as an edge to the most specific
    module it names."""

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    edges = set()
    for stmt in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(stmt, ast.Import):
            targets = [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level:
                anchor = package[:len(package) - stmt.level + 1]
                base = ".".join(anchor + ([stmt.module] if stmt.module else []))
            targets = [f"{base}.{alias.name}" for alias in stmt.names]
        else:
            continue
        edges.update(filter(None, map(resolve, targets)))
    edges.discard(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_finds_a_lazy_circle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    modules = {"pkg": tmp_path / "pkg/__init__.py", "pkg.a": tmp_path / "pkg/a.py",
               "pkg.b": tmp_path / "pkg/b.py"}
    for path in modules.values():
        path.parent.mkdir(exist_ok=True)
        path.write_text("")
    modules["pkg.a"].write_text("def f():\n    from .b import g\n")
    modules["pkg.b"].write_text("from pkg import a\n")
    assert _imported_modules("pkg.a", modules["pkg.a"], modules) == {"pkg.b"}
    assert _imported_modules("pkg.b", modules["pkg.b"], modules) == {"pkg.a"}


def test_no_import_circles_lazy_imports_included():
    graph = import_graph()
    assert "node.propose.heatmap" in graph["node.propose"]  # lazy imports are edges too
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_node_has_at_most_eight_modules_at_its_top():
    top = sorted(p.name for p in (ROOT / "node").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_NODE_MODULES, (
        f"node/ holds {len(top)} modules directly ({', '.join(top)}); move one into the "
        "subpackage of its stage")
    assert "types.py" in top  # other packages import node.types


def _runtime_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("\ndependencies = [", 1)[1].split("\n]", 1)[0]
    return [line.strip().strip(",").strip('"') for line in block.splitlines()
            if line.strip().startswith('"')]


def test_runtime_dependencies_fit_a_headless_car_computer():
    deps = _runtime_dependencies()
    names = [d.split(">")[0].split("<")[0].split("=")[0] for d in deps]
    assert "opencv-python-headless" in names and "opencv-python" not in names
    assert "matplotlib" not in names and "torch" not in names
    rosbags = next(d for d in deps if d.startswith("rosbags"))
    assert ">=0.10.9" in rosbags and "<" in rosbags  # the MCAP writer API, bounded above


def test_cone_node_console_script_runs_the_node_cli():
    assert 'cone-node = "node.__main__:main"' in (ROOT / "pyproject.toml").read_text()
    script = Path(sys.executable).with_name("cone-node")
    if not script.exists():
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    out = subprocess.run([str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert out.returncode in (0, 2)
    assert "usage: cone-node" in out.stdout + out.stderr
    assert "replay" in out.stdout + out.stderr
