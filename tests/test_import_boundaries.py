"""The runtime never imports torch, and heavy imports stay lazy (DESIGN.md map)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import node

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "tensorrt", "pycuda", "rclpy")


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
