"""What a camera's frames look like to the node, against what the node was validated on
(``python -m node check SOURCE``).

The node is validated on camera variants of real frames (``docs/validation.md``): burnt out,
blurred, noisy, colour-cast, veiled, dark, pale. Some of these the exposure stage corrects
(``node.sources.exposure``); two it cannot, and there the node loses cones: frames burnt out
to white (the colour is gone) and blurred frames (a distant cone smears into the road). This
module measures each frame's look, from the frame alone and without any model, so that a team
can check its camera before a test day:

* **Burnt out**: the share of pixels burnt out to white, every channel at ``SATURATED`` or
  above (a colour cast saturates one channel of many pixels, which is not the same loss).
* **Blur**, in pixels: at the centres of the strongest edges of the frame as the proposer
  sees it (shrunk by the config's ``proposer.heatmap_*`` rules where they shrink it), how
  much of their gradient a wider Gaussian takes away, read as the sigma of the Gaussian blur
  that would leave that much (0 for a step edge; 0.4 to 0.8 px on the recorded frames).
  The frame is smoothed by 1 px first, so that noise and JPEG's block edges do not pass for
  detail. A motion blur reads more than a Gaussian of the same spread, its profile being flat.
* **Noise**: the sensor noise's standard deviation in grey levels (Immerkaer's estimator,
  1996: the frame filtered by the difference of two Laplacians; edges add a little).
* What the exposure stage will do to each frame (``Exposure.gains``): white balance,
  brightening, veil and colour, and whether a correction hit its cap.

Each judged property has a line (``LINES``) where the validation's camera variants show the
node losing cones: between the strengths that kept at least 0.90 of its recall and those that
did not, or, for noise, past the strongest variant. ``python -m export.validate variants``
prints these readings beside the node's recall for every variant, so the lines can be checked
again whenever the models change (``docs/validation.md``, "Camera check").
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from node.node_config import NodeConfig
from node.sources.exposure import Exposure, cast_gains, sample_pixels

SATURATED = 250
"""A pixel with every channel at or above this grey level counts as burnt out."""
EDGE_SHARE = 0.05
"""The share of pixels, the strongest gradients after the smoothing, among which sharpness
takes the edges' centres."""
MIN_EDGE = 2.0
"""Edges weaker than this (grey levels per pixel, smoothed) are no edges: a flat frame has no
sharpness to read."""
MAX_BLUR_PX = 10.0
"""Blur readings stop here: no detail finer than this is left."""
DENOISE_SIGMA = 1.0
"""The Gaussian (px) that smooths the frame before its edges are read: sensor noise and JPEG's
block edges would otherwise read as fine detail and hide a blur."""
PROBE_SIGMA = 2.0
"""The wider Gaussian (px) whose loss of gradient at the edges tells how blurred they were."""
WARN_SHARE = 0.25
"""A property is flagged when at least this share of the checked frames lies beyond its line:
a camera blurred only at speed is flagged as well as one out of focus."""
CAPPED = 0.999
"""A correction within this fraction of its cap counts as capped."""


@dataclass(frozen=True)
class Line:
    """Where a measured property stops being what the node handles.

    Attributes:
        name: the property's key in ``FrameLook``.
        limit: the line itself.
        above: True when values above ``limit`` are beyond it (all three so far).
        why: what lies beyond, for the report.
        advice: what a team can do about it.
    """

    name: str
    limit: float
    above: bool
    why: str
    advice: str

    def beyond(self, value: float) -> bool:
        return value > self.limit if self.above else value < self.limit


LINES = (
    Line("clipped", 0.6, True,
         "burnt out to white: beyond this the overexposed variants lost many cones, their "
         "colour gone",
         "shorten the exposure or lower the gain; expose for the road, not the shade"),
    Line("blur", 2.2, True,
         "blurred: beyond this the motion-blur and defocus variants lost cones, distant ones first",
         "focus the lens, shorten the exposure time, clean the lens; or fine-tune on your own "
         "footage (python -m export finetune)"),
    Line("noise", 14.0, True,
         "noisier than the strongest noise variant the node was validated on",
         "more light or less sensor gain"),
)
"""The lines (``docs/validation.md``, "Camera check"), in report order."""


@dataclass
class FrameLook:
    """One frame's measurements (see the module docstring)."""

    width: int
    height: int
    view_width: int
    view_height: int
    clipped: float
    blur: float
    noise: float
    wb_gains: list[float]
    wb_capped: bool
    brightening: float
    brightening_capped: bool
    veil: float
    saturation: float
    saturation_capped: bool


def view_size(width: int, height: int, config: NodeConfig) -> tuple[int, int]:
    """The (width, height) the proposer resizes a frame of this size to (its
    ``proposer.heatmap_*`` rules, the whole frame). Only ``heatmap_resize: square`` needs the
    model's input size, read from its metadata then."""
    from node.propose.heatmap import ProposerMetadata, input_geometry

    p = config.proposer
    meta = ProposerMetadata()
    if p.heatmap_resize == "square":
        meta = _proposer_metadata(p.heatmap_model)
    return input_geometry(width, height, meta, p.heatmap_resize, p.heatmap_max_pixels,
                          [0.0, 1.0], p.heatmap_min_pixels).size


_METADATA: dict[str, object] = {}


def _proposer_metadata(model: str):
    """The heatmap model's metadata (its ONNX session opened once per path)."""
    from node.node_config import resolve_path
    from node.propose.heatmap import open_session

    if model not in _METADATA:
        _METADATA[model] = open_session(resolve_path(model))[1]
    return _METADATA[model]


def proposer_view(image: np.ndarray, config: NodeConfig) -> np.ndarray:
    """``image`` as grey levels (float32) at the size the proposer shrinks it to, if it does.
    A frame the proposer enlarges is read at its own size: enlarging softens every edge in
    pixels, and the cones grow with it, so the blur that matters is the camera's own."""
    from node.propose.heatmap import resize_image

    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    size = view_size(image.shape[1], image.shape[0], config)
    if size[0] * size[1] > image.shape[0] * image.shape[1]:
        return grey.astype(np.float32)
    return resize_image(grey, size).astype(np.float32)


def clipped_share(image: np.ndarray) -> float:
    """The share of pixels burnt out to white: every channel at ``SATURATED`` or above."""
    white = np.count_nonzero(image.min(axis=2) >= SATURATED)
    return float(white) / float(image.shape[0] * image.shape[1])


def sharpness(grey: np.ndarray) -> float:
    """At the edges' centres (the peaks, across the edge, of the gradient of ``grey`` smoothed
    by a Gaussian of ``PROBE_SIGMA`` px, among its strongest ``EDGE_SHARE``), the mean gradient
    of ``grey`` smoothed by ``DENOISE_SIGMA`` over that of ``grey`` smoothed by ``PROBE_SIGMA``,
    the lower of the two directions. An edge blurred by a Gaussian of sigma s reads
    sqrt((s^2 + PROBE^2) / (s^2 + DENOISE^2)) (``blur_px`` inverts it); NaN for a frame
    without edges."""
    fine = cv2.GaussianBlur(grey, (0, 0), DENOISE_SIGMA)
    coarse = cv2.GaussianBlur(grey, (0, 0), PROBE_SIGMA)
    ratios = []
    for axis in (0, 1):
        raw = np.abs(np.diff(fine, axis=axis))
        soft = np.abs(np.diff(coarse, axis=axis))
        if axis == 0:  # walk across the edges along the last axis either way
            raw, soft = raw.T, soft.T
        if soft.shape[1] < 3:
            return float("nan")
        centre = soft[:, 1:-1]
        edges = ((centre >= soft[:, :-2]) & (centre > soft[:, 2:])
                 & (centre >= np.quantile(soft, 1.0 - EDGE_SHARE)))
        denom = float(centre[edges].mean()) if edges.any() else 0.0
        if denom < MIN_EDGE:
            return float("nan")
        ratios.append(float(raw[:, 1:-1][edges].mean()) / denom)
    return min(ratios)


def blur_px(ratio: float) -> float:
    """The sigma (px) of the Gaussian blur that makes an edge read ``ratio`` (``sharpness``):
    0 for a step edge, at most ``MAX_BLUR_PX``; NaN for NaN."""
    if not np.isfinite(ratio):
        return float("nan")
    r2 = ratio * ratio
    if r2 - 1.0 <= 1e-9:
        return MAX_BLUR_PX
    s2 = (PROBE_SIGMA ** 2 - r2 * DENOISE_SIGMA ** 2) / (r2 - 1.0)
    return float(min(np.sqrt(max(s2, 0.0)), MAX_BLUR_PX))


_LAPLACE_DIFF = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_sigma(grey: np.ndarray) -> float:
    """Immerkaer's (1996) estimate of the noise's standard deviation, in grey levels."""
    if min(grey.shape) < 3:
        return 0.0
    response = np.abs(cv2.filter2D(grey, cv2.CV_32F, _LAPLACE_DIFF))[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2.0) / 6.0 * response.mean())


def readings(image: np.ndarray, config: NodeConfig) -> dict[str, float]:
    """The properties ``LINES`` judge, for one BGR frame: ``clipped``, ``blur`` and
    ``noise``."""
    grey = proposer_view(image, config)
    return {"clipped": round(clipped_share(image), 4), "blur": round(blur_px(sharpness(grey)), 2),
            "noise": round(noise_sigma(grey), 2)}


def look_at(image: np.ndarray, config: NodeConfig, exposure: Exposure | None = None
            ) -> FrameLook:
    """Measure one BGR frame as the node with ``config`` would see it."""
    read = readings(image, config)
    view = view_size(image.shape[1], image.shape[0], config)
    c = config.exposure
    stage = exposure or Exposure(c)
    pixels = sample_pixels(image)  # read once, for the stage's gains and the unclipped cast
    wb, gain, saturation, black = stage.gains(image, pixels)
    cast = cast_gains(pixels) if c.white_balance else np.ones(3)
    return FrameLook(
        width=int(image.shape[1]), height=int(image.shape[0]),
        view_width=int(view[0]), view_height=int(view[1]),
        clipped=read["clipped"], blur=read["blur"], noise=read["noise"],
        wb_gains=[round(float(g), 3) for g in wb],
        wb_capped=bool(c.max_wb_gain > 1.0
                       and np.any(np.abs(np.log(np.maximum(cast, 1e-6)))
                                  >= CAPPED * np.log(c.max_wb_gain))),
        brightening=round(float(gain), 3),
        brightening_capped=bool(gain >= CAPPED * c.max_gain and c.max_gain > 1.0),
        veil=round(float(black), 1),
        saturation=round(float(saturation), 3),
        saturation_capped=bool(saturation >= CAPPED * c.max_saturation_gain
                               and c.max_saturation_gain > 1.0),
    )


def judge(values: dict[str, list[float]]) -> dict[str, dict]:
    """For each line of ``LINES`` whose property ``values`` holds (one value per frame): the
    median, the share of frames beyond the line and whether that share flags it."""
    out = {}
    for line in LINES:
        if line.name not in values:
            continue
        v = np.asarray(values[line.name], np.float64)
        v = v[np.isfinite(v)]  # a frame without edges has no blur to read
        share = float(np.mean([line.beyond(x) for x in v])) if v.size else 0.0
        out[line.name] = {"median": round(float(np.median(v)), 4) if v.size else None,
                          "beyond": round(share, 3), "flagged": share >= WARN_SHARE}
    return out


@dataclass
class Verdict:
    """One row of the report: a property over the checked frames."""

    name: str
    median: float | None   # None where no frame could be read (blur of frames without edges)
    worst: float | None
    beyond: float          # the share of frames beyond the line (0 where there is none)
    flagged: bool
    note: str = ""
    advice: str = ""


@dataclass
class CheckReport:
    """The looks of the checked frames and what they add up to."""

    frames: int
    sizes: list[tuple[int, int, int, int]]  # frame width, height; the proposer's view of it
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def flagged(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.flagged]

    def to_dict(self) -> dict:
        return {"frames": self.frames, "sizes": [list(s) for s in self.sizes],
                "verdicts": [asdict(v) for v in self.verdicts],
                "flagged": [v.name for v in self.flagged]}

    @classmethod
    def from_dict(cls, d: dict) -> CheckReport:
        """The report ``to_dict`` wrote."""
        return cls(int(d["frames"]), [tuple(x) for x in d["sizes"]],
                   [Verdict(**v) for v in d["verdicts"]])


def summarise(looks: list[FrameLook], config: NodeConfig) -> CheckReport:
    """The report over ``looks`` (at least one)."""
    if not looks:
        raise ValueError("no frame to check")
    sizes = sorted({(k.width, k.height, k.view_width, k.view_height) for k in looks})
    report = CheckReport(len(looks), sizes)
    judged = judge({line.name: [getattr(k, line.name) for k in looks] for line in LINES})
    for line in LINES:
        j = judged[line.name]
        values = [v for v in (getattr(k, line.name) for k in looks) if np.isfinite(v)]
        worst = float(np.percentile(values, 90 if line.above else 10)) if values else None
        report.verdicts.append(Verdict(line.name, j["median"],
                                       None if worst is None else round(worst, 4), j["beyond"],
                                       j["flagged"], line.why if j["flagged"] else "",
                                       line.advice if j["flagged"] else ""))
    c = config.exposure
    corrections = (
        ("white balance", [max(abs(g - 1.0) for g in k.wb_gains) for k in looks],
         [k.wb_capped for k in looks],
         f"a colour cast beyond the stage's x{c.max_wb_gain:g} per channel",
         "set the camera's white balance (daylight) instead of auto"),
        ("brightening", [k.brightening for k in looks], [k.brightening_capped for k in looks],
         f"frames darker than the stage's x{c.max_gain:g} can lift",
         "lengthen the exposure or raise the gain"),
        ("veil", [k.veil for k in looks], [False] * len(looks), "", ""),
        ("colour", [k.saturation for k in looks], [k.saturation_capped for k in looks],
         f"colour paler than the stage's x{c.max_saturation_gain:g} can restore",
         "raise the camera's saturation"),
    )
    for name, values, capped, why, advice in corrections:
        share = float(np.mean(capped))
        flagged = share >= WARN_SHARE
        arr = np.asarray(values, np.float64)
        report.verdicts.append(Verdict(name, round(float(np.median(arr)), 4),
                                       round(float(np.percentile(arr, 90)), 4),
                                       round(share, 3), flagged,
                                       why if flagged else "", advice if flagged else ""))
    return report


class CameraWatch:
    """``readings`` of one frame every ``every_s`` seconds of the stream, in a background
    thread, and a warning when the last ``window`` of them cross a line as ``judge`` flags it.

    ``offer`` is called with every frame and costs a comparison, or a copy of the frame when
    one is due and the thread is idle (a frame due while the thread still reads the previous
    one is skipped). The thread's reading (about 20 ms for 640x640 on one core, mostly in
    OpenCV, which releases the interpreter lock) never delays a frame.
    """

    def __init__(self, config: NodeConfig, every_s: float = 5.0, window: int = 12) -> None:
        self._config = config
        self.every_s = float(every_s)
        self._recent: deque[dict[str, float]] = deque(maxlen=int(window))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()  # set while no frame waits to be read
        self._idle.set()
        self._pending: np.ndarray | None = None
        self._last_stamp: float | None = None
        self._closed = False
        self.read = 0
        self._thread = threading.Thread(target=self._run, name="camera watch", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: NodeConfig) -> CameraWatch | None:
        """The watch of ``config.camera_watch``; None when ``every_s`` is 0."""
        c = config.camera_watch
        return cls(config, c.every_s, c.window) if c.every_s > 0 else None

    def offer(self, image: np.ndarray | None, stamp: float) -> None:
        """A frame of the stream, captured at ``stamp`` (seconds): read it if one is due."""
        if image is None or self._closed:
            return
        last = self._last_stamp
        if last is not None and 0.0 <= stamp - last < self.every_s:
            return
        with self._lock:
            if self._pending is not None:
                return
            self._pending = image.copy()  # the pipeline's frame may be drawn on later
            self._idle.clear()
        self._last_stamp = stamp
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            with self._lock:
                image = self._pending
            if image is None:
                continue
            try:
                found = readings(image, self._config)
            except (ValueError, cv2.error):  # an odd frame: nothing to learn from it
                found = None
            with self._lock:
                if found is not None:
                    self._recent.append(found)
                    self.read += 1
                self._pending = None
                self._idle.set()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until the frame handed over last has been read (the end of a run, tests)."""
        return self._idle.wait(timeout)

    def report(self) -> dict:
        """Frames read so far, and ``judge``'s verdict on the last ``window`` of them."""
        with self._lock:
            recent = list(self._recent)
        out: dict = {"read": self.read, "window": len(recent)}
        if recent:
            out.update(judge({line.name: [r[line.name] for r in recent] for line in LINES}))
        return out

    def diagnostic_values(self) -> dict:
        """Frames read and the medians of the recent readings, for the ROS diagnostics."""
        report = self.report()
        out: dict = {"camera_frames_read": report["read"]}
        for line in LINES:
            median = report.get(line.name, {}).get("median")
            if median is not None:
                out[f"camera_{line.name}"] = median
        return out

    def warning(self) -> str | None:
        """One line naming what the recent frames cross, or None."""
        report = self.report()
        flagged = [line for line in LINES if report.get(line.name, {}).get("flagged")]
        if not flagged:
            return None
        parts = [f"{line.name} {report[line.name]['median']:g} (line {line.limit:g}, "
                 f"{report[line.name]['beyond']:.0%} of the last {report['window']} frames "
                 f"read)" for line in flagged]
        return ("camera: " + "; ".join(parts) + " - " + "; ".join(
            line.why.split(":")[0] for line in flagged) + "; see python -m node check")

    def close(self) -> None:
        """Stop the thread (safe to call twice)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=2.0)
