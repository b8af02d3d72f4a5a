"""Test doubles for the ROS 2 adapter: rosidl-style message classes generated from the rosbags
typestore, and a fake rclpy (nodes, lifecycle, QoS) with just the calls ``node.ros2.lifecycle`` makes.

The message classes follow the rosidl Python API (``get_fields_and_field_types`` with type
strings such as ``'double'``, ``'sequence<vision_msgs/Detection2D>'``), so
``ros_msgs.to_rclpy`` builds them exactly as it builds real rclpy messages.
"""

from __future__ import annotations

import dataclasses
import threading
import types

import numpy as np

from node.classes import BLUE, CLASSIFIER_CLASSES
from node.infer.metadata import ModelMetadata

_ROSIDL_BASE = {"float64": "double", "float32": "float", "bool": "boolean", "byte": "octet",
                "char": "uint8"}


def _rosidl_type(kind, desc):
    from rosbags.typesys.base import Nodetype

    if kind == Nodetype.BASE:
        return _ROSIDL_BASE.get(desc[0], desc[0])
    if kind == Nodetype.NAME:
        pkg, _, name = desc.split("/")
        return f"{pkg}/{name}"
    (elem_kind, elem_desc), length = desc
    elem = _rosidl_type(elem_kind, elem_desc)
    return f"{elem}[{length}]" if kind == Nodetype.ARRAY else f"sequence<{elem}>"


def fake_message_modules(ts):
    """``{package: module, package.msg: module}`` with one class per rosbags message type."""
    from rosbags.typesys.base import Nodetype

    classes: dict[str, type] = {}

    def make(msgtype):
        if msgtype in classes:
            return classes[msgtype]
        fielddefs = ts.fielddefs[msgtype][1]
        field_types = {name: _rosidl_type(kind, desc) for name, (kind, desc) in fielddefs}

        def __init__(self):
            for name, (kind, desc) in fielddefs:
                if kind == Nodetype.NAME:
                    value = make(desc)()
                elif kind == Nodetype.SEQUENCE:
                    value = []
                elif kind == Nodetype.ARRAY:
                    value = [0.0] * desc[1]
                else:
                    value = {"string": ""}.get(desc[0], False if desc[0] == "bool" else 0)
                setattr(self, name, value)

        cls = type(msgtype.rsplit("/", 1)[1], (), {
            "__init__": __init__,
            "get_fields_and_field_types": classmethod(lambda c: dict(field_types))})
        classes[msgtype] = cls
        return cls

    modules: dict[str, types.ModuleType] = {}
    for msgtype in ts.fielddefs:
        pkg, sub, name = msgtype.split("/")
        if sub != "msg":
            continue
        modules.setdefault(pkg, types.ModuleType(pkg))
        mod = modules.setdefault(f"{pkg}.msg", types.ModuleType(f"{pkg}.msg"))
        setattr(mod, name, make(msgtype))
        modules[pkg].msg = mod
    return modules


def plain(msg):
    """A message (rosbags or fake rclpy) as nested dicts/lists of Python scalars."""
    if isinstance(msg, (np.ndarray, list, tuple)) or type(msg).__name__ == "array":
        return [plain(v) for v in list(msg)]
    if isinstance(msg, np.generic):
        return msg.item()
    if isinstance(msg, bytes) and len(msg) == 1:  # rosidl ``byte`` (octet), e.g. a level
        return msg[0]
    if dataclasses.is_dataclass(msg):
        return {f.name: plain(getattr(msg, f.name)) for f in dataclasses.fields(msg)
                if f.name != "__msgtype__" and not f.name.isupper()}  # constants: OK, WARN
    if hasattr(msg, "get_fields_and_field_types"):
        return {k: plain(getattr(msg, k)) for k in msg.get_fields_and_field_types()}
    return msg


class FakePublisher:
    def __init__(self, msg_type, topic, qos):
        self.msg_type, self.topic, self.qos = msg_type, topic, qos
        self.messages: list = []
        self.lock = threading.Lock()

    def publish(self, msg):
        with self.lock:
            self.messages.append(msg)


class Return:
    SUCCESS, FAILURE, ERROR = "SUCCESS", "FAILURE", "ERROR"


class QoS:
    def __init__(self, depth=10, reliability="reliable"):
        self.depth, self.reliability = depth, reliability


CLI_PARAMETERS: dict = {}  # what the fake rclpy.init parsed from `--ros-args -p k:=v`


class FakeNode:
    def __init__(self, node_name, *, parameter_overrides=None):
        self.node_name = node_name
        self._overrides = {**CLI_PARAMETERS, **(parameter_overrides or {})}
        self.destroyed = False
        self.params, self.descriptors = {}, {}
        self.publishers, self.subscriptions, self.logs, self.timers = [], [], [], []

    def declare_parameter(self, name, value, descriptor=None):
        self.params[name] = self._overrides.get(name, value)
        self.descriptors[name] = descriptor

    def get_parameter(self, name):
        return types.SimpleNamespace(value=self.params[name])

    def create_publisher(self, msg_type, topic, qos):
        self.publishers.append(FakePublisher(msg_type, topic, qos))
        return self.publishers[-1]

    def destroy_publisher(self, publisher):
        self.publishers.remove(publisher)

    def create_subscription(self, msg_type, topic, callback, qos):
        self.subscriptions.append(types.SimpleNamespace(msg_type=msg_type, topic=topic,
                                                        callback=callback, qos=qos))
        return self.subscriptions[-1]

    def destroy_subscription(self, subscription):
        self.subscriptions.remove(subscription)

    def create_timer(self, period, callback):
        self.timers.append(types.SimpleNamespace(period=period, callback=callback))
        return self.timers[-1]

    def destroy_timer(self, timer):
        self.timers.remove(timer)

    def get_clock(self):
        import time

        return types.SimpleNamespace(now=lambda: types.SimpleNamespace(
            nanoseconds=time.time_ns()))

    def get_logger(self):
        return types.SimpleNamespace(info=self.logs.append, error=self.logs.append,
                                     warning=self.logs.append)

    def destroy_node(self):
        self.destroyed = True


class FakeLifecycleNode(FakeNode):
    activations = 0

    def create_lifecycle_publisher(self, msg_type, topic, qos):
        return self.create_publisher(msg_type, topic, qos)

    def on_activate(self, state):
        self.activations += 1
        return Return.SUCCESS

    def on_deactivate(self, state):
        return Return.SUCCESS

    def trigger_configure(self):
        return self.on_configure(None)

    def trigger_activate(self):
        return self.on_activate(None)


class FakeBackend:
    """Scores every crop as a blue cone (the adapter is under test, not the classifier)."""

    def __init__(self):
        self.meta = ModelMetadata(classes=list(CLASSIFIER_CLASSES), input_size=32)
        self.active, self._queue, self.last_timing = False, [], {}

    def activate(self):
        self.active = True
        return self

    def deactivate(self):
        self.active = False

    def infer_async(self, batch):
        logits = np.zeros((len(batch), len(self.meta.classes)), np.float32)
        logits[:, self.meta.classes.index(BLUE)] = 6.0
        self._queue.append(logits)

    def wait(self):
        return self._queue.pop(0)
