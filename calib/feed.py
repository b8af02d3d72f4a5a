"""The calibration feed: class-balanced, preprocessed crops for INT8 calibration.

One plain generator (in the manner of Polygraphy's ``load_data()``) feeds both INT8 paths:
ONNX Runtime's Q/DQ calibrators (``calib.quantize``) and the legacy TensorRT entropy
calibrator (``calib.trt_calibrator``). Crops are made exactly as the node makes them, through
``node.infer.preprocess`` with the model's own crop policy and normalisation (from its metadata), so
the ranges are measured on the tensors the car will see. A classifier trained on white-balanced
frames (``data.normalise``; its metadata's ``extra["normalise"]``) is calibrated on frames
through the same exposure stage (``node.sources.exposure.frame_normaliser``).

Selection is deterministic for a given seed: the same data, count and seed always give the
same batches, which is what makes a calibration reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from node.classes import BACKGROUND
from node.config import spec
from node.infer.metadata import ModelMetadata
from node.infer.preprocess import Preprocessor, normalize
from node.sources.exposure import frame_normaliser, trained_tolerance


class FeedError(ValueError):
    """The calibration data cannot be read or holds nothing usable."""


@dataclass
class CalibrationConfig:
    """The ``calibration`` section of ``configs/export.yaml`` (documented there)."""

    count: int = spec(1024, min=8, max=100000)
    batch_size: int = spec(32, min=1, max=1024)
    background_share: float = spec(0.2, min=0.0, max=0.9)
    seed: int = spec(0, min=0)
    synth_frames: int = spec(120, min=1, max=100000)
    synth_width: int = spec(640, min=64, max=4096)
    synth_height: int = spec(480, min=64, max=4096)


@dataclass
class LabelledFrame:
    """A frame with its labelled boxes, in the shape ``node.evaluate.datasets`` samples have.

    Attributes:
        image: H×W×3 uint8 BGR frame.
        boxes: N×4 float boxes (x1, y1, x2, y2) in pixels.
        labels: N project class names.
        name: where the frame came from (for error messages).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: Sequence[str]
    name: str = "frame"

    def load(self) -> np.ndarray:
        return self.image


def open_samples(source: str | Iterable[Any], synth_frames: int = 120, width: int = 640,
                 height: int = 480, seed: int = 0) -> list[Any]:
    """Resolve a data spec into a list of samples (``.load()``, ``.boxes``, ``.labels``).

    Args:
        source: ``yolo:DIR`` (read by ``node.evaluate.datasets.load_samples``), ``synth`` or
            ``synth:N`` (N frames from ``export.synth.render_scene``), or already-made samples.
        synth_frames: number of synthetic frames for plain ``synth``.
        width: synthetic frame width.
        height: synthetic frame height.
        seed: first synthetic scene seed.
    """
    if not isinstance(source, str):
        samples = list(source)
    elif source.startswith("yolo:"):
        from node.evaluate.datasets import load_samples

        try:
            samples = list(load_samples(source))
        except ValueError as exc:  # node.evaluate.datasets.DatasetError names the file
            raise FeedError(str(exc)) from None
    elif source == "synth" or source.startswith("synth:"):
        n = synth_frames
        if ":" in source:
            try:
                n = int(source.split(":", 1)[1])
            except ValueError:
                raise FeedError(f"data spec {source!r}: expected synth:N with an integer N"
                                ) from None
        from export.synth import render_scene

        samples = []
        for i in range(n):
            scene = render_scene(seed + i, width, height)
            samples.append(LabelledFrame(scene.image, np.asarray(scene.boxes, np.float32),
                                         list(scene.labels), name=f"synth#{seed + i}"))
    else:
        raise FeedError(f"data spec {source!r}: expected yolo:DIR or synth[:N]")
    if not samples:
        raise FeedError(f"data spec {source!r}: no frames found")
    return samples


def calibration_batches(
    source: str | Iterable[Any],
    meta: ModelMetadata,
    count: int,
    batch_size: int,
    seed: int = 0,
    background_share: float = 0.2,
    drop_last: bool = False,
    synth_frames: int = 120,
    synth_size: tuple[int, int] = (640, 480),
) -> Iterator[np.ndarray]:
    """Yield preprocessed N×3×S×S float32 batches of class-balanced crops.

    The cone classes of ``meta.classes`` get equal quotas (a class short of crops gives its
    remainder to the others); ``background_share`` of the crops are background squares mined
    away from every labelled box. Labels not in ``meta.classes`` are ignored.

    Args:
        source: a data spec or samples, see ``open_samples``.
        meta: the model's metadata (crop policy, input size, normalisation, classes).
        count: total number of crops (fewer only if the data holds fewer).
        batch_size: crops per batch.
        seed: selection and mining seed.
        background_share: fraction of crops that are background (0 when the model has no
            background class).
        drop_last: drop a final short batch (TensorRT calibrators need full batches).
        synth_frames: frames rendered for plain ``synth``.
        synth_size: (width, height) of synthetic frames.

    Raises:
        FeedError: no usable labelled crops.
    """
    crops = balanced_crops(source, meta, count, seed, background_share, synth_frames,
                           synth_size)
    pre = Preprocessor(meta, max_batch=1)
    for start in range(0, len(crops), batch_size):
        part = crops[start:start + batch_size]
        if drop_last and len(part) < batch_size:
            return
        yield normalize(part, pre.mean, pre.std, pre.to_rgb).copy()


def balanced_crops(source: str | Iterable[Any], meta: ModelMetadata, count: int, seed: int = 0,
                   background_share: float = 0.2, synth_frames: int = 120,
                   synth_size: tuple[int, int] = (640, 480), with_labels: bool = False):
    """The uint8 BGR crops (N×S×S×3) behind ``calibration_batches``, in feed order.

    With ``with_labels`` it returns ``(crops, labels)``, labels being class names, which lets
    tests and evaluation score a model on exactly the calibration distribution.
    """
    if count < 1:
        raise FeedError(f"calibration count must be >= 1, got {count}")
    samples = open_samples(source, synth_frames, synth_size[0], synth_size[1], seed)
    rng = np.random.default_rng(seed)
    cone_classes = [c for c in meta.classes if c != BACKGROUND]
    has_background = BACKGROUND in meta.classes
    n_background = round(count * background_share) if has_background else 0

    by_class: dict[str, list[tuple[int, int]]] = {c: [] for c in cone_classes}
    for i, sample in enumerate(samples):
        for j, label in enumerate(_labels(sample)):
            if label in by_class:
                by_class[label].append((i, j))
    if not any(by_class.values()):
        raise FeedError(f"calibration data has no boxes of the model's classes {cone_classes}")
    chosen = _balanced_pick(by_class, count - n_background, rng)

    per_frame: dict[int, list[tuple[int, str]]] = {}
    for label, picks in chosen.items():
        for i, j in picks:
            per_frame.setdefault(i, []).append((j, label))
    bg_frames = rng.integers(0, len(samples), n_background) if n_background else []
    bg_per_frame: dict[int, int] = {}
    for i in bg_frames:
        bg_per_frame[int(i)] = bg_per_frame.get(int(i), 0) + 1

    pre = Preprocessor(meta, max_batch=64)
    prepare = frame_normaliser(trained_tolerance(meta.extra))
    all_crops, all_labels = [], []

    def add(image: np.ndarray, boxes: list[np.ndarray], labels: list[str]) -> None:
        if boxes:
            all_crops.append(pre.crops(image, np.stack(boxes)).copy())
            all_labels.extend(labels)

    mined = 0
    for i in sorted(set(per_frame) | set(bg_per_frame)):
        image, boxes = prepare(_load(samples[i])), _boxes(samples[i])
        picks = per_frame.get(i, [])
        background = mine_background_boxes(image.shape, boxes, bg_per_frame.get(i, 0), rng,
                                           meta)
        mined += len(background)
        add(image, [boxes[j] for j, _ in picks] + background,
            [label for _, label in picks] + [BACKGROUND] * len(background))
    for _ in range(2 * len(samples)):  # crowded frames left a deficit: mine elsewhere
        if mined >= n_background:
            break
        i = int(rng.integers(0, len(samples)))
        image = prepare(_load(samples[i]))
        background = mine_background_boxes(image.shape, _boxes(samples[i]),
                                           min(n_background - mined, 4), rng, meta)
        mined += len(background)
        add(image, background, [BACKGROUND] * len(background))
    crops = np.concatenate(all_crops) if all_crops else np.empty((0, meta.input_size,
                                                                  meta.input_size, 3), np.uint8)
    order = rng.permutation(len(crops))  # mix classes within every batch
    crops = crops[order]
    labels = [all_labels[k] for k in order]
    return (crops, labels) if with_labels else crops


def mine_background_boxes(shape: tuple[int, ...], boxes: np.ndarray, n: int,
                          rng: np.random.Generator, meta: ModelMetadata,
                          tries: int = 50) -> list[np.ndarray]:
    """Up to ``n`` boxes whose crop squares stay clear of every labelled box's crop square.

    Sizes follow the frame's labelled boxes (or 4% of the frame height without any), and the
    clearance is a whole square side, so that an unlabelled cone next to a labelled one is
    unlikely to be taught as background (see the data README's caveats).
    """
    h, w = shape[:2]
    policy = meta.crop_policy
    taken = policy.square_boxes(boxes) if len(boxes) else np.empty((0, 4), np.float32)
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) if len(boxes) \
        else np.array([0.04 * h])
    out: list[np.ndarray] = []
    for _ in range(n * tries):
        if len(out) == n:
            break
        side = float(max(rng.choice(sides) * rng.uniform(0.7, 1.4), 6.0))
        if side >= min(w, h):
            continue
        x1 = rng.uniform(0, w - side)
        y1 = rng.uniform(0, h - side)
        box = np.array([x1, y1, x1 + side, y1 + side], np.float32)
        sq = policy.square_boxes(box[None])[0]
        margin = (sq[2] - sq[0]) * 0.5
        if len(taken) and np.any(
            (sq[0] - margin < taken[:, 2]) & (sq[2] + margin > taken[:, 0])
            & (sq[1] - margin < taken[:, 3]) & (sq[3] + margin > taken[:, 1])
        ):
            continue
        out.append(box)
    return out


def _balanced_pick(by_class: dict[str, list[tuple[int, int]]], total: int,
                   rng: np.random.Generator) -> dict[str, list[tuple[int, int]]]:
    """Equal quotas per class; a class that runs out hands its share to the others."""
    pools = {c: [entries[k] for k in rng.permutation(len(entries))]
             for c, entries in by_class.items() if entries}
    chosen: dict[str, list[tuple[int, int]]] = {c: [] for c in pools}
    remaining = max(total, 0)
    while remaining > 0 and pools:
        share = max(remaining // len(pools), 1)
        for c in sorted(pools):
            take = pools[c][:min(share, remaining)]
            chosen[c].extend(take)
            pools[c] = pools[c][len(take):]
            remaining -= len(take)
            if remaining == 0:
                break
        pools = {c: p for c, p in pools.items() if p}
    return chosen


def _load(sample: Any) -> np.ndarray:
    try:
        return sample.load()
    except ValueError as exc:  # node.evaluate.datasets.DatasetError names the file
        raise FeedError(str(exc)) from None


def _boxes(sample: Any) -> np.ndarray:
    return np.asarray(sample.boxes, np.float32).reshape(-1, 4)


def _labels(sample: Any) -> list[str]:
    labels = list(sample.labels)
    for label in labels:
        if not isinstance(label, str):
            raise FeedError(f"{getattr(sample, 'name', 'sample')}: labels must be class names, "
                            f"got {label!r}")
    return labels
