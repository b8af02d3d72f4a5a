"""Exposure normalisation: dark frames are brightened before proposals and crops.

A camera at dusk, in shade or set to a short exposure delivers frames far darker than those
the proposer and the classifier were trained on, and the proposer misses their cones. Each
frame's bright end is measured (a percentile of the brightest channel over a subsample of
about ``SAMPLE_PIXELS`` pixels) and the frame is scaled so that it reaches ``target``; a frame
already that bright is left untouched (the same array is returned). The gain also amplifies
the sensor's noise, so a brightened frame is smoothed by a Gaussian whose sigma grows with
the gain's doublings, as a camera's own signal processor does. Nothing here depends on the
camera: the gain comes from each frame alone.

Only the networks see the brightened frame; publishers get the frame as captured.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

SAMPLE_PIXELS = 10_000
"""About how many pixels the brightness statistic reads, whatever the frame size."""


def frame_level(image: np.ndarray, percentile: float) -> float:
    """The ``percentile`` (0..100) of the brightest channel over a regular subsample of
    ``image`` (H×W×3 uint8), in grey levels."""
    h, w = image.shape[:2]
    step = max(1, int(math.sqrt(h * w / SAMPLE_PIXELS)))
    # Nearest-neighbour shrinking picks every step-th pixel; OpenCV's per-channel maximum is
    # several times faster than numpy's reduction over a 3-long axis.
    small = cv2.resize(image, (max(1, w // step), max(1, h // step)),
                       interpolation=cv2.INTER_NEAREST)
    b, g, r = cv2.split(small)
    bright = cv2.max(cv2.max(b, g), r).ravel()
    k = min(bright.size - 1, max(0, round(percentile / 100.0 * (bright.size - 1))))
    return float(np.partition(bright, k)[k])


def frame_gain(image: np.ndarray, target: float, max_gain: float,
               percentile: float = 99.0) -> float:
    """The gain (1..``max_gain``) that brings the frame's ``percentile`` level to ``target``."""
    level = frame_level(image, percentile)
    return min(max(target / max(level, 1.0), 1.0), max_gain)


def apply_gain(image: np.ndarray, gain: float, denoise_sigma: float) -> np.ndarray:
    """``image`` scaled by ``gain`` (saturating at 255) and smoothed by a Gaussian of sigma
    ``denoise_sigma * log2(gain)`` pixels; ``image`` itself when ``gain`` is 1."""
    if gain <= 1.0:
        return image
    out = cv2.convertScaleAbs(image, alpha=gain)
    sigma = denoise_sigma * math.log2(gain)
    if sigma > 0.0:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    return out


class Exposure:
    """The node's exposure stage, from the config's ``exposure`` section.

    Args:
        target: grey level the frame's bright end is brought to.
        max_gain: the largest gain applied.
        denoise_sigma: Gaussian sigma in pixels per doubling of the gain (0 = no smoothing).
        percentile: which level of the brightest channel counts as the bright end.
    """

    def __init__(self, target: float, max_gain: float, denoise_sigma: float,
                 percentile: float = 99.0) -> None:
        self.target = float(target)
        self.max_gain = float(max_gain)
        self.denoise_sigma = float(denoise_sigma)
        self.percentile = float(percentile)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The frame the networks see: ``image`` itself, or a brightened copy."""
        gain = frame_gain(image, self.target, self.max_gain, self.percentile)
        return apply_gain(image, gain, self.denoise_sigma)
