"""Hand-typed HSV colour windows as cone candidates (``proposer.kind: hsv``).

The first colour proposer of the node, kept for comparison with the learned one
(``node.propose.base.ColourProposer``) and for frames far from the training data: HSV windows
per cone colour (OpenCV ``inRange``), outer contours (``cv2.findContours``) and colour-pixel
counts from one integral image; blobs that hold several touching cones are split (where a
single blob narrows: cones in a line; where a top edge has several tips: cones side by side);
the blobs a cone's stripe splits are merged again; cone-shape filters; a box too wide for a
cone is completed upwards and extended slightly downwards for the base; a polygon mask hides
the car's own body.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np

from node.node_config import HueRange, ProposerConfig
from node.propose.base import _EMPTY, Proposer, merge_greedy, union_by_group
from node.types import Frame


class HsvProposer(Proposer):
    """Colour-blob candidates for blue, yellow and orange cones from HSV windows.

    Args:
        config: the ``proposer`` section of the node config.
    """

    def __init__(self, config: ProposerConfig) -> None:
        super().__init__(config.max_candidates)
        self.config = config
        self._windows: list[list[HueRange]] = [
            config.colours.blue, config.colours.yellow, config.colours.orange
        ]
        k = 2 * config.open_px + 1
        self._open_kernel = (cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
                             if config.open_px else None)
        self._body_cache: dict[tuple[int, int], np.ndarray | None] = {}

    # -- masks ---------------------------------------------------------------------------
    def body_mask(self, height: int, width: int) -> np.ndarray | None:
        """uint8 mask that is 0 over the car's own body polygon and 255 elsewhere."""
        key = (height, width)
        if key not in self._body_cache:
            poly = self.config.body_mask
            if not poly:
                self._body_cache[key] = None
            else:
                pts = np.asarray(poly, np.float64) * np.array([width, height])
                mask = np.full((height, width), 255, np.uint8)
                cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 0)
                self._body_cache[key] = mask
        return self._body_cache[key]

    def colour_masks(self, image: np.ndarray) -> list[np.ndarray]:
        """One binary mask per colour (blue, yellow, orange), opened and body-masked."""
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        body = self.body_mask(*image.shape[:2])
        masks = []
        for windows in self._windows:
            mask = None
            for w in windows:
                m = cv2.inRange(hsv, (w.hue[0], w.sat_min, w.val_min), (w.hue[1], 255, w.val_max))
                mask = m if mask is None else cv2.bitwise_or(mask, m)
            if self._open_kernel is not None:
                mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self._open_kernel)
            if body is not None:
                mask = cv2.bitwise_and(mask, body)
            masks.append(mask)
        return masks

    # -- blobs ---------------------------------------------------------------------------
    def _propose(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        image = frame.image
        h, w = image.shape[:2]
        boxes, scores = [], []
        for mask in self.colour_masks(image):
            b, s = self._blobs_to_cones(mask, h, w)
            boxes.append(b)
            scores.append(s)
        return np.concatenate(boxes), np.concatenate(scores)

    def _blobs_to_cones(self, mask: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        # Outer contours are ~30x cheaper than connectedComponentsWithStats on a sparse mask;
        # colour pixels per box come from one integral image, vectorised over the boxes.
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            return _EMPTY, np.zeros(0)
        rects = np.array([cv2.boundingRect(c) for c in contours], np.int64).reshape(-1, 4)
        integral = cv2.integral(mask, sdepth=cv2.CV_32S)
        ix1, iy1 = rects[:, 0], rects[:, 1]
        ix2, iy2 = ix1 + rects[:, 2], iy1 + rects[:, 3]
        area = (integral[iy2, ix2] - integral[iy1, ix2] - integral[iy2, ix1]
                + integral[iy1, ix1]).astype(np.float64) / 255.0
        # Fragments below a few pixels are noise whatever they belong to.
        keep = area >= max(3, cfg.min_area_px // 4)
        if not keep.any():
            return _EMPTY, np.zeros(0)
        x1, y1 = ix1[keep].astype(np.float64), iy1[keep].astype(np.float64)
        x2, y2 = ix2[keep].astype(np.float64), iy2[keep].astype(np.float64)
        area = area[keep]
        x1, y1, x2, y2, area = self._split_stacked(mask, x1, y1, x2, y2, area)
        groups = self._stripe_groups(x1, y1, x2, y2)
        gx1, gy1, gx2, gy2, garea = union_by_group(groups, x1, y1, x2, y2, area)
        gx1, gy1, gx2, gy2, garea = self._split_side_by_side(mask, gx1, gy1, gx2, gy2, garea)
        bw, bh = gx2 - gx1, gy2 - gy1
        fill = garea / np.maximum(bw * bh, 1.0)
        aspect = bw / np.maximum(bh, 1.0)
        keep = ((bh <= cfg.max_height_frac * h) & (garea >= cfg.min_area_px)
                & (fill >= cfg.min_fill) & (aspect >= cfg.aspect_min)
                & (aspect <= cfg.aspect_max))
        gx1, gy1, gx2, gy2 = gx1[keep], gy1[keep], gx2[keep], gy2[keep]
        bw, bh, garea, fill = bw[keep], bh[keep], garea[keep], fill[keep]
        # A cone is never wider than about cone_aspect x its height: a wider blob is the body
        # of a cone whose tip was lost (blur, shade, occlusion), so extend it upwards.
        full_h = np.maximum(bh, bw / cfg.cone_aspect)
        gy1 = np.maximum(gy2 - full_h, 0.0)
        gy2 = np.minimum(gy2 + cfg.base_extend * full_h, h)
        tall = (gy2 - gy1) >= cfg.min_height_px
        boxes = np.stack([gx1, gy1, gx2, gy2], axis=1)[tall]
        # Rank: colour pixels (near cones first), weighted by how cone-like the fill is.
        score = (garea * np.minimum(fill / 0.4, 1.0))[tall]
        return boxes, score

    def _split_stacked(self, mask: np.ndarray, x1: np.ndarray, y1: np.ndarray,
                       x2: np.ndarray, y2: np.ndarray, area: np.ndarray) -> tuple:
        """Split single blobs taller than one cone part where they narrow: a farther cone's
        base touching the tip of a nearer cone in front of it (cones in a line)."""
        cfg = self.config
        bh = y2 - y1
        odd = np.flatnonzero((bh >= cfg.min_height_px)
                             & ((x2 - x1) < 0.8 * cfg.cone_aspect * bh))
        parts = [split_at_necks(mask, x1[i], y1[i], x2[i], y2[i]) for i in odd]
        return _replace_boxes(x1, y1, x2, y2, area, odd, parts)

    def _split_side_by_side(self, mask: np.ndarray, x1: np.ndarray, y1: np.ndarray,
                            x2: np.ndarray, y2: np.ndarray, area: np.ndarray) -> tuple:
        """Split merged blobs wider than one cone whose top edge has several tips (cones
        side by side, touching in the image) in the valleys between the tips."""
        cfg = self.config
        bh = y2 - y1
        odd = np.flatnonzero((bh >= cfg.min_height_px) & ((x2 - x1) > cfg.cone_aspect * bh))
        parts = [split_at_tips(mask, x1[i], y1[i], x2[i], y2[i]) for i in odd]
        return _replace_boxes(x1, y1, x2, y2, area, odd, parts)

    def _stripe_groups(self, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray,
                       y2: np.ndarray) -> np.ndarray:
        """Group label per blob: a narrower blob just above a wider one, centred on it and
        separated by a gap shorter than ``stripe_merge`` times the taller blob, is the same
        cone's tip above its stripe (transitively: large cones have two stripes)."""
        n = len(x1)
        labels = np.arange(n)
        if n < 2 or self.config.stripe_merge <= 0:
            return labels
        hgt, wid = y2 - y1, x2 - x1
        cx = (x1 + x2) * 0.5
        # Pair (i above j): i is the upper blob, j the lower one.
        gap = y1[None, :] - y2[:, None]
        taller = np.maximum(hgt[:, None], hgt[None, :])
        linked = ((y1[:, None] < y1[None, :])
                  & (gap >= -0.15 * taller - 1.0)
                  & (gap <= self.config.stripe_merge * taller + 1.0)
                  & (np.abs(cx[:, None] - cx[None, :]) <= 0.3 * wid[None, :] + 1.0)
                  & (wid[:, None] <= 1.2 * wid[None, :] + 2.0))
        # Greedy, closest pairs first; a merge must leave a cone-shaped box, so that a line
        # of cones one behind the other does not become one tall candidate.
        max_tall = 1.0 / (0.7 * self.config.cone_aspect)
        pairs = np.argwhere(linked)
        return merge_greedy(np.stack([x1, y1, x2, y2], axis=1),
                            pairs[np.argsort(gap[linked], kind="stable")],
                            lambda u: u[3] - u[1] <= max_tall * (u[2] - u[0]) + 2.0)


def _replace_boxes(x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                   area: np.ndarray, which: np.ndarray, parts: list[np.ndarray]) -> tuple:
    """Replace the boxes ``which`` by their ``parts``, sharing each box's area evenly."""
    if not parts or all(len(pt) == 1 for pt in parts):
        return x1, y1, x2, y2, area
    counts = np.array([len(pt) for pt in parts])
    whole = np.ones(len(x1), bool)
    whole[which] = False
    pieces = np.concatenate(parts)
    return (np.concatenate([x1[whole], pieces[:, 0]]), np.concatenate([y1[whole], pieces[:, 1]]),
            np.concatenate([x2[whole], pieces[:, 2]]), np.concatenate([y2[whole], pieces[:, 3]]),
            np.concatenate([area[whole], np.repeat(area[which] / counts, counts)]))


def split_at_tips(mask: np.ndarray, x1: float, y1: float, x2: float, y2: float,
                  prominence: float = 0.3) -> np.ndarray:
    """Boxes of the cones in one blob box, split where the blob's top edge dips between tips.

    Args:
        mask: the colour mask the blob came from.
        x1, y1, x2, y2: the blob's box (integer pixel edges).
        prominence: how deep (fraction of the box height) the dip between two tips must be.

    Returns:
        (K, 4) boxes; K = 1 (the box itself) when the top edge has a single tip.
    """
    box = np.array([[x1, y1, x2, y2]], np.float64)
    sub = mask[int(y1):int(y2), int(x1):int(x2)] > 0
    bh, bw = sub.shape
    if bw < 6 or bh < 4:
        return box
    has = sub.any(axis=0)
    height = np.where(has, bh - sub.argmax(axis=0), 0).astype(np.float64)
    smooth = np.convolve(height, np.ones(3) / 3.0, mode="same")
    cuts = _valleys(smooth, max(2, bw // 10), lambda a, b: prominence * bh, 0.4 * bh)
    if not cuts:
        return box
    edges = [0, *cuts, bw]
    out = []
    for lo, hi in itertools.pairwise(edges):
        rows = np.flatnonzero(sub[:, lo:hi].any(axis=1))
        if hi - lo >= 2 and len(rows):
            out.append([x1 + lo, y1 + rows[0], x1 + hi, y1 + rows[-1] + 1])
    return np.array(out, np.float64) if out else box


def split_at_necks(mask: np.ndarray, x1: float, y1: float, x2: float, y2: float,
                   prominence: float = 0.35) -> np.ndarray:
    """Boxes of the cones in one blob box, split where the blob narrows between a farther
    cone's base and a nearer cone's tip below it (cones in a line, overlapping in the image).

    Returns:
        (K, 4) boxes, top to bottom; K = 1 when the blob does not narrow.
    """
    box = np.array([[x1, y1, x2, y2]], np.float64)
    sub = mask[int(y1):int(y2), int(x1):int(x2)] > 0
    bh, bw = sub.shape
    if bh < 8 or bw < 3:
        return box
    width = np.convolve(sub.sum(axis=1).astype(np.float64), np.ones(3) / 3.0, mode="same")
    cuts = _valleys(width, max(2, bh // 10), lambda a, b: prominence * min(a, b), 0.3 * bw)
    if not cuts:
        return box
    edges = [0, *cuts, bh]
    out = []
    for lo, hi in itertools.pairwise(edges):
        cols = np.flatnonzero(sub[lo:hi].any(axis=0))
        if hi - lo >= 2 and len(cols):
            out.append([x1 + cols[0], y1 + lo, x1 + cols[-1] + 1, y1 + hi])
    return np.array(out, np.float64) if out else box


def _valleys(profile: np.ndarray, reach: int, depth, floor: float) -> list[int]:
    """Indices of the deepest point between consecutive peaks of ``profile`` (peaks: local
    maxima within ``reach`` that are at least ``floor``), kept where the dip below the lower
    of the two peaks is at least ``depth(peak_a, peak_b)``."""
    padded = np.pad(profile, reach, mode="constant")
    local_max = np.lib.stride_tricks.sliding_window_view(padded, 2 * reach + 1).max(axis=1)
    peaks = np.flatnonzero((profile >= local_max) & (profile >= floor))
    cuts = []
    for a, b in itertools.pairwise(peaks):
        if b - a < 2:
            continue
        valley = a + int(np.argmin(profile[a:b + 1]))
        if min(profile[a], profile[b]) - profile[valley] >= depth(profile[a], profile[b]):
            cuts.append(valley)
    return cuts



