"""Live cameras: capture pipelines and a newest-frame reader that survives cable faults.

Pipelines follow the jetson-inference/JetPack conventions: ``csi://N`` is a GStreamer
``nvarguscamerasrc`` pipeline (NVMM buffers, ``nvvidconv`` to BGRx, ``videoconvert`` to BGR),
``rtsp://`` is ``rtspsrc latency=0`` when OpenCV has GStreamer and the FFmpeg backend over TCP
with ``nobuffer`` otherwise, ``v4l2://`` is OpenCV's V4L2 backend with a one-frame buffer. Every
appsink uses ``drop=true max-buffers=1 sync=false`` so no stale frame queues up.

``LiveSource`` runs the capture in a thread and keeps a one-slot buffer: a frame not consumed
before the next arrives is overwritten and counted in ``dropped``, which bounds end-to-end
latency under overload. When reads fail, it reopens the capture with exponential backoff,
reports ``health`` (state ok/reconnecting/failed, since, attempts) and logs the attempts (at
most one line per ``LOG_INTERVAL_S``, each attempt in one line only); it gives up only after
``max_attempts`` (0 = never) with a ``SourceError``. A camera that is absent when the node
starts is retried the same way, from a thread, so a signal ends the node even while an open
hangs (as an RTSP open to a silent server does); RTSP opens also carry a timeout. It accepts any
capture factory returning an object with ``read() -> (ok, image)``, so tests inject fakes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from node.sources.files import Source, SourceError, _as_bgr
from node.types import Frame

log = logging.getLogger(__name__)

FFMPEG_RTSP_OPTIONS = "rtsp_transport;tcp|fflags;nobuffer"
OPEN_TIMEOUT_S = 5.0
"""How long an RTSP open (and one read) may take before it counts as a failed attempt."""
LOG_INTERVAL_S = 1.0
"""At most one reconnect log line per this many seconds, however short the backoff."""


class Capture(Protocol):
    """What ``LiveSource`` needs from a capture (``cv2.VideoCapture`` fits)."""

    def read(self) -> tuple[bool, np.ndarray | None]: ...


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, fps: int = 30,
                 flip_method: int = 0) -> str:
    """GStreamer pipeline for a Jetson CSI camera (Argus), ending in a BGR appsink."""
    return (f"nvarguscamerasrc sensor-id={int(sensor_id)} ! "
            f"video/x-raw(memory:NVMM), width=(int){int(width)}, height=(int){int(height)}, "
            f"format=(string)NV12, framerate=(fraction){int(fps)}/1 ! "
            f"nvvidconv flip-method={int(flip_method)} ! video/x-raw, format=(string)BGRx ! "
            f"videoconvert ! video/x-raw, format=(string)BGR ! "
            f"appsink drop=true max-buffers=1 sync=false")


_PIPELINE_UNSAFE = frozenset('!"\'\\`')


def check_camera_uri(uri: str) -> str:
    """``uri`` if it is safe to put into a GStreamer pipeline description, else ``SourceError``.

    A camera URI becomes a property of a pipeline element, so characters that end a quoted
    value or start a new element (``!``, quotes, backslash, backtick), whitespace and
    control characters are refused, whatever the scheme.
    """
    bad = sorted({c for c in uri if c in _PIPELINE_UNSAFE or c.isspace() or not c.isprintable()})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise SourceError(f"camera URI {uri!r} contains {shown}: not allowed in a camera URI")
    return uri


def rtsp_pipeline(url: str, latency_ms: int = 0, timeout_s: float = OPEN_TIMEOUT_S) -> str:
    """Low-latency GStreamer pipeline for an RTSP stream, ending in a BGR appsink; the
    connection times out after ``timeout_s`` instead of hanging. The URL is checked
    (``check_camera_uri``) and quoted, so it cannot add elements to the pipeline.

    Raises:
        SourceError: the URL holds a character that could change the pipeline.
    """
    check_camera_uri(url)
    timeout_us = int(timeout_s * 1e6)
    return (f'rtspsrc location="{url}" latency={int(latency_ms)} timeout={timeout_us} '
            f"tcp-timeout={timeout_us} ! decodebin ! videoconvert ! "
            f"video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1 sync=false")


@lru_cache(maxsize=1)
def opencv_has_gstreamer() -> bool:
    """Whether this OpenCV build can open GStreamer pipelines."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def capture_factory(uri: str, **opts: Any) -> Callable[[], Any]:
    """A function that opens ``uri`` as a ``cv2.VideoCapture`` (called again to reconnect).

    Raises:
        SourceError: unsupported on this OpenCV build, bad device path, unknown option.
    """
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if scheme == "csi":
        sensor = uri.split("://", 1)[1].strip("/") or "0"
        if not sensor.isdigit():
            raise SourceError(f"{uri}: expected csi://N with N the sensor id")
        if not opencv_has_gstreamer():
            raise SourceError(f"{uri}: this OpenCV has no GStreamer support; csi:// needs "
                              f"JetPack's OpenCV (or a build with -DWITH_GSTREAMER=ON)")
        pipeline = csi_pipeline(int(sensor), **_take(opts, uri, "width", "height", "fps",
                                                     "flip_method"))
        return lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
    if scheme == "v4l2":
        device = uri.split("://", 1)[1] or "/dev/video0"
        mode = _take(opts, uri, "width", "height", "fps")
        if not device.startswith("/dev/"):
            raise SourceError(f"{uri}: expected v4l2:///dev/videoN")
        props = {cv2.CAP_PROP_FRAME_WIDTH: mode.get("width"),
                 cv2.CAP_PROP_FRAME_HEIGHT: mode.get("height"), cv2.CAP_PROP_FPS: mode.get("fps")}

        def open_v4l2() -> Any:
            cap = cv2.VideoCapture(device, cv2.CAP_V4L2)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not a queue of old ones
            for prop, value in props.items():
                if value is not None:
                    cap.set(prop, float(value))
            return cap
        return open_v4l2
    if scheme in ("rtsp", "rtsps"):
        _take(opts, uri)
        check_camera_uri(uri)
        if opencv_has_gstreamer():
            pipeline = rtsp_pipeline(uri)
            return lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
        return lambda: _open_ffmpeg(uri, FFMPEG_RTSP_OPTIONS)
    path = uri.removeprefix("file://")
    _take(opts, uri)
    return lambda: cv2.VideoCapture(str(Path(path)))


def _open_ffmpeg(uri: str, options: str) -> Any:
    """Open with FFmpeg options, which OpenCV reads from the environment at open time only.

    The variable is restored afterwards: left set, it would also apply to video files opened
    later in the process (``nobuffer`` and friends are for live streams).
    """
    key = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
    before = os.environ.get(key)
    os.environ[key] = before or options  # a user's own setting wins
    timeout_ms = int(OPEN_TIMEOUT_S * 1e3)
    try:  # without a timeout an open to a silent server blocks for half a minute
        return cv2.VideoCapture(uri, cv2.CAP_FFMPEG,
                                [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms,
                                 cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms])
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def _take(opts: dict, uri: str, *names: str) -> dict:
    taken = {k: opts.pop(k) for k in names if k in opts}
    if opts:
        raise SourceError(f"{uri}: unknown source option {min(opts)!r} for this kind")
    return taken


class NewestFrameSource(Source):
    """A live source's one-frame slot: a producer thread offers frames, the consumer takes the
    newest, and a frame replaced before it was taken counts in ``dropped``.

    Shared by cameras (``LiveSource``) and ROS image topics (``node.ros2.bridge.TopicSource``).
    Subclasses say when the stream has ended or failed through ``_check_end``.
    """

    is_live = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._slot_arrived = 0.0
        self.arrived: float | None = None
        """``time.perf_counter()`` when the frame last returned by ``read`` arrived."""

    def _offer(self, frame: Frame) -> None:
        """Put a frame in the slot (caller holds ``self._cond``), replacing an untaken one."""
        if self._slot is not None:
            self.dropped += 1
        self._slot = frame
        self._slot_arrived = time.perf_counter()
        self._cond.notify_all()

    def _check_end(self) -> None:
        """Raise ``StopIteration`` (or an error) when no frame will come any more; the caller
        holds ``self._cond``."""
        if self._closed:
            raise StopIteration

    def read(self, timeout: float | None = None) -> Frame | None:
        """The newest frame; ``None`` if none arrived within ``timeout`` seconds (``None`` =
        wait until one comes).

        Raises:
            StopIteration: the source was closed or reached its end.
            SourceError: the source failed for good (see the subclass).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._slot is None:
                self._check_end()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame, self._slot = self._slot, None
            self.arrived = self._slot_arrived
            return frame

    def _generate(self) -> Iterator[Frame]:
        while True:
            try:
                frame = self.read()
            except StopIteration:
                return
            if frame is not None:
                yield frame


class LiveSource(NewestFrameSource):
    """Newest-frame reader over a capture factory, with reconnect and health.

    Args:
        open_capture: returns a fresh capture; called at start and on every reconnect. A
            capture whose ``isOpened()`` is false, or an exception, counts as a failed attempt.
        name: the URI, for messages.
        reconnect: reopen after read failures (cameras). ``False`` ends the source instead
            (a file read as a live source).
        reconnect_initial_s, reconnect_max_s: backoff starts here and doubles up to the max.
        max_attempts: consecutive failed reconnects before giving up; 0 retries forever.

    The first open runs in the capture thread: a camera absent at start is retried with the
    same backoff as one lost mid-run (systemd's start limit must not leave the car's node
    dead), and an open that hangs cannot block the caller's signal handling. Without
    ``reconnect`` (a file read live) a failed first open raises ``SourceError`` at once.
    """

    is_live = True

    def __init__(self, open_capture: Callable[[], Any], name: str, *, reconnect: bool = True,
                 reconnect_initial_s: float = 0.5, reconnect_max_s: float = 5.0,
                 max_attempts: int = 0) -> None:
        super().__init__(name)
        if reconnect_initial_s <= 0 or reconnect_max_s < reconnect_initial_s:
            raise SourceError(f"{name}: need 0 < reconnect_initial_s <= reconnect_max_s")
        if max_attempts < 0:
            raise SourceError(f"{name}: max_attempts must be >= 0 (0 = never give up)")
        self._open_capture = open_capture
        self.reconnect = reconnect
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.max_attempts = max_attempts
        self.captured = 0
        self.reconnects = 0
        self._stop = threading.Event()
        self._finished = False
        self._fatal: SourceError | None = None
        self._health = {"state": "opening", "since": time.time(), "attempts": 0,
                        "last_error": None}
        self._last_log: float | None = None
        self._unlogged = 0
        self._capture: Any = None
        self._opening = False
        if not reconnect:
            self._capture = self._try_open()
            if self._capture is None:
                raise SourceError(f"{name}: cannot open camera ({self._health['last_error']})")
            self._health["state"] = "ok"
        self._thread = threading.Thread(target=self._run, name=f"capture {name}", daemon=True)
        self._thread.start()

    @property
    def health(self) -> dict:
        with self._cond:
            return {**self._health, "dropped": self.dropped, "errors": self.errors,
                    "captured": self.captured}

    def _check_end(self) -> None:
        if self._fatal is not None:
            raise self._fatal  # the camera could not be recovered after max_attempts
        if self._finished or self._closed:
            raise StopIteration

    def _try_open(self) -> Any | None:
        self._opening = True
        try:
            cap = self._open_capture()
        except Exception as exc:  # noqa: BLE001 (a driver may raise anything: one failed try)
            self._health["last_error"] = f"open failed: {exc}"
            return None
        finally:
            self._opening = False
        if cap is None or (hasattr(cap, "isOpened") and not cap.isOpened()):
            self._health["last_error"] = "capture did not open"
            if cap is not None and hasattr(cap, "release"):
                cap.release()
            return None
        return cap

    def _run(self) -> None:
        try:
            self._capture_loop()
        except Exception as exc:  # noqa: BLE001 - a dead capture thread must not hang the node
            with self._cond:
                self._health.update(state="failed", since=time.time(),
                                    last_error=f"capture thread failed: {exc}")
                self._fatal = SourceError(f"{self.name}: capture thread failed "
                                          f"({type(exc).__name__}: {exc})")
                self._cond.notify_all()
            log.error("%s", self._fatal)
            _release(self._capture)

    def _capture_loop(self) -> None:
        if self._capture is None:  # the first open, retried like a reconnect
            cap = self._try_open()
            if cap is not None:
                self._capture = cap
                with self._cond:
                    self._health.update(state="ok", since=time.time())
            elif not self._reconnect(first=True):
                return
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                ok, image = self._capture.read()
            except Exception as exc:  # noqa: BLE001 (a failed read: reconnect, never die silently)
                ok, image = False, None
                self._health["last_error"] = f"read raised {exc}"
            capture_ms = (time.perf_counter() - t0) * 1e3
            if ok and image is not None:
                self._deliver(image, capture_ms)
                continue
            if self._stop.is_set():
                break
            if not self.reconnect:
                with self._cond:
                    self._finished = True
                    self._cond.notify_all()
                break
            if not self._reconnect():
                break
        _release(self._capture)

    def _deliver(self, image: np.ndarray, capture_ms: float) -> None:
        frame = Frame(self.captured, time.time(), _as_bgr(image), None, capture_ms)
        with self._cond:
            self._offer(frame)
            self.captured += 1

    def _reconnect(self, first: bool = False) -> bool:
        """Reopen with exponential backoff; ``False`` when giving up or stopping.

        ``first``: the camera was not there at start (no capture yet to release).
        """
        _release(self._capture)
        self._capture = None
        delay = self.reconnect_initial_s
        attempts = 0
        with self._cond:
            self._health.update(state="reconnecting", since=time.time(), attempts=0)
            self._health["last_error"] = self._health["last_error"] or "read failed"
        self._last_log, self._unlogged = None, 0
        if first:
            log.warning("%s: cannot open camera (%s), retrying", self.name,
                        self._health["last_error"])
        else:
            log.warning("%s: camera stopped delivering frames, reconnecting", self.name)
        while not self._stop.wait(delay):
            attempts += 1
            cap = self._try_open()
            with self._cond:
                self._health["attempts"] = attempts
            if cap is not None:
                self._capture = cap
                self.reconnects += 1
                with self._cond:
                    self._health.update(state="ok", since=time.time(), last_error=None)
                log.warning("%s: camera back after %d attempt(s)", self.name, attempts)
                return True
            self._log_attempt(attempts, min(delay * 2, self.reconnect_max_s))
            if self.max_attempts and attempts >= self.max_attempts:
                with self._cond:
                    self._health.update(state="failed", since=time.time())
                    what = "camera not available" if first else "camera lost"
                    self._fatal = SourceError(
                        f"{self.name}: {what}, gave up after {attempts} reconnect "
                        f"attempts ({self._health['last_error']})")
                    self._cond.notify_all()
                log.error("%s", self._fatal)
                return False
            delay = min(delay * 2, self.reconnect_max_s)
        return False

    def _log_attempt(self, attempts: int, next_s: float) -> None:
        """Log a failed attempt, at most one line per ``LOG_INTERVAL_S`` (a short backoff
        must not flood the journal); a line counts the attempts it stands for."""
        now = time.monotonic()
        if self._last_log is not None and now - self._last_log < LOG_INTERVAL_S:
            self._unlogged += 1
            return
        also = f" ({self._unlogged} earlier attempt(s) not logged)" if self._unlogged else ""
        log.warning("%s: reconnect attempt %d failed (%s), next in %.1f s%s", self.name,
                    attempts, self._health["last_error"], next_s, also)
        self._last_log, self._unlogged = now, 0

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        # A capture thread stuck in a driver's open cannot be interrupted; it is a daemon
        # thread, so the node does not wait for it (a read ends within a frame or a timeout).
        self._thread.join(timeout=0.1 if self._opening else 2.0)


class CaptureReplaySource(Source):
    """A camera read without dropping: every frame, paced by the consumer (``live=False``)."""

    def __init__(self, open_capture: Callable[[], Any], name: str) -> None:
        super().__init__(name)
        self._capture = open_capture()
        if self._capture is None or not self._capture.isOpened():
            raise SourceError(f"{name}: cannot open camera")

    def _generate(self) -> Iterator[Frame]:
        index = 0
        try:
            while True:
                t0 = time.perf_counter()
                ok, image = self._capture.read()
                if not ok or image is None:
                    return
                yield Frame(index, time.time(), _as_bgr(image), None,
                            (time.perf_counter() - t0) * 1e3)
                index += 1
        finally:
            _release(self._capture)

    def close(self) -> None:
        super().close()
        _release(self._capture)


def open_camera(uri: str, *, live: bool = True, **opts: Any) -> Source:
    """Open a camera URI (or a file, read as a camera); see ``node.sources.open_source``."""
    backoff = {k: opts.pop(k) for k in ("reconnect_initial_s", "reconnect_max_s",
                                        "max_attempts") if k in opts}
    is_file = "://" not in uri or uri.startswith("file://")
    factory = capture_factory(uri, **opts)
    if not live:
        return CaptureReplaySource(factory, uri)
    return LiveSource(factory, uri, reconnect=not is_file, **backoff)


def _release(capture: Any) -> None:
    if capture is not None and hasattr(capture, "release"):
        capture.release()
