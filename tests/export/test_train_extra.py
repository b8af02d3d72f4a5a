"""Without the ``[train]`` extra, a training command prints one line saying how to install it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK_TORCH = ("import sys, runpy\n"
               "for name in ('torch', 'torchvision'): sys.modules[name] = None\n"
               "sys.argv = [{module!r}, '--help']\n"
               "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")


@pytest.mark.parametrize("module", ["export.train", "export.data", "export.onnx",
                                    "export.evaluate", "export.proposer_train",
                                    "export.refiner_train", "export.ablation"])
def test_training_command_without_torch_prints_one_install_line(module):
    run = subprocess.run([sys.executable, "-c", BLOCK_TORCH.format(module=module)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    expected = (f"error: python -m {module} needs the training extra (torch, torchvision "
                'not installed): pip install -e ".[train]"')
    assert lines == [expected], run.stderr


def test_library_import_without_torch_raises_module_not_found():
    code = ("import sys\nsys.modules['torch'] = None\n"
            "try:\n    import export.model\nexcept ModuleNotFoundError as exc:\n    print(exc)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert run.stdout.strip() == ('the training modules need the training extra (torch not '
                                  'installed): pip install -e ".[train]"')


def test_renderer_runs_without_torch():
    code = BLOCK_TORCH.format(module="export.synth")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "--out" in run.stdout
