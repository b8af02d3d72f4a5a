"""Safe mining of ``background`` crops from labelled frames.

The BGRacing labels are not exhaustive: distant cones near the horizon, and some orange ones,
are often unlabelled. A background crop that is really a cone teaches the classifier to reject
cones, so every mined box must be

* far from every labelled box: no overlap with any labelled box grown ``gap`` times around its
  centre plus ``margin_px``;
* outside the horizon band (``horizon_band``, fractions of the frame height), where the
  unlabelled distant cones live.

Three kinds of boxes are mined, each sized like a cone at that row (``HeightByRow``, a line fit
of cone height against the row of its base):

* ``random``: anywhere else in the frame (asphalt, grass, sky, barriers, the overlay);
* ``nose``: the car's own nose and wheels at the bottom of the frame; the car has blue parts
  that a colour proposer fires on;
* ``colour``: blobs of cone-like blue, yellow or orange (HSV thresholds), i.e. the proposer's
  likely false positives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# OpenCV HSV ranges (H in 0..180) of cone-like colours, for proposal-like false positives.
HSV_RANGES = {
    "blue": ((100, 90, 40), (130, 255, 255)),
    "yellow": ((18, 100, 100), (35, 255, 255)),
    "orange": ((0, 120, 90), (15, 255, 255)),
}


@dataclass
class HeightByRow:
    """Cone height as a function of the row of its base, both as fractions of frame height."""

    slope: float = 0.37
    intercept: float = -0.108
    aspect_lo: float = 0.3
    aspect_hi: float = 0.65

    @classmethod
    def fit(cls, samples: list) -> HeightByRow:
        rows, heights, aspects = [], [], []
        for s in samples:
            if len(s.boxes) == 0:
                continue
            h_img = float(s.size[1])
            b = np.asarray(s.boxes, np.float64)
            h = b[:, 3] - b[:, 1]
            rows.append(b[:, 3] / h_img)
            heights.append(h / h_img)
            aspects.append((b[:, 2] - b[:, 0]) / np.maximum(h, 1e-6))
        if not rows or sum(len(r) for r in rows) < 20:
            return cls()
        rows_a, heights_a, aspects_a = map(np.concatenate, (rows, heights, aspects))
        slope, intercept = np.polyfit(rows_a, heights_a, 1)
        lo, hi = np.percentile(aspects_a, [5, 95])
        return cls(float(slope), float(intercept), float(lo), float(hi))

    def height(self, row: np.ndarray) -> np.ndarray:
        return self.slope * row + self.intercept

    def to_list(self) -> list[float]:
        return [self.slope, self.intercept, self.aspect_lo, self.aspect_hi]


def grown(boxes: np.ndarray, gap: float, margin: float) -> np.ndarray:
    """Boxes grown ``gap`` times around their centre, plus ``margin`` pixels on every side."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * gap + margin
    return np.concatenate([c - half, c + half], 1)


def far_from_all(candidates: np.ndarray, forbidden: np.ndarray) -> np.ndarray:
    """Mask of candidate boxes that overlap none of the forbidden boxes (IoU == 0)."""
    if len(forbidden) == 0 or len(candidates) == 0:
        return np.ones(len(candidates), bool)
    c, f = candidates[:, None, :], forbidden[None, :, :]
    ix = np.minimum(c[..., 2], f[..., 2]) - np.maximum(c[..., 0], f[..., 0])
    iy = np.minimum(c[..., 3], f[..., 3]) - np.maximum(c[..., 1], f[..., 1])
    return ~np.any((ix > 0) & (iy > 0), axis=1)


def _accept(cands: np.ndarray, forbidden: np.ndarray, w: int, h: int, band: tuple[float, float],
            n: int) -> np.ndarray:
    bottom = cands[:, 3] / h
    top = cands[:, 1] / h
    inside = (cands[:, 0] >= 0) & (cands[:, 1] >= 0) & (cands[:, 2] <= w) & (cands[:, 3] <= h)
    off_band = (bottom < band[0]) | (top > band[1])
    ok = inside & off_band & far_from_all(cands, forbidden)
    return cands[ok][:n]


def _random_boxes(rng: np.random.Generator, n: int, w: int, h: int, heights: HeightByRow,
                  rows: tuple[float, float], cols: tuple[float, float]) -> np.ndarray:
    base = rng.uniform(rows[0], rows[1], n)
    size = heights.height(base) * h * rng.uniform(0.7, 1.4, n)
    size = np.where(size < 10, rng.uniform(10, 40, n), size)  # above the horizon: any small size
    size = np.minimum(size, 0.3 * h)
    bw = size * rng.uniform(heights.aspect_lo, heights.aspect_hi, n)
    cx = rng.uniform(cols[0] * w, cols[1] * w, n)
    y2 = base * h
    return np.stack([cx - bw / 2, y2 - size, cx + bw / 2, y2], 1).astype(np.float32)


def colour_blob_boxes(image: np.ndarray, min_px: int = 6, max_frac: float = 0.3) -> np.ndarray:
    """Bounding boxes of connected blobs of cone-like colour (a colour proposer's view)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    boxes = []
    for lo, hi in HSV_RANGES.values():
        mask = cv2.inRange(hsv, np.array(lo, np.uint8), np.array(hi, np.uint8))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask)
        for x, y, bw, bh, _ in stats[1:]:
            if min_px <= bh <= max_frac * image.shape[0] and min_px <= bw <= max_frac * \
                    image.shape[1]:
                boxes.append((x, y, x + bw, y + bh))
    return np.array(boxes, np.float32).reshape(-1, 4)


def mine_background(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, cfg,
                    heights: HeightByRow, proposals: np.ndarray | None = None
                    ) -> dict[str, np.ndarray]:
    """Background boxes of one frame, by kind (``random``, ``nose``, ``colour`` and, given
    ``proposals``, ``proposal``).

    Args:
        image: the BGR frame.
        boxes: every labelled box of the frame (all classes).
        rng: random source (seed it for reproducible mining).
        cfg: the ``data.background`` config section.
        heights: the cone size model of the dataset.
        proposals: the node proposer's candidates on the frame, best first. The first
            ``cfg.proposals_per_frame`` of them that keep clear of every label and lie wholly
            above the horizon band are the hardest negatives: what the classifier must reject
            live (sky, trees, buildings, signs, a video overlay). Below the band the labels
            miss too many cones to mine the proposer's candidates safely.
    """
    h, w = image.shape[:2]
    forbidden = grown(boxes, cfg.gap, cfg.margin_px)
    band = tuple(cfg.horizon_band)
    tries = cfg.max_tries
    out = {"random": _accept(_random_boxes(rng, tries, w, h, heights, (0.05, 1.0), (0, 1)),
                             forbidden, w, h, band, cfg.per_frame)}
    x1, y1, x2, y2 = cfg.nose_region
    nose = _random_boxes(rng, tries, w, h, heights, (y1 + 0.1, y2), (x1, x2))
    out["nose"] = _accept(nose, forbidden, w, h, band, cfg.nose_per_frame)
    blobs = colour_blob_boxes(image)
    blobs = blobs[rng.permutation(len(blobs))]
    out["colour"] = _accept(blobs, forbidden, w, h, band, cfg.colour_blobs_per_frame)
    if proposals is not None:
        above = (band[0], float("inf"))  # a box reaching below band[0] is refused
        out["proposal"] = _accept(np.asarray(proposals, np.float32).reshape(-1, 4), forbidden,
                                  w, h, above, cfg.proposals_per_frame)
    return out


def contact_sheet(groups: list[np.ndarray], titles: list[str], path: str | Path,
                  rng: np.random.Generator, per_group: int = 160, cols: int = 20,
                  scale: int = 2) -> None:
    """Write a PNG of random crops of each group (one block of rows per group)."""
    blocks = []
    for crops, title in zip(groups, titles):
        if len(crops) == 0:
            continue
        pick = crops[rng.choice(len(crops), min(per_group, len(crops)), replace=False)]
        s = pick.shape[1]
        rows = -(-len(pick) // cols)
        grid = np.full((rows * (s + 2), cols * (s + 2), 3), 255, np.uint8)
        for i, crop in enumerate(pick):
            r, c = divmod(i, cols)
            grid[r * (s + 2):r * (s + 2) + s, c * (s + 2):c * (s + 2) + s] = crop
        label = np.full((18, grid.shape[1], 3), 255, np.uint8)
        cv2.putText(label, f"{title} ({len(crops)} crops)", (2, 13), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45, (0, 0, 0), 1)
        blocks.append(np.vstack([label, grid]))
    if blocks:
        width = max(b.shape[1] for b in blocks)
        blocks = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255)
                  for b in blocks]
        sheet = np.vstack(blocks)
        sheet = cv2.resize(sheet, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), sheet)
