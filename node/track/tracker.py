"""A light ByteTrack-style multi-object tracker for cones (numpy only; issue 23, item 2).

It follows ByteTrack (Zhang et al., *ByteTrack: Multi-Object Tracking by Associating Every
Detection Box*, ECCV 2022): every track carries a constant-velocity Kalman filter on its box
centre, width and height (the SORT / ByteTrack state with width instead of aspect ratio), and
each frame is associated in two stages: high-score detections against all tracks, then
low-score detections against the tracks still unmatched. Assignment is greedy on IoU (highest
first) instead of the Hungarian method: cones are far apart and greedy suffices, which keeps
scipy out of the runtime. Three cone-specific choices:

* a track only takes detections of its own colour (``unknown_cone`` matches any; small and
  large orange count as one, as the classifier confuses them), as blue and yellow cones
  stand side by side;
* when IoU finds no partner, a third stage matches by centre distance normalised by box
  height: at 10 fps a near cone moves and grows by more than its size between frames;
* every unmatched detection at or above ``new_track_score`` starts a track at once, so every
  published cone carries a ``track_id``;
* given each box's camera-frame position (``node.track.range``), tracks are predicted through
  the car's ego-motion, estimated from the static cones themselves (``node.track.egomotion``),
  instead of through the constant-velocity filter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from node.infer.postprocess import iou_matrix

from . import egomotion

UNKNOWN = "unknown_cone"
GROUP = {"large_orange_cone": "orange_cone"}
"""Classes a track may switch between: the classifier confuses small and large orange."""


@dataclass(frozen=True)
class TrackerConfig:
    """The ``tracking:`` config section (validated on construction).

    Attributes:
        high_score: detections at or above this score take part in the first stage.
        low_score: detections below this score are ignored altogether.
        new_track_score: unmatched detections at or above this score start a track.
        match_iou: least IoU for a first-stage match.
        low_match_iou: least IoU for a second-stage (low-score) match.
        max_centre_dist: third stage: largest centre distance, in predicted box heights.
        max_age: frames a track survives unseen before it is dropped.
        class_gate: match only detections of the track's class (unknown matches any).
        max_step_m: ego-motion: largest car travel between frames when its speed is unknown.
        max_accel_m: ego-motion: largest change of the per-frame travel once it is known.
        ego_smoothing: weight of the new ego-motion estimate against the previous one (0..1].
    """

    high_score: float = 0.5
    low_score: float = 0.1
    new_track_score: float = 0.0
    match_iou: float = 0.2
    low_match_iou: float = 0.4
    max_centre_dist: float = 1.0
    max_age: int = 5
    class_gate: bool = True
    max_step_m: float = 2.5
    max_accel_m: float = 0.4
    ego_smoothing: float = 0.5

    def __post_init__(self) -> None:
        bounds = {"high_score": (0.0, 1.0), "low_score": (0.0, 1.0),
                  "new_track_score": (0.0, 1.0), "match_iou": (0.0, 1.0),
                  "low_match_iou": (0.0, 1.0), "max_centre_dist": (0.0, 100.0),
                  "max_age": (0, 1000), "max_step_m": (0.0, 50.0),
                  "max_accel_m": (0.0, 50.0), "ego_smoothing": (0.01, 1.0)}
        for name, (lo, hi) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"tracking.{name}: expected a number, got {value!r}")  # noqa: TRY004
            if not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"tracking.{name}: {value!r} is outside [{lo}, {hi}]")
        if self.max_age != int(self.max_age):
            raise ValueError(f"tracking.max_age: expected an integer, got {self.max_age!r}")
        if self.low_score > self.high_score:
            raise ValueError(f"tracking.low_score: {self.low_score} is above high_score")
        if not isinstance(self.class_gate, bool):
            raise ValueError(f"tracking.class_gate: expected true or false, "  # noqa: TRY004
                             f"got {self.class_gate!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrackerConfig:
        """Build from a config mapping; unknown keys raise ValueError naming the key."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"tracking.{key}: unknown key; expected one of {sorted(known)}")
        return cls(**data)


def greedy_assign(score: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one pairs ``(row, col)`` taken in descending ``score``, each >= ``threshold``."""
    pairs: list[tuple[int, int]] = []
    if score.size == 0:
        return pairs
    used_r, used_c = set(), set()
    for flat in np.argsort(-score, axis=None, kind="stable"):
        r, c = divmod(int(flat), score.shape[1])
        if not score[r, c] >= threshold:
            break
        if r in used_r or c in used_c:
            continue
        pairs.append((r, c))
        used_r.add(r)
        used_c.add(c)
    return pairs


def _xyxy_to_state(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], np.float64)


_DIAG = np.diag_indices(8)


class _Track:
    """One track: a constant-velocity Kalman filter on (cx, cy, w, h) and their rates."""

    _F = np.eye(8)
    _F[:4, 4:] = np.eye(4)
    _H = np.eye(4, 8)
    POS_W, VEL_W = 1.0 / 20.0, 1.0 / 160.0  # ByteTrack's noise weights (times box height)
    _Q2 = np.array([POS_W] * 4 + [VEL_W] * 4) ** 2

    def __init__(self, track_id: int, box: np.ndarray, label: str, score: float) -> None:
        self.id = track_id
        self.label = label
        self.score = score
        self.age = 0  # frames since the last match
        self.hits = 1
        z = _xyxy_to_state(box)
        self.x = np.concatenate([z, np.zeros(4)])
        h = max(z[3], 1.0)
        std = np.array([2 * self.POS_W * h] * 4 + [10 * self.VEL_W * h] * 4)
        self.P = np.diag(std ** 2)
        self.last_box = np.asarray(box, np.float64)
        self.pos: np.ndarray | None = None  # camera-frame position (ego-motion mode)
        self.sd = 0.0
        self.pred_box: np.ndarray | None = None

    def predict(self) -> None:
        h = max(self.x[3], 1.0)
        self.x = self._F @ self.x
        self.x[2:4] = np.maximum(self.x[2:4], 1.0)
        self.P = self._F @ self.P @ self._F.T
        self.P[_DIAG] += self._Q2 * (h * h)  # process noise, scaled by the box height
        self.age += 1

    def update(self, box: np.ndarray, label: str, score: float) -> None:
        z = _xyxy_to_state(box)
        r = np.diag(np.full(4, self.POS_W * max(z[3], 1.0)) ** 2)
        s = self._H @ self.P @ self._H.T + r
        k = self.P @ self._H.T @ np.linalg.inv(s)
        self.x = self.x + k @ (z - self._H @ self.x)
        self.P = (np.eye(8) - k @ self._H) @ self.P
        if self.label == UNKNOWN or GROUP.get(label) == self.label:
            self.label = label
        self.last_box = np.asarray(box, np.float64)
        self.pred_box = None
        self.score = score
        self.age = 0
        self.hits += 1

    def place(self, xyz: np.ndarray, sd: float) -> None:
        """Fuse a measured position (inverse-variance) into the track's static position."""
        if self.pos is None:
            self.pos, self.sd = np.array(xyz, np.float64), sd
            return
        w0, w1 = 1.0 / max(self.sd, 1e-3) ** 2, 1.0 / max(sd, 1e-3) ** 2
        self.pos = (self.pos * w0 + np.asarray(xyz) * w1) / (w0 + w1)
        self.sd = 1.0 / math.sqrt(w0 + w1)

    @property
    def box(self) -> np.ndarray:
        if self.pred_box is not None:
            return self.pred_box
        cx, cy, w, h = self.x[:4]
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


class ConeTracker:
    """Assigns a persistent ``track_id`` to every box (see the module docstring)."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self.tracks: list[_Track] = []
        self._next_id = 1
        self._ego: tuple[float, np.ndarray] | None = None  # last (angle, translation)

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> ConeTracker:
        """From the ``tracking:`` config section (a dict); ValueError names a bad key."""
        return cls(TrackerConfig.from_dict(section))

    def reset(self) -> None:
        """Forget every track (a new clip); ids keep counting up."""
        self.tracks = []
        self._ego = None

    def _predict_ego(self, labels: list[str], xyz: np.ndarray, sigma: np.ndarray,
                     view: tuple[float, float, float, float, float]) -> None:
        """Move every positioned track through the ego-motion found from this frame's cones."""
        cfg = self.config
        placed = [t for t in self.tracks if t.pos is not None]
        if not placed:
            return
        prev = np.array([t.pos[[0, 2]] for t in placed])
        prev_sd = np.array([t.sd for t in placed])
        recent = np.array([t.age <= 1 for t in placed])
        compat = self._gate(placed, labels) & recent[:, None]
        if self._ego is None:
            prior, step = (0.0, np.zeros(2)), cfg.max_step_m
        else:
            prior, step = self._ego, cfg.max_accel_m
        angle, trans, inliers = egomotion.estimate(prev, prev_sd, xyz[:, [0, 2]], sigma,
                                                   compat, prior, step)
        if inliers >= 3:  # the car's motion is smooth: blend with the previous estimate
            if self._ego is not None:
                a = cfg.ego_smoothing
                angle = (1 - a) * self._ego[0] + a * angle
                trans = (1 - a) * self._ego[1] + a * trans
            self._ego = (angle, trans)
        elif self._ego is not None:
            angle, trans = self._ego
        rot = egomotion.rotation(angle)
        for t, p in zip(placed, prev):
            new = t.pos.copy()
            new[[0, 2]] = rot @ p + trans
            t.pred_box = egomotion.warp_box(t.last_box if t.pred_box is None else t.pred_box,
                                            t.pos, new, view)
            t.pos = new
            t.sd = math.hypot(t.sd, 0.1)

    def _shift_predictions(self, boxes: np.ndarray, labels: list[str]) -> None:
        """Remove the common image shift of the predictions (yaw error, pitch jitter)."""
        placed = [t for t in self.tracks if t.pred_box is not None]
        pairs = self._match(placed, boxes, labels, self.config.match_iou, True)
        if len(pairs) < 3:
            return
        shift = egomotion.median_shift(np.array([placed[r].box for r, _ in pairs]),
                                       boxes[[c for _, c in pairs]])
        for t in placed:
            t.pred_box = t.pred_box + np.tile(shift, 2)

    def _gate(self, tracks: list[_Track], labels: list[str]) -> np.ndarray:
        """(tracks, labels) bool: may this track take a box of this label (same colour
        group, or either one unknown)."""
        if not self.config.class_gate:
            return np.ones((len(tracks), len(labels)), bool)
        track_labels = [t.label for t in tracks]
        track_group = np.array([GROUP.get(lb, lb) for lb in track_labels], object)
        box_group = np.array([GROUP.get(lb, lb) for lb in labels], object)
        track_unknown = np.array([lb == UNKNOWN for lb in track_labels], bool)
        box_unknown = np.array([lb == UNKNOWN for lb in labels], bool)
        return ((track_group[:, None] == box_group[None, :]) | track_unknown[:, None]
                | box_unknown[None, :]).reshape(len(tracks), len(labels))

    def _match(self, tracks: list[_Track], boxes: np.ndarray, labels: list[str],
               min_iou: float, use_distance: bool) -> list[tuple[int, int]]:
        if not tracks or len(boxes) == 0:
            return []
        gate = self._gate(tracks, labels)
        pred = np.array([t.box for t in tracks])
        iou = np.where(gate, iou_matrix(pred, boxes), -np.inf)
        pairs = greedy_assign(iou, max(min_iou, 1e-9))
        if not use_distance or self.config.max_centre_dist <= 0:
            return pairs
        rows = [i for i in range(len(tracks)) if i not in {r for r, _ in pairs}]
        cols = [j for j in range(len(boxes)) if j not in {c for _, c in pairs}]
        if rows and cols:
            pc = (pred[rows, :2] + pred[rows, 2:]) / 2
            db = boxes[cols]
            dc = (db[:, :2] + db[:, 2:]) / 2
            scale = np.maximum(np.maximum(pred[rows, 3] - pred[rows, 1], 1.0)[:, None],
                               np.maximum(db[:, 3] - db[:, 1], 1.0)[None, :])
            dist = np.linalg.norm(pc[:, None] - dc[None], axis=2) / scale
            closeness = np.where(gate[np.ix_(rows, cols)], -dist, -np.inf)
            for r, c in greedy_assign(closeness, -self.config.max_centre_dist):
                pairs.append((rows[r], cols[c]))
        return pairs

    def update(self, boxes: np.ndarray, labels: list[str], scores: np.ndarray,
               xyz: np.ndarray | None = None, sigma: np.ndarray | None = None,
               view: tuple[float, float, float, float, float] | None = None
               ) -> list[int | None]:
        """Advance one frame and return each box's track id (None: below ``low_score``).

        Args:
            boxes: (N, 4) xyxy pixels; labels: N class names; scores: (N,) confidences.
            xyz, sigma, view: optional camera-frame positions (N, 3), their 1-sigma (N,) and
                the camera's ``fx, fy, cx, cy, horizon row``; with them, tracks follow the
                ego-motion instead of the constant-velocity filter.
        """
        cfg = self.config
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        for t in self.tracks:
            t.predict()
        ego = xyz is not None and sigma is not None and view is not None
        if ego:
            xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
            sigma = np.asarray(sigma, np.float64).reshape(-1)
            self._predict_ego(labels, xyz, sigma, view)
        ids: list[int | None] = [None] * len(boxes)
        high = [j for j in range(len(boxes)) if scores[j] >= cfg.high_score]
        low = [j for j in range(len(boxes)) if cfg.low_score <= scores[j] < cfg.high_score]
        if ego and self.tracks and len(high):
            self._shift_predictions(boxes[high], [labels[j] for j in high])
        free = list(self.tracks)
        for group, min_iou, use_dist in ((high, cfg.match_iou, True),
                                         (low, cfg.low_match_iou, False)):
            if not group:
                continue
            pairs = self._match(free, boxes[group], [labels[j] for j in group], min_iou,
                                use_dist)
            taken = set()
            for r, c in pairs:
                j = group[c]
                free[r].update(boxes[j], labels[j], float(scores[j]))
                if ego:
                    free[r].place(xyz[j], float(sigma[j]))
                ids[j] = free[r].id
                taken.add(r)
            free = [t for i, t in enumerate(free) if i not in taken]
        for j in range(len(boxes)):
            if ids[j] is None and scores[j] >= max(cfg.new_track_score, cfg.low_score):
                track = _Track(self._next_id, boxes[j], labels[j], float(scores[j]))
                if ego:
                    track.place(xyz[j], float(sigma[j]))
                self._next_id += 1
                self.tracks.append(track)
                ids[j] = track.id
        self.tracks = [t for t in self.tracks if t.age <= cfg.max_age]
        return ids
