"""Fixtures shared by the training-side tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from . import cone_patches


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A crop cache of drawn cone patches: 1500 training and 300 held-out crops."""
    pytest.importorskip("torch")
    from export.data import CLASS_INDEX, CropSet, save_cache

    tmp = tmp_path_factory.mktemp("cache")
    x, names = cone_patches(1500, seed=1)
    vx, vnames = cone_patches(300, seed=2)
    y = np.array([CLASS_INDEX[n] for n in names])
    vy = np.array([CLASS_INDEX[n] for n in vnames])
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    save_cache(CropSet(x, y, vx, vy, empty, np.zeros(0, np.int64), np.array(["t"] * len(y)),
                       np.array(["v"] * len(vy)), input_size=32), tmp / "cache.npz")
    return tmp / "cache.npz"
