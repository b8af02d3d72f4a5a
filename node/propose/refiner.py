"""A learned second stage that tightens candidate boxes (``proposer.refiner_model``).

The heatmap proposer places small cones well but sizes them coarsely: its boxes come from one
cell of a stride-4 grid, so a 16 px cone's box is often a few pixels off, and IoU 0.5 is lost
for a 9 px wide box with 3 px of error. The refiner is the box-regression head of a two-stage
detector (Fast R-CNN, Girshick 2015), made tiny: every candidate of a frame is cropped by one
``cv2.remap`` (``refiner_crops``, on ``node.infer.crop``'s sampling grid) into a square of twice the
box's longer side (a narrower window for a model whose ``min_aspect`` is below 1), resized to
the model's input (32 px), and a small CNN (``export.refiner_train``) predicts the four
edge offsets of the cone's box as fractions of that window. It runs on at most
``proposer.max_candidates`` boxes per frame, after the proposer's cap, in its own ONNX
Runtime session on one thread (on the CPU unless ``proposer.providers`` says otherwise).

The model's contract travels in the ONNX ``metadata_props`` under ``cone_refiner`` (JSON:
input size, crop context and minimum side, channel order, training clips). The model takes
raw 0..255 BGR pixels (N, 3, S, S) and returns ``deltas`` (N, 4). Only numpy, cv2 and
onnxruntime are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from node.infer.crop import _MAX_REMAP_ROWS, PAD_MODES, CropPolicy, sampling_grid
from node.infer.onnxrt import ort_session
from node.propose.base import Proposer
from node.propose.heatmap import HeatmapModelError
from node.types import Frame

METADATA_KEY = "cone_refiner"
FORMAT = "cone-refiner/1"
INPUT = "crops"
OUTPUT = "deltas"


class RefinerModelError(HeatmapModelError):
    """The refiner model is missing, unreadable or lacks its metadata; names the file."""


@dataclass
class RefinerMetadata:
    """How a box becomes the refiner's input, and what its output means.

    Attributes:
        input_size: side of the square crop in pixels.
        context: margin on every side of the box, as a fraction of its longer side (0.5 gives
            a square twice the longer side).
        min_side: smallest square side in frame pixels.
        extra: anything else recorded at export (training clips, validation scores).
        min_aspect: each side of the crop window is at least this fraction (0..1] of the
            other (1, the default, is the square of twice the longer side). Below 1 a thin
            cone's window is narrower than it is tall, so the crop keeps more of the cone's
            width: a 6 x 25 px cone is 4 px wide in a 32 px square crop, 8 px wide at 0.5.
    """

    input_size: int = 32
    context: float = 0.5
    min_side: float = 16.0
    extra: dict = field(default_factory=dict)
    min_aspect: float = 1.0

    @cached_property
    def policy(self) -> CropPolicy:
        """The crop policy of the windows, built once (it validates the fields)."""
        return CropPolicy(context=self.context, pad="replicate", min_side=self.min_side,
                          min_aspect=self.min_aspect)

    @property
    def square(self) -> bool:
        """Whether the windows are the policy's squares (``min_aspect`` 1)."""
        return self.policy.square

    def windows(self, boxes: np.ndarray) -> np.ndarray:
        """The crop window (x1, y1, x2, y2) of each box (``CropPolicy.windows``)."""
        return self.policy.windows(boxes)

    def window_sides(self, windows: np.ndarray) -> np.ndarray:
        """(N, 4) the width, height, width and height of each window (``windows``): the
        units of the four edge offsets."""
        w = windows[:, 2] - windows[:, 0]
        h = w if self.square else windows[:, 3] - windows[:, 1]
        return np.stack([w, h, w, h], axis=1)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "input_size": self.input_size,
                           "context": self.context, "min_side": self.min_side,
                           "min_aspect": self.min_aspect,
                           "channel_order": "BGR", "input": INPUT, "output": OUTPUT,
                           "extra": self.extra}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str) -> RefinerMetadata:
        """Parse and check; raises ``RefinerModelError`` naming ``origin``."""
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            meta = cls(int(d["input_size"]), float(d["context"]), float(d["min_side"]),
                       dict(d.get("extra", {})), float(d.get("min_aspect", 1.0)))
            meta.policy  # noqa: B018 (validates context, min_side and min_aspect)
        except (ValueError, KeyError, TypeError) as exc:
            raise RefinerModelError(f"{origin}: bad {METADATA_KEY} metadata ({exc})") from None
        if meta.input_size < 8:
            raise RefinerModelError(f"{origin}: {METADATA_KEY} input_size {meta.input_size} "
                                    f"is below 8")
        return meta


def refiner_crops(image: np.ndarray, boxes: np.ndarray, meta: RefinerMetadata,
                  out: np.ndarray | None = None, windows: np.ndarray | None = None
                  ) -> np.ndarray:
    """The refiner's input crops (N, S, S, 3) uint8 of ``boxes`` in ``image``, by one bilinear
    ``cv2.remap`` (no pyramid, unlike the classifier's ``crop_batch``: the refiner wants edges,
    and a pyramid level costs a full-frame ``pyrDown``). Training crops the same way.
    ``windows``: ``meta.windows(boxes)`` when the caller has them already."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    s = meta.input_size
    n = len(boxes)
    if out is None or len(out) < n:
        out = np.empty((n, s, s, 3), np.uint8)
    if n == 0:
        return out[:0]
    policy = meta.policy
    windows = meta.windows(boxes) if windows is None else windows
    per_call = max(1, _MAX_REMAP_ROWS // s)
    for a in range(0, n, per_call):
        b = min(n, a + per_call)
        # Fixed-point maps: converting costs less than it saves in the remap.
        map_xy, map_frac = cv2.convertMaps(*sampling_grid(windows[a:b], s, policy.square),
                                           cv2.CV_16SC2)
        out[a:b] = cv2.remap(image, map_xy, map_frac, cv2.INTER_LINEAR,
                             borderMode=PAD_MODES[policy.pad]).reshape(b - a, s, s, 3)
    return out[:n]


def apply_deltas(boxes: np.ndarray, deltas: np.ndarray, meta: RefinerMetadata,
                 windows: np.ndarray | None = None) -> np.ndarray:
    """Refined boxes: each edge moved by its delta times its crop window's side along it
    (``windows``: ``meta.windows(boxes)`` when the caller has them already)."""
    side = meta.window_sides(meta.windows(boxes) if windows is None else windows)
    return (np.asarray(boxes, np.float32) + deltas.astype(np.float32) * side).astype(np.float32)


def box_targets(boxes: np.ndarray, targets: np.ndarray, meta: RefinerMetadata) -> np.ndarray:
    """The deltas that move ``boxes`` onto ``targets`` (the inverse of ``apply_deltas``)."""
    side = meta.window_sides(meta.windows(boxes))
    return ((np.asarray(targets, np.float32) - boxes) / side).astype(np.float32)


def open_refiner(path: str | Path, threads: int = 1,
                 providers: str | list[str] | None = None):
    """An ONNX Runtime session (CPU unless ``providers`` says otherwise) for a refiner model,
    and its metadata.

    Raises:
        RefinerModelError: missing or unreadable file, missing metadata, wrong input/output,
            or an execution provider this ONNX Runtime lacks.
    """
    path = Path(path)
    session, text = ort_session(path, threads, METADATA_KEY, RefinerModelError,
                                "box refiner model", "refiner_train", providers)
    meta = RefinerMetadata.from_json(text, str(path))
    ins, outs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if ins != [INPUT] or outs != [OUTPUT]:
        raise RefinerModelError(f"{path}: inputs {ins} and outputs {outs}, expected "
                                f"[{INPUT!r}] and [{OUTPUT!r}]")
    return session, meta


class BoxRefiner:
    """Moves each candidate box onto the cone it covers (see the module docstring).

    Args:
        path: the refiner ONNX model.
        threads: ONNX Runtime intra-op threads.
        max_boxes: the most boxes per call; the crop buffer is allocated once at this size.
        passes: refinement passes, each from the previous one's boxes.
        providers: ONNX Runtime execution providers (``None`` = CPU, ``"auto"`` or a list).
    """

    def __init__(self, path: str | Path, threads: int = 1, max_boxes: int = 64,
                 passes: int = 1, providers: str | list[str] | None = None) -> None:
        self.session, self.meta = open_refiner(path, threads, providers)
        self.passes = passes
        s = self.meta.input_size
        self._crops = np.empty((max_boxes, s, s, 3), np.uint8)

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Refined copies of ``boxes`` (N, 4) in the pixels of ``image`` (BGR); with
        ``passes`` > 1 each pass starts from the previous one's boxes (iterative
        localisation: a box that moved far is looked at again, centred where it now is).
        Every refined box keeps at least a pixel of width and height inside the frame, so no
        candidate is lost to the refiner."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return boxes.copy()
        if len(boxes) > len(self._crops):
            self._crops = np.empty((len(boxes),) + self._crops.shape[1:], np.uint8)
        h, w = image.shape[:2]
        for _ in range(self.passes):
            windows = self.meta.windows(boxes)  # one per box, for the crop and the offsets
            crops = refiner_crops(image, boxes, self.meta, self._crops, windows)
            x = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32)
            (deltas,) = self.session.run(None, {INPUT: x})
            moved = apply_deltas(boxes, deltas, self.meta, windows)
            # A move that leaves under a pixel inside the frame (a degenerate crop can ask
            # for that) is not taken: the box stays where it was.
            iw = np.clip(moved[:, 2], 0, w) - np.clip(moved[:, 0], 0, w)
            ih = np.clip(moved[:, 3], 0, h) - np.clip(moved[:, 1], 0, h)
            ok = (iw >= 1.0) & (ih >= 1.0) & np.isfinite(moved).all(axis=1)
            boxes = np.where(ok[:, None], moved, boxes)
        return boxes


class RefinedProposer(Proposer):
    """Any proposer followed by the box refiner: same ranking, tighter boxes.

    The inner proposer's boxes (already capped at ``max_candidates``, best first) are refined
    and keep their order; the base class clips them to the frame again. The refiner never
    leaves a box empty inside the frame, so every candidate survives: the output of a smaller
    cap is always a prefix of that of a larger one.
    """

    def __init__(self, inner: Proposer, refiner: BoxRefiner, max_candidates: int) -> None:
        super().__init__(max_candidates)
        self.inner = inner
        self.refiner = refiner

    def _propose(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        refined = self.refiner(frame.image, self.inner.propose(frame))
        return refined, -np.arange(len(refined), dtype=np.float64)

    def close(self) -> None:
        self.inner.close()
