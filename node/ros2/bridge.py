"""The ROS-free half of the ROS 2 adapter (``node.ros2.lifecycle``): parameters to ``NodeConfig``
and their checks (values, and what may not change while the node is active), a newest-frame
source fed by an image subscription, a proposer fed by a box topic (LiDAR-projected boxes), a
publisher that maps results onto ROS topics through ``node.publish.ros_msgs`` with rolling
diagnostics, and the thread that runs the pipeline.

Nothing here imports rclpy or a message package: message classes and ROS publishers are
passed in, so all of it runs and is tested without ROS. The mapping itself
(``ros_msgs.detection_array_fields`` and friends, built by ``ros_msgs.to_rclpy``) is the one
the bag publisher uses, so live topics and bags never disagree.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from node.node_config import DEFAULT_CONFIG, NodeConfig, load_node_config
from node.propose.base import Proposer
from node.publish import ros_msgs
from node.publish.metrics import LatencyTracker
from node.publish.publishers import Publisher
from node.sources.camera import NewestFrameSource, check_camera_uri
from node.sources.files import Source, SourceError
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


# ---- parameter checks -----------------------------------------------------------------------

IMAGE_TRANSPORTS = ("raw", "compressed")
"""``image_transport``: ``raw`` subscribes ``sensor_msgs/Image`` on ``image_topic``,
``compressed`` ``sensor_msgs/CompressedImage`` on ``<image_topic>/compressed``."""
INPUT_QOS = ("sensor_data", "reliable", "best_effort")
"""``input_qos``: the image (and box) subscriptions' QoS. ``sensor_data`` is rclpy's
``qos_profile_sensor_data`` (best effort, keep last 5); ``reliable`` and ``best_effort`` keep
the last frame only."""

GUARDED_PARAMETERS = ("config_file", "model", "camera")
"""Parameters that name files or devices: refused while the node is active."""
GUARDED_KEYS = ("model.path", "source.uri", "source.topic", "publishers.jsonl", "publishers.zmq",
                "publishers.bag", "publishers.video_out", "metrics.prometheus_port",
                "metrics.prometheus_host", "proposer.external_dir", "proposer.colour_model",
                "proposer.heatmap_model", "proposer.refiner_model")
"""Node-config keys holding file paths, bind addresses, ports or camera URIs: ``overrides``
that touch one of them are refused while the node is active."""


def transport_topic(image_topic: str, transport: str) -> str:
    """The topic an ``image_transport`` subscribes to (image_transport's naming)."""
    topic = image_topic.strip().rstrip("/")
    return f"{topic}/compressed" if transport == "compressed" else topic


def check_parameters(params: Mapping[str, Any]) -> None:
    """Check the ROS-only parameters' values (the node config is checked when it is loaded).

    Raises:
        RosNodeError: one line naming the parameter, its value and what is allowed.
    """
    def bad(name: str, allowed: str) -> RosNodeError:
        return RosNodeError(f"parameter {name}: {params.get(name)!r} is not {allowed}")

    if "image_transport" in params and params["image_transport"] not in IMAGE_TRANSPORTS:
        raise bad("image_transport", " or ".join(IMAGE_TRANSPORTS))
    if "input_qos" in params and params["input_qos"] not in INPUT_QOS:
        raise bad("input_qos", ", ".join(INPUT_QOS[:-1]) + " or " + INPUT_QOS[-1])
    for name in ("diagnostics_period",):
        value = params.get(name)
        if value is not None and not (isinstance(value, (int, float)) and 0.05 <= value <= 60):
            raise bad(name, "a number of seconds from 0.05 to 60")
    for name in ("proposals_tolerance_ms", "warn_total_ms"):
        value = params.get(name)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1e4):
            raise bad(name, "a number of milliseconds from 0 to 10000")
    camera = str(params.get("camera") or "").strip()
    if camera:
        try:
            check_camera_uri(camera)
        except SourceError as exc:
            raise RosNodeError(f"parameter camera: {exc}") from None


def override_key(item: str) -> str:
    """The dotted key of a ``key.path=value`` override item."""
    return item.split("=", 1)[0].strip()


def touches_guarded_key(key: str) -> bool:
    """Whether setting ``key`` may change a guarded key (the key itself or a section above)."""
    return any(key == g or g.startswith(key + ".") for g in GUARDED_KEYS)


def guarded_change(name: str, old: Any, new: Any) -> str | None:
    """Why changing parameter ``name`` from ``old`` to ``new`` is refused while active, or
    ``None`` when it is allowed."""
    if old == new:
        return None
    if name in GUARDED_PARAMETERS:
        return (f"parameter {name} names a file or device and cannot change while the node is "
                f"active; deactivate it first")
    if name == "overrides":
        before, after = set(split_overrides(old)), set(split_overrides(new))
        touched = sorted({override_key(i) for i in before ^ after
                          if touches_guarded_key(override_key(i))})
        if touched:
            return (f"parameter overrides: {', '.join(touched)} names a file, bind address, "
                    f"port or camera and cannot change while the node is active; deactivate "
                    f"it first")
    return None


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

    HEADERS_KEPT = 64

    def __init__(self, topic: str) -> None:
        super().__init__(topic)
        self.received = 0
        self.frame_id: str | None = None
        self._headers: OrderedDict[int, tuple[str, dict | None]] = OrderedDict()

    def frame_id_of(self, index: int, default: str = "") -> str:
        """The ``header.frame_id`` of the message that became frame ``index``."""
        with self._cond:
            header = self._headers.get(index)
            return (header[0] if header else "") or default

    def stamp_of(self, index: int) -> dict | None:
        """The exact ``header.stamp`` (``{"sec", "nanosec"}``) of the message that became frame
        ``index`` (``Frame.stamp`` is a float, which cannot hold every nanosecond)."""
        with self._cond:
            header = self._headers.get(index)
            return dict(header[1]) if header and header[1] else None

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
        stamp = stamp_seconds(msg.header)
        exact = {"sec": int(msg.header.stamp.sec), "nanosec": int(msg.header.stamp.nanosec)} \
            if stamp else None
        try:
            image, error = ros_msgs.image_to_bgr(msg), None
        except ValueError as exc:
            image, error = None, f"{self.name}: {exc}"
        self.put(image, stamp or time.time(), frame_id=str(msg.header.frame_id or ""),
                 error=error, capture_ms=(time.perf_counter() - t0) * 1e3, exact_stamp=exact)

    def put(self, image: np.ndarray | None, stamp: float, *, frame_id: str = "",
            error: str | None = None, capture_ms: float = 0.0,
            exact_stamp: dict | None = None) -> None:
        """Offer a decoded BGR frame (``image=None`` with ``error`` for a bad message)."""
        with self._cond:
            if self._closed:
                return
            frame = Frame(self.received, float(stamp), image, None, capture_ms, error)
            self.errors += error is not None
            self.received += 1
            if frame_id:
                self.frame_id = frame_id
            self._headers[frame.index] = (frame_id, exact_stamp)
            while len(self._headers) > self.HEADERS_KEPT:
                self._headers.popitem(last=False)
            self._offer(frame)

    def close(self) -> None:
        # No generator.close() here: the pipeline thread may be inside it; waking it is enough.
        with self._cond:
            self._closed = True
            self._slot = None
            self._cond.notify_all()


# ---- boxes from a topic (LiDAR-projected proposals) -------------------------------------------

def detection_boxes(msg: Any) -> np.ndarray:
    """``vision_msgs/Detection2DArray`` boxes as (N, 4) float32 ``x1, y1, x2, y2`` pixels."""
    boxes = []
    for det in msg.detections:
        bbox = det.bbox
        cx, cy = float(bbox.center.position.x), float(bbox.center.position.y)
        w, h = float(bbox.size_x), float(bbox.size_y)
        boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return np.asarray(boxes, np.float32).reshape(-1, 4)


class TopicBoxProposer(Proposer):
    """Candidate boxes from a ``vision_msgs/Detection2DArray`` topic (LiDAR-projected boxes),
    matched to each frame by stamp: the message nearest the frame's stamp within
    ``tolerance_s``. The boxes are classified as they are, like those of the external
    (label-file) proposer: no overlap suppression, the largest kept first under the cap.

    ``put_message`` is called from the ROS executor thread. A frame whose boxes have not
    arrived yet waits for them at most ``tolerance_s`` (boxes stamped within the tolerance
    after the frame may still come). A frame without a match gets no candidates and counts
    in ``unmatched``.
    """

    suppress_overlaps = False

    def __init__(self, max_candidates: int, tolerance_s: float, keep: int = 64) -> None:
        super().__init__(max_candidates)
        self.tolerance_s = float(tolerance_s)
        self.keep = keep
        self._stamps: list[float] = []
        self._boxes: list[np.ndarray] = []
        self._cond = threading.Condition()
        self._closed = False
        self.received = self.matched = self.unmatched = 0

    def put_message(self, msg: Any) -> None:
        self.put(stamp_seconds(msg.header), detection_boxes(msg))

    def put(self, stamp: float, boxes: np.ndarray) -> None:
        """Offer the boxes (N, 4 xyxy) stamped ``stamp``; only the newest ``keep`` stay."""
        with self._cond:
            i = bisect.bisect_right(self._stamps, stamp)
            self._stamps.insert(i, float(stamp))
            self._boxes.insert(i, np.asarray(boxes, np.float32).reshape(-1, 4))
            if len(self._stamps) > self.keep:
                del self._stamps[0], self._boxes[0]
            self.received += 1
            self._cond.notify_all()

    def _nearest(self, stamp: float) -> np.ndarray | None:
        if not self._stamps:
            return None
        i = bisect.bisect_left(self._stamps, stamp)
        near = [j for j in (i - 1, i) if 0 <= j < len(self._stamps)]
        j = min(near, key=lambda k: abs(self._stamps[k] - stamp))
        return self._boxes[j] if abs(self._stamps[j] - stamp) <= self.tolerance_s else None

    def boxes_for(self, stamp: float, wait: bool = True) -> np.ndarray | None:
        """The boxes matched to ``stamp``, or ``None``."""
        deadline = time.monotonic() + (self.tolerance_s if wait else 0.0)
        with self._cond:
            while True:
                boxes = self._nearest(stamp)
                later = bool(self._stamps) and self._stamps[-1] > stamp + self.tolerance_s
                remaining = deadline - time.monotonic()
                if boxes is not None or later or self._closed or remaining <= 0:
                    self.matched += boxes is not None
                    self.unmatched += boxes is None
                    return boxes
                self._cond.wait(remaining)

    def _propose(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        boxes = self.boxes_for(frame.stamp)
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4), np.float32), np.zeros(0)
        return boxes, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    @property
    def health(self) -> dict:
        with self._cond:
            return {"proposals_received": self.received, "proposals_matched": self.matched,
                    "proposals_unmatched": self.unmatched}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# ---- results -> topics -----------------------------------------------------------------------

class RosTopicPublisher(Publisher):
    """Publishes each ``FrameResult`` on ROS topics, through ``node.publish.ros_msgs``, and
    keeps the rolling latency figures that ``publish_diagnostics`` sends.

    Args:
        detections: ``(publisher, Detection2DArray class)``: one message per frame, with the
            input image's stamp and frame id.
        diagnostics: ``(publisher, DiagnosticArray class)``: sent by ``publish_diagnostics``,
            which the node calls from a timer (about 1 Hz), never per frame.
        annotated: ``(publisher, CompressedImage class)`` or ``None``.
        frame_id: the outputs' ``header.frame_id``: a string, or a callable taking the
            ``FrameResult`` (the subscribed image's own frame id).
        warn_total_ms: latency budget for WARN diagnostics (``None``: no check).
        health: returns counters merged into the diagnostics (received, dropped, errors...).
        warning: returns a one-line warning that makes the diagnostics WARN (the camera
            watch's: frames blurred or burnt out), or ``None``.
        window: frames in the rolling latency window.
        stamp: the input message's exact ``{"sec", "nanosec"}`` for a result (or ``None``:
            the frame's float stamp is used), so the output header equals the input's.
        to_message: ``ros_msgs.to_rclpy``; injectable for tests.

    ``close`` only stops publishing: the ROS publishers belong to the node.
    """

    name = "ros2 topics"

    def __init__(self, detections: tuple[Any, type], diagnostics: tuple[Any, type],
                 annotated: tuple[Any, type] | None = None, *,
                 frame_id: str | Callable[[FrameResult], str] = "camera",
                 warn_total_ms: float | None = None,
                 health: Callable[[], dict] | None = None,
                 warning: Callable[[], str | None] | None = None, window: int = 300,
                 stamp: Callable[[FrameResult], dict | None] | None = None,
                 to_message: Callable[[type, dict], Any] = ros_msgs.to_rclpy) -> None:
        super().__init__()
        self.detections = detections
        self.diagnostics = diagnostics
        self.annotated = annotated
        self.wants_image = annotated is not None
        self._frame_id = frame_id
        self.warn_total_ms = warn_total_ms
        self._health = health
        self._warning = warning
        self._stamp = stamp
        self._to_message = to_message
        self.tracker = LatencyTracker(window=window)
        self._last: tuple[float, str, str | None] | None = None  # (monotonic, frame id, error)
        self._last_lock = threading.Lock()

    def frame_id(self, result: FrameResult) -> str:
        return self._frame_id(result) if callable(self._frame_id) else self._frame_id

    def _publish(self, result: FrameResult, image: np.ndarray | None) -> None:
        frame_id = self.frame_id(result)
        fields = ros_msgs.detection_array_fields(result, frame_id)
        exact = self._stamp(result) if self._stamp is not None else None
        if exact is not None:
            fields["header"] = {"stamp": exact, "frame_id": frame_id}
            for detection in fields["detections"]:
                detection["header"] = fields["header"]
        pub, cls = self.detections
        pub.publish(self._to_message(cls, fields))
        error = result.error or result.frame.error
        self.tracker.record(result.latency_ms, error=error is not None)
        with self._last_lock:
            self._last = (time.monotonic(), frame_id, error)
        if self.annotated is not None and result.frame.image is not None:
            from node.publish.annotate import draw_cones

            # The pipeline hands over the raw frame; draw on a copy.
            drawn = draw_cones(result.frame.image, result.cones,
                               latency_ms=result.latency_ms.get("total"), error=result.error)
            pub, cls = self.annotated
            pub.publish(self._to_message(cls, ros_msgs.compressed_image_fields(
                drawn, result.frame.stamp, frame_id)))

    def diagnostics_fields(self, stamp: float, stale_after_s: float = 2.0) -> dict:
        """The ``DiagnosticArray`` fields now: rolling FPS and latency percentiles, counters."""
        with self._last_lock:
            last = self._last
        counts = {"frames": self.tracker.frames, "errors": self.tracker.errors}
        if self._health is not None:
            counts.update(self._health())
        age = None if last is None else time.monotonic() - last[0]
        return ros_msgs.rolling_diagnostics_fields(
            self.tracker.rolling(), counts, stamp, frame_id=last[1] if last else "",
            warn_total_ms=self.warn_total_ms, last_error=last[2] if last else None,
            idle_s=age, stale_after_s=stale_after_s,
            warning=self._warning() if self._warning is not None else None)

    def publish_diagnostics(self, stamp: float, stale_after_s: float = 2.0) -> None:
        """Send one ``DiagnosticArray`` (the node's timer calls this, about once a second)."""
        if self.closed:
            return
        pub, cls = self.diagnostics
        pub.publish(self._to_message(cls, self.diagnostics_fields(stamp, stale_after_s)))


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
