"""The proposer contract and the proposers without a model file of their own.

``Proposer`` is the base class: ``propose(frame) -> (N, 4) float32 xyxy boxes``, ranked and
capped. ``ColourProposer`` (``kind: colour``) works from the learned colour statistics of
``node.propose.colour_model``; ``ExternalBoxProposer`` (``kind: external``) reads YOLO label
files. The merging helpers here are shared with ``node.propose.hsv`` and
``node.propose.heatmap``; ``node.propose.build_proposer`` picks a proposer from the config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np

from node.node_config import ProposerConfig
from node.types import Frame

_EMPTY = np.zeros((0, 4), np.float32)


class ProposalError(ValueError):
    """External proposals cannot be read (missing folder, malformed label file)."""


class Proposer(ABC):
    """Base class: ``propose`` ranks, caps and formats what ``_propose`` finds.

    Attributes:
        max_candidates: the per-frame cap.
        suppress_overlaps: whether the pipeline should suppress overlapping detections made
            from these boxes (colour blobs can overlap; external boxes are one object each).
    """

    suppress_overlaps: bool = True

    def __init__(self, max_candidates: int) -> None:
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        self.max_candidates = int(max_candidates)

    def propose(self, frame: Frame) -> np.ndarray:
        """Candidate boxes (N, 4) float32 x1, y1, x2, y2, best first, N <= max_candidates."""
        if frame.image is None:
            return _EMPTY.copy()
        boxes, scores = self._propose(frame)
        if len(boxes) == 0:
            return _EMPTY.copy()
        # Boxes are clipped to the frame (labels are too); a box left with no area is dropped.
        h, w = frame.image.shape[:2]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
        np.clip(boxes[:, 0::2], 0, w, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, h, out=boxes[:, 1::2])
        keep = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        scores = np.asarray(scores, np.float64)[keep]
        order = keep[np.argsort(-scores, kind="stable")[: self.max_candidates]]
        return np.ascontiguousarray(boxes[order])

    @abstractmethod
    def _propose(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 4) and one ranking score per box, in any order."""

    def close(self) -> None:
        """Release resources (none by default)."""



def body_mask_image(polygon: list[list[float]], height: int, width: int) -> np.ndarray | None:
    """uint8 mask, 0 over the car's body polygon (frame fractions) and 255 elsewhere."""
    if not polygon:
        return None
    pts = np.asarray(polygon, np.float64) * np.array([width, height])
    mask = np.full((height, width), 255, np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 0)
    return mask


class ColourProposer(Proposer):
    """Cone candidates from learned colour statistics and a size prior by image row.

    Args:
        config: the ``proposer`` section of the node config (``colour_model`` names the
            learned statistics, ``colour_threshold`` the posterior a pixel needs).

    Raises:
        ColourModelError: the colour model file is missing or malformed.
    """

    def __init__(self, config: ProposerConfig) -> None:
        from node.propose.colour_model import load_colour_model

        super().__init__(config.max_candidates)
        self.config = config
        self.model = load_colour_model(config.colour_model)
        self._level = round(63 * config.colour_threshold)
        self._body_cache: dict[tuple[int, int], np.ndarray | None] = {}

    def body_mask(self, height: int, width: int) -> np.ndarray | None:
        """uint8 mask that is 0 over the car's own body polygon and 255 elsewhere."""
        key = (height, width)
        if key not in self._body_cache:
            self._body_cache[key] = body_mask_image(self.config.body_mask, height, width)
        return self._body_cache[key]

    def colour_map(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        """Packed class/posterior byte per pixel of the rows cones can be in, and that first
        row (rows above the highest cone top of the training data are skipped)."""
        from node.propose.colour_model import colour_codes

        h, w = image.shape[:2]
        row0 = max(int(self.model.row_min * h) - 8, 0)
        packed = np.take(self.model.table, colour_codes(image[row0:]))
        body = self.body_mask(h, w)
        if body is not None:
            packed = cv2.bitwise_and(packed, body[row0:])
        return packed, row0

    def _propose(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        image = frame.image
        h = image.shape[0]
        packed, row0 = self.colour_map(image)
        boxes, scores = [], []
        for c in range(3):
            mask = cv2.inRange(packed, c * 64 + self._level, c * 64 + 63)
            stats = _part_stats(mask, self.config.min_part_px)
            if len(stats):
                b, s = self._cones_from_parts(stats.astype(np.float64), row0, h)
                boxes.append(b)
                scores.append(s)
        if not boxes:
            return _EMPTY, np.zeros(0)
        return np.concatenate(boxes), np.concatenate(scores)

    def _cones_from_parts(self, stats: np.ndarray, row0: int, h: int) -> tuple:
        """Merge the parts of one colour into cones and shape their boxes."""
        cfg, model = self.config, self.model
        x1, y1 = stats[:, 0], stats[:, 1] + row0
        x2, y2, area = x1 + stats[:, 2], y1 + stats[:, 3], stats[:, 4]
        groups = self._merge_parts(x1, y1, x2, y2, h)
        gx1, gy1, gx2, gy2, garea = union_by_group(groups, x1, y1, x2, y2, area)
        expected = np.maximum(model.expected_height(gy2, h), cfg.min_height_px)
        bh, bw = gy2 - gy1, gx2 - gx1
        # A cone's box: at least the prior's share of the expected height (a lone stripe-cut
        # part is extended upwards), its base below the colour, its width the cone's.
        full_h = np.maximum(bh * cfg.grow_height, cfg.min_height_frac * expected)
        cx = (gx1 + gx2) * 0.5
        half_w = np.maximum(bw * cfg.grow_width, model.aspect * full_h) * 0.5
        top = gy2 + cfg.base_extend * full_h - full_h
        boxes = np.stack([cx - half_w, top, cx + half_w, top + full_h], axis=1)
        keep = ((bh <= model.ratio_hi * expected + 4.0) & (full_h >= cfg.min_height_px)
                & (bw <= cfg.aspect_max * np.maximum(bh, 1.0) + 2.0))
        cover = garea / np.maximum(model.aspect * expected * expected, 1.0)
        score = np.minimum(cover, 1.0) * np.sqrt(garea)
        return boxes[keep], score[keep]

    def _merge_parts(self, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray,
                     y2: np.ndarray, frame_h: int) -> np.ndarray:
        """Group label per part: parts stacked vertically whose union fits one cone of the
        expected size (closest pairs first, transitively) are one cone."""
        n = len(x1)
        labels = np.arange(n)
        if n < 2 or self.config.stripe_merge <= 0:
            return labels
        cx, wid = (x1 + x2) * 0.5, x2 - x1
        expected = self.model.expected_height(np.maximum(y2[:, None], y2[None, :]), frame_h)
        gap = np.maximum(y1[None, :] - y2[:, None], y1[:, None] - y2[None, :])
        linked = ((gap <= self.config.stripe_merge * np.maximum(expected, 4.0))
                  & (np.abs(cx[:, None] - cx[None, :])
                     <= 0.5 * np.maximum(wid[:, None], wid[None, :]) + 1.0)
                  & np.triu(np.ones((n, n), bool), 1))
        pairs = np.argwhere(linked)
        if not len(pairs):
            return labels
        slope = self.model.ratio_hi * self.model.slope
        offset = self.model.ratio_hi * float(self.model.expected_height(0.0, frame_h)) + 3.0

        def one_cone(u: list[float]) -> bool:
            return (u[3] - u[1] <= slope * u[3] + offset
                    and u[2] - u[0] <= 0.9 * (u[3] - u[1]) + 3)

        return merge_greedy(np.stack([x1, y1, x2, y2], axis=1),
                            pairs[np.argsort(gap[linked], kind="stable")], one_cone)


def _part_stats(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """(N, 5) x, y, w, h, pixels of the mask's outer contours (their boxes; pixels counted
    from one integral image). Outer contours are several times cheaper than
    ``connectedComponentsWithStats`` on a sparse mask."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 5))
    rects = np.array([cv2.boundingRect(c) for c in contours], np.int64).reshape(-1, 4)
    integral = cv2.integral(mask, sdepth=cv2.CV_32S)
    x1, y1 = rects[:, 0], rects[:, 1]
    x2, y2 = x1 + rects[:, 2], y1 + rects[:, 3]
    pixels = (integral[y2, x2] - integral[y1, x2] - integral[y2, x1]
              + integral[y1, x1]) / 255.0
    keep = pixels >= min_pixels
    return np.column_stack([rects[keep], pixels[keep]]).astype(np.float64)


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return int(i)


def merge_greedy(boxes: np.ndarray, pairs: np.ndarray, accept) -> np.ndarray:
    """Group label per box (0..G-1): the linked ``pairs`` (row indices, best first) are merged
    transitively, each merge only when ``accept(union)`` holds for the union box
    ``[x1, y1, x2, y2]`` of the two groups. Shared by the colour and HSV proposers' stripe
    merging."""
    n = len(boxes)
    labels = np.arange(n)
    bx = np.asarray(boxes, np.float64).reshape(-1, 4).tolist()
    for i, j in np.asarray(pairs).reshape(-1, 2).tolist():
        a, b = _find(labels, i), _find(labels, j)
        if a == b:
            continue
        p, q = bx[a], bx[b]
        u = [min(p[0], q[0]), min(p[1], q[1]), max(p[2], q[2]), max(p[3], q[3])]
        if not accept(u):
            continue
        root, child = min(a, b), max(a, b)
        labels[child] = root
        bx[root] = u
    roots = np.array([_find(labels, i) for i in range(n)], np.int64)
    return np.unique(roots, return_inverse=True)[1]


class ExternalBoxProposer(Proposer):
    """Boxes from YOLO label files, matched to frames by image stem.

    Args:
        labels_dir: a folder of ``.txt`` label files, or a YOLO dataset root holding
            ``labels/``. Class ids in the files are ignored.
        max_candidates: the per-frame cap; the largest boxes are kept first.

    Frames without a name (video) are matched by index to numeric stems (``000012.txt`` is
    frame 12). A frame without a label file gets no boxes.

    Raises:
        ProposalError: the folder does not exist or holds no label files.
    """

    suppress_overlaps = False

    def __init__(self, labels_dir: str | Path, max_candidates: int = 64) -> None:
        super().__init__(max_candidates)
        from node.evaluate.datasets import read_yolo_labels

        root = Path(labels_dir)
        if not root.is_dir():
            raise ProposalError(f"{root}: proposals folder not found")
        folder = root / "labels" if (root / "labels").is_dir() else root
        try:
            self.labels: dict[str, np.ndarray] = read_yolo_labels(folder)
        except (OSError, ValueError) as exc:
            raise ProposalError(f"{folder}: cannot read YOLO labels ({exc})") from None
        if not self.labels:
            raise ProposalError(f"{folder}: no YOLO .txt label files found")
        self.by_index = {int(s): s for s in self.labels if s.isdigit()}

    def rows_for(self, frame: Frame) -> np.ndarray | None:
        """The label rows of a frame (cls, xc, yc, w, h normalised), or None."""
        if frame.source_name is not None:
            return self.labels.get(Path(frame.source_name).stem)
        stem = self.by_index.get(frame.index)
        return None if stem is None else self.labels[stem]

    def _propose(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows_for(frame)
        if rows is None or len(rows) == 0:
            return _EMPTY, np.zeros(0)
        h, w = frame.image.shape[:2]
        boxes = yolo_to_xyxy(rows, w, h)
        return boxes, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])



def union_by_group(groups: np.ndarray, x1, y1, x2, y2, area):
    """Union box and summed pixel count of the parts sharing a group label (0..G-1),
    vectorised over the labels."""
    count = int(groups.max()) + 1
    gx1, gy1 = np.full(count, np.inf), np.full(count, np.inf)
    gx2, gy2 = np.full(count, -np.inf), np.full(count, -np.inf)
    np.minimum.at(gx1, groups, x1)
    np.minimum.at(gy1, groups, y1)
    np.maximum.at(gx2, groups, x2)
    np.maximum.at(gy2, groups, y2)
    return gx1, gy1, gx2, gy2, np.bincount(groups, weights=area, minlength=count)

def yolo_to_xyxy(rows: np.ndarray, width: int, height: int) -> np.ndarray:
    """YOLO rows (cls, xc, yc, w, h), normalised → (N, 4) float32 pixel boxes x1, y1, x2, y2."""
    rows = np.asarray(rows, np.float64).reshape(-1, 5)
    xc, yc = rows[:, 1] * width, rows[:, 2] * height
    bw, bh = rows[:, 3] * width, rows[:, 4] * height
    return np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], 1).astype(np.float32)
