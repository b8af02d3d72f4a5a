"""Publishers of per-frame results: JSONL, ZeroMQ PUB, ROS 2 bag (MCAP) and annotated video.

All share one small contract: ``publish(result, image=None)`` once per frame in input order,
``publish_health(health, stamp)`` for source status while a camera reconnects, and an
idempotent ``close()`` (also a context manager) that flushes everything, so a graceful
shutdown on SIGINT/SIGTERM leaves whole files behind.

``image`` is an already-annotated frame (``node.annotate.draw_cones``); publishers that need
one (``wants_image``) draw their own when it is ``None``. ``publish_all`` draws once for all.

- ``JsonlPublisher``: ``FrameResult.to_record()`` (DESIGN.md), one line per frame, written in
  one call and flushed, so an interrupted run leaves only whole lines.
- ``ZmqPublisher``: PUB socket (127.0.0.1 by default), multipart ``[topic, JSON record]``;
  health goes out as ``[topic + b".health", JSON]``. A bounded send queue (``SNDHWM``) means a
  slow subscriber loses messages instead of stalling the node, as ZeroMQ PUB always does.
- ``BagPublisher``: rosbag2 (MCAP storage) via ``rosbags``: ``vision_msgs/Detection2DArray`` on
  ``/perception/cones``, ``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics`` and optionally
  ``sensor_msgs/CompressedImage`` (JPEG, annotated) on ``/perception/cones/image/compressed``.
  Log time = capture stamp. Message definitions are embedded (MCAP schemas and
  ``metadata.yaml``), so Foxglove and ``ros2 bag play`` can decode vision_msgs.
- ``VideoPublisher``: annotated MP4 (``mp4v``), one video frame per published result.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import cv2
import numpy as np

from node import ros_msgs
from node.annotate import blank_frame, draw_cones
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

    def publish(self, result: FrameResult, image: np.ndarray | None = None) -> None:
        """Publish one frame's result (``image``: annotated frame, if the caller has one)."""
        if self.closed:
            raise PublisherError(f"{self.name}: publish after close")
        self._publish(result, image)
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


class JsonlPublisher(Publisher):
    """One JSON object per frame (DESIGN.md schema) to a file, or stdout for ``"-"``."""

    def __init__(self, path: str | Path = "-") -> None:
        super().__init__()
        self.name = str(path)
        self._owns = str(path) != "-"
        if self._owns:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._file: TextIO = open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
            except OSError as exc:
                raise PublisherError(f"{path}: cannot write JSONL ({exc.strerror})") from None
        else:
            self._file = sys.stdout

    def _publish(self, result: FrameResult, image: np.ndarray | None) -> None:
        line = json.dumps(result.to_record(), separators=(", ", ": ")) + "\n"
        self._file.write(line)  # one write per line, then flush: no partial lines on SIGTERM
        self._file.flush()

    def _close(self) -> None:
        self._file.flush()
        if self._owns:
            self._file.close()


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
    """

    CONES_TOPIC = "/perception/cones"
    DIAGNOSTICS_TOPIC = "/diagnostics"
    IMAGE_TOPIC = "/perception/cones/image/compressed"

    def __init__(self, path: str | Path, *, frame_id: str = "camera", images: bool = False,
                 jpeg_quality: int = 80, overwrite: bool = False,
                 warn_total_ms: float | None = None, storage: str = "mcap") -> None:
        super().__init__()
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        self.name = str(path)
        self.frame_id = frame_id
        self.wants_image = images
        self.jpeg_quality = jpeg_quality
        self.warn_total_ms = warn_total_ms
        if self.path.exists():
            if not overwrite:
                raise PublisherError(f"{self.path}: bag already exists (remove it or overwrite)")
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
        self._writer.write(connection, ros_msgs.stamp_ns(stamp), data)

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

    def publish_health(self, health: dict, stamp: float | None = None) -> None:
        if not self.closed:
            stamp = time.time() if stamp is None else stamp
            self._write(self._diagnostics, ros_msgs.DIAGNOSTICS_TYPE,
                        ros_msgs.health_fields(health, stamp, frame_id=self.frame_id), stamp)

    def _close(self) -> None:
        self._writer.close()  # writes the MCAP summary/index and metadata.yaml


class VideoPublisher(Publisher):
    """Annotated MP4 (``mp4v``): one video frame per result, in the first frame's size.

    Frames without an image (unreadable input) become dark frames with the error text, so the
    video stays frame-aligned with the JSONL. The FPS overlay is the node's publish rate (an
    exponential moving average) unless the caller passes an annotated image.
    """

    wants_image = True

    def __init__(self, path: str | Path, fps: float = 30.0) -> None:
        super().__init__()
        if fps <= 0:
            raise PublisherError(f"{path}: video fps must be > 0, got {fps}")
        self.path = Path(path)
        self.name = str(path)
        self.fps = float(fps)
        self._writer: Any = None
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
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                 (width, height))
        if not writer.isOpened():
            raise PublisherError(f"{self.path}: cannot open video writer (mp4v, {width}x{height})")
        self._writer, self._size = writer, (width, height)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.release()


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
    publishers: list[Publisher] = []
    try:
        if jsonl is not None:
            publishers.append(JsonlPublisher(jsonl))
        if zmq is not None:
            publishers.append(ZmqPublisher(zmq, topic=zmq_topic))
        if bag is not None:
            publishers.append(BagPublisher(bag, frame_id=frame_id, images=bag_images,
                                           overwrite=overwrite, warn_total_ms=warn_total_ms))
        if video is not None:
            publishers.append(VideoPublisher(video, fps=video_fps))
    except BaseException:
        for publisher in publishers:
            publisher.close()
        raise
    return publishers
