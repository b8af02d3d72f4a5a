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

from node.classes import COLOUR_GROUP as GROUP
from node.classes import UNKNOWN
from node.infer.postprocess import colour_group_codes, iou_matrix, same_colour

from . import egomotion


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
    flat = np.flatnonzero(score.ravel() >= threshold)
    if not len(flat):
        return pairs
    used_r, used_c = set(), set()
    for f in flat[np.argsort(-score.ravel()[flat], kind="stable")]:
        r, c = divmod(int(f), score.shape[1])
        if r in used_r or c in used_c:
            continue
        pairs.append((r, c))
        used_r.add(r)
        used_c.add(c)
    return pairs


def _xyxy_to_state(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 4) centre x, centre y, width, height."""
    return np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]],
                          axis=1)


_DIAG = np.diag_indices(8)
_F = np.eye(8)
_F[:4, 4:] = np.eye(4)
_H = np.eye(4, 8)
POS_W, VEL_W = 1.0 / 20.0, 1.0 / 160.0  # ByteTrack's noise weights (times box height)
_Q2 = np.array([POS_W] * 4 + [VEL_W] * 4) ** 2


class _Tracks:
    """Every live track, one row each (arrays, so that a frame costs a few numpy calls).

    Each row is a constant-velocity Kalman filter on (cx, cy, w, h) and their rates, the
    track's id, label, score, age (frames since its last match), last matched box, and in
    ego-motion mode its camera-frame position (NaN until placed) with 1-sigma and the box
    predicted through the ego-motion (``has_pred``).
    """

    def __init__(self) -> None:
        self.id = np.zeros(0, np.int64)
        self.label: list[str] = []
        self.group = np.zeros(0, np.int64)  # colour_group_codes(self.label), kept in step
        self.score = np.zeros(0)
        self.age = np.zeros(0, np.int64)
        self.hits = np.zeros(0, np.int64)
        self.x = np.zeros((0, 8))
        self.P = np.zeros((0, 8, 8))
        self.last_box = np.zeros((0, 4))
        self.pos = np.zeros((0, 3))
        self.sd = np.zeros(0)
        self.pred_box = np.zeros((0, 4))
        self.has_pred = np.zeros(0, bool)

    def __len__(self) -> int:
        return len(self.id)

    def add(self, ids: np.ndarray, boxes: np.ndarray, labels: list[str], scores: np.ndarray,
            xyz: np.ndarray | None, sd: np.ndarray | None) -> None:
        """Start one track per row of ``boxes``; ``xyz``/``sd`` place them (ego-motion)."""
        n = len(boxes)
        z = _xyxy_to_state(boxes)
        h = np.maximum(z[:, 3], 1.0)
        std = np.concatenate([np.outer(h, [2 * POS_W] * 4), np.outer(h, [10 * VEL_W] * 4)], 1)
        P = np.zeros((n, 8, 8))
        P[:, _DIAG[0], _DIAG[1]] = std ** 2
        pos = np.full((n, 3), np.nan) if xyz is None else np.array(xyz, np.float64)
        sd0 = np.zeros(n) if sd is None else np.array(sd, np.float64)
        self.id = np.concatenate([self.id, ids])
        self.label = self.label + list(labels)
        self.group = np.concatenate([self.group, colour_group_codes(labels)])
        self.score = np.concatenate([self.score, scores])
        self.age = np.concatenate([self.age, np.zeros(n, np.int64)])
        self.hits = np.concatenate([self.hits, np.ones(n, np.int64)])
        self.x = np.concatenate([self.x, np.concatenate([z, np.zeros((n, 4))], 1)])
        self.P = np.concatenate([self.P, P])
        self.last_box = np.concatenate([self.last_box, boxes])
        self.pos = np.concatenate([self.pos, pos])
        self.sd = np.concatenate([self.sd, sd0])
        self.pred_box = np.concatenate([self.pred_box, np.zeros((n, 4))])
        self.has_pred = np.concatenate([self.has_pred, np.zeros(n, bool)])

    def keep(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (bool mask), in order."""
        for name in ("id", "group", "score", "age", "hits", "x", "P", "last_box", "pos", "sd",
                     "pred_box", "has_pred"):
            setattr(self, name, getattr(self, name)[rows])
        self.label = [lb for lb, k in zip(self.label, rows) if k]

    def predict(self) -> None:
        """One constant-velocity step of every filter; process noise scales with the box."""
        h = np.maximum(self.x[:, 3], 1.0)
        self.x = self.x @ _F.T
        self.x[:, 2:4] = np.maximum(self.x[:, 2:4], 1.0)
        self.P = _F @ self.P @ _F.T
        self.P[:, _DIAG[0], _DIAG[1]] += _Q2 * (h * h)[:, None]
        self.age += 1

    def update(self, rows: np.ndarray, boxes: np.ndarray, labels: list[str],
               scores: np.ndarray) -> None:
        """Kalman update of ``rows`` with their matched ``boxes`` (same order)."""
        z = _xyxy_to_state(boxes)
        P = self.P[rows]
        s = P[:, :4, :4] + np.eye(4) * ((POS_W * np.maximum(z[:, 3], 1.0)) ** 2)[:, None, None]
        k = P[:, :, :4] @ np.linalg.inv(s)
        self.x[rows] += (k @ (z - self.x[rows, :4])[:, :, None])[:, :, 0]
        self.P[rows] = (np.eye(8) - k @ _H) @ P
        for r, label in zip(rows.tolist(), labels):
            if self.label[r] == UNKNOWN or GROUP.get(label) == self.label[r]:
                self.label[r] = label
                self.group[r] = colour_group_codes([label])[0]
        self.last_box[rows] = boxes
        self.has_pred[rows] = False
        self.score[rows] = scores
        self.age[rows] = 0
        self.hits[rows] += 1

    def place(self, rows: np.ndarray, xyz: np.ndarray, sd: np.ndarray) -> None:
        """Fuse measured positions (inverse-variance) into the rows' static positions."""
        first = np.isnan(self.pos[rows, 0])
        w0 = 1.0 / np.maximum(self.sd[rows], 1e-3) ** 2
        w1 = 1.0 / np.maximum(sd, 1e-3) ** 2
        fused = (self.pos[rows] * w0[:, None] + xyz * w1[:, None]) / (w0 + w1)[:, None]
        self.pos[rows] = np.where(first[:, None], xyz, fused)
        self.sd[rows] = np.where(first, sd, 1.0 / np.sqrt(w0 + w1))

    def boxes(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """(N, 4) xyxy: the ego-motion prediction where there is one, else the filter's."""
        cx, cy, w, h = self.x[rows, :4].T
        own = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        return np.where(self.has_pred[rows, None], self.pred_box[rows], own)


class ConeTracker:
    """Assigns a persistent ``track_id`` to every box (see the module docstring)."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self.tracks = _Tracks()
        self._next_id = 1
        self._ego: tuple[float, np.ndarray] | None = None  # last (angle, translation)

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> ConeTracker:
        """From the ``tracking:`` config section (a dict); ValueError names a bad key."""
        return cls(TrackerConfig.from_dict(section))

    def reset(self) -> None:
        """Forget every track (a new clip); ids keep counting up."""
        self.tracks = _Tracks()
        self._ego = None

    def _predict_ego(self, codes: np.ndarray, xyz: np.ndarray, sigma: np.ndarray,
                     view: tuple[float, float, float, float, float]) -> None:
        """Move every positioned track through the ego-motion found from this frame's cones."""
        cfg, tr = self.config, self.tracks
        placed = np.flatnonzero(~np.isnan(tr.pos[:, 0]))
        if not len(placed):
            return
        prev = tr.pos[placed][:, [0, 2]]
        compat = self._gate(placed, codes) & (tr.age[placed] <= 1)[:, None]
        if self._ego is None:
            prior, step = (0.0, np.zeros(2)), cfg.max_step_m
        else:
            prior, step = self._ego, cfg.max_accel_m
        angle, trans, inliers = egomotion.estimate(prev, tr.sd[placed], xyz[:, [0, 2]], sigma,
                                                   compat, prior, step)
        if inliers >= 3:  # the car's motion is smooth: blend with the previous estimate
            if self._ego is not None:
                a = cfg.ego_smoothing
                angle = (1 - a) * self._ego[0] + a * angle
                trans = (1 - a) * self._ego[1] + a * trans
            self._ego = (angle, trans)
        elif self._ego is not None:
            angle, trans = self._ego
        new = tr.pos[placed].copy()
        new[:, [0, 2]] = prev @ egomotion.rotation(angle).T + trans
        base = np.where(tr.has_pred[placed, None], tr.pred_box[placed], tr.last_box[placed])
        tr.pred_box[placed] = egomotion.warp_boxes(base, tr.pos[placed], new, view)
        tr.has_pred[placed] = True
        tr.pos[placed] = new
        tr.sd[placed] = np.hypot(tr.sd[placed], 0.1)

    def _shift_predictions(self, boxes: np.ndarray, codes: np.ndarray) -> None:
        """Remove the common image shift of the predictions (yaw error, pitch jitter)."""
        tr = self.tracks
        placed = np.flatnonzero(tr.has_pred)
        pairs = self._match(placed, boxes, codes, self.config.match_iou, True)
        if len(pairs) < 3:
            return
        rows, cols = (np.array(v) for v in zip(*pairs))
        shift = egomotion.median_shift(tr.pred_box[placed[rows]], boxes[cols])
        tr.pred_box[placed] += np.tile(shift, 2)

    def _gate(self, rows: np.ndarray, box_group: np.ndarray) -> np.ndarray:
        """(rows, boxes) bool: may this track take a box of this colour group
        (``colour_group_codes`` of its label): ``same_colour``."""
        if not self.config.class_gate:
            return np.ones((len(rows), len(box_group)), bool)
        return same_colour(self.tracks.group[rows], box_group)

    def _match(self, rows: np.ndarray, boxes: np.ndarray, codes: np.ndarray,
               min_iou: float, use_distance: bool) -> list[tuple[int, int]]:
        """Pairs (index into ``rows``, index into ``boxes``): IoU first, then distance;
        ``codes`` are the boxes' colour groups (``colour_group_codes``)."""
        if not len(rows) or len(boxes) == 0:
            return []
        gate = self._gate(rows, codes)
        pred = self.tracks.boxes(rows)
        iou = np.where(gate, iou_matrix(pred, boxes), -np.inf)
        pairs = greedy_assign(iou, max(min_iou, 1e-9))
        if not use_distance or self.config.max_centre_dist <= 0:
            return pairs
        free_r = np.ones(len(rows), bool)
        free_c = np.ones(len(boxes), bool)
        for r, c in pairs:
            free_r[r] = free_c[c] = False
        left, right = np.flatnonzero(free_r), np.flatnonzero(free_c)
        if len(left) and len(right):
            pc = (pred[left, :2] + pred[left, 2:]) / 2
            db = boxes[right]
            dc = (db[:, :2] + db[:, 2:]) / 2
            scale = np.maximum(np.maximum(pred[left, 3] - pred[left, 1], 1.0)[:, None],
                               np.maximum(db[:, 3] - db[:, 1], 1.0)[None, :])
            dist = np.linalg.norm(pc[:, None] - dc[None], axis=2) / scale
            closeness = np.where(gate[np.ix_(left, right)], -dist, -np.inf)
            for r, c in greedy_assign(closeness, -self.config.max_centre_dist):
                pairs.append((int(left[r]), int(right[c])))
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
        cfg, tr = self.config, self.tracks
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        labels = list(labels)
        codes = colour_group_codes(labels)
        tr.predict()
        ego = xyz is not None and sigma is not None and view is not None
        if ego:
            xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
            sigma = np.asarray(sigma, np.float64).reshape(-1)
            self._predict_ego(codes, xyz, sigma, view)
        ids = np.zeros(len(boxes), np.int64)  # 0: no track
        high = np.flatnonzero(scores >= cfg.high_score)
        low = np.flatnonzero((scores >= cfg.low_score) & (scores < cfg.high_score))
        if ego and len(tr) and len(high):
            self._shift_predictions(boxes[high], codes[high])
        free = np.arange(len(tr))
        for group, min_iou, use_dist in ((high, cfg.match_iou, True),
                                         (low, cfg.low_match_iou, False)):
            if not len(group):
                continue
            pairs = self._match(free, boxes[group], codes[group], min_iou, use_dist)
            if not pairs:
                continue
            r_idx, c_idx = (np.array(v) for v in zip(*pairs))
            rows, dets = free[r_idx], group[c_idx]
            tr.update(rows, boxes[dets], [labels[j] for j in dets], scores[dets])
            if ego:
                tr.place(rows, xyz[dets], sigma[dets])
            ids[dets] = tr.id[rows]
            free = np.delete(free, r_idx)
        new = np.flatnonzero((ids == 0) & (scores >= max(cfg.new_track_score, cfg.low_score)))
        if len(new):
            new_ids = np.arange(self._next_id, self._next_id + len(new))
            self._next_id += len(new)
            tr.add(new_ids, boxes[new], [labels[j] for j in new], scores[new],
                   xyz[new] if ego else None, sigma[new] if ego else None)
            ids[new] = new_ids
        tr.keep(tr.age <= cfg.max_age)
        return [int(i) if i else None for i in ids]
