"""Monocular range and multi-object tracking of cones (issue 23).

``TrackingStage`` is the seam the pipeline calls once per frame, after post-processing:
``stage.update(cones, frame_w, frame_h, stamp)`` returns the same cones with ``range_m``,
``range_sigma_m``, ``xyz``, ``range_basis`` and ``track_id`` filled. Only numpy is used.
"""

from .range import CameraConfig, RangeEstimator, RangeResult, pinhole_sigma
from .stage import TrackingStage, label_text
from .tracker import ConeTracker, TrackerConfig

__all__ = ["CameraConfig", "ConeTracker", "RangeEstimator", "RangeResult", "TrackerConfig",
           "TrackingStage", "label_text", "pinhole_sigma"]
