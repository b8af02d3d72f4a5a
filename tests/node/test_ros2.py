"""The ROS 2 adapter without ROS: message mapping via rosbags types, parameters -> config,
Image -> numpy, and the node's lifecycle over a fake rclpy.

rclpy cannot be installed here. The fake rclpy (``ros_doubles``) implements only the calls
node/ros2/lifecycle.py makes (declare/get parameters, create publishers/subscriptions with a QoS,
lifecycle callbacks); its message classes are generated from the rosbags typestore with the rosidl
Python API (``get_fields_and_field_types``), so the live mapping (``ros_msgs.to_rclpy``) is
checked against the bag mapping (``ros_msgs.to_rosbags``) field by field.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from node.config import ConfigError
from node.publish import ros_msgs
from node.ros2.lifecycle import (
    PARAMETERS,
    RosNodeError,
    RosTopicPublisher,
    TopicSource,
    build_node_class,
    choose_input,
    config_from_parameters,
    split_overrides,
)
from node.types import Cone, Frame, FrameResult

from . import ros_doubles
from .ros_doubles import (
    FakeBackend,
    FakeLifecycleNode,
    FakeNode,
    FakePublisher,
    QoS,
    Return,
    fake_message_modules,
    plain,
)

ROOT = Path(__file__).resolve().parents[2]
STAMP = 1764201600.25  # exactly representable: sec 1764201600, nanosec 250000000


def _result(stamp=STAMP):
    frame = Frame(7, stamp, np.zeros((480, 640, 3), np.uint8), "00007.jpg")
    cones = [Cone((100.0, 200.0, 140.0, 260.0), "blue_cone", 0.97),
             Cone((300.5, 210.0, 320.5, 250.0), "yellow_cone", 0.81)]
    latency = {"capture": 1.25, "propose": 2.5, "preprocess": 0.75, "infer": 5.0, "post": 0.125,
               "total": 9.625}
    return FrameResult(frame, cones, latency, num_candidates=3)


# ---- mapping via rosbags types ---------------------------------------------------------------

def test_detection_array_fields_match_the_cones_field_by_field():
    ts = ros_msgs.build_typestore()
    msg = ros_msgs.to_rosbags(ts, ros_msgs.DETECTIONS_TYPE,
                              ros_msgs.detection_array_fields(_result(), "cam_front"))
    # Round trip through CDR: it is a valid ROS 2 message, not just an object.
    msg = ts.deserialize_cdr(ts.serialize_cdr(msg, ros_msgs.DETECTIONS_TYPE),
                             ros_msgs.DETECTIONS_TYPE)
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1764201600, 250_000_000)
    assert msg.header.frame_id == "cam_front"
    assert len(msg.detections) == 2
    first, second = msg.detections
    assert first.header.stamp.sec == msg.header.stamp.sec and first.id == "0"
    assert [r.hypothesis.class_id for r in first.results] == ["blue_cone"]
    assert first.results[0].hypothesis.score == pytest.approx(0.97)
    assert (first.bbox.center.position.x, first.bbox.center.position.y) == (120.0, 230.0)
    assert (first.bbox.size_x, first.bbox.size_y) == (40.0, 60.0)
    assert first.bbox.center.theta == 0.0
    assert second.results[0].hypothesis.class_id == "yellow_cone"
    assert second.results[0].hypothesis.score == pytest.approx(0.81)
    assert (second.bbox.center.position.x, second.bbox.size_x) == (310.5, 20.0)


def test_diagnostics_fields_carry_the_latency_figures():
    ts = ros_msgs.build_typestore()
    fields = ros_msgs.diagnostics_fields(_result(), frame_id="cam", warn_total_ms=5.0)
    msg = ts.deserialize_cdr(ts.serialize_cdr(
        ros_msgs.to_rosbags(ts, ros_msgs.DIAGNOSTICS_TYPE, fields), ros_msgs.DIAGNOSTICS_TYPE),
        ros_msgs.DIAGNOSTICS_TYPE)
    (status,) = msg.status
    values = {kv.key: kv.value for kv in status.values}
    assert values["infer_ms"] == "5.000" and values["total_ms"] == "9.625"
    assert values["cones"] == "2" and values["candidates"] == "3" and values["frame"] == "7"
    assert status.level == ros_msgs.DIAG_WARN  # 9.6 ms over a 5 ms budget
    assert msg.header.stamp.sec == 1764201600


@pytest.fixture()
def fake_msgs(monkeypatch):
    ts = ros_msgs.build_typestore()
    modules = fake_message_modules(ts)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return ts, modules


def test_live_messages_equal_bag_messages_field_by_field(fake_msgs):
    ts, modules = fake_msgs
    cones_cls = modules["vision_msgs.msg"].Detection2DArray
    diag_cls = modules["diagnostic_msgs.msg"].DiagnosticArray
    image_cls = modules["sensor_msgs.msg"].CompressedImage
    pubs = [FakePublisher(c, t, None) for c, t in ((cones_cls, "/c"), (diag_cls, "/d"),
                                                   (image_cls, "/i"))]
    topics = RosTopicPublisher((pubs[0], cones_cls), (pubs[1], diag_cls), (pubs[2], image_cls),
                               frame_id=lambda result: f"cam_{result.frame.index}",
                               warn_total_ms=5.0, health=lambda: {"dropped": 4})
    result = _result()
    topics.publish(result)
    # Detections per frame; diagnostics only when the node's timer asks for them.
    assert [len(p.messages) for p in pubs] == [1, 0, 1]
    bag_cones = ros_msgs.to_rosbags(ts, ros_msgs.DETECTIONS_TYPE,
                                    ros_msgs.detection_array_fields(result, "cam_7"))
    assert plain(pubs[0].messages[0]) == plain(bag_cones)
    fields = topics.diagnostics_fields(STAMP + 1)
    topics.publish_diagnostics(STAMP + 1)
    bag_diag = ros_msgs.to_rosbags(ts, ros_msgs.DIAGNOSTICS_TYPE, fields)
    assert plain(pubs[1].messages[0]) == plain(bag_diag)
    (status,) = pubs[1].messages[0].status
    values = {kv.key: kv.value for kv in status.values}
    # One frame of 9.625 ms: every percentile is that frame's, over the 5 ms budget.
    assert values["total_ms_p50"] == values["total_ms_p99"] == "9.625"
    assert values["infer_ms_p90"] == "5.000" and values["dropped"] == "4"
    assert values["frames"] == "1" and values["errors"] == "0"
    assert plain(status.level) == ros_msgs.DIAG_WARN and "over budget 5 ms" in status.message
    assert pubs[1].messages[0].header.stamp.sec == 1764201601
    live = pubs[0].messages[0]
    assert live.detections[1].results[0].hypothesis.class_id == "yellow_cone"
    image = pubs[2].messages[0]
    assert image.format == "jpeg" and image.header.frame_id == "cam_7"
    decoded = cv2.imdecode(np.frombuffer(bytes(image.data), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (480, 640, 3)
    # The blue cone's box outline (x = 100) is drawn on the black frame, in blue (BGR).
    assert decoded[230, 99:102, 0].max() > 100 and decoded[400, 500].max() < 20
    topics.close()
    with pytest.raises(ValueError, match="publish after close"):
        topics.publish(result)



def test_live_detections_carry_the_track_id(fake_msgs):
    _, modules = fake_msgs
    cones_cls = modules["vision_msgs.msg"].Detection2DArray
    diag_cls = modules["diagnostic_msgs.msg"].DiagnosticArray
    pub = FakePublisher(cones_cls, "/c", None)
    topics = RosTopicPublisher((pub, cones_cls), (FakePublisher(diag_cls, "/d", None), diag_cls),
                               frame_id="cam_front")
    result = _result()
    result.cones = [dataclasses.replace(c, track_id=40 + k, range_m=6.0)
                    for k, c in enumerate(result.cones)]
    topics.publish(result)
    assert [d.id for d in pub.messages[0].detections] == ["40", "41"]
    topics.close()

def test_a_camera_warning_makes_the_diagnostics_warn(fake_msgs):
    _, modules = fake_msgs
    cones_cls = modules["vision_msgs.msg"].Detection2DArray
    diag_cls = modules["diagnostic_msgs.msg"].DiagnosticArray
    said = {"warning": None}
    topics = RosTopicPublisher((FakePublisher(cones_cls, "/c", None), cones_cls),
                               (FakePublisher(diag_cls, "/d", None), diag_cls),
                               health=lambda: {"camera_blur": 2.9},
                               warning=lambda: said["warning"])
    topics.publish(_result())
    (status,) = topics.diagnostics_fields(STAMP + 1)["status"]
    assert status["level"] == ros_msgs.DIAG_OK and status["message"] == "ok"
    said["warning"] = "camera: blur 2.9 (line 2.2, 100% of the last 12 frames read)"
    (status,) = topics.diagnostics_fields(STAMP + 2)["status"]
    assert status["level"] == ros_msgs.DIAG_WARN and status["message"] == said["warning"]
    assert {"key": "camera_blur", "value": "2.900"} in status["values"]
    # A failed frame still outranks it.
    topics.publish(dataclasses.replace(_result(), error="bad frame"))
    (status,) = topics.diagnostics_fields(STAMP + 3)["status"]
    assert status["level"] == ros_msgs.DIAG_ERROR
    topics.close()


# ---- parameters -> config ------------------------------------------------------------------

def test_parameters_map_onto_the_node_config():
    defaults = {name: value for name, value, _ in PARAMETERS}
    config = config_from_parameters(defaults)
    assert config.model.path == "models/cone_classifier.cpu.int8.onnx"
    assert config.source.uri is None
    assert choose_input(config, defaults["image_topic"]) == ("topic", "/camera/image_raw")
    params = {**defaults, "model": "models/x.int8.engine", "camera": "csi://0",
              "overrides": "model.score_threshold=0.3; proposer.max_candidates=8\n"}
    config = config_from_parameters(params)
    assert config.model.path == "models/x.int8.engine" and config.source.uri == "csi://0"
    assert config.model.score_threshold == 0.3 and config.proposer.max_candidates == 8
    assert choose_input(config, "/camera/image_raw") == ("camera", "csi://0")
    assert split_overrides(["a.b=1", " ", "c=2"]) == ["a.b=1", "c=2"]
    with pytest.raises(ConfigError, match="proposer.max_candidate"):
        config_from_parameters({**defaults, "overrides": ["proposer.max_candidate=3"]})
    with pytest.raises(ConfigError, match="nope.yaml"):
        config_from_parameters({**defaults, "config_file": "nope.yaml"})
    with pytest.raises(RosNodeError, match="image_topic"):
        choose_input(config_from_parameters(defaults), "")


# ---- Image -> numpy, newest-frame slot -------------------------------------------------------

def _image_msg(ts, image, encoding, stamp=(1764201600, 5_000_000), frame_id="cam"):
    Image = ts.types["sensor_msgs/msg/Image"]
    Header = ts.types["std_msgs/msg/Header"]
    Time = ts.types["builtin_interfaces/msg/Time"]
    h, w = image.shape[:2]
    step = w * (image.shape[2] if image.ndim == 3 else 1)
    return Image(header=Header(stamp=Time(sec=stamp[0], nanosec=stamp[1]), frame_id=frame_id),
                 height=h, width=w, encoding=encoding, is_bigendian=0, step=step,
                 data=np.ascontiguousarray(image).reshape(-1))


def test_topic_source_decodes_images_and_keeps_only_the_newest():
    ts = ros_msgs.build_typestore()
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 30
    source = TopicSource("/camera/image_raw")
    source.put_message(_image_msg(ts, bgr[..., ::-1], "rgb8"))
    first = source.read(timeout=0)
    assert first.image.shape == (4, 5, 3) and first.image[0, 0].tolist() == [10, 20, 30]
    assert first.stamp == pytest.approx(1764201600.005) and source.frame_id == "cam"
    mono = np.arange(20, dtype=np.uint8).reshape(4, 5)
    source.put_message(_image_msg(ts, bgr, "bgr8", stamp=(1, 0)))
    source.put_message(_image_msg(ts, mono, "mono8", stamp=(2, 0)))
    newest = source.read(timeout=0)
    assert newest.stamp == 2.0 and newest.image[0, 3].tolist() == [3, 3, 3]
    assert source.dropped == 1 and source.received == 3
    assert source.read(timeout=0) is None
    bad = _image_msg(ts, bgr, "bgr8")
    bad.encoding = "yuv422"
    source.put_message(bad)
    broken = source.read(timeout=0)
    assert broken.image is None and "yuv422" in broken.error and source.errors == 1
    # close() wakes a reader blocked in the pipeline thread and ends the iteration.
    frames = []
    reader = threading.Thread(target=lambda: frames.extend(source))
    reader.start()
    time.sleep(0.05)
    source.close()
    reader.join(2.0)
    assert not reader.is_alive() and frames == []


# ---- the node over a fake rclpy --------------------------------------------------------------


@pytest.fixture(params=["lifecycle", "plain"])
def fake_rclpy(request, monkeypatch, fake_msgs):
    ts, _ = fake_msgs
    sensor = QoS(depth=1, reliability="best_effort")
    rclpy = types.ModuleType("rclpy")
    rclpy.calls = []

    def init(args):
        rclpy.calls.append(("init", list(args)))
        it = iter(args[args.index("--ros-args") + 1:] if "--ros-args" in args else [])
        for flag in it:
            if flag == "-p":
                key, _, value = next(it).partition(":=")
                ros_doubles.CLI_PARAMETERS[key] = value

    rclpy.init, rclpy.ok = init, lambda: True
    rclpy.try_shutdown = lambda: rclpy.calls.append(("shutdown",))
    monkeypatch.setattr(ros_doubles, "CLI_PARAMETERS", {})

    class Executor:
        def add_node(self, node):
            rclpy.calls.append(("add_node", node))

        def remove_node(self, node):
            rclpy.calls.append(("remove_node", node))

        def spin_once(self, timeout_sec=None):
            raise KeyboardInterrupt  # Ctrl-C on the first spin

    modules = {
        "rclpy": rclpy,
        "rclpy.executors": types.SimpleNamespace(SingleThreadedExecutor=Executor,
                                                 ExternalShutdownException=RuntimeError),
        "rclpy.qos": types.SimpleNamespace(QoSProfile=QoS, qos_profile_sensor_data=sensor),
        "rclpy.node": types.SimpleNamespace(Node=FakeNode),
        "rcl_interfaces": types.ModuleType("rcl_interfaces"),
        "rcl_interfaces.msg": types.SimpleNamespace(ParameterDescriptor=lambda description: (
            types.SimpleNamespace(description=description, dynamic_typing=False))),
        "rclpy.lifecycle": (types.SimpleNamespace(LifecycleNode=FakeLifecycleNode,
                                                  TransitionCallbackReturn=Return)
                            if request.param == "lifecycle" else None),  # None: ImportError
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    backend = FakeBackend()
    import node.infer

    monkeypatch.setattr(node.infer, "load_backend", lambda path, **kw: backend)
    return request.param, ts, sensor, backend


def test_node_lifecycle_subscribes_with_sensor_qos_and_publishes_stamped_cones(fake_rclpy):
    kind, ts, sensor_qos, backend = fake_rclpy
    cls = build_node_class()
    assert cls.is_lifecycle == (kind == "lifecycle")
    # Sync: the pipelined loop publishes frame t only once frame t+1 has been captured.
    node = cls(parameter_overrides={"overrides": ["model.score_threshold=0.4",
                                                  "pipeline.sync=true",
                                                  # one drawn blue cone: the colour proposer,
                                                  # boxes as proposed (a flat triangle)
                                                  "proposer.kind=colour",
                                                  "proposer.refiner_model=null"],
                                    "annotated_topic": "/perception/cones/image/compressed"})
    assert node.descriptors["overrides"].dynamic_typing is True
    assert node.on_configure(None) == cls.Return.SUCCESS
    assert node.config.model.score_threshold == 0.4
    topics = {p.topic: p for p in node.publishers}
    assert set(topics) == {"/perception/cones", "/diagnostics",
                           "/perception/cones/image/compressed"}
    assert topics["/perception/cones"].qos.depth == 10
    assert topics["/perception/cones"].qos.reliability == "reliable"
    assert topics["/perception/cones/image/compressed"].qos is sensor_qos
    assert not backend.active  # the model is loaded in on_activate, not on_configure

    assert node.on_activate(None) == cls.Return.SUCCESS
    assert backend.active and node.subscriptions[0].topic == "/camera/image_raw"
    assert node.subscriptions[0].qos is sensor_qos
    assert (sensor_qos.depth, sensor_qos.reliability) == (1, "best_effort")
    image = np.full((240, 320, 3), 90, np.uint8)
    cv2.fillConvexPoly(image, np.array([[150, 100], [130, 160], [170, 160]]), (200, 80, 10))
    node.subscriptions[0].callback(_image_msg(ts, image, "bgr8", stamp=(1764201600, 250_000_000),
                                              frame_id="cam_left"))
    cones_pub = topics["/perception/cones"]
    deadline = time.monotonic() + 10
    while not cones_pub.messages and time.monotonic() < deadline:
        time.sleep(0.01)
    (msg,) = cones_pub.messages
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1764201600, 250_000_000)
    assert msg.header.frame_id == "cam_left"
    (det,) = msg.detections
    assert det.results[0].hypothesis.class_id == "blue_cone"
    assert det.results[0].hypothesis.score > 0.9
    # The box is the proposer's box for this frame (proposal tuning is not under test here).
    from node.propose import build_proposer

    (x1, y1, x2, y2), = build_proposer(node.config.proposer).propose(Frame(0, 0.0, image))
    # It covers the drawn cone (x 130..170, y 100..160), with at most the proposer's margin.
    assert x1 <= 131 and x2 >= 169 and x2 - x1 <= 60 and y1 <= 101 and y2 >= 159
    assert det.bbox.center.position.x == pytest.approx((x1 + x2) / 2, abs=1e-3)
    assert det.bbox.center.position.y == pytest.approx((y1 + y2) / 2, abs=1e-3)
    assert (det.bbox.size_x, det.bbox.size_y) == pytest.approx((x2 - x1, y2 - y1), abs=1e-3)
    # Diagnostics come from the node's timer (1 s), not from the frames.
    assert topics["/diagnostics"].messages == []
    (timer,) = node.timers
    assert timer.period == 1.0
    timer.callback()
    (diag,) = topics["/diagnostics"].messages
    values = {kv.key: kv.value for kv in diag.status[0].values}
    assert {"propose_ms_p50", "infer_ms_p90", "total_ms_p99", "fps"} <= set(values)
    assert (values["frames"], values["received"], values["dropped"]) == ("1", "1", "0")
    assert diag.header.frame_id == "cam_left"

    assert node.on_deactivate(None) == cls.Return.SUCCESS
    assert not backend.active and node.subscriptions == [] and node.timers == []
    assert node.on_cleanup(None) == cls.Return.SUCCESS and node.publishers == []


def test_node_configure_failure_is_one_logged_line(fake_rclpy):
    cls = build_node_class()
    node = cls(parameter_overrides={"config_file": "missing/node.yaml"})
    assert node.on_configure(None) == cls.Return.FAILURE
    assert node.logs == ["configure failed: missing/node.yaml: config file not found"]
    assert node.publishers == []


def test_module_imports_and_main_fails_cleanly_without_rclpy():
    code = ("import sys, node.ros2.lifecycle\n"
            "print(','.join(m for m in ('rclpy', 'vision_msgs', 'cv_bridge') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stderr
    # rclpy made unimportable (it may be installed here: make install-ros).
    no_rclpy = ("import runpy, sys\nsys.modules['rclpy'] = None\nsys.argv = ['node.ros2', "
                "'--ros-args']\nrunpy.run_module('node.ros2', run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", no_rclpy], cwd=ROOT, capture_output=True,
                         text=True, check=False, timeout=60)
    assert run.returncode == 3, run.stderr
    assert run.stdout == "" and len(run.stderr.strip().splitlines()) == 1
    assert "source /opt/ros/<distro>/setup.bash" in run.stderr and "Traceback" not in run.stderr


def test_main_exits_1_when_autostart_fails_and_0_on_ctrl_c(fake_rclpy):
    from node.ros2 import lifecycle as ros2

    rclpy = sys.modules["rclpy"]
    # A bad config: configure fails, main returns 1 so that systemd restarts the node.
    assert ros2.main(["prog", "--ros-args", "-p", "config_file:=missing/node.yaml"]) == 1
    assert rclpy.calls[0] == ("init", ["prog", "--ros-args", "-p",
                                       "config_file:=missing/node.yaml"])
    node = rclpy.calls[1][1]
    assert node.logs == ["configure failed: missing/node.yaml: config file not found"]
    assert node.destroyed and rclpy.calls[-1] == ("shutdown",)
    # A good config: configure + activate, then Ctrl-C during spin is a clean exit.
    ros_doubles.CLI_PARAMETERS.clear()
    rclpy.calls.clear()
    assert ros2.main(["prog"]) == 0
    node = rclpy.calls[1][1]
    assert any(line.startswith("active: ") for line in node.logs)
    assert node.destroyed and node._backend is None  # on_shutdown released the model


def test_pipeline_thread_reports_a_lost_camera_in_one_line():
    from node.ros2.lifecycle import PipelineThread
    from node.sources.files import SourceError

    class LostCamera:
        def run(self, source):
            raise SourceError("csi://0: camera lost, gave up after 3 reconnect attempts\nmore")

        def request_stop(self):
            pass

    ended = []
    runner = PipelineThread(LostCamera(), TopicSource("csi://0"),
                            lambda summary, error: ended.append((summary, error))).start()
    runner._thread.join(5)
    message = "SourceError: csi://0: camera lost, gave up after 3 reconnect attempts"
    assert ended == [(None, message)]
    assert runner.stop() is None and not runner.alive


# ---- parameter checks and guards, boxes from a topic (no ROS) -------------------------------

def test_parameter_values_are_checked_with_the_parameter_named():
    from node.ros2.bridge import check_parameters

    defaults = {name: value for name, value, _ in PARAMETERS}
    check_parameters(defaults)
    for name, value, allowed in (("image_transport", "h264", "raw or compressed"),
                                 ("input_qos", "fast", "sensor_data, reliable or best_effort"),
                                 ("diagnostics_period", 0.0, "0.05 to 60"),
                                 ("proposals_tolerance_ms", -1.0, "0 to 10000")):
        with pytest.raises(RosNodeError, match=f"^parameter {name}: .*{allowed}"):
            check_parameters({**defaults, name: value})
    with pytest.raises(RosNodeError, match="^parameter camera: .*not allowed in a camera URI"):
        check_parameters({**defaults, "camera": 'rtsp://cam/x" ! fakesink'})


def test_changes_to_files_binds_ports_and_cameras_are_guarded():
    from node.ros2.bridge import guarded_change, transport_topic

    for name in ("config_file", "model", "camera"):
        assert guarded_change(name, "a", "b").startswith(f"parameter {name} ")
        assert guarded_change(name, "a", "a") is None
    base = "model.score_threshold=0.5"
    for item in ("publishers.jsonl=x.jsonl", "publishers.zmq=tcp://0.0.0.0:1",
                 "metrics.prometheus_port=9100", "metrics.prometheus_host=0.0.0.0",
                 "model.path=m.onnx", "source.uri=csi://0", "proposer.heatmap_model=p.onnx",
                 "publishers={jsonl: x}", "metrics={}"):
        reason = guarded_change("overrides", base, f"{base}; {item}")
        assert reason and reason.startswith("parameter overrides: " + item.split("=")[0])
        # Taking such an override away is guarded as well.
        assert guarded_change("overrides", [base, item], [base])
    assert guarded_change("overrides", base, "model.score_threshold=0.7") is None
    assert guarded_change("image_topic", "/a", "/b") is None
    assert transport_topic("/cam/image/", "compressed") == "/cam/image/compressed"
    assert transport_topic("/cam/image", "raw") == "/cam/image"


def test_topic_boxes_are_matched_to_frames_by_the_nearest_stamp_within_the_tolerance():
    from node.ros2.bridge import TopicBoxProposer

    proposer = TopicBoxProposer(max_candidates=2, tolerance_s=0.05)
    assert proposer.suppress_overlaps is False  # boxes are one object each, as given
    image = np.zeros((100, 200, 3), np.uint8)
    small, big, other = [10, 10, 20, 30], [50, 20, 90, 80], [0, 0, 5, 5]
    proposer.put(10.00, np.array([small, big, other], np.float32))
    proposer.put(10.10, np.array([other], np.float32))
    # Nearest within 50 ms: the first message; the cap keeps the two largest, largest first.
    boxes = proposer.propose(Frame(0, 10.03, image))
    assert boxes.tolist() == [big, small]
    assert proposer.propose(Frame(1, 10.09, image)).tolist() == [other]
    # 70 ms from both: no candidates, after waiting at most the tolerance for late boxes.
    t0 = time.monotonic()
    assert len(proposer.propose(Frame(2, 10.17, image))) == 0
    assert time.monotonic() - t0 < 1.0
    # Boxes arriving while a frame waits are used.
    later = threading.Timer(0.01, proposer.put, (10.30, np.array([small], np.float32)))
    later.start()
    assert proposer.propose(Frame(3, 10.30, image)).tolist() == [small]
    later.join()
    assert proposer.health == {"proposals_received": 3, "proposals_matched": 3,
                               "proposals_unmatched": 1}
