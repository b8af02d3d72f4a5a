"""The ROS-free half of the ROS 2 adapter (``node.ros2.lifecycle``): parameters to ``NodeConfig``, a
newest-frame source fed by an image subscription, a publisher that maps results onto ROS
topics through ``node.publish.ros_msgs``, and the thread that runs the pipeline.

Nothing here imports rclpy or a message package: message classes and ROS publishers are
passed in, so all of it runs and is tested without ROS. The mapping itself
(``ros_msgs.detection_array_fields`` and friends, built by ``ros_msgs.to_rclpy``) is the one
the bag publisher uses, so live topics and bags never disagree.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from node.node_config import DEFAULT_CONFIG, NodeConfig, load_node_config
from node.publish import ros_msgs
from node.publish.publishers import Publisher
from node.sources.camera import NewestFrameSource
from node.sources.files import Source
from node.types import Frame, FrameResult


class RosNodeError(ValueError):
    """The ROS node cannot be configured or activated; the message says which parameter."""


# ---- parameters -> NodeConfig --------------------------------------------------------------

def split_overrides(value: str | Sequence[str] | None) -> list[str]:
    """The ``overrides`` parameter as a list of ``key.path=value`` items.

    A string is split on ``;`` and newlines; a list is taken item by item; blanks are dropped.
    """
    if value is None:
        return []
    items = value.replace("\n", ";").split(";") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def config_from_parameters(params: Mapping[str, Any]) -> NodeConfig:
    """The validated ``NodeConfig`` the parameters describe.

    ``config_file`` is loaded, then ``overrides``, then ``model`` (``model.path``) and
    ``camera`` (``source.uri``) when they are not empty, as the CLI applies ``--set`` before
    its dedicated flags.

    Raises:
        ConfigError: missing config file, unknown key or bad value (names file and key).
    """
    flags = split_overrides(params.get("overrides"))
    if str(params.get("model") or "").strip():
        flags.append(f"model.path={json.dumps(str(params['model']).strip())}")
    if str(params.get("camera") or "").strip():
        flags.append(f"source.uri={json.dumps(str(params['camera']).strip())}")
    config_file = str(params.get("config_file") or DEFAULT_CONFIG)
    return load_node_config(config_file, flags)


def choose_input(config: NodeConfig, image_topic: str) -> tuple[str, str]:
    """``("camera", uri)`` when the config names a camera, else ``("topic", image_topic)``.

    Raises:
        RosNodeError: neither a camera nor an image topic.
    """
    if config.source.uri:
        return "camera", config.source.uri
    if image_topic.strip():
        return "topic", image_topic.strip()
    raise RosNodeError("no input: set the parameter camera (or source.uri in the config) or "
                       "image_topic")


# ---- subscribed images -----------------------------------------------------------------------

def stamp_seconds(header: Any) -> float:
    """``std_msgs/Header`` stamp in seconds since the epoch (0 if unset)."""
    return int(header.stamp.sec) + int(header.stamp.nanosec) * 1e-9


class TopicSource(NewestFrameSource):
    """Frames pushed by a subscription callback; only the newest one waits.

    ``put`` is called from the ROS executor thread, iteration happens in the pipeline's
    thread. A frame not taken before the next one arrives is replaced and counted in
    ``dropped``, as ``node.sources.camera.LiveSource`` does for cameras. ``close`` wakes a waiting
    reader and ends the iteration.
    """

    def __init__(self, topic: str) -> None:
        super().__init__(topic)
        self.received = 0
        self.frame_id: str | None = None

    @property
    def health(self) -> dict:
        with self._cond:
            return {"state": "closed" if self._closed else "ok", "received": self.received,
                    "dropped": self.dropped, "errors": self.errors}

    def put_message(self, msg: Any) -> None:
        """Decode a ``sensor_msgs/Image`` (or ``CompressedImage``) and offer it.

        A message that cannot be decoded becomes a frame with ``error`` set, so the node
        reports it on ``/diagnostics`` instead of going silent.
        """
        t0 = time.perf_counter()
        stamp = stamp_seconds(msg.header) or time.time()
        try:
            image, error = ros_msgs.image_to_bgr(msg), None
        except ValueError as exc:
            image, error = None, f"{self.name}: {exc}"
        self.put(image, stamp, frame_id=str(msg.header.frame_id or ""), error=error,
                 capture_ms=(time.perf_counter() - t0) * 1e3)

    def put(self, image: np.ndarray | None, stamp: float, *, frame_id: str = "",
            error: str | None = None, capture_ms: float = 0.0) -> None:
        """Offer a decoded BGR frame (``image=None`` with ``error`` for a bad message)."""
        with self._cond:
            if self._closed:
                return
            frame = Frame(self.received, float(stamp), image, None, capture_ms, error)
            self.errors += error is not None
            self.received += 1
            if frame_id:
                self.frame_id = frame_id
            self._offer(frame)

    def close(self) -> None:
        # No generator.close() here: the pipeline thread may be inside it; waking it is enough.
        with self._cond:
            self._closed = True
            self._slot = None
            self._cond.notify_all()


# ---- results -> topics -----------------------------------------------------------------------

class RosTopicPublisher(Publisher):
    """Publishes each ``FrameResult`` on ROS topics, through ``node.publish.ros_msgs``.

    Args:
        detections: ``(publisher, Detection2DArray class)``.
        diagnostics: ``(publisher, DiagnosticArray class)``.
        annotated: ``(publisher, CompressedImage class)`` or ``None``.
        frame_id: the outputs' ``header.frame_id``: a string, or a callable read per frame
            (the subscribed image's frame id).
        warn_total_ms: latency budget for WARN diagnostics (``None``: no check).
        to_message: ``ros_msgs.to_rclpy``; injectable for tests.

    ``close`` only stops publishing: the ROS publishers belong to the node.
    """

    name = "ros2 topics"

    def __init__(self, detections: tuple[Any, type], diagnostics: tuple[Any, type],
                 annotated: tuple[Any, type] | None = None, *,
                 frame_id: str | Callable[[], str] = "camera",
                 warn_total_ms: float | None = None,
                 to_message: Callable[[type, dict], Any] = ros_msgs.to_rclpy) -> None:
        super().__init__()
        self.detections = detections
        self.diagnostics = diagnostics
        self.annotated = annotated
        self.wants_image = annotated is not None
        self._frame_id = frame_id
        self.warn_total_ms = warn_total_ms
        self._to_message = to_message

    def frame_id(self) -> str:
        return self._frame_id() if callable(self._frame_id) else self._frame_id

    def _publish(self, result: FrameResult, image: np.ndarray | None) -> None:
        frame_id = self.frame_id()
        pub, cls = self.detections
        pub.publish(self._to_message(cls, ros_msgs.detection_array_fields(result, frame_id)))
        pub, cls = self.diagnostics
        pub.publish(self._to_message(cls, ros_msgs.diagnostics_fields(
            result, frame_id=frame_id, warn_total_ms=self.warn_total_ms)))
        if self.annotated is not None and result.frame.image is not None:
            from node.publish.annotate import draw_cones

            # The pipeline hands over the raw frame; draw on a copy.
            drawn = draw_cones(result.frame.image, result.cones,
                               latency_ms=result.latency_ms.get("total"), error=result.error)
            pub, cls = self.annotated
            pub.publish(self._to_message(cls, ros_msgs.compressed_image_fields(
                drawn, result.frame.stamp, frame_id)))


# ---- the pipeline thread ----------------------------------------------------------------------

class PipelineThread:
    """Runs ``Pipeline.run(source)`` in a thread until ``stop()`` or the source ends.

    Args:
        pipeline: a ``node.pipeline.Pipeline`` (backend active, publishers attached).
        source: the frame source; the pipeline closes it when it ends.
        on_exit: called in the thread with ``(summary, error)`` when the run ends; ``error``
            is a one-line message when the run failed (for example, a camera gone for good).
    """

    def __init__(self, pipeline: Any, source: Source,
                 on_exit: Callable[[dict | None, str | None], None] | None = None) -> None:
        self.pipeline = pipeline
        self.source = source
        self.on_exit = on_exit
        self.summary: dict | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="cone pipeline", daemon=True)

    def start(self) -> PipelineThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.summary = self.pipeline.run(self.source)
        except Exception as exc:  # noqa: BLE001 (reported to the node, which exits)
            lines = str(exc).strip().splitlines()
            self.error = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        if self.on_exit is not None:
            self.on_exit(self.summary, self.error)

    def stop(self, timeout: float = 10.0) -> dict | None:
        """Ask the pipeline to finish its frame in flight, wake the source, and join."""
        self.pipeline.request_stop()
        self.source.close()
        self._thread.join(timeout)
        return self.summary

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def file_publishers(config: NodeConfig) -> list:
    """The config's own publishers (JSONL, ZeroMQ, bag, video), as with ``python -m node run``."""
    pub = config.publishers
    if not any((pub.jsonl, pub.zmq, pub.bag, pub.video_out)):
        return []
    from node.publish.publishers import build_publishers

    return build_publishers(jsonl=pub.jsonl, zmq=pub.zmq, bag=pub.bag, video=pub.video_out,
                            bag_images=pub.annotate_bag_images, video_fps=pub.video_fps)
