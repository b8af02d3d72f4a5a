"""Publishers of per-frame results: JSONL, ZeroMQ PUB, ROS 2 bag (MCAP) and annotated video.

All share one small contract: ``publish(result, image=None)`` once per frame in input order,
``publish_health(health, stamp)`` for source status while a camera reconnects, and an
idempotent ``close()`` (also a context manager) that flushes everything, so a graceful
shutdown on SIGINT/SIGTERM leaves whole files behind.

``image`` is an already-annotated frame (``node.publish.annotate.draw_cones``); publishers that need
one (``wants_image``) draw their own when it is ``None``. ``publish_all`` draws once for all.

- ``JsonlPublisher``: ``FrameResult.to_record()`` (docs/design.md), one line per frame, written in
  one call and flushed, so an interrupted run leaves only whole lines. A failed write (a full
  disk) cuts the file back to its last whole line and raises ``PublisherError`` naming it.
- ``ZmqPublisher``: PUB socket (127.0.0.1 by default), multipart ``[topic, JSON record]``;
  health goes out as ``[topic + b".health", JSON]``. A bounded send queue (``SNDHWM``) means a
  slow subscriber loses messages instead of stalling the node, as ZeroMQ PUB always does.
- ``BagPublisher``: rosbag2 (MCAP storage) via ``rosbags``: ``vision_msgs/Detection2DArray`` on
  ``/perception/cones``, ``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics`` and optionally
  ``sensor_msgs/CompressedImage`` (JPEG, annotated) on ``/perception/cones/image/compressed``.
  Log time = capture stamp. Message definitions are embedded (MCAP schemas and
  ``metadata.yaml``), so Foxglove and ``ros2 bag play`` can decode vision_msgs. A chunk is
  flushed to disk at least every ``flush_interval_s``: after a ``kill -9``,
  ``python -m node reindex DIR`` recovers every message up to the last flushed chunk.
- ``VideoPublisher``: annotated video (``.webm``: VP9, plays in a browser; ``.mp4``: ``mp4v``), one
  video frame per published result. OpenCV
  does not report failed writes, so ``close`` reads the finished file back and raises
  ``PublisherError`` naming it when it is not a whole video (a full disk).

``build_publishers`` (the command line) never replaces an output silently: an existing regular
file or bag is refused with ``PublisherError`` unless ``overwrite`` is given (devices and pipes
are written as they are).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from node.publish import ros_msgs
from node.publish.annotate import blank_frame, draw_cones
from node.types import FrameResult

if TYPE_CHECKING:
    from typing_extensions import Self


class PublisherError(ValueError):
    """A publisher cannot be opened or written. The message names the file or endpoint."""


class Publisher:
    """Base: state checks here, work in ``_publish``/``_close`` (Polygraphy-style split)."""

    wants_image = False
    name = "publisher"

    def __init__(self) -> None:
        self.closed = False
        self.published = 0
        self.failed: PublisherError | None = None

    def publish(self, result: FrameResult, image: np.ndarray | None = None) -> None:
        """Publish one frame's result (``image``: annotated frame, if the caller has one).

        Raises:
            PublisherError: the output failed (now or on an earlier frame); names it.
        """
        if self.closed:
            raise PublisherError(f"{self.name}: publish after close")
        if self.failed is not None:
            raise self.failed
        try:
            self._publish(result, image)
        except PublisherError as exc:
            self.failed = exc
            raise
        self.published += 1

    def publish_health(self, health: dict, stamp: float | None = None) -> None:
        """Publish a source's health (camera reconnecting). Default: nothing to do."""

    def close(self) -> None:
        """Flush and release; safe to call more than once."""
        if not self.closed:
            self.closed = True
            self._close()

    def _publish(self, result: FrameResult, image: np.ndarray | None) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing regular file (GNU ``cp -n``-style), unless ``overwrite``.

    Raises:
        PublisherError: ``path`` exists (one line naming it and ``--overwrite``).
    """
    p = Path(path)
    if not overwrite and p.is_file():
        raise PublisherError(f"{p}: already exists; not overwriting it (pass --overwrite to "
                             f"replace it)")


class JsonlPublisher(Publisher):
    """One JSON object per frame (docs/design.md schema) to a file, or stdout for ``"-"``.

    Args:
        path: the file, or ``"-"``.
        overwrite: replace an existing file (the default, as ``open(path, "w")`` does);
            ``False`` refuses it (``build_publishers``, the command line).
    """

    def __init__(self, path: str | Path = "-", overwrite: bool = True) -> None:
        super().__init__()
        self.name = str(path)
        self._owns = str(path) != "-"
        self._whole = 0  # bytes of whole lines written
        if self._owns:
            refuse_existing(path, overwrite)
            regular = not Path(path).exists() or Path(path).is_file()
            mode = "wb" if overwrite or not regular else "xb"  # devices and pipes as they are
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._file: Any = open(path, mode, buffering=0)  # noqa: SIM115
            except FileExistsError:
                raise PublisherError(f"{path}: already exists; not overwriting it (pass "
                                     f"--overwrite to replace it)") from None
            except OSError as exc:
                raise PublisherError(f"{path}: cannot write JSONL ({exc.strerror})") from None
        else:
            self._file = sys.stdout

    def _publish(self, result: FrameResult, image: np.ndarray | None) -> None:
        line = json.dumps(result.to_record(), separators=(", ", ": ")) + "\n"
        if not self._owns:
            self._file.write(line)  # one write per line, then flush: whole lines on SIGTERM
            self._file.flush()
            return
        encoded = line.encode("utf-8")
        data = memoryview(encoded)
        try:
            while data:  # an unbuffered write may be short (the disk filling up)
                data = data[self._file.write(data):]
        except OSError as exc:
            self._cut_to_whole_lines()
            raise PublisherError(f"{self.name}: cannot write JSONL ({exc.strerror}); it keeps "
                                 f"the {self.published} whole record(s) written") from None
        self._whole += len(encoded)

    def _cut_to_whole_lines(self) -> None:
        """Drop a partly written last line (a regular file only; devices cannot be cut)."""
        try:
            os.ftruncate(self._file.fileno(), self._whole)
        except OSError:
            pass

    def _close(self) -> None:
        if self._owns:
            self._file.close()
        else:
            self._file.flush()


class ZmqPublisher(Publisher):
    """ZeroMQ PUB of the JSONL records.

    Args:
        endpoint: where to bind; ``tcp://127.0.0.1:0`` picks a free port (see ``endpoint``).
        topic: first frame of every multipart message (subscribers filter on it).
        hwm: send high-water mark in messages (bounded queue; beyond it PUB drops).
        linger_ms: how long ``close`` may spend flushing queued messages.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5556", topic: bytes = b"cones",
                 hwm: int = 100, linger_ms: int = 200) -> None:
        super().__init__()
        import zmq

        self.topic = topic if isinstance(topic, bytes) else str(topic).encode()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, int(hwm))
        self._socket.setsockopt(zmq.LINGER, int(linger_ms))
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            self._context.term()
            raise PublisherError(f"{endpoint}: cannot bind ZeroMQ PUB ({exc})") from None
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.name = self.endpoint

    def _publish(self, result: FrameResult, image: np.ndarray | None) -> None:
        payload = json.dumps(result.to_record()).encode()
        self._socket.send_multipart([self.topic, payload])

    def publish_health(self, health: dict, stamp: float | None = None) -> None:
        if not self.closed:
            record = {"stamp": time.time() if stamp is None else stamp, **health}
            self._socket.send_multipart([self.topic + b".health",
                                         json.dumps(record, default=str).encode()])

    def _close(self) -> None:
        self._socket.close()  # honours LINGER: queued frames get linger_ms to leave
        self._context.term()


class BagPublisher(Publisher):
    """ROS 2 bag (MCAP) with detections, latency diagnostics and optional annotated images.

    Args:
        path: bag directory to create (must not exist unless ``overwrite``).
        frame_id: header frame id of every message.
        images: also write annotated JPEGs as ``sensor_msgs/CompressedImage``.
        jpeg_quality: JPEG quality of those images.
        overwrite: replace an existing bag directory (one holding ``metadata.yaml``).
        warn_total_ms: end-to-end budget above which diagnostics report WARN.
        storage: ``"mcap"`` (default, Foxglove-friendly) or ``"sqlite3"``.
        flush_interval_s: MCAP only: the pending chunk is written and flushed to disk once it
            is this old, so a killed node loses at most this much (``python -m node reindex``
            recovers the rest).
    """

    FLUSH_INTERVAL_S = 0.5
    """Default chunk age at which it is flushed: well inside the promised second."""

    CONES_TOPIC = "/perception/cones"
    DIAGNOSTICS_TOPIC = "/diagnostics"
    IMAGE_TOPIC = "/perception/cones/image/compressed"

    def __init__(self, path: str | Path, *, frame_id: str = "camera", images: bool = False,
                 jpeg_quality: int = 80, overwrite: bool = False,
                 warn_total_ms: float | None = None, storage: str = "mcap",
                 flush_interval_s: float | None = None) -> None:
        super().__init__()
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        self.name = str(path)
        self.frame_id = frame_id
        self.wants_image = images
        self.jpeg_quality = jpeg_quality
        self.warn_total_ms = warn_total_ms
        self.flush_interval_s = self.FLUSH_INTERVAL_S if flush_interval_s is None \
            else flush_interval_s
        self._flushed_at = time.monotonic()
        if self.path.exists():
            if not overwrite:
                raise PublisherError(f"{self.path}: bag already exists; not overwriting it "
                                     f"(pass --overwrite to replace it)")
            if not (self.path / "metadata.yaml").is_file() and any(self.path.iterdir()):
                raise PublisherError(f"{self.path}: exists and is not a ROS 2 bag; not replacing")
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
        if storage not in plugins:
            raise PublisherError(f"{path}: unknown bag storage {storage!r} (mcap or sqlite3)")
        self.typestore = ros_msgs.build_typestore()
        # Version 8 is the oldest layout rosbags writes; it carries the message definitions.
        self._writer = Writer(self.path, version=8, storage_plugin=plugins[storage])
        self._writer.set_custom_data("writer", "cone_node")
        self._writer.set_custom_data("frame_id", frame_id)
        self._writer.open()
        add = self._writer.add_connection
        self._cones = add(self.CONES_TOPIC, ros_msgs.DETECTIONS_TYPE, typestore=self.typestore)
        self._diagnostics = add(self.DIAGNOSTICS_TOPIC, ros_msgs.DIAGNOSTICS_TYPE,
                                typestore=self.typestore)
        self._images = add(self.IMAGE_TOPIC, ros_msgs.COMPRESSED_IMAGE_TYPE,
                           typestore=self.typestore) if images else None

    def _write(self, connection: Any, msgtype: str, fields: dict, stamp: float) -> None:
        message = ros_msgs.to_rosbags(self.typestore, msgtype, fields)
        data = self.typestore.serialize_cdr(message, msgtype)
        try:
            self._writer.write(connection, ros_msgs.stamp_ns(stamp), data)
        except OSError as exc:
            raise PublisherError(f"{self.path}: cannot write bag ({exc.strerror})") from None

    def _maybe_flush(self) -> None:
        """Flush once the pending chunk is old enough (called after a whole frame)."""
        if time.monotonic() - self._flushed_at >= self.flush_interval_s:
            try:
                self.flush()
            except OSError as exc:
                raise PublisherError(f"{self.path}: cannot write bag ({exc.strerror})") \
                    from None

    def flush(self) -> None:
        """Write the pending MCAP chunk (with its message index) and flush it to the OS, so a
        ``kill -9`` loses nothing before this point (rosbags writes a chunk per MiB only)."""
        self._flushed_at = time.monotonic()
        storage = getattr(self._writer, "storage", None)
        chunk = getattr(storage, "chunk", None)
        if chunk is None or not getattr(chunk, "msgs", None):
            return  # sqlite3 commits by itself; or nothing new since the last flush
        storage.close_chunk()
        storage.bio.flush()

    def _publish(self, result: FrameResult, image: np.ndarray | None) -> None:
        stamp = result.frame.stamp
        self._write(self._cones, ros_msgs.DETECTIONS_TYPE,
                    ros_msgs.detection_array_fields(result, self.frame_id), stamp)
        self._write(self._diagnostics, ros_msgs.DIAGNOSTICS_TYPE,
                    ros_msgs.diagnostics_fields(result, frame_id=self.frame_id,
                                                warn_total_ms=self.warn_total_ms), stamp)
        if self._images is not None:
            if image is None and result.frame.image is not None:
                image = draw_cones(result.frame.image, result.cones,
                                   latency_ms=result.latency_ms.get("total"))
            if image is not None:
                self._write(self._images, ros_msgs.COMPRESSED_IMAGE_TYPE,
                            ros_msgs.compressed_image_fields(image, stamp, self.frame_id,
                                                             self.jpeg_quality), stamp)
        self._maybe_flush()  # a chunk holds whole frames

    def publish_health(self, health: dict, stamp: float | None = None) -> None:
        if not self.closed:
            stamp = time.time() if stamp is None else stamp
            self._write(self._diagnostics, ros_msgs.DIAGNOSTICS_TYPE,
                        ros_msgs.health_fields(health, stamp, frame_id=self.frame_id), stamp)
            self._maybe_flush()

    def _close(self) -> None:
        try:
            self._writer.close()  # writes the MCAP summary/index and metadata.yaml
        except OSError as exc:
            raise PublisherError(f"{self.path}: cannot finish bag ({exc.strerror}); "
                                 f"`python -m node reindex {self.path}` recovers its "
                                 f"flushed messages") from None


VIDEO_CODECS: dict[str, tuple[str, ...]] = {".webm": ("VP90", "VP80"), ".mkv": ("VP90", "mp4v"),
                                             ".mp4": ("mp4v",), ".avi": ("MJPG",)}
"""Video suffix → FourCC codes to try, best first. Browsers play VP9 (WebM) and H.264; OpenCV's
pip wheels write VP9 but not H.264, so ``.webm`` is the video to watch in a browser, and
``.mp4`` is MPEG-4 Part 2 (``mp4v``) for players such as VLC and for OpenCV itself."""


class VideoPublisher(Publisher):
    """Annotated video: one video frame per result, in the first frame's size. The codec follows
    the suffix (``VIDEO_CODECS``): ``.webm`` is VP9 (plays in a browser), ``.mp4`` is ``mp4v``.

    Frames without an image (unreadable input) become dark frames with the error text, so the
    video stays frame-aligned with the JSONL. The FPS overlay is the node's publish rate (an
    exponential moving average) unless the caller passes an annotated image.
    """

    wants_image = True

    def __init__(self, path: str | Path, fps: float = 30.0, overwrite: bool = True) -> None:
        super().__init__()
        if fps <= 0:
            raise PublisherError(f"{path}: video fps must be > 0, got {fps}")
        refuse_existing(path, overwrite)  # opened at the first frame; refused now
        self.path = Path(path)
        self.name = str(path)
        self.fps = float(fps)
        self._writer: Any = None
        self.codec: str | None = None  # the FourCC in use, once the first frame opened the file
        self._size: tuple[int, int] | None = None
        self._pending_errors: list[str] = []
        self._last_publish: float | None = None
        self._rate: float | None = None

    def _publish(self, result: FrameResult, image: np.ndarray | None) -> None:
        now = time.perf_counter()
        if self._last_publish is not None and now > self._last_publish:
            inst = 1.0 / (now - self._last_publish)
            self._rate = inst if self._rate is None else 0.9 * self._rate + 0.1 * inst
        self._last_publish = now
        if image is None and result.frame.image is not None:
            image = draw_cones(result.frame.image, result.cones, fps=self._rate,
                               latency_ms=result.latency_ms.get("total"))
        if image is None:
            error = result.error or result.frame.error or "no image"
            if self._writer is None:
                self._pending_errors.append(error)
            else:
                self._write_error(error)
            return
        if self._writer is None:
            self._open(image.shape[1], image.shape[0])
            for error in self._pending_errors:
                self._write_error(error)
            self._pending_errors.clear()
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(image)

    def _write_error(self, error: str) -> None:
        width, height = self._size
        self._writer.write(draw_cones(blank_frame(width, height), [], copy=False, error=error))

    def _open(self, width: int, height: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        codecs = VIDEO_CODECS.get(self.path.suffix.lower(), ("mp4v",))
        for fourcc in codecs:
            with _quiet_stderr(self.path.suffix.lower() == ".webm"):
                writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*fourcc),
                                         self.fps, (width, height))
            if writer.isOpened():
                break
        else:
            raise PublisherError(f"{self.path}: cannot open a video writer "
                                 f"({'/'.join(codecs)}, {width}x{height})")
        self.codec = fourcc
        self._writer, self._size = writer, (width, height)
        self._written = 0

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.release()
        self._check_written()

    def _check_written(self) -> None:
        """Read the finished file back: OpenCV's writer reports no failed write (a full disk
        gives a truncated MP4 with no index that no player opens)."""
        expected = self.published
        capture = cv2.VideoCapture(str(self.path))
        try:
            readable = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) \
                if capture.isOpened() else 0
        finally:
            capture.release()
        if readable < expected:
            raise PublisherError(f"{self.path}: video is incomplete ({readable} of {expected} "
                                 f"frames readable; is the disk full?)")


@contextlib.contextmanager
def _quiet_stderr(active: bool) -> Iterator[None]:
    """Silence file descriptor 2 while OpenCV opens a WebM writer: its FFmpeg layer prints that
    WebM stores no FourCC tag ("tag ... is not supported"), which is true and harmless."""
    if not active:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def publish_all(publishers: Sequence[Publisher], result: FrameResult,
                fps: float | None = None) -> None:
    """Publish to every publisher, drawing the annotated frame once if any needs it."""
    image = None
    if result.frame.image is not None and any(p.wants_image for p in publishers):
        image = draw_cones(result.frame.image, result.cones, fps=fps,
                           latency_ms=result.latency_ms.get("total"))
    for publisher in publishers:
        publisher.publish(result, image)


def build_publishers(jsonl: str | Path | None = None, zmq: str | None = None,
                     bag: str | Path | None = None, video: str | Path | None = None, *,
                     frame_id: str = "camera", bag_images: bool = False,
                     overwrite: bool = False, video_fps: float = 30.0,
                     zmq_topic: bytes = b"cones",
                     warn_total_ms: float | None = None) -> list[Publisher]:
    """The publishers asked for (``None`` = off). If one fails, those opened are closed.

    Raises:
        PublisherError: a file or endpoint that cannot be opened.
    """
    # The ones that can be refused without touching a file come first (a busy port, an
    # existing bag), then the JSONL, whose file is created (or replaced) last: a refused start
    # must not have truncated it. The returned list keeps the documented order.
    order = {"jsonl": 0, "zmq": 1, "bag": 2, "video": 3}
    made: dict[str, Publisher] = {}
    try:
        if video is not None:
            refuse_existing(video, overwrite)
        if jsonl is not None and str(jsonl) != "-":
            refuse_existing(jsonl, overwrite)
        if zmq is not None:
            made["zmq"] = ZmqPublisher(zmq, topic=zmq_topic)
        if bag is not None:
            made["bag"] = BagPublisher(bag, frame_id=frame_id, images=bag_images,
                                       overwrite=overwrite, warn_total_ms=warn_total_ms)
        if video is not None:
            made["video"] = VideoPublisher(video, fps=video_fps, overwrite=overwrite)
        if jsonl is not None:
            made["jsonl"] = JsonlPublisher(jsonl, overwrite=overwrite)
    except BaseException:
        for publisher in made.values():
            publisher.close()
        raise
    publishers = [made[key] for key in sorted(made, key=order.__getitem__)]
    return publishers
