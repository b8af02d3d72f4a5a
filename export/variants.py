"""Camera variants of labelled frames: what a camera the node was never tuned on looks like.

Each variant turns one labelled frame (BGR image, ``x1, y1, x2, y2`` boxes) into what another
camera would have recorded, with the boxes moved to match:

* ``horizon_25`` / ``horizon_40`` / ``horizon_60``: the frame is shifted up or down (cropped on
  one side, padded with grey on the other) so that the horizon sits at 25 %, 40 % or 60 % of
  the height: a camera mounted higher or lower, or pitched;
* ``unstretch``: the 16:9 aspect that a square dataset frame was squashed from, restored
  (cones twice as wide as in the square frame);
* ``wide_2592x640``, ``large_2048x1536``, ``small_800x320``: the unstretched frame rescaled
  and padded (grey) to another sensor's size;
* corruptions at three strengths (ImageNet-C's idea, Hendrycks and Dietterich 2019, with the
  kinds a car's camera meets): ``droplets`` (water on the lens), ``motion_blur``, ``noise``,
  ``low_light`` (dark and noisy), ``tint_cool`` and ``tint_warm`` (a white balance off
  towards blue or orange), ``desaturate`` (weaker colour), ``jpeg``, ``overexposed``
  (bright sun on a camera exposing for the shade: bright surfaces burn out to white),
  ``defocus`` (a lens out of focus) and ``haze`` (haze, a fogged lens or glare veiling the
  frame in light).

The horizon of a clip is estimated from its labels: the median over its frames of the lowest
box bottom (the most distant labelled cone stands nearest the horizon). Everything is
deterministic in the frame's index. Only numpy and cv2 are used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

GREY = (114, 114, 114)
STRENGTHS = (1, 2, 3)
SQUARE_TO_WIDE = 16.0 / 9.0
"""Width factor that restores a 16:9 frame squashed to a square (the BGRacing frames)."""


def _same_scale(width: int, height: int) -> float:
    return 1.0


@dataclass(frozen=True)
class Variant:
    """One camera variant: ``apply(image, boxes, horizon_frac, seed) -> (image, boxes,
    kept)``, where ``kept`` marks which input boxes are still in view (in order), and
    ``scale(width, height)``: how many times taller a cone is in the variant of a frame of that
    size (scoring counts sizes in the source frame's pixels, so that every variant is scored
    on the same cones as the base)."""

    name: str
    kind: str  # "geometry" or "corruption"
    apply: Callable[[np.ndarray, np.ndarray, float, int], tuple[np.ndarray, np.ndarray]]
    scale: Callable[[int, int], float] = _same_scale


def estimate_horizon(boxes_per_frame: list[np.ndarray], height: int) -> float:
    """A clip's horizon as a fraction of the frame height: the median over frames of the
    lowest box bottom (0.4 when no frame has a box)."""
    tops = [float(b[:, 3].min()) for b in boxes_per_frame if len(b)]
    return float(np.median(tops)) / height if tops else 0.4


def affine_boxes(boxes: np.ndarray, sx: float, sy: float, ox: float, oy: float,
                 width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes scaled by (sx, sy), moved by (ox, oy), clipped to the frame, and which were kept:
    a box that loses more than half its height or width to the edge is dropped."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4) * [sx, sy, sx, sy] + [ox, oy, ox, oy]
    clipped = b.copy()
    np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
    full_w, full_h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    keep = ((clipped[:, 2] - clipped[:, 0] >= 0.5 * full_w)
            & (clipped[:, 3] - clipped[:, 1] >= 0.5 * full_h))
    return clipped[keep].astype(np.float32), keep


def shift_rows(image: np.ndarray, boxes: np.ndarray, dy: int) -> tuple:
    """The frame moved down by ``dy`` rows (up if negative), grey where nothing was seen."""
    h, w = image.shape[:2]
    out = np.full_like(image, GREY[0])
    if dy >= 0:
        out[dy:] = image[:h - dy]
    else:
        out[:h + dy] = image[-dy:]
    return (out, *affine_boxes(boxes, 1, 1, 0, dy, w, h))


def horizon_at(target: float) -> Callable:
    def apply(image, boxes, horizon, seed):
        h = image.shape[0]
        return shift_rows(image, boxes, round((target - horizon) * h))
    return apply


def resize_and_pad(image: np.ndarray, boxes: np.ndarray, content: tuple[int, int],
                   canvas: tuple[int, int]) -> tuple:
    """Resize the frame to ``content`` (w, h) and centre it on a grey ``canvas`` (w, h)."""
    from node.propose.heatmap import resize_image

    h, w = image.shape[:2]
    cw, ch = content
    small = resize_image(image, (cw, ch))
    out = np.full((canvas[1], canvas[0], 3), GREY[0], np.uint8)
    ox, oy = (canvas[0] - cw) // 2, (canvas[1] - ch) // 2
    out[oy:oy + ch, ox:ox + cw] = small
    return (out, *affine_boxes(boxes, cw / w, ch / h, ox, oy, canvas[0], canvas[1]))


def sensor_content(canvas: tuple[int, int], fill: str, width: int, height: int
                   ) -> tuple[int, int]:
    """The (w, h) the unstretched frame is resized to on a sensor ``canvas``: ``fill``
    ``height`` scales it to the canvas height, ``width`` to the canvas width."""
    aspect = SQUARE_TO_WIDE * width / height
    if fill == "height":
        ch = canvas[1]
        return min(round(ch * aspect), canvas[0]), ch
    cw = canvas[0]
    return cw, min(round(cw / aspect), canvas[1])


def sensor(canvas: tuple[int, int], fill: str) -> Callable:
    """The unstretched frame on another sensor (``sensor_content``), centred (grey around)."""
    def apply(image, boxes, horizon, seed):
        h, w = image.shape[:2]
        return resize_and_pad(image, boxes, sensor_content(canvas, fill, w, h), canvas)
    return apply


def sensor_scale(canvas: tuple[int, int], fill: str) -> Callable[[int, int], float]:
    def scale(width: int, height: int) -> float:
        return sensor_content(canvas, fill, width, height)[1] / height
    return scale


def unstretch(image, boxes, horizon, seed):
    h, w = image.shape[:2]
    size = (round(w * SQUARE_TO_WIDE), h)
    return resize_and_pad(image, boxes, size, size)


# ---------------------------------------------------------------------------- corruptions

def droplets(image: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
    """Water drops on the lens: round patches that show a blurred, magnified, flipped view of
    what lies behind them, with soft edges (more and larger drops with ``strength``)."""
    h, w = image.shape[:2]
    out = image.astype(np.float32)
    scale = min(h, w)
    for _ in range(4 + 6 * strength):
        r = int(rng.uniform(0.02, 0.04 + 0.02 * strength) * scale)
        cx, cy = int(rng.uniform(0, w)), int(rng.uniform(0, h))
        x0, y0, x1, y1 = max(cx - r, 0), max(cy - r, 0), min(cx + r, w), min(cy + r, h)
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        patch = cv2.flip(image[y0:y1, x0:x1], -1)  # a drop is a tiny lens: the view inverts
        patch = cv2.GaussianBlur(patch, (0, 0), 1.5 + strength).astype(np.float32) * 1.08
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / max(r, 1)
        alpha = np.clip((1.0 - d) * 3.0, 0.0, 0.9)[..., None]
        out[y0:y1, x0:x1] = out[y0:y1, x0:x1] * (1 - alpha) + patch * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def motion_blur(image, strength, rng):
    k = (5, 9, 15)[strength - 1]
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2] = 1.0 / k
    angle = rng.uniform(-15, 15)
    rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), angle, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (k, k))
    return cv2.filter2D(image, -1, kernel / max(kernel.sum(), 1e-6))


def noise(image, strength, rng):
    sigma = (6.0, 12.0, 20.0)[strength - 1]
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def low_light(image, strength, rng):
    gain, sigma = ((0.5, 3.0), (0.3, 4.0), (0.18, 5.0))[strength - 1]
    dark = image.astype(np.float32) * gain + rng.normal(0, sigma, image.shape)
    return np.clip(dark, 0, 255).astype(np.uint8)


TINTS = {"cool": (1.15, 1.0, 0.87), "warm": (0.87, 1.0, 1.15)}
"""B, G, R gains of the mildest colour cast of each direction."""


def tint(direction: str) -> Callable:
    """A white balance off towards blue (``cool``, light taken for warmer than it is) or
    orange (``warm``): each channel's gain raised to the power ``strength``."""
    def apply(image, strength, rng):
        gains = np.asarray(TINTS[direction], np.float32) ** strength
        return cv2.transform(image, np.diag(gains))
    return apply


def desaturate(image, strength, rng):
    """A camera with weaker colour (a low saturation setting, haze): HSV saturation scaled by
    0.7, 0.5 or 0.35."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[..., 1] = np.round(hsv[..., 1] * (0.7, 0.5, 0.35)[strength - 1]).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def overexposed(image, strength, rng):
    """Bright sun on a camera that exposes for the shade: every channel times 1.5, 2 or 2.8,
    clipped at 255 (bright surfaces burn out to white)."""
    gain = (1.5, 2.0, 2.8)[strength - 1]
    return cv2.convertScaleAbs(image, alpha=gain)


def defocus(image, strength, rng):
    """A lens out of focus (or fogged): a Gaussian blur of sigma 1, 2 or 3 px."""
    return cv2.GaussianBlur(image, (0, 0), float(strength))


def haze(image, strength, rng):
    """Haze, fog, a fogged lens or sun glare on the lens: the frame blended with light grey
    (200) by 0.3, 0.5 or 0.7, which lifts its blacks and flattens its contrast."""
    veil = (0.3, 0.5, 0.7)[strength - 1]
    return cv2.addWeighted(image, 1.0 - veil, np.full_like(image, 200), veil, 0.0)


def jpeg(image, strength, rng):
    quality = (40, 20, 10)[strength - 1]
    _ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


CORRUPTIONS = {"droplets": droplets, "motion_blur": motion_blur, "noise": noise,
               "low_light": low_light, "tint_cool": tint("cool"), "tint_warm": tint("warm"),
               "desaturate": desaturate, "jpeg": jpeg, "overexposed": overexposed,
               "defocus": defocus, "haze": haze}


def corruption(fn: Callable, strength: int) -> Callable:
    def apply(image, boxes, horizon, seed):
        return (fn(image, strength, np.random.default_rng(seed)), boxes,
                np.ones(len(boxes), bool))
    return apply


def build_variants(names: list[str] | None = None) -> list[Variant]:
    """Every variant (``names`` picks some, by name or by family such as ``noise``)."""
    found = [Variant("base", "geometry", lambda im, b, h, s: (im, b, np.ones(len(b), bool)))]
    found += [Variant(f"horizon_{int(t * 100)}", "geometry", horizon_at(t))
              for t in (0.25, 0.40, 0.60)]
    found += [Variant("unstretch", "geometry", unstretch),
              *(Variant(name, "geometry", sensor(canvas, fill), sensor_scale(canvas, fill))
                for name, canvas, fill in (("wide_2592x640", (2592, 640), "height"),
                                           ("large_2048x1536", (2048, 1536), "width"),
                                           ("small_800x320", (800, 320), "height")))]
    found += [Variant(f"{name}_{k}", "corruption", corruption(fn, k))
              for name, fn in CORRUPTIONS.items() for k in STRENGTHS]
    if not names:
        return found
    known = {v.name for v in found} | set(CORRUPTIONS) | {"horizon"}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--variants {unknown[0]}: unknown variant (known: "
                         f"{', '.join(sorted(known))})")
    picked = [v for v in found if v.name in names or v.name.rsplit("_", 1)[0] in names
              or v.name == "base"]
    return picked
