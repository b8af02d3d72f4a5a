"""What the camera adds to a synthetic frame: the ego car's nose, the HUD, the sensor.

The car's monocoque, cockpit and front wheels fill the bottom of every real on-board frame
and have blue parts, so a colour proposer fires there; the HUD (a track map and a speed
readout) is burnt into the real videos. Both hide cones behind them, so each drawing function
returns the mask it covers. ``apply_camera_look`` then applies exposure, white balance,
gamma, vignetting, motion blur, defocus, sensor noise and a JPEG round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from export.synth.scene import _SCALE, SHIFT, fill

# --------------------------------------------------------------------------- ego car


NOSE_BLUE_ENVELOPE = ((0.43, 0.62), (0.57, 0.62), (0.83, 1.0), (0.17, 1.0))
"""Frame-fraction polygon that holds the nose's blue panels in every variant (a proposer
body mask for synthetic clips, as ``node/cli/demo.py`` uses)."""


def _envelope_half(y: float) -> float:
    """Half-width of ``NOSE_BLUE_ENVELOPE`` at row fraction ``y`` (from its left edge)."""
    (x_top, y_top), (x_bottom, y_bottom) = NOSE_BLUE_ENVELOPE[0], NOSE_BLUE_ENVELOPE[3]
    return (0.5 - x_top) + (x_top - x_bottom) * (y - y_top) / (y_bottom - y_top)


@dataclass(frozen=True)
class CarNose:
    """The ego car's monocoque, cockpit and front wheels as seen from the roll-hoop camera,
    in fractions of the image size."""

    tip_y: float
    tip_half: float
    half_width: float
    body_bgr: tuple[int, int, int]
    accent_bgr: tuple[int, int, int] | None
    wheel_x: float
    wheel_top: float
    wheel_half: float
    mount_bar: bool


def random_car_nose(rng: np.random.Generator) -> CarNose:
    body = [(60, 28, 18), (32, 28, 28), (22, 22, 24), (80, 40, 20)][rng.integers(0, 4)]
    accent = [(200, 110, 30), (170, 80, 20), (220, 150, 60), None][rng.integers(0, 4)]
    return CarNose(float(rng.uniform(0.48, 0.62)), float(rng.uniform(0.03, 0.07)),
                   float(rng.uniform(0.22, 0.32)), body, accent,
                   float(rng.uniform(0.20, 0.30)), float(rng.uniform(0.58, 0.72)),
                   float(rng.uniform(0.06, 0.085)), bool(rng.random() < 0.4))


def draw_car_nose(img: np.ndarray, car: CarNose, jitter: tuple[float, float]) -> np.ndarray:
    """Draw the car into ``img``; returns the bool mask of what it covers."""
    h, w = img.shape[:2]
    dx, dy = jitter
    mask = np.zeros((h, w), np.uint8)

    def to_px(points):
        return np.asarray(points, dtype=np.float64) * [w, h] + [dx, dy]

    def poly(points, color):
        pts = to_px(points)
        fill(img, pts, color)
        fill(mask, pts, 255)

    def ellipse(center, axes, color, thickness=-1):
        c = to_px([center])[0]
        c_fx = tuple(int(v) for v in np.rint((c - 0.5) * _SCALE))
        ax = (int(axes[0] * w * _SCALE), int(axes[1] * h * _SCALE))
        th = thickness if thickness < 0 else max(1, int(thickness * w))
        cv2.ellipse(img, c_fx, ax, 0, 0, 360, color, th, cv2.LINE_8, SHIFT)
        cv2.ellipse(mask, c_fx, ax, 0, 0, 360, 255, th, cv2.LINE_8, SHIFT)

    cy_wheel = (car.wheel_top + 1.05) / 2
    for side in (-1, 1):
        x = 0.5 + side * car.wheel_x
        arm = car.wheel_top + 0.1
        poly(_ordered([(0.5 + side * 0.06, arm), (x, arm - 0.02), (x, arm - 0.008),
                       (0.5 + side * 0.06, arm + 0.012)]), (28, 28, 28))
        ellipse((x, cy_wheel), (car.wheel_half, (1.05 - car.wheel_top) / 2), (24, 24, 26))
        ellipse((x + side * car.wheel_half * 0.45, cy_wheel),
                (car.wheel_half * 0.35, (1.05 - car.wheel_top) / 2 * 0.9), (40, 40, 43))
    hw, tip = car.half_width, car.tip_half
    poly([(0.5 - tip, car.tip_y), (0.5 + tip, car.tip_y), (0.5 + hw, 1.02), (0.5 - hw, 1.02)],
         car.body_bgr)
    if car.accent_bgr is not None:  # blue side panels: what a blue-cone proposer fires on
        y0 = max(car.tip_y + 0.04, NOSE_BLUE_ENVELOPE[0][1] + 0.02)
        body_half = tip + (hw - tip) * (y0 - car.tip_y) / (1.02 - car.tip_y)
        outer0 = min(body_half - 0.005, _envelope_half(y0))
        outer1 = min(hw - 0.005, _envelope_half(1.0))
        inner0 = min(tip + 0.005, outer0 - 0.01)
        for side in (-1, 1):
            poly(_ordered([(0.5 + side * inner0, y0), (0.5 + side * outer0, y0 + 0.01),
                           (0.5 + side * outer1, 1.02), (0.5 + side * (outer1 - 0.05), 1.02)]),
                 car.accent_bgr)
    cockpit = car.tip_y + 0.16
    poly([(0.5 - 0.09, cockpit), (0.5 + 0.09, cockpit), (0.5 + 0.14, 1.02), (0.5 - 0.14, 1.02)],
         (30, 30, 32))
    ellipse((0.5, cockpit + 0.12), (0.075, 0.07), (70, 70, 72), thickness=0.012)  # wheel
    poly([(0.47, cockpit + 0.02), (0.53, cockpit + 0.02), (0.53, cockpit + 0.06),
          (0.47, cockpit + 0.06)], (110, 150, 90))  # dash display
    ellipse((0.44, cockpit + 0.07), (0.01, 0.01), (40, 40, 220))
    if car.mount_bar:  # the camera mount's tube at the frame edge
        poly([(0.93, 0.0), (0.97, 0.0), (1.01, 1.0), (0.96, 1.0)], (20, 20, 20))
    return mask > 0


def _ordered(points):
    """Corners sorted around their centroid, so a mirrored quad stays convex-fillable."""
    pts = np.asarray(points, dtype=np.float64)
    c = pts.mean(axis=0)
    return pts[np.argsort(np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0]))]


_SEGMENTS = {  # seven-segment digits: a b c d e f g
    "0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc", "5": "afgcd",
    "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg"}
_SEGMENT_LINES = {"a": ((0, 0), (1, 0)), "b": ((1, 0), (1, 1)), "c": ((1, 1), (1, 2)),
                  "d": ((0, 2), (1, 2)), "e": ((0, 1), (0, 2)), "f": ((0, 0), (0, 1)),
                  "g": ((0, 1), (1, 1))}


def _draw_number(img: np.ndarray, text: str, origin: tuple[int, int], size: int, color,
                 thickness: int) -> None:
    """Seven-segment digits: cheaper than cv2.putText and looks like an on-screen readout."""
    x, y = origin
    for ch in text:
        if ch == ".":
            cv2.circle(img, (x, y + 2 * size), max(1, thickness), color, -1)
            x += size // 2 + 2
            continue
        for seg in _SEGMENTS.get(ch, ""):
            (ax, ay), (bx, by) = _SEGMENT_LINES[seg]
            cv2.line(img, (x + ax * size, y + ay * size), (x + bx * size, y + by * size), color,
                     thickness)
        x += size + size // 2 + 2


def draw_hud(img: np.ndarray, hud_seed: int, phase: float, speed_kmh: float) -> np.ndarray:
    """A track map in the top-left corner and a speed readout, like the real videos' overlay.

    Returns the bool mask the overlay hides (cones under it are not drawn).
    """
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    g = np.random.default_rng(hud_seed)
    t = np.linspace(0, 2 * np.pi, 48)
    r = 1 + 0.3 * np.sin(3 * t + g.uniform(0, 6)) + 0.2 * np.cos(5 * t)
    pts = np.stack([0.12 * w + 0.07 * w * r * np.sin(t), 0.16 * h + 0.12 * h * r * np.cos(t)], 1)
    for color, thick in (((235, 235, 235), 5), ((60, 210, 230), 2)):
        cv2.polylines(img, [pts.astype(np.int32)], True, color, thick, cv2.LINE_AA)
    cv2.polylines(mask, [pts.astype(np.int32)], True, 255, 9)
    dot = tuple(int(v) for v in pts[int(phase * 47) % 48])
    cv2.circle(img, dot, 4, (40, 40, 230), -1)
    cv2.circle(mask, dot, 7, 255, -1)
    size = max(6, h // 60)
    org = (int(0.74 * w), int(0.88 * h))
    _draw_number(img, f"{speed_kmh:.1f}", org, size, (245, 245, 245), 2)
    cv2.rectangle(mask, (org[0] - 3, org[1] - 3), (org[0] + 7 * size, org[1] + 2 * size + 3), 255,
                  -1)
    return mask > 0


# --------------------------------------------------------------------------- camera effects


@dataclass(frozen=True)
class CameraLook:
    """Per-frame sensor and lens effects."""

    gain: float
    white_balance: tuple[float, float, float]
    gamma: float
    vignette: float
    motion_blur_px: int
    motion_angle: float
    defocus_sigma: float
    noise_sigma: float
    jpeg_quality: int


def random_camera_look(rng: np.random.Generator) -> CameraLook:
    return CameraLook(
        gain=float(rng.uniform(0.65, 1.3)),
        white_balance=tuple(float(v) for v in rng.uniform(0.92, 1.08, 3)),
        gamma=float(rng.uniform(0.85, 1.2)),
        vignette=float(rng.uniform(0.0, 0.35)),
        motion_blur_px=int(rng.choice([0, 0, 0, 3, 5, 7])),
        motion_angle=float(rng.uniform(-20, 20)),
        defocus_sigma=float(rng.choice([0.0, 0.5, 0.7, 1.0])),
        noise_sigma=float(rng.uniform(0, 6)),
        jpeg_quality=int(rng.integers(35, 96)),
    )


_NOISE_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _noise_table(h: int, w: int) -> np.ndarray:
    """Fixed unit-variance noise (seeded once per size); frames take random windows of it,
    which is far cheaper than drawing fresh Gaussian noise every frame."""
    key = (h, w)
    if key not in _NOISE_CACHE:
        g = np.random.default_rng(1234)
        _NOISE_CACHE[key] = g.standard_normal((h + 64, w + 64, 3)).astype(np.float32)
    return _NOISE_CACHE[key]


@lru_cache(maxsize=8)
def _radius2(h: int, w: int) -> np.ndarray:
    """Squared distance from the image centre, 1 at the middle of each edge, (h, w, 1)."""
    yy = (np.arange(h, dtype=np.float32) - h / 2) / (h / 2)
    xx = (np.arange(w, dtype=np.float32) - w / 2) / (w / 2)
    return (yy[:, None] ** 2 + xx[None, :] ** 2)[..., None]


def apply_camera_look(img: np.ndarray, look: CameraLook, rng: np.random.Generator) -> np.ndarray:
    """Exposure, white balance, gamma, vignette, blur, noise and JPEG round trip."""
    h, w = img.shape[:2]
    ramp = np.arange(256, dtype=np.float32)[:, None] / 255.0
    curve = np.clip(ramp * look.gain * np.asarray(look.white_balance, np.float32), 0, 1)
    out = cv2.LUT(img, (curve ** look.gamma * 255 + 0.5).astype(np.uint8)[None])
    if look.motion_blur_px > 1:
        k = np.zeros((look.motion_blur_px, look.motion_blur_px), np.float32)
        k[look.motion_blur_px // 2] = 1.0 / look.motion_blur_px
        rot = cv2.getRotationMatrix2D(((look.motion_blur_px - 1) / 2,) * 2, look.motion_angle, 1)
        k = cv2.warpAffine(k, rot, k.shape[::-1])
        out = cv2.filter2D(out, -1, k / max(k.sum(), 1e-6))
    if look.defocus_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), look.defocus_sigma)
    if look.vignette > 0 or look.noise_sigma > 0:
        out = out.astype(np.float32)
        if look.vignette > 0:
            out *= 1 - look.vignette * 0.5 * _radius2(h, w)
        if look.noise_sigma > 0:
            oy, ox = (int(v) for v in rng.integers(0, 64, 2))
            out += _noise_table(h, w)[oy:oy + h, ox:ox + w] * look.noise_sigma
        out = np.clip(out, 0, 255, out=out).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, look.jpeg_quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else out
