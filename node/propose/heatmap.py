"""A learned cone-centre heatmap as the cone proposer (``proposer.kind: heatmap``).

CenterNet-style (Zhou, Wang and Krähenbühl, "Objects as Points", 2019), made tiny: the frame
keeps its aspect and its scale (it is shrunk only to stay within ``proposer.heatmap_max_pixels``,
and a frame smaller than ``proposer.heatmap_min_pixels`` is enlarged to it) and is padded to the
network's 32 px grid (``input_geometry``), so any camera's frame size works and a small cone
keeps at least its pixels; a small fully-convolutional network (``export.proposer_train``)
predicts at output stride 4 a cone-centre heatmap (sigmoid), the box size (log height and log
width, input pixels) and the centre's offset from its cell. Decoding is CenterNet's: a 3x3
max filter keeps local peaks, a score threshold and a top-K cap select them, and each peak
becomes one class-agnostic box, mapped back to frame pixels and clipped to the frame. With
``proposer.heatmap_shoulders`` (the default) a cell above the threshold that is no peak becomes
a box too when its box lies clear of every stronger one (``shoulder_cells``): the weaker of
two cones that overlap in the image has no peak of its own. The classifier labels the boxes
(``background`` included).

The model runs in its own ``onnxruntime.InferenceSession`` with one intra-op thread (the
proposer runs on the capture thread, next to the classifier's worker), not through
``node.infer``: those validate classifier metadata (class list, crop policy). The
proposer's own contract travels in the ONNX ``metadata_props`` under ``cone_proposer`` (JSON:
input size, output stride, channel order, mean and std, output names, training clips).
Only numpy, cv2 and onnxruntime are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from node.infer.onnxrt import ort_session
from node.infer.postprocess import suppress_overlaps
from node.node_config import ProposerConfig, resolve_path
from node.propose.base import _EMPTY, Proposer, body_mask_image
from node.types import Frame

METADATA_KEY = "cone_proposer"
FORMAT = "cone-proposer/1"
OUTPUTS = ("heatmap", "size", "offset")
"""Output names of the ONNX graph: (1,1,G,G) sigmoid centre heat, (1,2,G,G) log(h), log(w)
in input pixels, (1,2,G,G) x and y offsets of the centre within its cell (cells)."""


class HeatmapModelError(ValueError):
    """The proposer model is missing, unreadable or lacks its metadata; names the file."""


@dataclass
class ProposerMetadata:
    """The preprocessing and decoding contract of a cone-heatmap model.

    Attributes:
        input_size: square input side in pixels (the frame is resized to it, aspect ignored).
        stride: input pixels per heatmap cell.
        channel_order: ``RGB`` or ``BGR`` order of the input tensor's channels.
        mean, std: per-channel normalisation on the 0..1 scale: ``(x / 255 - mean) / std``.
        extra: anything else recorded at export (training clips, architecture, scores).
    """

    input_size: int = 320
    stride: int = 4
    channel_order: str = "RGB"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    extra: dict = field(default_factory=dict)

    @property
    def raw_pixels(self) -> bool:
        """Whether the model takes raw 0..255 pixels (mean 0, std 1/255), normalising them
        itself."""
        return not any(self.mean) and all(abs(v * 255.0 - 1.0) < 1e-6 for v in self.std)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "input_size": self.input_size,
                           "stride": self.stride, "channel_order": self.channel_order,
                           "mean": list(self.mean), "std": list(self.std),
                           "outputs": list(OUTPUTS), "extra": self.extra}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str) -> ProposerMetadata:
        """Parse and check; raises ``HeatmapModelError`` naming ``origin``."""
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            meta = cls(int(d["input_size"]), int(d["stride"]), str(d["channel_order"]),
                       [float(v) for v in d["mean"]], [float(v) for v in d["std"]],
                       dict(d.get("extra", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise HeatmapModelError(f"{origin}: bad {METADATA_KEY} metadata ({exc})") from None
        if (meta.input_size % meta.stride or meta.channel_order not in ("RGB", "BGR")
                or len(meta.mean) != 3 or len(meta.std) != 3 or min(meta.std) <= 0):
            raise HeatmapModelError(f"{origin}: inconsistent {METADATA_KEY} metadata "
                                    f"(input_size {meta.input_size}, stride {meta.stride}, "
                                    f"channel_order {meta.channel_order})")
        return meta


def to_input_tensor(image: np.ndarray, meta: ProposerMetadata,
                    rows: tuple[int, int] | None = None) -> np.ndarray:
    """BGR frame → (1, 3, S, S) float32 network input, squashed to the model's square
    ``input_size`` (``heatmap_resize: square``); with ``rows`` = (top, bottom) in input
    pixels, only that band: (1, 3, bottom - top, S)."""
    s = meta.input_size
    geo = InputGeometry((s, s), (s, s), rows or (0, s),
                        (image.shape[1] / s, image.shape[0] / s))
    return frame_tensor(image, meta, geo)


def normalise(small: np.ndarray, meta: ProposerMetadata) -> np.ndarray:
    """A BGR image already at the network's input size → (1, 3, H, W) float32 input."""
    if meta.raw_pixels:
        # The model normalises the pixels itself: each channel is copied into its plane
        # (about two thirds of the time of numpy's transposing copy at 640x640).
        planes = cv2.split(small)
        if meta.channel_order == "RGB":
            planes = planes[::-1]
        x = np.empty((1, 3, *small.shape[:2]), np.float32)
        for i, plane in enumerate(planes):
            x[0, i] = plane
        return x
    if len(set(meta.std)) == 1:
        # One C++ pass (channel swap, mean, scale, HWC -> NCHW); the mean is given in the
        # output channel order. Several times cheaper than the numpy arithmetic below.
        return cv2.dnn.blobFromImage(small, 1.0 / (255.0 * meta.std[0]), None,
                                     tuple(255.0 * v for v in meta.mean),
                                     meta.channel_order == "RGB", False, cv2.CV_32F)
    if meta.channel_order == "RGB":
        small = small[..., ::-1]
    mean = np.asarray(meta.mean, np.float32) * 255.0
    scale = 1.0 / (np.asarray(meta.std, np.float32) * 255.0)
    x = (small.astype(np.float32) - mean) * scale
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def decode_heatmap(heat: np.ndarray, log_size: np.ndarray, offset: np.ndarray, stride: int,
                   threshold: float, top_k: int, scale: tuple[float, float] = (1.0, 1.0),
                   frame_size: tuple[int, int] | None = None, top_row: int = 0,
                   shoulders: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CenterNet decoding of one image's outputs into boxes.

    Args:
        heat: (G_h, G_w) centre probabilities.
        log_size: (2, G_h, G_w) log(height), log(width) in input pixels.
        offset: (2, G_h, G_w) x and y of the centre within its cell, in cells.
        stride: input pixels per cell.
        threshold: smallest peak probability kept.
        top_k: most boxes returned (highest peaks first).
        scale: (x, y) frame pixels per input pixel.
        frame_size: (width, height) to clip the boxes to; None leaves them unclipped.
        top_row: input row of the heatmap's first row (the network saw a band of rows).
        shoulders: also decode the cells whose heat is a shoulder on a neighbour's peak
            (``shoulder_cells``): the weaker of two cones that overlap in the image.

    Returns:
        (N, 4) float32 x1, y1, x2, y2 in frame pixels, and (N,) float32 peak scores, best first.
    """
    heat = np.asarray(heat, np.float32)
    ys, xs = np.nonzero(heat >= threshold)
    scores = heat[ys, xs]
    peak = scores == cv2.dilate(heat, np.ones((3, 3), np.uint8))[ys, xs]
    if not peak.any():
        return _EMPTY.copy(), np.zeros(0, np.float32)
    if shoulders:  # the peaks (row-major, as found), then the shoulders, strongest first
        boxes = cell_boxes(ys, xs, log_size, offset, stride, scale, top_row)
        rest = np.flatnonzero(~peak)
        taken = rest[shoulder_cells(boxes[rest], scores[rest], boxes[peak])]
        boxes = np.concatenate([boxes[peak], boxes[taken]])
        scores = np.concatenate([scores[peak], scores[taken]])
    else:
        boxes = cell_boxes(ys[peak], xs[peak], log_size, offset, stride, scale, top_row)
        scores = scores[peak]
    order = np.argsort(-scores, kind="stable")[:top_k]
    boxes, scores = boxes[order], scores[order]
    if frame_size is not None:
        np.clip(boxes[:, 0::2], 0.0, float(frame_size[0]), out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0.0, float(frame_size[1]), out=boxes[:, 1::2])
        keep = (boxes[:, 2] - boxes[:, 0] >= 1.0) & (boxes[:, 3] - boxes[:, 1] >= 1.0)
        boxes, scores = boxes[keep], scores[keep]
    return boxes, scores.astype(np.float32)


def cell_boxes(ys: np.ndarray, xs: np.ndarray, log_size: np.ndarray, offset: np.ndarray,
               stride: int, scale: tuple[float, float] = (1.0, 1.0), top_row: int = 0
               ) -> np.ndarray:
    """(N, 4) float32 x1, y1, x2, y2 in frame pixels that the cells (``ys``, ``xs``) decode
    to (``decode_heatmap``'s arguments)."""
    cx = (xs + offset[0, ys, xs]) * stride * scale[0]
    cy = ((ys + offset[1, ys, xs]) * stride + top_row) * scale[1]
    half_h = 0.5 * np.exp(np.clip(log_size[0, ys, xs], -2.0, 8.0)) * scale[1]
    half_w = 0.5 * np.exp(np.clip(log_size[1, ys, xs], -2.0, 8.0)) * scale[0]
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1).astype(np.float32)


def shoulder_cells(boxes: np.ndarray, scores: np.ndarray, peak_boxes: np.ndarray) -> np.ndarray:
    """Which of the heatmap's other cells above the threshold stand for a cone of their own:
    indices into ``boxes`` (the boxes those cells decode to), strongest first.

    Two cones that overlap in the image, or stand a cell or two apart, often leave one peak: the
    weaker cone's heat is a shoulder on its neighbour's, above the threshold but not a local
    maximum. Such a cell is a cone of its own when the centre of its box lies outside every
    peak's box (``peak_boxes``) and outside the box of every stronger cell taken before it.
    The rest of a cone's own heat decodes into that cone's box, or lies inside it, and is never
    taken.
    """
    cx, cy = (boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5

    def centres_inside(rows: np.ndarray, of: np.ndarray) -> np.ndarray:
        return ((cx[rows, None] >= of[:, 0]) & (cx[rows, None] <= of[:, 2])
                & (cy[rows, None] >= of[:, 1]) & (cy[rows, None] <= of[:, 3]))

    free = np.flatnonzero(~centres_inside(np.arange(len(boxes)), peak_boxes).any(axis=1))
    free = free[np.argsort(-scores[free], kind="stable")]
    covered = centres_inside(free, boxes[free])  # [i, j]: free[i]'s centre in free[j]'s box
    taken: list[int] = []
    for i in range(len(free)):
        if not covered[i, taken].any():
            taken.append(i)
    return free[taken]


def open_session(path: str | Path, threads: int = 1,
                 providers: str | list[str] | None = None):
    """An ONNX Runtime session (CPU unless ``providers`` says otherwise) for the proposer
    model and its metadata.

    Raises:
        HeatmapModelError: missing or unreadable file, missing metadata or outputs, or an
            execution provider this ONNX Runtime lacks.
    """
    path = Path(path)
    session, text = ort_session(path, threads, METADATA_KEY, HeatmapModelError,
                                "proposer model", "proposer_train", providers)
    meta = ProposerMetadata.from_json(text, str(path))
    names = [o.name for o in session.get_outputs()]
    if names != list(OUTPUTS):
        raise HeatmapModelError(f"{path}: outputs {names}, expected {list(OUTPUTS)}")
    return session, meta


PYRAMID_AREA = 2.0
"""A frame input larger than this many times the model's square input area is also seen at
that area (``HeatmapProposer.levels``)."""
PYRAMID_NMS_IOU = 0.5
"""Boxes of the two levels overlapping more than this are one cone."""
ROW_ALIGN = 32
"""The network's coarsest stride: the input's sides, and a band of rows, are multiples of it."""

MAX_ENLARGE = 2.0
"""Largest factor by which ``heatmap_min_pixels`` enlarges a small frame."""


@dataclass(frozen=True)
class InputGeometry:
    """How one frame size maps onto the network's input (``input_geometry``).

    Attributes:
        size: (width, height) the frame is resized to.
        padded: (width, height) of the network input: ``size`` padded right and below to
            multiples of ``ROW_ALIGN`` (the padding is never searched: boxes are clipped to the
            frame).
        rows: (top, bottom) input rows the network sees (a band; (0, padded height) for all).
        scale: (x, y) frame pixels per input pixel.
    """

    size: tuple[int, int]
    padded: tuple[int, int]
    rows: tuple[int, int]
    scale: tuple[float, float]


def input_geometry(frame_w: int, frame_h: int, meta: ProposerMetadata, resize: str,
                   max_pixels: int, rows: list[float], min_pixels: int = 0) -> InputGeometry:
    """The network input for a ``frame_w`` x ``frame_h`` frame.

    ``resize`` ``keep_aspect`` scales the frame by one factor (a cone keeps its shape): 1 (a
    12 px cone stays 12 px), less only as far as needed to keep the input within
    ``max_pixels``, and more for a frame of fewer than ``min_pixels`` pixels, which is
    enlarged to that many (at most ``MAX_ENLARGE`` times): its small cones grow with it, to
    sizes the network's 4 px heatmap cells resolve better. ``square`` squashes any frame to
    the model's square ``input_size`` (how the training frames were made, aspect ignored).
    ``rows`` are ``proposer.heatmap_rows``, [top, bottom] frame fractions, widened to
    ``ROW_ALIGN``.
    """
    if resize == "square":
        w = h = meta.input_size
    else:
        area = float(frame_w * frame_h)
        if area < min_pixels:
            s = min(MAX_ENLARGE, float(np.sqrt(min_pixels / area)))
        else:
            s = min(1.0, float(np.sqrt(max_pixels / area)))
        w, h = max(ROW_ALIGN, int(frame_w * s)), max(ROW_ALIGN, int(frame_h * s))
    pw, ph = (-(-w // ROW_ALIGN) * ROW_ALIGN, -(-h // ROW_ALIGN) * ROW_ALIGN)
    return InputGeometry((w, h), (pw, ph), heatmap_band(rows, h, ph), (frame_w / w, frame_h / h))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` at ``size`` (width, height): area interpolation when it shrinks, bilinear
    when it grows (as the proposer training's scale jitter); ``image`` itself at its size."""
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    grows = size[0] * size[1] > w * h
    return cv2.resize(image, tuple(size),
                      interpolation=cv2.INTER_LINEAR if grows else cv2.INTER_AREA)


def frame_tensor(image: np.ndarray, meta: ProposerMetadata, geo: InputGeometry) -> np.ndarray:
    """BGR frame → (1, 3, rows, padded width) float32 network input of ``geo``: resized
    (``resize_image``), zero padded (after normalisation: the mean colour), the band of
    rows."""
    small = resize_image(image, geo.size)
    pad_w, pad_h = geo.padded[0] - geo.size[0], geo.padded[1] - geo.size[1]
    if pad_w or pad_h:
        fill = [round(255 * m) for m in meta.mean]
        if meta.channel_order == "RGB":
            fill = fill[::-1]
        small = cv2.copyMakeBorder(small, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=fill)
    top, bottom = geo.rows
    return normalise(small[top:bottom], meta)


def heatmap_band(rows: list[float], input_size: int, limit: int | None = None
                 ) -> tuple[int, int]:
    """``proposer.heatmap_rows`` ([top, bottom] frame fractions of an input ``input_size``
    rows high) → (top, bottom) input rows, widened outwards to multiples of ``ROW_ALIGN``
    (never empty, never past ``limit``: the padded input, by default ``input_size``)."""
    limit = input_size if limit is None else limit
    top = int(np.floor(rows[0] * input_size / ROW_ALIGN)) * ROW_ALIGN
    bottom = min(int(np.ceil(rows[1] * input_size / ROW_ALIGN)) * ROW_ALIGN, limit)
    return top, max(bottom, top + ROW_ALIGN)


class HeatmapProposer(Proposer):
    """Class-agnostic cone boxes from the peaks of a learned cone-centre heatmap.

    Args:
        config: the ``proposer`` section (``heatmap_model``, ``heatmap_threshold``,
            ``heatmap_shoulders``, ``heatmap_threads``, ``heatmap_resize``, ``heatmap_max_pixels``,
            ``heatmap_min_pixels``, ``heatmap_rows``,
            ``max_candidates``, ``body_mask``).

    Raises:
        HeatmapModelError: the model is missing or is not a cone proposer model.
    """

    def __init__(self, config: ProposerConfig) -> None:
        super().__init__(config.max_candidates)
        self.config = config
        self.threshold = float(config.heatmap_threshold)
        self.session, self.meta = open_session(resolve_path(config.heatmap_model),
                                               config.heatmap_threads, config.providers)
        model_input = self.session.get_inputs()[0]
        self._input = model_input.name
        fixed = [d if isinstance(d, int) else None for d in model_input.shape[2:]]
        self._fixed = (tuple(fixed) if len(fixed) == 2 and None not in fixed else None)
        if self._fixed is not None and (config.heatmap_resize != "square"
                                        or list(config.heatmap_rows) != [0.0, 1.0]):
            raise HeatmapModelError(
                f"{config.heatmap_model}: fixed input size {self._fixed[1]}x{self._fixed[0]}, "
                f"so proposer.heatmap_resize must be 'square' and proposer.heatmap_rows "
                f"[0, 1]; or re-export the model (export.proposer_train exports a dynamic "
                f"height and width)")
        self._geometry: dict[tuple[int, int], list[InputGeometry]] = {}
        self._body_cache: dict[tuple[int, int], np.ndarray | None] = {}

    def geometry(self, width: int, height: int) -> InputGeometry:
        """The network input for frames of this size (computed once per size)."""
        return self.levels(width, height)[0]

    def levels(self, width: int, height: int) -> list[InputGeometry]:
        """The inputs the network sees for frames of this size: the frame at its own scale
        (``input_geometry``) and, when that holds more than ``PYRAMID_AREA`` times the model's
        square input (a large sensor, whose near cones are bigger than any the network was
        trained on), the frame again at the model's input area, for the big cones."""
        key = (width, height)
        if key not in self._geometry:
            c = self.config
            fine = input_geometry(width, height, self.meta, c.heatmap_resize,
                                  c.heatmap_max_pixels, c.heatmap_rows, c.heatmap_min_pixels)
            levels = [fine]
            nominal = self.meta.input_size ** 2
            if (c.heatmap_pyramid and c.heatmap_resize == "keep_aspect" and self._fixed is None
                    and fine.size[0] * fine.size[1] > PYRAMID_AREA * nominal):
                levels.append(input_geometry(width, height, self.meta, "keep_aspect", nominal,
                                             c.heatmap_rows))
            self._geometry[key] = levels
        return self._geometry[key]

    def raw_outputs(self, image: np.ndarray, level: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The network's heatmap (G_h, G_w), log size (2, G_h, G_w) and offset (2, G_h, G_w)
        of the frame's band of input rows at pyramid ``level`` (``levels(...)``)."""
        geo = self.levels(image.shape[1], image.shape[0])[level]
        heat, size, offset = self.session.run(None, {self._input: frame_tensor(image, self.meta,
                                                                                geo)})
        return heat[0, 0], size[0], offset[0]

    def _propose(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        image = frame.image
        h, w = image.shape[:2]
        found = []
        for level, geo in enumerate(self.levels(w, h)):
            heat, size, offset = self.raw_outputs(image, level)
            # Every peak (and shoulder) above the threshold is decoded; the base class caps
            # after the body mask and frame clipping, so a smaller cap is always a prefix of a
            # larger one.
            found.append(decode_heatmap(heat, size, offset, self.meta.stride, self.threshold,
                                        heat.size, geo.scale, (w, h), geo.rows[0],
                                        self.config.heatmap_shoulders))
        boxes, scores = found[0]
        if len(found) > 1:  # one box per cone over the levels, the more confident one
            boxes = np.concatenate([b for b, _ in found])
            scores = np.concatenate([s for _, s in found])
            keep = suppress_overlaps(boxes, scores, PYRAMID_NMS_IOU)
            boxes, scores = boxes[keep], scores[keep]
        if self.config.body_mask and len(boxes):
            key = (h, w)
            if key not in self._body_cache:
                self._body_cache[key] = body_mask_image(self.config.body_mask, h, w)
            mask = self._body_cache[key]
            cx = np.clip(((boxes[:, 0] + boxes[:, 2]) * 0.5).astype(np.int64), 0, w - 1)
            cy = np.clip(((boxes[:, 1] + boxes[:, 3]) * 0.5).astype(np.int64), 0, h - 1)
            keep = mask[cy, cx] > 0
            boxes, scores = boxes[keep], scores[keep]
        return boxes, scores
