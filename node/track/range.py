"""Monocular range of Formula Student cones from their boxes (issue 23, item 1).

A pinhole camera (Hartley & Zisserman, *Multiple View Geometry*, ch. 6) and the cone sizes of
the Formula Student rules (small cones 325 mm tall on a 228 mm base plate, large orange cones
505 mm on 285 mm) give each box a camera-frame position of the cone's base centre:

* **size** (always): a cone of height ``H`` whose box is ``h`` px tall stands at depth
  ``Z = (fy·H + r·(y2 − v_hor)) / h``. The first term is the textbook ``fy·H/h``; the second
  corrects for the box bottom being the *front* edge of the base plate (``r`` = its mean
  reach towards the camera, ``4/pi`` of the plate's half side), which is ``y2 − v_hor`` px
  below the horizon row ``v_hor`` (``cy`` when the pitch is not configured). Its 1-sigma is
  ``sigma_Z = Z²·sigma_h / (fy·H)`` (the issue's formula), with the box-height noise
  ``sigma_h = sqrt(sigma_h_px² + (sigma_h_rel·h)²)``.
* **ground** (when the camera height and pitch are configured): the ray through the box's
  bottom centre meets the ground plane at the plate's front edge; ``r`` further along the
  view is the base centre. Its 1-sigma is ``Z²·cos(pitch)·sigma_v / (fy·hc)`` with the
  bottom-edge noise and the pitch noise ``sigma_v = sqrt((sigma_h/√2)² + (fy·sigma_pitch)²)``.
  The two are fused by inverse variance (their small correlation through ``y2`` is ignored).

``range_m`` is the Euclidean distance to the base centre; ``range_sigma_m`` scales sigma_Z by
``range/Z`` (the pixel ray is fixed, so every coordinate scales with Z).

Intrinsics come from the ``camera:`` config (fx, fy, cx, cy at a calibrated image size) or a
``sensor_msgs/CameraInfo`` (``from_camera_info``); without them a default horizontal field of
view of ``DEFAULT_HFOV_DEG`` with square pixels (or the ``native_aspect`` squeeze) is assumed
and every range is marked ``@default_hfov``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

DEFAULT_HFOV_DEG = 90.0
"""Horizontal field of view assumed when no intrinsics are configured (degrees)."""

CONE_HEIGHT_M: dict[str, float] = {"blue_cone": 0.325, "yellow_cone": 0.325,
                                   "orange_cone": 0.325, "unknown_cone": 0.325,
                                   "large_orange_cone": 0.505}
"""Cone heights of the Formula Student rules, ground to tip (metres)."""

PLATE_SIDE_M: dict[str, float] = {"large_orange_cone": 0.285}
"""Base plate side per class (metres); every other class has the small cones' 0.228 m."""

SMALL_PLATE_SIDE_M = 0.228


def plate_reach(label: str) -> float:
    """Mean reach of a square base plate towards the camera, over a uniform plate yaw (m)."""
    return PLATE_SIDE_M.get(label, SMALL_PLATE_SIDE_M) / 2.0 * 4.0 / math.pi


@dataclass(frozen=True)
class CameraConfig:
    """The ``camera:`` config section (all optional; validated on construction).

    Attributes:
        fx, fy, cx, cy: intrinsics in pixels at ``image_width`` x ``image_height``; give all
            four or none. Frames of another size scale them proportionally.
        image_width, image_height: the calibrated image size (needed with fx..cy).
        hfov_deg: horizontal field of view used when fx..cy are not given.
        native_aspect: width/height of the sensor before the frames were resized (16/9 for
            the bgracing frames); None means square pixels. Used with ``hfov_deg`` only.
        height_m: camera height above the ground (enables the ground-plane estimate).
        pitch_deg: downward tilt of the optical axis (degrees, positive looking down).
        sigma_h_px: constant part of the box-height noise (pixels). The defaults of
            ``sigma_h_px``, ``sigma_h_rel`` and ``box_pad_px`` were fitted to the bundled
            node's boxes on one rendered clip (``python -m export.track_eval --calibrate``,
            seeds 100-102; docs/tracking.md) and hold for other seeds; refit them for a new model.
        sigma_h_rel: part of the box-height noise proportional to the box height.
        sigma_pitch_deg: frame-to-frame pitch noise (suspension, vibration), degrees.
        box_pad_px: how much taller a box is than the cone's projected height, on average
            (a box that encloses every touched pixel is about 1 px taller).
        pitch_prior_sigma_deg: how far the pitch may be from 0 when ``pitch_deg`` is not
            given; widens ``range_sigma_m`` accordingly.
    """

    fx: float | None = None
    fy: float | None = None
    cx: float | None = None
    cy: float | None = None
    image_width: int | None = None
    image_height: int | None = None
    hfov_deg: float = DEFAULT_HFOV_DEG
    native_aspect: float | None = None
    height_m: float | None = None
    pitch_deg: float | None = None
    sigma_h_px: float = 1.0
    sigma_h_rel: float = 0.02
    sigma_pitch_deg: float = 0.25
    box_pad_px: float = 1.0
    pitch_prior_sigma_deg: float = 8.0

    def __post_init__(self) -> None:
        ranges = {"fx": (1e-3, 1e6), "fy": (1e-3, 1e6), "cx": (-1e5, 1e5), "cy": (-1e5, 1e5),
                  "image_width": (1, 65536), "image_height": (1, 65536),
                  "hfov_deg": (1.0, 179.0), "native_aspect": (0.1, 10.0),
                  "height_m": (0.01, 20.0), "pitch_deg": (-45.0, 45.0),
                  "sigma_h_px": (0.0, 100.0), "sigma_h_rel": (0.0, 1.0),
                  "sigma_pitch_deg": (0.0, 10.0), "box_pad_px": (-20.0, 20.0),
                  "pitch_prior_sigma_deg": (0.0, 45.0)}
        for name, (lo, hi) in ranges.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"camera.{name}: expected a number, got {value!r}")  # noqa: TRY004
            if not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"camera.{name}: {value!r} is outside [{lo}, {hi}]")
        given = [n for n in ("fx", "fy", "cx", "cy") if getattr(self, n) is not None]
        if given and len(given) != 4:
            missing = sorted({"fx", "fy", "cx", "cy"} - set(given))
            raise ValueError(f"camera.{missing[0]}: give all of fx, fy, cx, cy or none")
        if given and (self.image_width is None or self.image_height is None):
            name = "image_width" if self.image_width is None else "image_height"
            raise ValueError(f"camera.{name}: required with fx, fy, cx, cy")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CameraConfig:
        """Build from a config mapping; unknown keys raise ValueError naming the key."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"camera.{key}: unknown key; expected one of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_camera_info(cls, info: Any, **extra: Any) -> CameraConfig:
        """Intrinsics from a ``sensor_msgs/CameraInfo`` (a message or a dict with ``k``/``K``,
        ``width``, ``height``); ``extra`` sets the other fields (height_m, pitch_deg, ...)."""
        get = (info.get if isinstance(info, dict) else lambda k, d=None: getattr(info, k, d))
        k = get("k", None)
        if k is None:
            k = get("K", None)
        if k is None or len(k) != 9:
            raise ValueError("camera_info.k: expected the 9 values of the 3x3 matrix K")
        return cls(fx=float(k[0]), fy=float(k[4]), cx=float(k[2]), cy=float(k[5]),
                   image_width=int(get("width")), image_height=int(get("height")), **extra)

    @property
    def calibrated(self) -> bool:
        return self.fx is not None

    def intrinsics(self, width: int, height: int) -> tuple[float, float, float, float]:
        """``fx, fy, cx, cy`` for a ``width`` x ``height`` frame."""
        if self.calibrated:
            sx, sy = width / self.image_width, height / self.image_height
            return self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy
        fx = width / 2.0 / math.tan(math.radians(self.hfov_deg) / 2.0)
        fy = fx if self.native_aspect is None else fx * height / width * self.native_aspect
        return fx, fy, width / 2.0, height / 2.0


@dataclass
class RangeResult:
    """Per-box range estimates (arrays of length N)."""

    xyz: np.ndarray  # (N, 3) camera-frame base centre, metres
    range_m: np.ndarray
    sigma_m: np.ndarray
    basis: list[str]


class RangeEstimator:
    """Range, bearing and uncertainty of cones from their boxes (see the module docstring)."""

    def __init__(self, config: CameraConfig | None = None) -> None:
        self.config = config or CameraConfig()

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> RangeEstimator:
        """From the ``camera:`` config section (a dict); ValueError names a bad key."""
        return cls(CameraConfig.from_dict(section))

    @property
    def note(self) -> str:
        """One line for the run summary: where the intrinsics came from."""
        c = self.config
        if c.calibrated:
            return "intrinsics from config/CameraInfo"
        return f"no intrinsics: default horizontal field of view {c.hfov_deg:g} deg"

    def view(self, width: int, height: int) -> tuple[float, float, float, float, float]:
        """``fx, fy, cx, cy`` and the horizon row for a ``width`` x ``height`` frame."""
        fx, fy, cx, cy = self.config.intrinsics(width, height)
        return fx, fy, cx, cy, cy - fy * math.tan(math.radians(self.config.pitch_deg or 0.0))

    def estimate(self, boxes: np.ndarray, labels: list[str], width: int,
                 height: int) -> RangeResult:
        """Estimate every box's base-centre position, range and 1-sigma.

        Args:
            boxes: (N, 4) ``x1, y1, x2, y2`` in pixels of a ``width`` x ``height`` frame.
            labels: class names (unknown names use the small cones' size).
            width, height: frame size in pixels.
        """
        c = self.config
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        n = len(b)
        fx, fy, cx, cy = c.intrinsics(width, height)
        cone_h = np.array([CONE_HEIGHT_M.get(lb, 0.325) for lb in labels], np.float64)
        reach = np.array([plate_reach(lb) for lb in labels], np.float64)
        h = np.maximum(b[:, 3] - b[:, 1] - c.box_pad_px, 1.0)
        u = (b[:, 0] + b[:, 2]) / 2.0
        y2 = b[:, 3]
        pitch = math.radians(c.pitch_deg or 0.0)
        v_hor = cy - fy * math.tan(pitch)
        below = np.maximum(y2 - v_hor, 0.0)
        # A vertical segment below the optical axis is foreshortened by the pitch.
        tilt = math.cos(pitch) - math.sin(pitch) * ((b[:, 1] + b[:, 3]) / 2.0 - cy) / fy
        z_size = (fy * cone_h * tilt + reach * below) / h
        sigma_h = np.sqrt(c.sigma_h_px ** 2 + (c.sigma_h_rel * h) ** 2)
        reach_sd = 0.098 * reach  # spread of the reach over the plate's yaw
        var_size = (z_size ** 2 * sigma_h / (fy * cone_h)) ** 2 + (reach_sd * below / h) ** 2
        if c.pitch_deg is None:  # an unknown pitch: the tilt factor's own uncertainty
            s_pitch = math.radians(c.pitch_prior_sigma_deg)
            off_axis = ((b[:, 1] + b[:, 3]) / 2.0 - cy) / fy
            var_size = var_size + z_size ** 2 * ((off_axis * s_pitch) ** 2
                                                 + (s_pitch ** 2 / 2) ** 2)
        z = z_size
        var = var_size
        basis = np.array(["size"] * n, dtype=object)
        ray_x = (u - cx) / fx
        if c.height_m is not None and n:
            cp, sp = math.cos(pitch), math.sin(pitch)
            ray_y = (y2 - cy) / fy
            denom = cp * ray_y + sp  # ray's drop per unit depth, along world down
            ok = denom > 1e-4
            z_front = np.where(ok, c.height_m / np.where(ok, denom, 1.0), np.inf)
            # The base centre lies ``reach`` beyond the front edge, horizontally away from
            # the camera: along the front point's offset from the foot of the camera.
            zf = np.where(ok, z_front, 1.0)
            front = np.stack([ray_x * zf, ray_y * zf, zf], axis=1)
            up = np.array([0.0, -cp, -sp])
            horiz = front + c.height_m * up  # minus the camera height, in camera axes
            horiz /= np.maximum(np.linalg.norm(horiz, axis=1, keepdims=True), 1e-9)
            z_ground = np.where(ok, zf + reach * horiz[:, 2], np.inf)
            sigma_v = np.sqrt((sigma_h / math.sqrt(2.0)) ** 2
                              + (fy * math.radians(c.sigma_pitch_deg)) ** 2)
            var_ground = (z_ground ** 2 * cp * sigma_v / (fy * c.height_m)) ** 2
            ok &= np.isfinite(z_ground) & (z_ground < 500.0)
            w_size = 1.0 / var_size
            w_ground = np.where(ok, 1.0 / np.where(ok, var_ground, 1.0), 0.0)
            z = np.where(ok, (z_size * w_size + np.where(ok, z_ground, 0.0) * w_ground)
                         / (w_size + w_ground), z_size)
            var = 1.0 / (w_size + w_ground)
            basis[ok] = "size+ground"
        # Base centre: the front edge's row, moved ``reach`` deeper along the same height.
        y_cam = (y2 - cy) / fy * np.maximum(z - reach, 0.05)
        if c.height_m is not None:
            cp, sp = math.cos(pitch), math.sin(pitch)
            y_cam = (c.height_m - z * sp) / cp  # on the ground plane
        xyz = np.stack([ray_x * z, y_cam, z], axis=1) if n else np.zeros((0, 3))
        rng = np.linalg.norm(xyz, axis=1)
        sigma = np.sqrt(var) * rng / np.maximum(z, 1e-6)
        tags = [str(t) if c.calibrated else f"{t}@default_hfov" for t in basis]
        return RangeResult(xyz, rng, sigma, tags)


def pinhole_sigma(z: float, sigma_h_px: float, f_px: float, height_m: float) -> float:
    """The issue's pinhole depth uncertainty ``sigma_Z = Z² · sigma_h / (f · H)``."""
    return z * z * sigma_h_px / (f_px * height_m)
