"""The per-frame tracking stage: range for every cone, then a track id (issue 23).

This is the seam for the pipeline: after post-processing, before publishing::

    stage = TrackingStage.from_config({"camera": {...}, "tracking": {...}})
    result.cones = stage.update(result.cones, frame_w, frame_h, frame.stamp)

Publishers then find ``range_m``, ``range_sigma_m``, ``xyz``, ``range_basis`` and
``track_id`` on each ``node.types.Cone``; ``label_text`` is the annotation string.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from node.types import Cone, label_text

from .range import RangeEstimator
from .tracker import ConeTracker

__all__ = ["TrackingStage", "label_text"]


class TrackingStage:
    """Range estimator plus tracker, applied to one frame's cones at a time."""

    def __init__(self, estimator: RangeEstimator | None = None,
                 tracker: ConeTracker | None = None) -> None:
        self.estimator = estimator or RangeEstimator()
        self.tracker = tracker or ConeTracker()

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> TrackingStage:
        """From a mapping with optional ``camera`` and ``tracking`` sections.

        Raises:
            ValueError: an unknown section or key, or a bad value; the message names it.
        """
        config = dict(config or {})
        for key in config:
            if key not in ("camera", "tracking"):
                raise ValueError(f"{key}: unknown section; expected camera or tracking")
        return cls(RangeEstimator.from_config(config.get("camera")),
                   ConeTracker.from_config(config.get("tracking")))

    @property
    def note(self) -> str:
        """One line for the run summary (says when the default field of view is used)."""
        return self.estimator.note

    def update(self, cones: list[Cone], frame_w: int, frame_h: int,
               stamp: float | None = None) -> list[Cone]:
        """Return ``cones`` (same order) with range, position and track id filled.

        Args:
            cones: the frame's published cones.
            frame_w, frame_h: the frame size in pixels (boxes are in these pixels).
            stamp: capture time; unused today (the filter steps once per frame), kept for
                a time-aware motion model.
        """
        del stamp
        boxes = np.array([c.box for c in cones], np.float64).reshape(-1, 4)
        labels = [c.label for c in cones]
        est = self.estimator.estimate(boxes, labels, frame_w, frame_h)
        ids = self.tracker.update(boxes, labels, np.array([c.score for c in cones]),
                                  est.xyz, est.sigma_m, self.estimator.view(frame_w, frame_h))
        return [replace(c, range_m=r, range_sigma_m=sd, xyz=tuple(p), range_basis=basis,
                        track_id=i)
                for c, r, sd, p, basis, i in zip(cones, est.range_m.tolist(),
                                                  est.sigma_m.tolist(), est.xyz.tolist(),
                                                  est.basis, ids, strict=True)]

    def reset(self) -> None:
        """Forget all tracks (a new recording)."""
        self.tracker.reset()

