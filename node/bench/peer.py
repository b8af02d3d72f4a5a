"""The peer column: a single-stage YOLO detector timed on the node's frames and runtime.

Users choose between this two-stage node and a one-stage detector, so ``python -m node bench
--peer DETECTOR.onnx`` times such a detector (for example YOLO11n exported to ONNX by the
ultralytics package) over the same frames, under the same runtime (ONNX Runtime, same execution
providers) and the same thread count. Its timing includes what any user of it pays per frame,
just as the node's includes its own stages: capture, letterbox to the detector's input size,
normalisation, inference, and decoding of the Ultralytics YOLOv8/11 output layout
``1 × (4 + nc) × anchors`` (centre-x, centre-y, width, height in input pixels, then one sigmoid
score per class) with class-aware NMS (``cv2.dnn.NMSBoxesBatched``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from node.bench.measure import latency_stats, open_replay
from node.types import Frame

DEFAULT_INPUT = 640
PAD_VALUE = 114  # Ultralytics' letterbox grey


class PeerError(ValueError):
    """The peer detector cannot be loaded or does not have the YOLO output layout."""


def letterbox(image: np.ndarray, size: int, pad_value: int = PAD_VALUE
              ) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio so the image fits ``size``×``size``, pad the rest.

    Returns:
        The square image, the scale applied, and the (left, top) padding in pixels.
    """
    h, w = image.shape[:2]
    scale = min(size / h, size / w)
    new_w, new_h = round(w * scale), round(h * scale)
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    out = cv2.copyMakeBorder(image, top, size - new_h - top, left, size - new_w - left,
                             cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return out, scale, (left, top)


def decode_yolo(output: np.ndarray, conf: float = 0.25, iou: float = 0.45,
                max_det: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image's ``(4 + nc) × anchors`` YOLO output and apply class-aware NMS.

    Returns:
        boxes (K, 4) x1, y1, x2, y2 in input pixels, scores (K,), class ids (K,).
    """
    pred = output.reshape(output.shape[-2], output.shape[-1])
    cls_scores = pred[4:]
    class_ids = cls_scores.argmax(0)
    scores = cls_scores[class_ids, np.arange(pred.shape[1])]
    keep = np.flatnonzero(scores > conf)
    if keep.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    cx, cy, w, h = pred[:4, keep]
    xywh = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
    picked = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores[keep].tolist(),
                                     class_ids[keep].tolist(), conf, iou, top_k=max_det)
    picked = np.asarray(picked, np.int64).reshape(-1)
    boxes = xywh[picked].copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes.astype(np.float32), scores[keep][picked], class_ids[keep][picked]


class PeerDetector:
    """A YOLO-layout ONNX detector run the way a user of it would run it.

    Args:
        path: the detector's ``.onnx``.
        threads: ONNX Runtime intra-op threads (``None``: ONNX Runtime's default).
        providers: ONNX Runtime execution providers (default: CPU).
        conf: score threshold before NMS.
        iou: NMS IoU threshold.
    """

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: list[str] | None = None, conf: float = 0.25,
                 iou: float = 0.45) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise PeerError(f"{self.path}: peer detector not found")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several private exception types
            raise PeerError(f"{self.path}: not a loadable ONNX model "
                            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})"
                            ) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1] not in (3, "3"):
            raise PeerError(f"{self.path}: expected one N×3×H×W image input, got {shape}")
        self.input_name = inputs[0].name
        self.input_size = shape[2] if isinstance(shape[2], int) and shape[2] > 0 else DEFAULT_INPUT
        out_shape = outputs[0].shape
        if len(out_shape) != 3 or (isinstance(out_shape[1], int) and out_shape[1] < 5):
            raise PeerError(f"{self.path}: expected the YOLO output layout 1×(4+nc)×anchors, "
                            f"got {out_shape}")
        self.conf, self.iou = conf, iou

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (x1, y1, x2, y2 in frame pixels), scores and class ids for one BGR frame."""
        square, scale, (left, top) = letterbox(image, self.input_size)
        blob = cv2.dnn.blobFromImage(square, 1.0 / 255.0, swapRB=True)
        (output,) = self.session.run(None, {self.input_name: blob})[:1]
        boxes, scores, class_ids = decode_yolo(output, self.conf, self.iou)
        boxes -= np.array([left, top, left, top], np.float32)
        boxes /= scale
        return boxes, scores, class_ids


def time_peer(detector: PeerDetector, frames: Iterable[Frame | np.ndarray],
              warmup: int = 3) -> dict:
    """Run the detector over every frame, the capture (iteration) included in the wall time.

    Args:
        detector: the peer.
        frames: replay frames (``Frame`` objects or BGR arrays), e.g. a fresh source.
        warmup: runs on the first frame before the clock starts (like the node's warm-up).

    Returns:
        ``{"frames", "fps", "latency_ms": latency_stats (mean/p50/p90/p99 ms, cv),
        "detections"}``.
    """
    images = (f.image if isinstance(f, Frame) else f for f in frames)
    images = (img for img in images if img is not None)
    first = next(images, None)
    if first is None:
        raise PeerError("the peer detector got no readable frames")
    for _ in range(warmup):
        detector.detect(first)
    latencies: list[float] = []
    detections = 0
    started = t0 = time.perf_counter()  # the first frame's capture is not in the clock
    image: np.ndarray | None = first
    while image is not None:
        boxes, _, _ = detector.detect(image)
        detections += len(boxes)
        latencies.append((time.perf_counter() - t0) * 1000.0)
        t0 = time.perf_counter()
        image = next(images, None)
    wall = t0 - started
    return {
        "frames": len(latencies),
        "fps": len(latencies) / wall if wall > 0 else float("nan"),
        "latency_ms": latency_stats(latencies),
        "detections": detections,
    }


def run_peer(detector: Any, uri: str, frames: int) -> dict[str, Any]:
    """The peer detector's FPS over the same replay frames as the pipeline's run."""
    source = open_replay(uri, frames)
    try:
        result = time_peer(detector, source)
    finally:
        source.close()
    result["input"] = detector.input_size
    return result
