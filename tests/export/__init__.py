"""Tests of the training side. ``cone_patches`` draws labelled crops without any data set."""

from __future__ import annotations

import cv2
import numpy as np

# BGR colours of cone bodies and their stripes.
_CONES = {
    "blue_cone": ((200, 90, 20), (245, 245, 245), 1),
    "yellow_cone": ((20, 210, 235), (30, 30, 30), 1),
    "orange_cone": ((0, 110, 245), (245, 245, 245), 1),
    "large_orange_cone": ((0, 110, 245), (245, 245, 245), 2),
}


def cone_patches(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` uint8 BGR crops of drawn cones and background, classes in turn.

    Cones are striped triangles on a noisy grey/green ground at random scale and offset;
    background crops are the same ground with a random non-cone shape (grey or dark).
    """
    rng = np.random.default_rng(seed)
    names = list(_CONES) + ["background"]
    crops, labels = np.empty((n, size, size, 3), np.uint8), []
    for i in range(n):
        name = names[i % len(names)]
        ground = rng.integers(60, 160, 3)
        img = np.clip(ground + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        h = size * rng.uniform(0.55, 0.85)
        w = h * rng.uniform(0.45, 0.7)
        cx = size / 2 + rng.uniform(-0.1, 0.1) * size
        base = size / 2 + h / 2 + rng.uniform(-0.08, 0.08) * size
        tri = np.array([[cx, base - h], [cx - w / 2, base], [cx + w / 2, base]], np.int32)
        if name == "background":
            grey = int(rng.integers(20, 230))
            cv2.fillPoly(img, [tri], (grey, grey, grey))
        else:
            body, stripe, n_stripes = _CONES[name]
            cv2.fillPoly(img, [tri], body)
            for k in range(n_stripes):
                y = int(base - h * (0.45 + 0.2 * k))
                half = int(w / 2 * (base - y) / h)
                cv2.line(img, (int(cx) - half, y), (int(cx) + half, y), stripe,
                         max(1, size // 16))
        crops[i] = img
        labels.append(name)
    return crops, labels
