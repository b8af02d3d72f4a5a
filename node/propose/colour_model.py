"""Learned colour statistics of cones: a colour look-up table and a size prior by image row.

Colour: a Bayesian pixel classifier in the manner of Swain & Ballard's histogram
back-projection (1991) and Jones & Rehg's skin-colour model (2002). Per-class colour
histograms (32 bins per BGR channel) are counted from pixels inside the labelled cone boxes of
the training frames, and one background histogram from pixels well away from every box; the
look-up table holds, per colour, the winning cone class (2 bits) and its posterior
probability (6 bits) in one byte. Frames are white-balanced by the grey-world assumption
(Buchsbaum 1980) before the look-up, both when the histograms are counted and at run time, so
that a yellow or orange cast of one camera does not move the colours out of the table.

Size: a cone's box height grows linearly with the row of its base on a flat track (pinhole
camera, ground plane); ``height ≈ slope * bottom + intercept`` is fitted to the training boxes,
with the spread of the ratio to it, and the typical width / height of a box.

``python -m node.propose.colour_model --data yolo:DIR --out models/colour_model.json`` fits both on
the TRAINING frames only (those ``configs/train.yaml``'s ``data.heldout`` does not hold out).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

BINS = 32
SHIFT = 3  # 256 / BINS = 2**SHIFT
COLOUR_CLASSES = ("blue_cone", "yellow_cone", "orange_cone")
"""Cone colours of the table, in the order of their 2-bit class code."""
_TO_COLOUR = {"blue_cone": 0, "yellow_cone": 1, "orange_cone": 2, "large_orange_cone": 2}
DEFAULT_MODEL_FILE = "models/colour_model.json"


class ColourModelError(ValueError):
    """The colour model file is missing or malformed; the message names it."""


@dataclass
class ColourModel:
    """A colour table and a size prior.

    Attributes:
        table: (BINS**3,) uint8, index ``b<<10 | g<<5 | r`` of the 5-bit channels; value
            ``class << 6 | round(63 * P(class | colour))``.
        slope, intercept: box height in pixels ≈ slope * bottom row + intercept (at ``height``).
        ratio_lo, ratio_hi: 1st and 99th percentiles of the true height / that prediction.
        aspect: median width / height of a labelled box.
        height: frame height the size prior was fitted at (it scales with the frame).
        row_min: fraction of the frame height above which no labelled cone's top lies.
    """

    table: np.ndarray
    slope: float
    intercept: float
    ratio_lo: float
    ratio_hi: float
    aspect: float
    height: int
    row_min: float

    def expected_height(self, bottom: np.ndarray, frame_height: int) -> np.ndarray:
        """The typical height in pixels of a cone whose base is at row ``bottom``."""
        k = frame_height / self.height
        return self.slope * np.asarray(bottom, np.float64) + self.intercept * k

    def to_json(self) -> dict:
        packed = base64.b64encode(zlib.compress(self.table.tobytes(), 9)).decode("ascii")
        return {"format": "cone-colour-model/1", "bins": BINS, "classes": list(COLOUR_CLASSES),
                "size_prior": {"slope": self.slope, "intercept": self.intercept,
                               "ratio_lo": self.ratio_lo, "ratio_hi": self.ratio_hi,
                               "aspect": self.aspect, "height": self.height,
                               "row_min": self.row_min},
                "table_zlib_b64": packed}

    @classmethod
    def from_json(cls, data: dict, where: str = "colour model") -> ColourModel:
        try:
            if data["format"] != "cone-colour-model/1" or data["bins"] != BINS:
                raise ColourModelError(f"{where}: unsupported format {data['format']!r}")
            table = np.frombuffer(zlib.decompress(base64.b64decode(data["table_zlib_b64"])),
                                  np.uint8).copy()
            size = data["size_prior"]
            model = cls(table, *(float(size[k]) for k in
                                 ("slope", "intercept", "ratio_lo", "ratio_hi", "aspect")),
                        int(size["height"]), float(size["row_min"]))
        except (KeyError, TypeError, ValueError, zlib.error) as exc:
            if isinstance(exc, ColourModelError):
                raise
            raise ColourModelError(f"{where}: malformed colour model ({exc})") from None
        if table.size != BINS ** 3:
            raise ColourModelError(f"{where}: table has {table.size} entries, expected "
                                   f"{BINS ** 3}")
        return model


def load_colour_model(path: str | Path = DEFAULT_MODEL_FILE) -> ColourModel:
    """Read a colour model JSON (relative paths also from the repository root)."""
    from node.node_config import resolve_path

    resolved = resolve_path(path)
    try:
        data = json.loads(resolved.read_text())
    except OSError:
        raise ColourModelError(f"{path}: colour model not found (fit one with "
                               f"`python -m node.propose.colour_model --data yolo:DIR`)") from None
    except json.JSONDecodeError as exc:
        raise ColourModelError(f"{path}: not JSON ({exc.msg})") from None
    return ColourModel.from_json(data, str(path))


# --------------------------------------------------------------------------- per frame

_QUANTISE = np.zeros((1, 256, 3), np.uint16)
_QUANTISE[0, :, 0] = (np.arange(256) >> SHIFT) << 10
_QUANTISE[0, :, 1] = (np.arange(256) >> SHIFT) << 5
_QUANTISE[0, :, 2] = np.arange(256) >> SHIFT
_SUM = np.ones((1, 3), np.float32)


def grey_world_table(image: np.ndarray, stride: int = 4) -> np.ndarray:
    """A per-channel look-up (1, 256, 3) uint16 that white-balances by the grey world and
    quantises to the table's 5-bit channel codes in one ``cv2.LUT``."""
    means = np.array(cv2.mean(image[::stride, ::stride])[:3])
    gains = np.clip(means.mean() / np.maximum(means, 1.0), 0.5, 2.0)
    levels = np.clip(np.arange(256)[:, None] * gains[None, :], 0, 255).astype(np.int64)
    lut = np.empty((1, 256, 3), np.uint16)
    lut[0, :, 0] = (levels[:, 0] >> SHIFT) << 10
    lut[0, :, 1] = (levels[:, 1] >> SHIFT) << 5
    lut[0, :, 2] = levels[:, 2] >> SHIFT
    return lut


def colour_codes(image: np.ndarray, balance: bool = True) -> np.ndarray:
    """(H, W) uint16 table index per pixel (grey-world balanced when ``balance``)."""
    lut = grey_world_table(image) if balance else _QUANTISE
    return cv2.transform(cv2.LUT(image, lut), _SUM)


# --------------------------------------------------------------------------- fitting

def count_histograms(samples: list, balance: bool = True, bg_per_frame: int = 20000,
                     seed: int = 0) -> np.ndarray:
    """(4, BINS**3) pixel counts: the three cone colours, then background.

    Cone pixels: the central half (in width) of every labelled box, where the cone's own
    colour is; background: a random sample of pixels outside every box grown 2x.
    """
    rng = np.random.default_rng(seed)
    counts = np.zeros((4, BINS ** 3), np.float64)
    for sample in samples:
        image = sample.load()
        codes = colour_codes(image, balance)
        h, w = codes.shape
        owner = np.full((h, w), -1, np.int8)
        near = np.zeros((h, w), bool)
        for box, label in zip(np.round(sample.boxes).astype(int), sample.labels, strict=True):
            x1, y1, x2, y2 = box
            bw, bh = x2 - x1, y2 - y1
            if label in _TO_COLOUR and bw >= 2 and bh >= 4:
                owner[y1:y2, x1 + bw // 4:max(x2 - bw // 4, x1 + bw // 4 + 1)] = \
                    _TO_COLOUR[label]
            near[max(y1 - bh, 0):y2 + bh // 2, max(x1 - bw, 0):x2 + bw] = True
        for c in range(3):
            counts[c] += np.bincount(codes[owner == c], minlength=BINS ** 3)
        free = codes[~near]
        if len(free):
            pick = rng.choice(len(free), min(len(free), bg_per_frame), replace=False)
            counts[3] += np.bincount(free[pick], minlength=BINS ** 3)
    return counts


def table_from_counts(counts: np.ndarray, prior: float = 0.02, smooth: float = 0.5) -> np.ndarray:
    """Packed table: winning cone class and its posterior (cone prior ``prior`` per class)."""
    density = (counts + smooth) / (counts + smooth).sum(axis=1, keepdims=True)
    ratio = density[:3] / density[3]
    post = ratio * prior / (ratio * prior + 1.0)
    best = post.argmax(axis=0)
    level = np.round(63 * post.max(axis=0)).astype(np.uint8)
    return ((best.astype(np.uint8) << 6) | level).astype(np.uint8)


def fit_size_prior(samples: list) -> dict:
    """Height-by-row line, its ratio spread, the median aspect and the topmost row."""
    boxes = np.concatenate([s.boxes for s in samples if len(s.boxes)]).astype(np.float64)
    frame_h = int(samples[0].size[1])
    heights = boxes[:, 3] - boxes[:, 1]
    slope, intercept = np.polyfit(boxes[:, 3], heights, 1)
    ratio = heights / np.maximum(slope * boxes[:, 3] + intercept, 1.0)
    lo, hi = np.percentile(ratio, [1, 99])
    return {"slope": float(slope), "intercept": float(intercept), "ratio_lo": float(lo),
            "ratio_hi": float(hi),
            "aspect": float(np.median((boxes[:, 2] - boxes[:, 0]) / np.maximum(heights, 1))),
            "height": frame_h,
            "row_min": float(np.percentile(boxes[:, 1], 0.5) / frame_h)}


def fit_colour_model(samples: list, prior: float = 0.02) -> ColourModel:
    """Fit table and size prior on labelled samples (the training frames only)."""
    if not samples:
        raise ColourModelError("no training samples to fit the colour model on")
    size = fit_size_prior(samples)
    return ColourModel(table_from_counts(count_histograms(samples), prior), **size)


def drop_near_duplicates(train: list, held: list, threshold: float = 5.0) -> list:
    """Training frames minus those whose 64x64 grey thumbnail differs from a held-out frame's
    by less than ``threshold`` grey levels (BGRacing's ``skidpad_2`` re-exports held-out
    ``skidpad`` frame 21)."""
    def thumb(sample) -> np.ndarray:
        grey = cv2.cvtColor(sample.load(), cv2.COLOR_BGR2GRAY)
        return cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)

    if not held:
        return list(train)
    held_thumbs = np.stack([thumb(s) for s in held])
    return [s for s in train
            if np.abs(held_thumbs - thumb(s)).mean(axis=(1, 2)).min() >= threshold]


def main(argv: list[str] | None = None) -> int:
    """``python -m node.propose.colour_model --data yolo:DIR [--out FILE]``: fit on the training split."""
    from node.evaluate.datasets import load_samples
    from node.evaluate.splits import select_samples

    parser = argparse.ArgumentParser(prog="python -m node.propose.colour_model", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--data", required=True, metavar="yolo:DIR")
    parser.add_argument("--out", default=DEFAULT_MODEL_FILE)
    parser.add_argument("--prior", type=float, default=0.02,
                        help="prior probability of each cone colour per pixel")
    args = parser.parse_args(argv)
    try:
        samples = load_samples(args.data)
        train = drop_near_duplicates(select_samples(samples, "train"),
                                     select_samples(samples, "heldout"))
        model = fit_colour_model(train, args.prior)
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(model.to_json()) + "\n")
    print(f"{args.out}: fitted on {len(train)} training frames; height ≈ "
          f"{model.slope:.3f} * bottom + {model.intercept:.1f} px "
          f"(ratio {model.ratio_lo:.2f}..{model.ratio_hi:.2f}), aspect {model.aspect:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
