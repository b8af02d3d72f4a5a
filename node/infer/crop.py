"""Crop policy: how a candidate box becomes a square classifier input.

A box's window is a square of its longer side plus context (the default), or with
``min_aspect`` below 1 a rectangle whose shorter side is at least that fraction of the longer,
stretched to the square input: a thin cone then fills more of its crop, and less of its
neighbours shows.

The same function crops for training (``export``) and at runtime, so the classifier always
sees crops made the way the node makes them. All crops of a frame are sampled by one
``cv2.remap`` call over a stacked sampling grid: no per-crop Python loop in the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PAD_MODES = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE}
_MAX_REMAP_ROWS = 32000  # cv2.remap's destination is limited to SHRT_MAX rows
_MAX_LEVEL = 4
_REGION_MARGIN = 8  # pixels of the pyramid level kept around the squares (_pyramid_region)


@dataclass(frozen=True)
class CropPolicy:
    """How a box is turned into a square crop.

    Attributes:
        context: margin added on every side, as a fraction of the box's longer side.
        pad: ``constant`` (fill with ``pad_value``) or ``replicate`` where the square leaves
            the frame.
        pad_value: grey level used by ``constant`` padding.
        min_side: smallest square side in pixels, so that tiny boxes are not over-magnified.
        min_aspect: each side of the window is at least this fraction (0..1] of the other; 1
            (the default) is the square of the longer side.
    """

    context: float = 0.15
    pad: str = "constant"
    pad_value: int = 114
    min_side: float = 8.0
    min_aspect: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.context <= 2.0:
            raise ValueError(f"crop context must be in [0, 2], got {self.context}")
        if self.pad not in PAD_MODES:
            raise ValueError(f"crop pad must be one of {sorted(PAD_MODES)}, got {self.pad!r}")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"crop pad_value must be in [0, 255], got {self.pad_value}")
        if self.min_side <= 0:
            raise ValueError(f"crop min_side must be > 0, got {self.min_side}")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ValueError(f"crop min_aspect must be in (0, 1], got {self.min_aspect}")

    @property
    def square(self) -> bool:
        """Whether the windows are squares (``min_aspect`` 1)."""
        return self.min_aspect >= 1.0

    def square_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Square regions (x1, y1, x2, y2) centred on each box, with context added.

        The square may extend past the frame; ``crop_batch`` pads there.
        """
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
        cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
        w = np.abs(boxes[:, 2] - boxes[:, 0])
        h = np.abs(boxes[:, 3] - boxes[:, 1])
        side = np.maximum(np.maximum(w, h) * (1.0 + 2.0 * self.context), self.min_side)
        half = side * 0.5
        return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)

    def windows(self, boxes: np.ndarray) -> np.ndarray:
        """The crop window (x1, y1, x2, y2) of each box, centred on it: each side ``1 + 2 *
        context`` times the box's side along it or ``min_aspect`` times the other side,
        whichever is longer, and at least ``min_side``. With ``min_aspect`` 1 these are
        ``square_boxes``."""
        if self.square:
            return self.square_boxes(boxes)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        w = np.abs(boxes[:, 2] - boxes[:, 0])
        h = np.abs(boxes[:, 3] - boxes[:, 1])
        grow = 1.0 + 2.0 * self.context
        half_w = 0.5 * np.maximum(np.maximum(w, self.min_aspect * h) * grow, self.min_side)
        half_h = 0.5 * np.maximum(np.maximum(h, self.min_aspect * w) * grow, self.min_side)
        cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
        cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
        return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)

    def to_dict(self) -> dict:
        d = {
            "context": self.context,
            "pad": self.pad,
            "pad_value": self.pad_value,
            "min_side": self.min_side,
        }
        if not self.square:  # a square policy's dict stays what older nodes read
            d["min_aspect"] = self.min_aspect
        return d


def sampling_grid(squares: np.ndarray, size: int, square: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Source-pixel coordinates for every output pixel of every crop.

    Returns two float32 arrays of shape (N*size, size) for ``cv2.remap``: pixel centres of the
    output grid mapped into each square. With ``square`` False the regions may be rectangles
    (the refiner's narrower windows), each stretched to the square output; with True their
    width sets both steps.
    """
    n = squares.shape[0]
    step_x = (squares[:, 2] - squares[:, 0]) / size  # (N,)
    step_y = step_x if square else (squares[:, 3] - squares[:, 1]) / size
    t = np.arange(size, dtype=np.float32) + 0.5  # pixel centres of the output grid
    xs = squares[:, 0, None] + t[None, :] * step_x[:, None] - 0.5  # (N, size)
    ys = squares[:, 1, None] + t[None, :] * step_y[:, None] - 0.5
    map_x = np.broadcast_to(xs[:, None, :], (n, size, size)).reshape(n * size, size)
    map_y = np.broadcast_to(ys[:, :, None], (n, size, size)).reshape(n * size, size)
    return np.ascontiguousarray(map_x, np.float32), np.ascontiguousarray(map_y, np.float32)


def crop_batch(
    frame: np.ndarray,
    boxes: np.ndarray,
    size: int,
    policy: CropPolicy = CropPolicy(),
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Crop every box of a frame into one uint8 batch of square crops (each box's
    ``policy.windows`` window, stretched to the square where it is a rectangle).

    Args:
        frame: H×W×3 uint8 image (BGR as read by OpenCV).
        boxes: N×4 boxes (x1, y1, x2, y2) in frame pixels. Boxes may lie partly or wholly
            outside the frame; those pixels are padded per the policy.
        size: side of the output crops in pixels.
        policy: the crop policy.
        out: optional preallocated N×size×size×3 uint8 array to write into.

    Returns:
        N×size×size×3 uint8 crops, in the frame's channel order.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(
            f"frame must be an H×W×3 uint8 image, got shape {frame.shape} dtype {frame.dtype}"
        )
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not np.all(np.isfinite(boxes)):
        raise ValueError("boxes must be finite")
    n = boxes.shape[0]
    if out is None:
        out = np.empty((n, size, size, 3), np.uint8)
    elif out.shape[0] < n or out.shape[1:] != (size, size, 3) or out.dtype != np.uint8:
        raise ValueError(f"out buffer {out.shape} {out.dtype} cannot hold {n} crops of {size}")
    if n == 0:
        return out[:0]
    squares = policy.windows(boxes)
    square = policy.square
    border = PAD_MODES[policy.pad]
    value = (policy.pad_value,) * 3
    # Shrinking by more than 2x with bilinear sampling aliases (stripes turn to moire), so
    # each crop samples the pyramid level that brings its shrink factor under 2 (along the
    # window's longer side). The level depends only on the crop itself, so a crop is the same
    # whatever else is in the batch.
    scale = np.maximum(squares[:, 2] - squares[:, 0], squares[:, 3] - squares[:, 1]) / size
    levels = np.clip(np.floor(np.log2(np.maximum(scale, 1.0))), 0, _MAX_LEVEL).astype(int)
    per_call = max(1, _MAX_REMAP_ROWS // size)
    for level in np.unique(levels).tolist():
        idx = np.flatnonzero(levels == level)
        src, origin = _pyramid_region(frame, squares[idx], level)
        for start in range(0, idx.size, per_call):
            part = idx[start : start + per_call]
            map_x, map_y = sampling_grid(squares[part] / float(2**level), size, square)
            # Shifting by whole pixels after the grid is built keeps every coordinate exact,
            # so a crop does not depend on which other crops set the region.
            map_x -= origin[0]
            map_y -= origin[1]
            crops = cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR, borderMode=border,
                              borderValue=value)
            out[part] = crops.reshape(len(part), size, size, 3)
    return out[:n]


def _pyramid_region(frame: np.ndarray, squares: np.ndarray, level: int
                    ) -> tuple[np.ndarray, tuple[int, int]]:
    """The part of pyramid level ``level`` of ``frame`` that ``squares`` (frame pixels) sample,
    and its origin (x, y) in that level's pixels (whole numbers).

    Only the region around the squares is shrunk: bit for bit the pixels that ``cv2.pyrDown``
    of the whole frame gives there, at a fraction of its cost (a whole 640×640 frame takes
    about 1 ms). The region starts on a multiple of ``2**level`` so that each halving samples
    the same pixels as on the whole frame, and keeps a margin of ``_REGION_MARGIN`` level
    pixels, wider than the band that the 5×5 kernel's border handling changes at the
    region's inner edges (at most 2 pixels per halving). Where the region meets the frame's
    edge it is the frame's edge, so padding is the same too.
    """
    if level == 0:
        return frame, (0, 0)
    h, w = frame.shape[:2]
    step = 2**level
    margin = _REGION_MARGIN * step
    # A square that leaves the frame samples the frame's edge pixels there (or the padding
    # next to them), so the margin is kept around the squares clipped to the frame: a square
    # wholly below a small frame still needs the rows above its bottom edge.
    extent = np.array([w, h], np.float32)
    lo = np.floor(np.clip(squares[:, :2].min(axis=0), 0, extent)) - margin
    hi = np.ceil(np.clip(squares[:, 2:].max(axis=0), 0, extent)) + margin
    x0 = int(np.clip(lo[0], 0, w)) // step * step
    y0 = int(np.clip(lo[1], 0, h)) // step * step
    x1, y1 = int(np.clip(hi[0], 0, w)), int(np.clip(hi[1], 0, h))
    if x1 - x0 < step or y1 - y0 < step:  # every square lies wholly outside the frame
        x0 = y0 = 0
        x1, y1 = w, h
    src = frame[y0:y1, x0:x1]
    for _ in range(level):
        src = cv2.pyrDown(src)
    return src, (x0 // step, y0 // step)
