"""Camera domain randomisation: what another team's camera does to the same scene.

A network trained on one camera learns that camera's white balance, exposure, sharpness, noise
and compression as part of what a cone looks like, and calls a cone from another camera
background. Domain randomisation (Tobin et al., 2017) draws these properties at random for
every training sample so that none of them can be relied on. ``random_camera`` applies, each
with its own probability:

* exposure (global gain) and white balance (per-channel gain, kept small enough that no cone
  colour turns into another: orange stays orange at +-12 %);
* contrast and gamma;
* defocus (Gaussian) or motion blur;
* sensor noise (stronger in the dark, as on a real sensor);
* water drops on the lens (blurred, inverted patches);
* JPEG compression.

The geometric part of another camera (scale, aspect, mount) is drawn by each trainer where it
warps its frames (``export.proposer_data.augment_frame``); ``random_aspect`` gives the aspect
factor they share. Works on uint8 H x W x 3 images in any channel order; numpy and cv2 only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np


@dataclass(frozen=True)
class CameraRandomisation:
    """Probabilities and ranges of ``random_camera``; ``strength`` 0 turns it off.

    Attributes:
        exposure: global gain range (log-uniform).
        white_balance: largest per-channel gain deviation.
        p_blur, p_noise, p_drops, p_jpeg: probability of each effect per image.
        max_blur_px: longest motion-blur kernel / largest Gaussian sigma x 3, reached on an
            image whose shorter side is at least ``blur_full_side`` (smaller images get
            proportionally less, as a frame-sized blur would shrink with the frame).
        blur_full_side: see ``max_blur_px``.
        max_noise: largest noise sigma (grey levels) at full exposure.
        drop_radius: lens drops' radius range, as a fraction of the image's shorter side.
        drop_count: fewest and most lens drops.
        jpeg_quality: lowest and highest JPEG quality.
        saturation: range of the factor on HSV saturation (a camera with weaker or stronger
            colour); (1, 1), the default, draws nothing.
    """

    exposure: tuple[float, float] = (0.3, 1.5)
    white_balance: float = 0.12
    contrast: tuple[float, float] = (0.7, 1.3)
    gamma: tuple[float, float] = (0.75, 1.35)
    p_blur: float = 0.3
    max_blur_px: int = 11
    blur_full_side: int = 64
    p_noise: float = 0.35
    max_noise: float = 16.0
    p_drops: float = 0.12
    drop_radius: tuple[float, float] = (0.02, 0.09)
    drop_count: tuple[int, int] = (2, 12)
    p_jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (12, 70)
    saturation: tuple[float, float] = (1.0, 1.0)


DEFAULT = CameraRandomisation()

# Stronger, for a whole frame or a proposer's training window: darker exposures, longer
# blur, more and larger drops, more noise. The default profile leaves the proposer short of
# the cones on strongly blurred, wet or dark frames (docs/validation.md).
STRONG = CameraRandomisation(exposure=(0.15, 1.5), p_blur=0.4, max_blur_px=19,
                             p_noise=0.4, max_noise=22.0, p_drops=0.2,
                             drop_radius=(0.02, 0.12), drop_count=(2, 24))

# A classifier crop is a cone and its context resized to the model's input (32 px): a blur or
# a drop of a given size on the lens covers a far larger part of a small cone's crop than of
# the frame. On the held-out clips' camera variants, a 9 or 15 px motion blur of the frame is
# 5-30 px in the crop of a 12-48 px cone, and one drop can cover a whole distant cone.
CROP = CameraRandomisation(max_blur_px=20, blur_full_side=32, p_blur=0.4, p_drops=0.2,
                           drop_radius=(0.1, 0.6), drop_count=(1, 3))

# CROP with cameras of weaker colour too (saturation x 0.3 to x 1.3): an experiment
# (docs/experiments.md), not the bundled recipe.
CROP_SATURATION = replace(CROP, saturation=(0.3, 1.3))

PROFILES: dict[str, CameraRandomisation | None] = {
    "none": None, "default": DEFAULT, "strong": STRONG, "crop": CROP,
    "crop_saturation": CROP_SATURATION}
"""Profiles by name: the classifier's ``augment.camera.profile``, and the frame trainers'
``--camera`` (``FRAME_PROFILES``). None of them turns a cone's colour into another."""

# STRONG with exposures up to 2.5: about a fifth of the windows burn out where bright
# surfaces clip (an overexposed camera), and clipping can turn an orange cone yellow. Only
# for the proposer and the refiner, which find cones whatever their colour; never for the
# classifier, which must not learn a wrong colour.
STRONG_BRIGHT = replace(STRONG, exposure=(0.15, 2.5))

FRAME_PROFILES: dict[str, CameraRandomisation | None] = {
    **PROFILES, "strong_bright": STRONG_BRIGHT}
"""The proposer's and the refiner's ``--camera`` profiles: ``PROFILES`` and burnt-out ones."""


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def random_aspect(rng: np.random.Generator, lo: float = 0.8, hi: float = 2.0) -> float:
    """A horizontal stretch factor (log-uniform): above 1 a cone is wider than in the training
    frame (a camera whose frames were not squashed to a square), below 1 narrower."""
    return log_uniform(rng, lo, hi)


def random_camera(image: np.ndarray, rng: np.random.Generator,
                  cfg: CameraRandomisation = DEFAULT, blur_x_scale: float = 1.0) -> np.ndarray:
    """``image`` as a randomly drawn other camera would have recorded it (uint8, same size).
    ``blur_x_scale`` stretches the blur horizontally, as a crop window narrower than the
    square (``CropPolicy.min_aspect``) stretches a frame's blur (the same random draws)."""
    f = image.astype(np.float32) / 255.0
    gamma = log_uniform(rng, *cfg.gamma)
    f = np.power(f, gamma)
    mean = float(f.mean())
    f = (f - mean) * rng.uniform(*cfg.contrast) + mean
    exposure = log_uniform(rng, *cfg.exposure)
    wb = 1.0 + rng.uniform(-cfg.white_balance, cfg.white_balance, 3)
    f = f * (exposure * wb).astype(np.float32)
    out = np.clip(f * 255.0, 0, 255)
    if cfg.saturation != (1.0, 1.0):  # drawn only when asked: other profiles' draws unchanged
        out = scale_saturation(out, log_uniform(rng, *cfg.saturation))
    h, w = image.shape[:2]
    if rng.random() < cfg.p_blur and min(h, w) >= 8:
        out = blur(out, rng, cfg.max_blur_px * min(1.0, min(h, w) / cfg.blur_full_side),
                   blur_x_scale)
    if rng.random() < cfg.p_drops and min(h, w) >= 32:
        out = lens_drops(out, rng, cfg.drop_count, cfg.drop_radius)
    if rng.random() < cfg.p_noise:
        # Shot noise grows as exposure falls (the sensor's gain amplifies it).
        sigma = rng.uniform(1.0, cfg.max_noise) * min(2.0, 1.0 / max(exposure, 0.25)) ** 0.5
        out = out + rng.normal(0.0, sigma, out.shape).astype(np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < cfg.p_jpeg:
        q = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return out


def scale_saturation(f: np.ndarray, factor: float) -> np.ndarray:
    """A float BGR image (0..255) with its HSV saturation scaled by ``factor`` (at most full)."""
    hsv = cv2.cvtColor(f.astype(np.float32) / 255.0, cv2.COLOR_BGR2HSV)
    hsv[..., 1] = np.minimum(hsv[..., 1] * factor, 1.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR) * 255.0


def blur(f: np.ndarray, rng: np.random.Generator, max_px: float,
         x_scale: float = 1.0) -> np.ndarray:
    """Defocus (Gaussian) or linear motion blur of random direction, up to ``max_px``;
    ``x_scale`` stretches either horizontally after it is drawn."""
    if max_px < 1.5:
        return f
    if rng.random() < 0.5:
        sigma = rng.uniform(0.5, max(0.6, max_px / 3.0))
        return cv2.GaussianBlur(f, (0, 0), sigmaX=sigma * x_scale, sigmaY=sigma)
    k = int(rng.integers(3, max(4, int(max_px)) + 1)) | 1
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2] = 1.0
    rot = cv2.getRotationMatrix2D(((k - 1) / 2, (k - 1) / 2), rng.uniform(0, 180), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (k, k))
    if x_scale != 1.0:
        kernel = cv2.resize(kernel, (max(1, round(k * x_scale)) | 1, k),
                            interpolation=cv2.INTER_LINEAR)
    return cv2.filter2D(f, -1, kernel / max(float(kernel.sum()), 1e-6))


def lens_drops(f: np.ndarray, rng: np.random.Generator, count: tuple[int, int] = (2, 12),
               radius: tuple[float, float] = (0.02, 0.09)) -> np.ndarray:
    """Water drops: soft round patches showing a blurred, inverted view of what is behind."""
    h, w = f.shape[:2]
    out = f.astype(np.float32, copy=True)
    side = min(h, w)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        r = max(3, int(rng.uniform(*radius) * side))
        cx, cy = int(rng.uniform(0, w)), int(rng.uniform(0, h))
        x0, y0, x1, y1 = max(cx - r, 0), max(cy - r, 0), min(cx + r, w), min(cy + r, h)
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        patch = cv2.GaussianBlur(cv2.flip(np.ascontiguousarray(out[y0:y1, x0:x1]), -1),
                                 (0, 0), rng.uniform(1.0, 4.0)) * rng.uniform(0.95, 1.15)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
        alpha = np.clip((1.0 - d) * 3.0, 0.0, 0.9)[..., None]
        out[y0:y1, x0:x1] = out[y0:y1, x0:x1] * (1 - alpha) + patch * alpha
    return out
