"""ROS 2 message mapping for the node's output, shared by the bag writer and the live node.

Cones become ``vision_msgs/msg/Detection2DArray`` (vision_msgs 4.x, the ROS 2 Humble layout:
``ObjectHypothesis{class_id: string, score: float64}``, ``BoundingBox2D{center: Pose2D
{position: Point2D, theta}, size_x, size_y}``); latency and source health become
``diagnostic_msgs/msg/DiagnosticArray`` as in the ROS diagnostics stack.

The mapping is written once, as *plain nested dicts* of field values
(``detection_array_fields``, ``diagnostics_fields``, ``health_fields``,
``compressed_image_fields``). Two small builders turn such a dict into a message object:

- ``to_rosbags(typestore, msgtype, fields)`` for the ``rosbags`` typestore (bags, no ROS
  install needed; ``build_typestore`` registers vision_msgs, which the stock Humble store
  lacks);
- ``to_rclpy(msg_class, fields)`` for rosidl-generated Python classes in a live rclpy node
  (only uses the rosidl API ``get_fields_and_field_types``; rclpy itself is never imported).

Fields left out of a dict keep their ROS default (zero, empty string, empty sequence), so both
builders produce the same message. ``image_to_bgr`` decodes ``sensor_msgs`` images for
replay and for a live subscriber alike.
"""

from __future__ import annotations

import array
import importlib
import math
import re
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from node.types import STAGES, FrameResult

DETECTIONS_TYPE = "vision_msgs/msg/Detection2DArray"
DIAGNOSTICS_TYPE = "diagnostic_msgs/msg/DiagnosticArray"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPE = "sensor_msgs/msg/Image"

DIAG_OK, DIAG_WARN, DIAG_ERROR, DIAG_STALE = 0, 1, 2, 3
"""``diagnostic_msgs/DiagnosticStatus`` levels."""

# vision_msgs 4.x (ROS 2 Humble to Jazzy) message definitions, field by field: the whole
# package. The stock rosbags typestores have no vision_msgs, and the package is not in the
# Python package registry, so these texts are both what ``build_typestore`` registers and the
# .msg files from which ``ros/build_vision_msgs.py`` generates the real rosidl package for
# rclpy. Relative names resolve in vision_msgs.
VISION_MSGS_DEFINITIONS: dict[str, str] = {
    "vision_msgs/msg/Point2D": "float64 x\nfloat64 y\n",
    "vision_msgs/msg/Pose2D": "vision_msgs/Point2D position\nfloat64 theta\n",
    "vision_msgs/msg/BoundingBox2D": (
        "vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n"),
    "vision_msgs/msg/BoundingBox2DArray": "std_msgs/Header header\nBoundingBox2D[] boxes\n",
    "vision_msgs/msg/BoundingBox3D": "geometry_msgs/Pose center\ngeometry_msgs/Vector3 size\n",
    "vision_msgs/msg/BoundingBox3DArray": "std_msgs/Header header\nBoundingBox3D[] boxes\n",
    "vision_msgs/msg/ObjectHypothesis": "string class_id\nfloat64 score\n",
    "vision_msgs/msg/ObjectHypothesisWithPose": (
        "ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n"),
    "vision_msgs/msg/Classification": "std_msgs/Header header\nObjectHypothesis[] results\n",
    "vision_msgs/msg/Detection2D": (
        "std_msgs/Header header\nObjectHypothesisWithPose[] results\nBoundingBox2D bbox\n"
        "string id\n"),
    "vision_msgs/msg/Detection2DArray": "std_msgs/Header header\nDetection2D[] detections\n",
    "vision_msgs/msg/Detection3D": (
        "std_msgs/Header header\nObjectHypothesisWithPose[] results\nBoundingBox3D bbox\n"
        "string id\n"),
    "vision_msgs/msg/Detection3DArray": "std_msgs/Header header\nDetection3D[] detections\n",
    "vision_msgs/msg/VisionClass": "uint16 class_id\nstring class_name\n",
    "vision_msgs/msg/LabelInfo": (
        "std_msgs/Header header\nVisionClass[] class_map\nfloat32 threshold\n"),
    "vision_msgs/msg/VisionInfo": (
        "std_msgs/Header header\nstring method\nstring database_location\n"
        "int32 database_version\n"),
}


@lru_cache(maxsize=1)
def build_typestore() -> Any:
    """The rosbags ROS 2 Humble typestore with vision_msgs 4.x registered (cached)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    typestore = get_typestore(Stores.ROS2_HUMBLE)
    types: dict = {}
    for name, text in VISION_MSGS_DEFINITIONS.items():
        types.update(get_types_from_msg(text, name))
    typestore.register(types)
    return typestore


def stamp_fields(stamp: float) -> dict:
    """``builtin_interfaces/Time`` from seconds since the epoch.

    Whole seconds and the fraction are split before scaling, so a stamp such as
    ``1700000000.25`` maps to exactly 250,000,000 ns (scaling first would lose ~200 ns).
    """
    sec = math.floor(float(stamp))
    nanosec = round((float(stamp) - sec) * 1e9)
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    return {"sec": int(sec), "nanosec": nanosec}


def stamp_ns(stamp: float) -> int:
    """Seconds since the epoch as integer nanoseconds (bag log time), split as above."""
    fields = stamp_fields(stamp)
    return fields["sec"] * 1_000_000_000 + fields["nanosec"]


def header_fields(stamp: float, frame_id: str) -> dict:
    return {"stamp": stamp_fields(stamp), "frame_id": frame_id}


_IDENTITY_POSE: dict = {"pose": {"orientation": {"w": 1.0}}}
"""``geometry_msgs/PoseWithCovariance`` at identity: image-space detections have no 3-D pose."""


def detection_array_fields(result: FrameResult, frame_id: str = "camera") -> dict:
    """``vision_msgs/Detection2DArray`` for one frame's cones.

    The header stamp is the capture time. Each cone is one ``Detection2D`` with one hypothesis:
    ``class_id`` is the class name (e.g. ``"blue_cone"``), ``score`` the classifier score. The
    box centre and size are in pixels of the original frame; ``id`` is the cone's track id
    (``node.track``), or its index in the frame when it has none (tracking off). The hypothesis
    pose stays at identity: the range and camera-frame position travel in the JSONL record.
    """
    header = header_fields(result.frame.stamp, frame_id)
    detections = []
    for i, cone in enumerate(result.cones):
        x1, y1, x2, y2 = (float(v) for v in cone.box)
        detections.append({
            "header": header,
            "results": [{
                "hypothesis": {"class_id": cone.label, "score": float(cone.score)},
                "pose": _IDENTITY_POSE,
            }],
            "bbox": {"center": {"position": {"x": (x1 + x2) / 2, "y": (y1 + y2) / 2},
                                "theta": 0.0},
                     "size_x": x2 - x1, "size_y": y2 - y1},
            "id": str(cone.track_id if cone.track_id is not None else i),
        })
    return {"header": header, "detections": detections}


def diagnostics_fields(result: FrameResult, *, name: str = "cone_node: latency",
                       hardware_id: str = "", frame_id: str = "camera",
                       warn_total_ms: float | None = None) -> dict:
    """``diagnostic_msgs/DiagnosticArray`` with one status holding the frame's latency.

    Keys are ``<stage>_ms`` for every stage present (values formatted ``%.3f``), then
    ``frame``, ``cones`` and ``candidates``. Level is ERROR when the frame has an error (the
    message is the error), WARN when ``total`` exceeds ``warn_total_ms``, else OK.
    """
    latency = result.latency_ms
    keys = [s for s in (*STAGES, "infer_gpu", "total") if s in latency]
    keys += sorted(k for k in latency if k not in keys)
    values = [{"key": f"{k}_ms", "value": f"{float(latency[k]):.3f}"} for k in keys]
    values += [{"key": "frame", "value": str(result.frame.index)},
               {"key": "cones", "value": str(len(result.cones))},
               {"key": "candidates", "value": str(result.num_candidates)}]
    error = result.error or result.frame.error
    total = latency.get("total")
    if error:
        level, message = DIAG_ERROR, error
    elif warn_total_ms is not None and total is not None and total > warn_total_ms:
        level, message = DIAG_WARN, f"total {total:.1f} ms over budget {warn_total_ms:g} ms"
    else:
        level, message = DIAG_OK, "ok"
    return _diagnostic_array(level, message, name, hardware_id, values, result.frame.stamp,
                             frame_id)


def _diagnostic_array(level: int, message: str, name: str, hardware_id: str, values: list,
                      stamp: float, frame_id: str) -> dict:
    """A ``DiagnosticArray``'s fields holding one status."""
    status = {"level": level, "name": name, "message": message, "hardware_id": hardware_id,
              "values": values}
    return {"header": header_fields(stamp, frame_id), "status": [status]}


def rolling_diagnostics_fields(rolling: dict, counts: dict, stamp: float, *,
                               name: str = "cone_node: latency", hardware_id: str = "",
                               frame_id: str = "", warn_total_ms: float | None = None,
                               last_error: str | None = None, idle_s: float | None = None,
                               stale_after_s: float = 2.0, warning: str | None = None) -> dict:
    """``diagnostic_msgs/DiagnosticArray`` of a live node's recent frames, as
    diagnostic_updater sends it: one status, sent periodically (the live node: about 1 Hz).

    Args:
        rolling: ``LatencyTracker.rolling()``: ``{"fps", "latency_ms": {stage: {p50, p90, p99}}}``.
        counts: counters shown as they are (frames, received, dropped, errors, ...).
        stamp: the header stamp (now), seconds since the epoch.
        last_error: the newest frame's error, if it had one.
        idle_s: seconds since the newest frame (``None``: no frame yet).
        warning: a one-line warning from elsewhere (the camera watch), or ``None``.

    Keys: ``fps``, then ``<stage>_ms_p50|p90|p99`` per stage (``%.3f``), then the counters.
    Level: ERROR when the newest frame failed (the message is its error); WARN when no frame
    came for ``stale_after_s`` (or none yet), when the p90 of ``total`` exceeds
    ``warn_total_ms``, or with a ``warning`` (its message); else OK.
    """
    latency = rolling.get("latency_ms", {})
    values = [{"key": "fps", "value": f"{float(rolling.get('fps', 0.0)):.3f}"}]
    for stage in [s for s in (*STAGES, "infer_gpu", "total") if s in latency] + \
            sorted(s for s in latency if s not in (*STAGES, "infer_gpu", "total")):
        for q in ("p50", "p90", "p99"):
            values.append({"key": f"{stage}_ms_{q}", "value": _value_text(
                float(latency[stage][q]))})
    values += [{"key": str(k), "value": _value_text(v)} for k, v in counts.items()]
    p90 = latency.get("total", {}).get("p90")
    if last_error:
        level, message = DIAG_ERROR, last_error
    elif idle_s is None:
        level, message = DIAG_WARN, "no frames yet"
    elif idle_s > stale_after_s:
        level, message = DIAG_WARN, f"no frames for {idle_s:.1f} s"
    elif warn_total_ms is not None and p90 is not None and p90 > warn_total_ms:
        level, message = DIAG_WARN, f"total p90 {p90:.1f} ms over budget {warn_total_ms:g} ms"
    elif warning:
        level, message = DIAG_WARN, warning
    else:
        level, message = DIAG_OK, "ok"
    return _diagnostic_array(level, message, name, hardware_id, values, stamp, frame_id)


def health_fields(health: dict, stamp: float, *, name: str = "cone_node: camera",
                  hardware_id: str = "", frame_id: str = "camera") -> dict:
    """``diagnostic_msgs/DiagnosticArray`` for a source's health (see ``Source.health``).

    ``state`` ok -> OK, reconnecting -> WARN, anything else (failed) -> ERROR.
    """
    state = str(health.get("state", "ok"))
    level = {"ok": DIAG_OK, "reconnecting": DIAG_WARN}.get(state, DIAG_ERROR)
    message = str(health.get("last_error") or state)
    values = [{"key": str(k), "value": _value_text(v)} for k, v in health.items()]
    status = {"level": level, "name": name, "message": message, "hardware_id": hardware_id,
              "values": values}
    return {"header": header_fields(stamp, frame_id), "status": [status]}


def compressed_image_fields(image_bgr: np.ndarray, stamp: float, frame_id: str = "camera",
                            quality: int = 80) -> dict:
    """``sensor_msgs/CompressedImage`` (JPEG) of a BGR image."""
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding of the annotated frame failed")
    return {"header": header_fields(stamp, frame_id), "format": "jpeg",
            "data": np.asarray(buf, dtype=np.uint8).reshape(-1)}


_CHANNELS = {"bgr8": 3, "rgb8": 3, "mono8": 1, "bgra8": 4, "rgba8": 4, "8uc1": 1, "8uc3": 3}
_TO_BGR = {"rgb8": cv2.COLOR_RGB2BGR, "mono8": cv2.COLOR_GRAY2BGR, "8uc1": cv2.COLOR_GRAY2BGR,
           "bgra8": cv2.COLOR_BGRA2BGR, "rgba8": cv2.COLOR_RGBA2BGR}


def image_to_bgr(msg: Any) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` (bgr8, rgb8, mono8, bgra8, rgba8) or
    ``sensor_msgs/CompressedImage`` (anything cv2 decodes) into H×W×3 uint8 BGR.

    Works on rosbags and rclpy messages alike (same attribute names).

    Raises:
        ValueError: unsupported encoding, inconsistent size/step, or undecodable data.
    """
    data = np.frombuffer(memoryview(msg.data).cast("B"), dtype=np.uint8)
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if image is None:
            raise ValueError(f"CompressedImage ({msg.format or 'no format'}) could not be decoded")
        return image
    encoding = str(msg.encoding).lower()
    channels = _CHANNELS.get(encoding)
    if channels is None:
        raise ValueError(f"unsupported image encoding {msg.encoding!r} "
                         f"(supported: bgr8, rgb8, mono8, bgra8, rgba8)")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row = width * channels
    if height <= 0 or width <= 0 or step < row or data.size < step * height:
        raise ValueError(f"Image {width}x{height} {encoding} step {step} does not match "
                         f"its {data.size} data bytes")
    pixels = data[: step * height].reshape(height, step)[:, :row].reshape(height, width, channels)
    if encoding in _TO_BGR:
        return cv2.cvtColor(pixels, _TO_BGR[encoding])
    return pixels.copy()


def to_rosbags(typestore: Any, msgtype: str, fields: dict, _memo: dict | None = None) -> Any:
    """Build a rosbags message object of ``msgtype`` from a nested field dict.

    A sub-dict that appears several times (the frame header shared by every detection, the
    constant hypothesis pose) is built once and the message object shared: serialization only
    reads it.

    Raises:
        KeyError: a field name that ``msgtype`` does not have.
    """
    memo: dict = {} if _memo is None else _memo
    if id(fields) in memo:
        return memo[id(fields)]
    plan, names = _rosbags_plan(typestore, msgtype)
    if not names.issuperset(fields):
        raise KeyError(f"{msgtype} has no field {min(set(fields) - names)!r}")
    kwargs = {}
    for name, kind, arg in plan:
        value = fields.get(name)
        if kind == "base":
            kwargs[name] = _base_value(arg, value)
        elif kind == "msg":
            kwargs[name] = to_rosbags(typestore, arg, value or {}, memo)
        elif kind == "msgs":
            kwargs[name] = [to_rosbags(typestore, arg, item, memo) for item in value or ()]
        elif kind == "strings":
            kwargs[name] = [str(v) for v in value or ()]
        else:  # numeric array: arg = (numpy dtype, fixed length or 0)
            dtype, length = arg
            array = np.asarray(value if value is not None else (), dtype=dtype).reshape(-1)
            kwargs[name] = array if array.size or not length else np.zeros(length, dtype)
    message = typestore.types[msgtype](**kwargs)
    memo[id(fields)] = message
    return message


_PLANS: dict[tuple[int, str], tuple[list, frozenset]] = {}


def _rosbags_plan(typestore: Any, msgtype: str) -> tuple[list, frozenset]:
    """Per-type field plan (cached): ``(name, kind, arg)`` with kind base/msg/msgs/strings/
    numbers, so building a message does no type introspection in the hot path."""
    key = (id(typestore), msgtype)
    if key not in _PLANS:
        from rosbags.typesys.base import Nodetype

        plan = []
        for name, (kind, desc) in typestore.fielddefs[msgtype][1]:
            if kind == Nodetype.BASE:
                plan.append((name, "base", desc[0]))
            elif kind == Nodetype.NAME:
                plan.append((name, "msg", desc))
            else:  # ARRAY (fixed length) or SEQUENCE
                (elem_kind, elem_desc), length = desc
                if elem_kind == Nodetype.NAME:
                    plan.append((name, "msgs", elem_desc))
                elif elem_desc[0] == "string":
                    plan.append((name, "strings", None))
                else:
                    fixed = length if kind == Nodetype.ARRAY else 0
                    plan.append((name, "numbers",
                                 (_NUMPY_TYPES.get(elem_desc[0], np.float64), fixed)))
        _PLANS[key] = (plan, frozenset(name for name, _, _ in plan))
    return _PLANS[key]


_NUMPY_TYPES = {"bool": np.bool_, "byte": np.uint8, "char": np.uint8, "int8": np.int8,
                "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
                "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64,
                "float32": np.float32, "float64": np.float64}


def _base_value(typename: str, value: Any) -> Any:
    if typename == "string":
        return "" if value is None else str(value)
    if typename == "bool":
        return bool(value)
    if typename in ("float32", "float64"):
        return 0.0 if value is None else float(value)
    return 0 if value is None else int(value)


_SEQ_RE = re.compile(r"^sequence<(.+?)(?:,\s*\d+)?>$")
_ARRAY_RE = re.compile(r"^(.+)\[(\d+)\]$")


def to_rclpy(msg_class: type, fields: dict) -> Any:
    """Build a rosidl-generated (rclpy) message from a nested field dict.

    Only the rosidl Python API is used: ``msg_class()`` and
    ``get_fields_and_field_types()`` (type strings such as ``'double'``,
    ``'sequence<vision_msgs/Detection2D>'``, ``'double[36]'``, ``'builtin_interfaces/Time'``);
    nested classes are imported from ``<package>.msg``.
    """
    msg = msg_class()
    types = msg_class.get_fields_and_field_types()
    for name, value in fields.items():
        if name not in types:
            raise KeyError(f"{msg_class.__name__} has no field {name!r}")
        typ = types[name]
        seq = _SEQ_RE.match(typ) or _ARRAY_RE.match(typ)
        elem = seq.group(1) if seq else typ
        if "/" in elem:
            cls = _rosidl_class(elem)
            value = ([to_rclpy(cls, v) for v in value] if seq else to_rclpy(cls, value))
        elif seq:
            value = [_rclpy_scalar(elem, v) for v in np.asarray(value).reshape(-1).tolist()]
            if elem == "uint8":
                value = array.array("B", value)
        else:
            value = _rclpy_scalar(elem, value)
        setattr(msg, name, value)
    return msg


def _rclpy_scalar(typename: str, value: Any) -> Any:
    if typename in ("double", "float"):
        return float(value)
    if typename in ("string", "wstring"):
        return str(value)
    if typename == "boolean":
        return bool(value)
    if typename == "octet":  # rosidl maps msg ``byte`` to a 1-byte ``bytes``
        return value if isinstance(value, bytes) else bytes([int(value)])
    return int(value)


def _rosidl_class(type_name: str) -> type:
    package, _, name = type_name.rpartition("/")
    package = package.split("/")[0]
    return getattr(importlib.import_module(f"{package}.msg"), name)


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)
