"""Fixtures shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.node.backend_doubles import make_onnx


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """A tiny ONNX colour classifier with the node's metadata (read-only, shared)."""
    path = tmp_path_factory.mktemp("reliability_model") / "tiny.onnx"
    make_onnx(path)
    return path
