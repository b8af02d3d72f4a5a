"""Data that flows through the node: frames in, labelled cones and latency figures out.

These are the seams between sources, proposers, backends, the pipeline and publishers; keep
them small and free of heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STAGES: tuple[str, ...] = ("capture", "propose", "preprocess", "infer", "post", "publish")
"""Latency stages, in pipeline order. ``total`` (capture to publish) is added per frame."""


@dataclass
class Frame:
    """One camera or replay frame.

    Attributes:
        index: 0-based position in the source (replay: input order; live: capture count).
        stamp: capture time, seconds since the epoch (bag/topic time when replaying a bag).
        image: H×W×3 uint8 BGR, or ``None`` when the frame could not be read (see ``error``).
        source_name: image file name for folders and globs, ``None`` for video and cameras.
        capture_ms: time spent obtaining/decoding this frame.
        error: why the frame could not be read, for frames that are skipped but recorded.
    """

    index: int
    stamp: float
    image: np.ndarray | None
    source_name: str | None = None
    capture_ms: float = 0.0
    error: str | None = None


@dataclass
class Cone:
    """A published cone: box (x1, y1, x2, y2) in pixels of the original frame.

    The optional fields are filled by ``node.track`` (issue 23) and appear in ``to_dict`` only
    when set, so records without tracking keep exactly the keys they always had.

    Attributes:
        range_m: distance from the camera to the cone's base centre, metres.
        range_sigma_m: 1-sigma uncertainty of ``range_m``, metres.
        xyz: base centre in the camera frame (x right, y down, z along the optical axis), m.
        range_basis: how the range was found (``size``, ``size+ground``; suffixed
            ``@default_hfov`` when no intrinsics were configured).
        track_id: identity of the cone across frames (positive, unique per tracker).
    """

    box: tuple[float, float, float, float]
    label: str
    score: float
    range_m: float | None = None
    range_sigma_m: float | None = None
    xyz: tuple[float, float, float] | None = None
    range_basis: str | None = None
    track_id: int | None = None

    def to_dict(self) -> dict:
        out = {"box": [round(float(v), 2) for v in self.box], "label": self.label,
               "score": round(float(self.score), 4)}
        if self.range_m is not None:
            out["range_m"] = round(float(self.range_m), 3)
        if self.range_sigma_m is not None:
            out["range_sigma_m"] = round(float(self.range_sigma_m), 3)
        if self.xyz is not None:
            out["xyz"] = [round(float(v), 3) for v in self.xyz]
        if self.range_basis is not None:
            out["range_basis"] = self.range_basis
        if self.track_id is not None:
            out["track_id"] = int(self.track_id)
        return out



def label_text(cone: Cone) -> str:
    """Annotation text: ``"blue_cone #12 7.4 m"`` (parts that are unset are left out)."""
    parts = [cone.label]
    if cone.track_id is not None:
        parts.append(f"#{cone.track_id}")
    if cone.range_m is not None:
        parts.append(f"{cone.range_m:.1f} m")
    return " ".join(parts)

@dataclass
class FrameResult:
    """Everything published for one frame."""

    frame: Frame
    cones: list[Cone] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    num_candidates: int = 0
    error: str | None = None

    def to_record(self) -> dict:
        """The JSONL record of docs/design.md (one per input frame, in input order)."""
        img = self.frame.image
        h, w = (img.shape[:2] if img is not None else (None, None))
        record = {
            "frame": self.frame.index,
            "source": self.frame.source_name,
            "stamp": self.frame.stamp,
            "width": w,
            "height": h,
            "cones": [c.to_dict() for c in self.cones],
            "latency_ms": {k: round(float(v), 3) for k, v in self.latency_ms.items()},
        }
        error = self.error or self.frame.error
        if error:
            record["error"] = error
        return record
