"""Fault-injecting doubles shared by the reliability tests: scripted cameras, collecting
publishers, a slow or failing backend wrapper and synthetic frames with painted cones.

Models are the tiny ONNX classifiers of the node tests (``tests.node.backend_doubles.make_onnx``
and the mean-colour classifier of ``tests.node.test_pipeline``), so every test stays fast.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import numpy as np

from node.types import Frame

BLUE, YELLOW, ORANGE = (200, 60, 20), (20, 210, 230), (20, 110, 245)
"""BGR colours the colour proposer and the mean-colour classifier both recognise."""
LABEL_OF = {BLUE: "blue_cone", YELLOW: "yellow_cone", ORANGE: "orange_cone"}


def cone_image(height: int, width: int, boxes: list[tuple[int, int, int, int, tuple]],
               grey: int = 90) -> np.ndarray:
    """A grey BGR frame with filled rectangles (x1, y1, x2, y2, BGR colour)."""
    image = np.full((height, width, 3), grey, np.uint8)
    for x1, y1, x2, y2, colour in boxes:
        image[y1:y2, x1:x2] = colour
    return image


class ScriptedCamera:
    """A capture object (``isOpened``/``read``/``release``) for ``node.sources.camera.LiveSource``.

    Args:
        shape: (height, width) of its frames; tests tell cameras apart by frame size.
        frames: frames it delivers before failing (``None``: never fails).
        period_s: time one ``read`` takes (the camera's frame period).
        fail_with: ``"false"`` (read returns ``(False, None)``) or an exception to raise.
        image: a function index → image, overriding the default painted frame.
    """

    def __init__(self, shape: tuple[int, int] = (48, 64), frames: int | None = None,
                 period_s: float = 0.005, fail_with: str | BaseException = "false",
                 image: Callable[[int], np.ndarray] | None = None) -> None:
        self.shape, self.frames, self.period_s = shape, frames, period_s
        self.fail_with, self.image = fail_with, image
        self.delivered = 0
        self.released = 0

    def isOpened(self) -> bool:
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        time.sleep(self.period_s)
        if self.frames is not None and self.delivered >= self.frames:
            if isinstance(self.fail_with, BaseException):
                raise self.fail_with
            return False, None
        index = self.delivered
        self.delivered += 1
        if self.image is not None:
            return True, self.image(index)
        h, w = self.shape
        return True, cone_image(h, w, [(w // 3, h // 4, w // 3 + w // 5, h - h // 8, BLUE)])

    def release(self) -> None:
        self.released += 1


class CameraScript:
    """A capture factory that plays back a list of outcomes, one per open attempt.

    Each entry is a ``ScriptedCamera`` (opened), an exception (the open raises) or ``None``
    (a capture that did not open). The last entry repeats. Open times are kept, so tests can
    check the reconnect backoff.
    """

    class _Closed:
        def isOpened(self) -> bool:
            return False

        def release(self) -> None:
            pass

    def __init__(self, *outcomes: ScriptedCamera | BaseException | None) -> None:
        self.outcomes = list(outcomes)
        self.opened_at: list[float] = []
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.opened_at.append(time.monotonic())
            index = min(len(self.opened_at) - 1, len(self.outcomes) - 1)
        outcome = self.outcomes[index]
        if isinstance(outcome, BaseException):
            raise outcome
        return self._Closed() if outcome is None else outcome


class CollectingPublisher:
    """Keeps every record (serialised at publish time, as real publishers do) and every
    health message; ``on_record`` may stop the pipeline."""

    wants_image = False

    def __init__(self, on_record: Callable[[dict], None] | None = None) -> None:
        self.records: list[dict] = []
        self.health: list[tuple[float, dict]] = []
        self.closed = False
        self.on_record = on_record

    def publish(self, result, image=None) -> None:
        record = json.loads(json.dumps(result.to_record()))
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def publish_health(self, health: dict, stamp: float | None = None) -> None:
        self.health.append((time.monotonic(), dict(health)))

    def close(self) -> None:
        self.closed = True


class FaultyBackend:
    """Wraps an activated backend and injects faults per submitted batch (0-based).

    Args:
        inner: the real backend.
        raise_in_wait: batch numbers whose ``wait`` raises ``exc`` (after draining the inner).
        raise_in_submit: batch numbers whose ``infer_async`` raises ``exc`` (nothing queued).
        logits: batch number → function(logits) → corrupted logits.
        exc: the exception to raise.
    """

    def __init__(self, inner, raise_in_wait=(), raise_in_submit=(), logits=None,
                 exc: BaseException | None = None) -> None:
        self.inner, self.meta, self.max_batch = inner, inner.meta, inner.max_batch
        self.raise_in_wait, self.raise_in_submit = set(raise_in_wait), set(raise_in_submit)
        self.corrupt = dict(logits or {})
        self.exc = exc or RuntimeError("CUDA error: an illegal memory access was encountered")
        self.submitted = 0
        self._queue: list[int] = []

    def infer_async(self, batch: np.ndarray) -> None:
        number = self.submitted
        self.submitted += 1
        if number in self.raise_in_submit:
            raise self.exc
        self.inner.infer_async(batch)
        self._queue.append(number)

    def wait(self) -> np.ndarray:
        number = self._queue.pop(0)
        logits = self.inner.wait()
        if number in self.raise_in_wait:
            raise self.exc
        if number in self.corrupt:
            return self.corrupt[number](logits)
        return logits

    @property
    def last_timing(self) -> dict:
        return self.inner.last_timing


def slow_down(backend, seconds: float) -> None:
    """Make an activated ONNX Runtime backend's worker take ``seconds`` longer per batch (a
    slower accelerator), without touching the main thread."""
    run = backend._run

    def slow_run(staged):
        time.sleep(seconds)
        return run(staged)

    backend._run = slow_run


def frames_of(images: list[np.ndarray | None], names: list[str] | None = None) -> list[Frame]:
    """Replay frames from images (``None`` stays an unreadable frame)."""
    return [Frame(i, 1000.0 + i, img, None if names is None else names[i],
                  error=None if img is not None else "unreadable")
            for i, img in enumerate(images)]


def cone_folder(root, count: int):
    """``count`` small PNG frames in ``root``, each with a blue and a yellow cone."""
    import cv2

    for i in range(count):
        cv2.imwrite(str(root / f"f{i:02d}.png"),
                    cone_image(60, 80, [(10, 10, 25, 50, BLUE), (50, 15, 62, 50, YELLOW)]))
    return root


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """``python -m node ARGV`` in-process: exit code, stdout, stderr."""
    from node.__main__ import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
