"""Imported first by every module that needs torch: without the ``[train]`` extra, running a
training command prints one line saying how to install it, instead of a torch traceback.

Run as a command (``python -m export.train`` and friends), a missing extra exits with that
line; imported as a library, it raises ``ModuleNotFoundError`` with the same message.
"""

from __future__ import annotations

import importlib.util
import sys

PACKAGES = ("torch", "torchvision", "onnx")
INSTALL = 'pip install -e ".[train]"'


def missing_packages() -> list[str]:
    """The packages of the ``[train]`` extra that cannot be imported here."""
    missing = []
    for name in PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[name] is None
            found = False
        if not found:
            missing.append(name)
    return missing


def check() -> None:
    missing = missing_packages()
    if not missing:
        return
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    command = spec.name if spec is not None and spec.name.startswith(("export.", "calib.")) \
        else None
    what = f"python -m {command} needs" if command else "the training modules need"
    message = f"{what} the training extra ({', '.join(missing)} not installed): {INSTALL}"
    if command:
        raise SystemExit(f"error: {message}")
    raise ModuleNotFoundError(message, name=missing[0])


check()
