"""Small coloured-cone scenes and a briefly trained classifier for the export/calib tests.

The scenes are drawn here (not by ``export.synth``) so the tests own their ground truth and stay
fast: 160×120 frames with cluttered backgrounds and cone-like triangles of the four classes.
``trained_classifier`` trains ``se_resnet_slim32`` for a few dozen steps on crops made by the
node's own preprocessing; it reaches well above chance, which is all the INT8 tests need.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from calib.feed import LabelledFrame, balanced_crops
from node.classes import (
    BACKGROUND,
    BLUE,
    CLASSIFIER_CLASSES,
    CONE_CLASSES,
    LARGE_ORANGE,
    ORANGE,
    YELLOW,
)
from node.infer.metadata import ModelMetadata
from node.infer.preprocess import Preprocessor, normalize

# body colour (BGR), stripe colour, number of stripes
_LOOK = {
    BLUE: ((200, 90, 20), (255, 255, 255), 1),
    YELLOW: ((30, 215, 235), (20, 20, 20), 1),
    ORANGE: ((10, 110, 250), (255, 255, 255), 1),
    LARGE_ORANGE: ((10, 110, 250), (255, 255, 255), 2),
}


def make_scene(seed: int, width: int = 160, height: int = 120, cones: int = 4) -> LabelledFrame:
    """A frame with ``cones`` labelled cones on a cluttered grey-green background."""
    rng = np.random.default_rng(seed)
    img = rng.normal(110, 25, (height, width, 3)).clip(0, 255).astype(np.uint8)
    for _ in range(6):  # clutter: grey/green rectangles
        x, y = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        colour = tuple(int(c) for c in rng.integers(40, 160, 3))
        cv2.rectangle(img, (x, y), (x + int(rng.integers(5, 30)), y + int(rng.integers(5, 30))),
                      colour, -1)
    boxes, labels = [], []
    names = list(_LOOK)
    for k in range(cones):
        label = names[int(rng.integers(0, 4))] if k >= 4 else names[(seed + k) % 4]
        h = int(rng.integers(14, 34)) + (6 if label == LARGE_ORANGE else 0)
        w = max(int(h * 0.6), 6)
        x1 = int(rng.integers(0, width - w))
        y1 = int(rng.integers(0, height - h))
        body, stripe, n = _LOOK[label]
        tri = np.array([[x1 + w // 2, y1], [x1, y1 + h - 1], [x1 + w - 1, y1 + h - 1]], np.int32)
        cv2.fillPoly(img, [tri], body)
        for s in range(n):
            yy = y1 + int(h * (0.35 + 0.25 * s))
            cv2.line(img, (x1 + w // 4, yy), (x1 + 3 * w // 4, yy), stripe, max(h // 10, 1))
        boxes.append([x1, y1, x1 + w, y1 + h])
        labels.append(label)
    return LabelledFrame(img, np.asarray(boxes, np.float32), labels, name=f"scene#{seed}")


def scenes(first: int, count: int) -> list[LabelledFrame]:
    return [make_scene(first + i) for i in range(count)]


def write_yolo(frames: list[LabelledFrame], root: Path) -> Path:
    """Write frames as a YOLO dataset (images/, labels/, data.yaml); returns ``root``."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text(f"names: {list(CONE_CLASSES)}\n")
    ids = {c: i for i, c in enumerate(CONE_CLASSES)}
    for k, frame in enumerate(frames):
        cv2.imwrite(str(root / "images" / f"f{k}.png"), frame.image)
        h, w = frame.image.shape[:2]
        rows = [f"{ids[lab]} {(b[0] + b[2]) / 2 / w} {(b[1] + b[3]) / 2 / h} "
                f"{(b[2] - b[0]) / w} {(b[3] - b[1]) / h}"
                for b, lab in zip(frame.boxes, frame.labels)]
        (root / "labels" / f"f{k}.txt").write_text("\n".join(rows))
    return root


def metadata() -> ModelMetadata:
    return ModelMetadata(classes=list(CLASSIFIER_CLASSES), input_size=32,
                         arch="se_resnet_slim32")


def labelled_batch(frames: list[LabelledFrame], meta: ModelMetadata, count: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Normalised crops and class indices, class-balanced with background (the feed's mix)."""
    crops, labels = balanced_crops(frames, meta, count, seed=seed, with_labels=True)
    pre = Preprocessor(meta, max_batch=1)
    x = normalize(crops, pre.mean, pre.std, pre.to_rgb).copy()
    y = np.array([meta.classes.index(c) for c in labels], np.int64)
    return x, y


@functools.lru_cache(maxsize=2)
def trained_classifier(steps: int = 30, seed: int = 0):
    """``se_resnet_slim32`` trained briefly on scene crops; returns (model, meta)."""
    import torch

    from export.model import create_model

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    meta = metadata()
    x, y = labelled_batch(scenes(1000, 100), meta, 1000, seed)
    model = create_model(meta.arch, len(meta.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(xt), 32))
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), meta


__all__ = [
    "BACKGROUND",
    "labelled_batch",
    "make_scene",
    "metadata",
    "scenes",
    "trained_classifier",
    "write_yolo",
]
