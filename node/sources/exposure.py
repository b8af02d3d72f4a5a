"""Frame normalisation for the networks: white balance, veiled frames stretched, dark frames
brightened, pale colour raised.

Cameras differ in colour and brightness far more than the training frames did. Four
corrections, each computed from the frame alone (nothing depends on the camera), bring every
frame to the look the proposer and the classifier were trained on:

* **White balance.** The frame's greyest pixels (the least coloured ``GREY_FRACTION`` of those
  neither dark nor saturated, once a grey-world guess has removed most of the cast: asphalt,
  lines, kerbs, sky) are made grey by one gain per channel, at most ``max_wb_gain`` either way.
  The mean of the three gains is 1, so the brightness is kept. A camera whose white balance
  is off by a third turns blue cones teal and yellow ones green; without this the proposer
  loses most cones on such frames (docs/validation.md).
* **Black level.** A frame whose dark end (a percentile of each pixel's darkest channel) lies
  above ``max_black`` is lowered by the excess and stretched, so that its bright end lands on
  the brightening's ``target`` (within ``max_gain``) and its dark end on ``max_black``: haze,
  a fogged lens or sun glare on the lens veil the whole frame in light and lift its blacks to
  grey, which the networks never saw. The stretch pivots about the excess while that is
  below ``max_black``, so that a frame just past the threshold is treated as one just below
  it (plain brightening).
* **Exposure.** A frame whose bright end (a percentile of its brightest channel) lies below
  ``target`` is scaled up to it, by at most ``max_gain``; a brighter frame is not touched. The
  gain also amplifies the sensor's noise, so a brightened frame is smoothed by a Gaussian whose
  sigma grows with the gain's doublings, as a camera's own signal processor does.
* **Colour.** A frame whose most coloured pixels (a percentile of each pixel's chroma, its
  brightest channel minus its darkest, after the two corrections above) are paler than
  ``min_chroma`` has its saturation raised to it about each pixel's luma, by at most
  ``max_saturation_gain``: a camera with weak colour (or a washed-out, hazy scene) turns a
  yellow cone beige and an orange one brown, and the networks take them for background or
  for each other. Greys stay grey and the luma is kept.

All are measured on a regular grid of ``GRID`` x ``GRID`` pixels and applied in one pass
(``cv2.transform``). Only the networks see the result; publishers get the frame as
captured.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from node.node_config import ExposureConfig

GRID = 22
"""The statistics read a regular GRID x GRID sample of the frame's pixels, whatever its size,
as one 484-value array per channel: every numpy operation on them stays under the size at
which numpy releases the interpreter lock (500 elements). In the pipelined loop each release
can make the main thread wait for another thread to hand the lock back (up to the 5 ms switch
interval), so the same statistics read with OpenCV or on larger arrays cost 2-3 ms a frame
there against 0.2 ms alone."""
GREY_FRACTION = 0.3
"""Share of the usable pixels, the least coloured, that white balance makes grey."""
DARK, SATURATED = 15, 250
"""Pixels with a channel at or below ``DARK`` or at or above ``SATURATED`` say nothing about the
colour of the light."""
MIN_USABLE = 50
"""Fewer usable pixels than this (a black or blown-out frame): the grey-world guess is used."""
UNCHANGED = 0.01
"""Channel gains within this of 1 leave the frame untouched (no copy)."""
MIN_SIGMA = 0.3
"""A narrower Gaussian moves no pixel by more than about two grey levels: skipped."""
BRIGHT_PERCENTILE = 99.0
"""The percentile of the brightest channel that counts as a frame's bright end."""
CHROMA_PERCENTILE = 99.0
"""The percentile of the pixels' chroma that counts as a frame's most coloured."""
DARK_PERCENTILE = 1.0
"""The percentile of each pixel's darkest channel that counts as a frame's dark end."""
LUMA = np.array([0.114, 0.587, 0.299], np.float32)
"""B, G, R weights of the luma (ITU-R BT.601) kept when the saturation is raised."""


def sample_pixels(image: np.ndarray) -> list[np.ndarray]:
    """The B, G and R values (three float32 arrays of at most ``GRID`` * ``GRID``) of a
    regular grid over the whole of ``image``, one pixel near the centre of each cell. A
    strided view: nothing of the frame is copied."""
    h, w = image.shape[:2]
    sy, sx = -(-h // GRID), -(-w // GRID)  # ceil: the grid spans the whole frame
    grid = image[sy // 2::sy, sx // 2::sx]
    return [grid[..., c].astype(np.float32).ravel() for c in range(3)]


def _kth(values: np.ndarray, fraction: float) -> float:
    """The value at ``fraction`` (0..1) of the sorted ``values``."""
    k = min(values.size - 1, max(0, round(fraction * (values.size - 1))))
    return float(np.partition(values, k)[k])


def _max3(b: np.ndarray, g: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(b, g), r)


def _min3(b: np.ndarray, g: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.minimum(np.minimum(b, g), r)


def cast_gains(pixels: list[np.ndarray]) -> np.ndarray:
    """Per-channel gains (3,) that make the greyest of ``pixels`` (``sample_pixels``) grey,
    unbounded: how strong the frame's colour cast is."""
    means = np.array([float(c.mean()) for c in pixels])
    guess = means.mean() / np.maximum(means, 1.0)  # grey world: the average colour is grey
    usable = (_max3(*pixels) < SATURATED) & (_min3(*pixels) > DARK)
    chosen = means
    if np.count_nonzero(usable) >= MIN_USABLE:
        kept = [c[usable] for c in pixels]
        balanced = [c * float(k) for c, k in zip(kept, guess)]
        top = _max3(*balanced)
        chroma = (top - _min3(*balanced)) / np.maximum(top, 1.0)
        grey = chroma <= _kth(chroma, GREY_FRACTION)
        chosen = np.array([float(c[grey].mean()) for c in kept])
    return chosen.mean() / np.maximum(chosen, 1.0)


def grey_gains(pixels: list[np.ndarray], max_gain: float = 2.0) -> np.ndarray:
    """Per-channel gains (3,) that make the greyest of ``pixels`` (``sample_pixels``) grey,
    each within [1 / ``max_gain``, ``max_gain``], with a mean of 1."""
    gains = np.clip(cast_gains(pixels), 1.0 / max_gain, max_gain)
    return (gains / gains.mean()).astype(np.float32)


def beyond_tolerance(gains: np.ndarray, tolerance: float) -> np.ndarray:
    """``gains`` (3,) with the first ``tolerance`` (a fraction) of each channel's correction
    left out, in log terms, and a mean of 1 again: a cast too small to tell from the scene's
    own colours is left alone, a stronger one is brought back within it (the networks were
    trained on per-channel gains within +-12 %, ``export.camera_aug``). Continuous in the
    measured gains."""
    log = np.log(np.asarray(gains, np.float64))
    shrunk = np.exp(np.sign(log) * np.maximum(np.abs(log) - np.log1p(tolerance), 0.0))
    return (shrunk / shrunk.mean()).astype(np.float32)


def _scaled(pixels: list[np.ndarray], gains: np.ndarray | None) -> list[np.ndarray]:
    """``pixels`` with each channel scaled by ``gains`` and saturating at 255, as
    ``apply_gains`` would leave them; ``pixels`` themselves when ``gains`` is None."""
    if gains is None:
        return pixels
    return [np.minimum(c * float(k), 255.0) for c, k in zip(pixels, gains)]


def bright_level(pixels: list[np.ndarray], percentile: float = 99.0,
                 gains: np.ndarray | None = None) -> float:
    """The ``percentile`` (0..100) of the brightest channel of ``pixels`` (``sample_pixels``),
    each channel scaled by ``gains`` first when given, in grey levels (at most 255)."""
    return min(_kth(_max3(*_scaled(pixels, gains)), percentile / 100.0), 255.0)


def dark_level(pixels: list[np.ndarray], percentile: float = 1.0,
               gains: np.ndarray | None = None) -> float:
    """The ``percentile`` (0..100) of the darkest channel of ``pixels`` (``sample_pixels``),
    each channel scaled by ``gains`` first when given, in grey levels."""
    return _kth(_min3(*_scaled(pixels, gains)), percentile / 100.0)


def chroma_level(pixels: list[np.ndarray], percentile: float = 99.0,
                 gains: np.ndarray | None = None) -> float:
    """The ``percentile`` (0..100) of the chroma (brightest minus darkest channel) of
    ``pixels`` (``sample_pixels``), each channel scaled by ``gains`` first when given, in grey
    levels."""
    pixels = _scaled(pixels, gains)
    return _kth(_max3(*pixels) - _min3(*pixels), percentile / 100.0)


def exposure_gain(level: float, target: float, max_gain: float) -> float:
    """The gain (1..``max_gain``) that brings a ``level`` (a bright end, a chroma) up to
    ``target``."""
    return min(max(target / max(level, 1.0), 1.0), max_gain)


def colour_matrix(gains: np.ndarray, saturation: float = 1.0) -> np.ndarray:
    """The 3 x 3 matrix (B, G, R) that scales each channel by ``gains`` and then moves every
    pixel ``saturation`` times as far from its luma (``LUMA``): greys stay grey, and each
    pixel's chroma is multiplied by ``saturation``."""
    mix = saturation * np.eye(3, dtype=np.float32) + (1.0 - saturation) * LUMA[None, :]
    return (mix @ np.diag(np.asarray(gains, np.float32))).astype(np.float32)


def veil_pivot(black: float, max_black: float) -> float:
    """The grey level a veiled frame's stretch pivots about, ``black`` being how far its dark
    end lies above ``max_black``: ``max_black`` itself once the excess reaches it, the excess
    while it is smaller, so that a frame just past the threshold is brightened as one just
    below it (about 0)."""
    return min(black, max_black)


def apply_gains(image: np.ndarray, gains: np.ndarray, denoise_sigma: float = 0.0,
                saturation: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """``image`` with each channel scaled by ``gains`` (B, G, R), ``offset`` grey levels added
    to every channel, its saturation raised by ``saturation`` (``colour_matrix``; saturating
    at 0 and 255), smoothed by a Gaussian of ``denoise_sigma`` px; ``image`` itself when
    nothing would change."""
    if (np.all(np.abs(np.asarray(gains) - 1.0) < UNCHANGED) and abs(offset) < 0.5
            and abs(saturation - 1.0) < UNCHANGED and denoise_sigma < MIN_SIGMA):
        return image
    matrix = colour_matrix(gains, saturation)
    if abs(offset) >= 0.5:  # a uniform offset is grey: the saturation leaves it as it is
        matrix = np.hstack([matrix, np.full((3, 1), offset, np.float32)])
    out = cv2.transform(image, matrix)
    if denoise_sigma >= MIN_SIGMA:
        out = cv2.GaussianBlur(out, (0, 0), denoise_sigma)
    return out


class Exposure:
    """The node's frame normalisation: the config's ``exposure`` section
    (``node.node_config.ExposureConfig``, its defaults when None) put to work."""

    def __init__(self, config: ExposureConfig | None = None) -> None:
        self.config = config or ExposureConfig()
        self._frames = self._balanced = self._brightened = self._saturated = 0
        self._lowered = 0
        self._wb_sum = np.zeros(3)
        self._gain_sum = self._saturation_sum = self._black_sum = 0.0

    @classmethod
    def from_config(cls, section: ExposureConfig) -> Exposure | None:
        """The stage for a config section; None when every correction is off."""
        on = (section.auto_gain or section.white_balance or section.saturation
              or section.black_level)
        return cls(section) if on else None

    def gains(self, image: np.ndarray, pixels: list[np.ndarray] | None = None
              ) -> tuple[np.ndarray, float, float, float]:
        """The frame's white-balance gains (3,), its brightening (>= 1), its saturation gain
        (>= 1) and how far its dark end lies above ``max_black`` (grey levels after the white
        balance; the frame is lowered by it and stretched about the smaller of it and
        ``max_black``). ``pixels``: the frame's ``sample_pixels``, when the caller has them."""
        c = self.config
        pixels = sample_pixels(image) if pixels is None else pixels
        wb = (beyond_tolerance(grey_gains(pixels, c.max_wb_gain), c.wb_tolerance)
              if c.white_balance else np.ones(3, np.float32))
        black = (max(0.0, dark_level(pixels, DARK_PERCENTILE, wb) - c.max_black)
                 if c.black_level else 0.0)
        # Veiled: one stretch about the pivot takes the dark end to max_black and the bright
        # end to target.
        pivot = veil_pivot(black, c.max_black)
        gain = (exposure_gain(bright_level(pixels, BRIGHT_PERCENTILE, wb) - black - pivot,
                              c.target - pivot, c.max_gain)
                if c.auto_gain or black > 0.0 else 1.0)
        saturation = 1.0
        if c.saturation:
            level = chroma_level(pixels, CHROMA_PERCENTILE, wb * gain)
            if level >= 1.0:  # a grey frame has no colour to raise
                saturation = exposure_gain(level, c.min_chroma, c.max_saturation_gain)
        return wb, gain, saturation, black

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The frame the networks see: ``image`` itself, or a corrected copy."""
        wb, gain, saturation, black = self.gains(image)
        self._frames += 1
        if black >= 0.5:
            self._lowered += 1
            self._black_sum += black
        if np.any(np.abs(wb - 1.0) >= UNCHANGED):
            self._balanced += 1
            self._wb_sum += wb
        if gain - 1.0 >= UNCHANGED:
            self._brightened += 1
            self._gain_sum += gain
        if saturation - 1.0 >= UNCHANGED:
            self._saturated += 1
            self._saturation_sum += saturation
        sigma = self.config.denoise_sigma * math.log2(gain)
        offset = veil_pivot(black, self.config.max_black) * (1.0 - gain) - black * gain
        return apply_gains(image, wb * gain, sigma, saturation, offset)

    def report(self) -> dict:
        """What the stage did so far: frames seen, how many it white-balanced (and their mean
        B, G, R gains), found veiled (and their mean dark-end excess), brightened (and their
        mean gain) and made more colourful (and their mean saturation gain). A camera whose
        frames are mostly corrected is set up far from the training camera's look: its own
        white balance, exposure or saturation may be worth fixing."""
        out: dict = {"frames": self._frames, "white_balanced": self._balanced,
                     "brightened": self._brightened, "saturated": self._saturated,
                     "black_lowered": self._lowered}
        if self._balanced:
            out["mean_wb_gains"] = [round(float(g), 3) for g in self._wb_sum / self._balanced]
        if self._brightened:
            out["mean_brightening"] = round(self._gain_sum / self._brightened, 3)
        if self._saturated:
            out["mean_saturation"] = round(self._saturation_sum / self._saturated, 3)
        if self._lowered:
            out["mean_black_lowered"] = round(self._black_sum / self._lowered, 1)
        return out


def trained_tolerance(extra: dict) -> float | None:
    """The ``wb_tolerance`` a classifier's training frames were white-balanced with: its
    metadata's ``extra["normalise"]`` (``data.normalise`` in the training config); None when
    it was trained on the frames as stored."""
    trained = (extra.get("normalise") or {}).get("wb_tolerance")
    if not isinstance(trained, (int, float)) or isinstance(trained, bool):
        return None
    return float(trained)


def frame_normaliser(wb_tolerance: float | None) -> Callable[[np.ndarray], np.ndarray]:
    """What a frame goes through before it is cropped for training or INT8 calibration:
    nothing when ``wb_tolerance`` is None, else this stage with that white-balance tolerance
    (and the other corrections at their defaults), as the node prepares its frames."""
    if wb_tolerance is None:
        return lambda image: image
    return Exposure(ExposureConfig(wb_tolerance=wb_tolerance))


def training_mismatch(extra: dict, config: ExposureConfig) -> str | None:
    """One line when the classifier was trained on frames this stage prepares differently
    (``trained_tolerance``). None when they agree or the model says nothing."""
    trained = trained_tolerance(extra)
    if trained is None:
        return None
    if not config.white_balance:
        return (f"the classifier was trained on frames white-balanced with wb_tolerance "
                f"{trained:g}, but exposure.white_balance is off")
    if abs(config.wb_tolerance - trained) > 1e-6:
        return (f"the classifier was trained on frames white-balanced with wb_tolerance "
                f"{trained:g}, but exposure.wb_tolerance is {config.wb_tolerance:g}")
    return None


def describe(report: dict) -> str | None:
    """One line for the run summary, or None when the stage changed no frame."""
    if not (report.get("white_balanced") or report.get("brightened")
            or report.get("saturated") or report.get("black_lowered")):
        return None
    parts = []
    if report.get("white_balanced"):
        b, g, r = report["mean_wb_gains"]
        parts.append(f"{report['white_balanced']} of {report['frames']} frames white-balanced "
                     f"(mean gains B {b:.2f} G {g:.2f} R {r:.2f})")
    if report.get("black_lowered"):
        parts.append(f"{report['black_lowered']} of {report['frames']} veiled, black level "
                     f"lowered (mean {report['mean_black_lowered']:.0f} grey levels)")
    if report.get("brightened"):
        parts.append(f"{report['brightened']} of {report['frames']} brightened (mean "
                     f"x{report['mean_brightening']:.2f})")
    if report.get("saturated"):
        parts.append(f"{report['saturated']} of {report['frames']} more colourful (mean "
                     f"saturation x{report['mean_saturation']:.2f})")
    return "; ".join(parts)
