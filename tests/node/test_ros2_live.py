"""The ROS 2 node on real rclpy (Jazzy, Fast DDS) with the real vision_msgs (``make install-ros``).

A driver node publishes rendered frames (``export.synth``, exact labels) as
``sensor_msgs/Image`` or ``CompressedImage`` and reads what the cone node publishes, over DDS on
this machine. Checked: the detections' header (the input image's stamp and frame_id), their
classes against the rendered cones, the diagnostics rate (about 1 Hz whatever the frame rate),
the drop count, LiDAR-style boxes as proposals, every lifecycle transition, the parameter guards,
and ``python -m node.ros2`` started and stopped with SIGINT.

Without rclpy these tests skip; under ``make test-ros`` (``CONE_NODE_REQUIRE_ROS=1``) they fail.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from node.cli.demo import SYNTH_BODY_MASK
from node.infer.postprocess import iou_matrix

ROOT = Path(__file__).resolve().parents[2]
REQUIRE = os.environ.get("CONE_NODE_REQUIRE_ROS") == "1"
# DDS discovery stays on this machine, in a domain of its own per test run.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))

pytestmark = pytest.mark.ros
T0 = 1764201600  # frame i is stamped T0 + i / 10 s
BODY_MASK = f"proposer.body_mask={json.dumps(SYNTH_BODY_MASK)}"


def _import_ros():
    try:
        import rclpy
        import rclpy.lifecycle
        from vision_msgs.msg import Detection2DArray  # noqa: F401
    except ImportError as exc:
        message = f"real rclpy and vision_msgs are needed (make install-ros): {exc}"
        if REQUIRE:
            pytest.fail(message)
        pytest.skip(message)
    return rclpy


@pytest.fixture(scope="module")
def rclpy():
    rclpy = _import_ros()
    rclpy.init()
    yield rclpy
    rclpy.try_shutdown()


@pytest.fixture(scope="module")
def clip():
    from export.synth import render_clip

    return list(render_clip(3, 16))


class Harness:
    """The cone node and a driver node in one multi-threaded executor, spinning in a thread."""

    def __init__(self, rclpy, name: str, **params):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.parameter import Parameter
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from vision_msgs.msg import Detection2DArray

        from node.ros2.lifecycle import build_node_class

        self.rclpy = rclpy
        self.prefix = f"/{name}"
        defaults = {"autostart": False, "image_topic": f"{self.prefix}/image",
                    "detections_topic": f"{self.prefix}/cones",
                    "diagnostics_topic": f"{self.prefix}/diagnostics",
                    "overrides": [BODY_MASK]}
        params = {k: v.replace("{prefix}", self.prefix) if isinstance(v, str) else v
                  for k, v in {**defaults, **params}.items()}
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        self.node = build_node_class()(name, parameter_overrides=overrides)
        self.driver = rclpy.create_node(f"{name}_driver")
        transport = params.get("image_transport", "raw")
        self.compressed = transport == "compressed"
        image_topic = params["image_topic"] + ("/compressed" if self.compressed else "")
        self.image_pub = self.driver.create_publisher(
            CompressedImage if self.compressed else Image, image_topic, qos_profile_sensor_data)
        self.boxes_pub = self.driver.create_publisher(
            Detection2DArray, params.get("proposals_topic") or f"{self.prefix}/lidar_boxes",
            qos_profile_sensor_data)
        self.cones: list = []
        self.diagnostics: list = []  # (monotonic arrival, message)
        self.lock = threading.Lock()
        self.driver.create_subscription(Detection2DArray, params["detections_topic"],
                                        self._on_cones, 50)
        self.driver.create_subscription(DiagnosticArray, params["diagnostics_topic"],
                                        self._on_diag, 50)
        self.executor = MultiThreadedExecutor(num_threads=3)
        self.executor.add_node(self.node)
        self.executor.add_node(self.driver)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_cones(self, msg):
        with self.lock:
            self.cones.append(msg)

    def _on_diag(self, msg):
        with self.lock:
            self.diagnostics.append((time.monotonic(), msg))

    def start(self):
        from rclpy.lifecycle import TransitionCallbackReturn

        assert self.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert self.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        self.wait_for_subscribers()
        return self

    def wait_for_subscribers(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while self.image_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.image_pub.get_subscription_count() > 0, "the node did not subscribe"

    def image_message(self, image, index, frame_id="cam_front"):
        from sensor_msgs.msg import CompressedImage, Image

        if self.compressed:
            msg = CompressedImage()
            msg.format = "jpeg"
            msg.data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        else:
            msg = Image()
            msg.height, msg.width = image.shape[:2]
            msg.encoding, msg.step = "bgr8", image.shape[1] * 3
            msg.data = image.tobytes()
        msg.header.frame_id = frame_id
        return self.restamp(msg, index)

    @staticmethod
    def restamp(msg, index):
        """Give a message the stamp of frame ``index`` (10 frames a second from ``T0``)."""
        msg.header.stamp.sec, msg.header.stamp.nanosec = T0 + index // 10, (index % 10) * 10**8
        return msg

    def boxes_message(self, boxes, index, offset_ns=0):
        from vision_msgs.msg import Detection2D, Detection2DArray

        msg = Detection2DArray()
        stamp_ns = (index % 10) * 10**8 + offset_ns
        msg.header.stamp.sec = T0 + index // 10 + stamp_ns // 10**9
        msg.header.stamp.nanosec = stamp_ns % 10**9
        msg.header.frame_id = "lidar"
        for x1, y1, x2, y2 in np.asarray(boxes, np.float64).tolist():
            det = Detection2D()
            det.bbox.center.position.x = (x1 + x2) / 2
            det.bbox.center.position.y = (y1 + y2) / 2
            det.bbox.size_x, det.bbox.size_y = x2 - x1, y2 - y1
            msg.detections.append(det)
        return msg

    def cones_for(self, index, timeout=30.0):
        """The detections stamped as frame ``index``, waiting for them."""
        sec, nanosec = T0 + index // 10, (index % 10) * 10**8
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for msg in self.cones:
                    if (msg.header.stamp.sec, msg.header.stamp.nanosec) == (sec, nanosec):
                        return msg
            time.sleep(0.01)
        return None

    def close(self):
        self.executor.shutdown(timeout_sec=5)
        self.thread.join(5)
        if not self.node.finalized:
            from node.ros2.lifecycle import _shutdown

            _shutdown(self.node)
        self.node.destroy_node()
        self.driver.destroy_node()


@pytest.fixture()
def harness(rclpy, request):
    made = []

    def make(**params):
        name = re.sub(r"\W", "_", f"cone_{request.node.name[5:25]}_{len(made)}")
        made.append(Harness(rclpy, name, **params))
        return made[-1]

    yield make
    for h in made:
        h.close()


def _score(scenes, messages, min_height=16.0):
    """(found, correct, total) of the rendered cones >= ``min_height`` px tall: greedy IoU >= 0.5
    matching, and whether the matched detection has the cone's class."""
    found = correct = total = 0
    for scene, msg in zip(scenes, messages):
        tall = np.flatnonzero(scene.boxes[:, 3] - scene.boxes[:, 1] >= min_height)
        total += len(tall)
        if not len(tall) or msg is None or not msg.detections:
            continue
        det = np.array([[d.bbox.center.position.x - d.bbox.size_x / 2,
                         d.bbox.center.position.y - d.bbox.size_y / 2,
                         d.bbox.center.position.x + d.bbox.size_x / 2,
                         d.bbox.center.position.y + d.bbox.size_y / 2] for d in msg.detections])
        m = iou_matrix(scene.boxes[tall], det)
        used_g, used_d = set(), set()
        for g, d in zip(*np.unravel_index(np.argsort(-m, axis=None), m.shape)):
            if m[g, d] < 0.5:
                break
            if g in used_g or d in used_d:
                continue
            used_g.add(g)
            used_d.add(d)
            found += 1
            label = msg.detections[d].results[0].hypothesis.class_id
            correct += label == scene.labels[tall[g]]
    return found, correct, total


# ---- frames in, cones out -----------------------------------------------------------------

@pytest.mark.parametrize("transport", ["raw", "compressed"])
def test_rendered_frames_give_detections_stamped_as_their_image_with_true_classes(
        harness, clip, transport):
    h = harness(image_transport=transport).start()
    scenes = clip[:10]
    messages = []
    for i, scene in enumerate(scenes):  # one frame at a time: none is dropped
        h.image_pub.publish(h.image_message(scene.image, i, frame_id=f"cam_{i % 2}"))
        messages.append(h.cones_for(i))
        assert messages[-1] is not None, f"no detections for frame {i}"
    for i, msg in enumerate(messages):
        assert msg.header.frame_id == f"cam_{i % 2}"
        assert all(d.header.frame_id == msg.header.frame_id for d in msg.detections)
        assert all(d.header.stamp == msg.header.stamp for d in msg.detections)
    found, correct, total = _score(scenes, messages)
    print(f"{transport}: recall {found}/{total}, label accuracy {correct}/{found}")
    # Measured here: raw 76 of 77 found, all 76 with the right class; compressed (JPEG 90)
    # 75 of 77, all 75 right.
    assert total >= 60
    assert found / total >= 0.9 and correct / found >= 0.95


def test_diagnostics_come_about_once_a_second_with_percentiles_and_drops(harness, clip):
    # The driver publishes from this process, beside the node. With the classifier on one
    # thread (model.threads=1, the default) the busy pipeline thread kept the GIL from the
    # driver's loop and the 1 Hz timer on 2 cores (15-20 frames and 2-4 diagnostics in 5 s);
    # two threads leave the pipeline idle between frames, which is what this test needs.
    h = harness(diagnostics_period=1.0, overrides=["model.threads=2"]).start()
    # Messages are built once and restamped: filling a large Image message in Python takes
    # longer than the frame interval on a busy machine.
    pool = [h.image_message(scene.image, i) for i, scene in enumerate(clip[:10])]
    published = 0
    t_start = time.monotonic()
    while time.monotonic() - t_start < 5.0:  # frames at about 20 Hz, faster than 1 Hz by far
        h.image_pub.publish(h.restamp(pool[published % len(pool)], published))
        published += 1
        time.sleep(0.05)
    elapsed = time.monotonic() - t_start
    # Then a burst, far faster than the node: only the newest frame waits, the rest are dropped.
    for _ in range(40):
        h.image_pub.publish(h.restamp(pool[published % len(pool)], published))
        published += 1
    time.sleep(2.5)  # the last diagnostics of the run, with the node idle
    t_end = time.monotonic()
    with h.lock:
        during = [m for t, m in h.diagnostics if t_start <= t <= t_end]
        last = h.diagnostics[-1][1]
    window = t_end - t_start
    print(f"{published - 40} frames in {elapsed:.1f} s, {len(during)} diagnostics messages "
          f"in {window:.1f} s")
    assert published - 40 >= 25
    (status,) = last.status
    values = {kv.key: kv.value for kv in status.values}
    received, frames, dropped = (int(values[k]) for k in ("received", "frames", "dropped"))
    print(f"last diagnostics: received {received}, processed {frames}, dropped {dropped}, "
          f"fps {values['fps']}")
    # About 1 Hz over the whole window, the idle end included (while frames arrive, the driver
    # in this process and the node share one interpreter, and a busy machine has delayed the
    # timer to 2 messages in 5 s), and far fewer than one per frame.
    assert 0.4 * window <= len(during) <= 2.0 * window
    assert len(during) <= frames / 3
    # Every received frame was processed or dropped (at most two were still in flight), and
    # the burst was dropped rather than queued (DDS itself drops part of it with sensor QoS;
    # measured here: 107 of 138 received, 101 processed, 6 dropped by the node).
    assert received >= 0.9 * (published - 40)
    assert 0 <= received - frames - dropped <= 2
    assert dropped >= 2
    p50, p90, p99 = (float(values[f"total_ms_{q}"]) for q in ("p50", "p90", "p99"))
    assert 0 < p50 <= p90 <= p99
    assert float(values["fps"]) > 0 and status.name == "cone_node: latency"


def test_a_blurred_camera_turns_the_diagnostics_to_warn_and_a_sharp_one_back(harness, clip):
    """The camera watch on real rclpy: frames blurred far past the check's line (a Gaussian
    of 4 px) make the latency diagnostics WARN with the watch's one-line warning; sharp
    frames clear it. The watch reads a frame every 0.1 s of stamps, over the last 4."""
    from diagnostic_msgs.msg import DiagnosticStatus

    h = harness(diagnostics_period=0.5, overrides=[
        BODY_MASK, "model.threads=2", "camera_watch.every_s=0.1",
        "camera_watch.window=4"]).start()
    blurred = [h.image_message(cv2.GaussianBlur(s.image, (0, 0), 4.0), i)
               for i, s in enumerate(clip[:8])]
    sharp = [h.image_message(s.image, i) for i, s in enumerate(clip[:8])]

    def latest():
        with h.lock:
            return h.diagnostics[-1][1].status[0] if h.diagnostics else None

    def feed_until(pool, start, check):
        index = start
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            h.image_pub.publish(h.restamp(pool[index % len(pool)], index))
            index += 1
            time.sleep(0.05)
            status = latest()
            if status is not None and check(status):
                return index, status
        return index, latest()

    index, status = feed_until(blurred, 0, lambda s: s.level == DiagnosticStatus.WARN
                               and s.message.startswith("camera:"))
    assert status is not None and status.level == DiagnosticStatus.WARN, status
    assert status.message.startswith("camera: blur ") and "python -m node check" in \
        status.message
    values = {kv.key: kv.value for kv in status.values}
    assert float(values["camera_blur"]) > 2.2
    _, status = feed_until(sharp, index, lambda s: s.level == DiagnosticStatus.OK)
    assert status.level == DiagnosticStatus.OK, status.message


def test_lidar_boxes_on_a_topic_are_the_candidates_matched_by_stamp(harness, clip):
    h = harness(proposals_topic="{prefix}/lidar_boxes").start()
    deadline = time.monotonic() + 10
    while h.boxes_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    scenes = clip[:6]
    messages = []
    for i, scene in enumerate(scenes):
        tall = scene.boxes[scene.boxes[:, 3] - scene.boxes[:, 1] >= 16]
        h.boxes_pub.publish(h.boxes_message(tall, i, offset_ns=20_000_000))  # 20 ms off
        # The boxes must be there when the frame is taken (the node waits for them only up to
        # the 50 ms tolerance, less than a busy 2-core machine may take to deliver them).
        assert _eventually(lambda n=i + 1: h.node._proposer.received >= n)
        h.image_pub.publish(h.image_message(scene.image, i))
        messages.append(h.cones_for(i))
        assert messages[-1] is not None
    for scene, msg in zip(scenes, messages):
        tall = scene.boxes[scene.boxes[:, 3] - scene.boxes[:, 1] >= 16]
        det = np.array([[d.bbox.center.position.x - d.bbox.size_x / 2,
                         d.bbox.center.position.y - d.bbox.size_y / 2,
                         d.bbox.center.position.x + d.bbox.size_x / 2,
                         d.bbox.center.position.y + d.bbox.size_y / 2] for d in msg.detections])
        # Only the given boxes are classified: every detection is one of them, as it was sent.
        assert len(det) and iou_matrix(det, tall).max(axis=1).min() > 0.99
    found, correct, total = _score(scenes, messages)
    print(f"boxes from a topic: {found}/{total} detected, {correct} with the right class")
    assert found / total >= 0.95 and correct / found >= 0.95  # measured: 44 of 44, all right
    # Boxes stamped 200 ms away from the frame (tolerance 50 ms) are not used.
    h.boxes_pub.publish(h.boxes_message(clip[6].boxes, 6, offset_ns=200_000_000))
    assert _eventually(lambda: h.node._proposer.received >= 7)
    h.image_pub.publish(h.image_message(clip[6].image, 6))
    msg = h.cones_for(6)
    assert msg is not None and len(msg.detections) == 0


# ---- lifecycle ----------------------------------------------------------------------------

def _eventually(check, timeout=10.0) -> bool:
    """``check()`` turned true within ``timeout`` s (the ROS graph is updated asynchronously)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _published_topics(h) -> set:
    return {name for name, _ in h.node.get_publisher_names_and_types_by_node(
        h.node.get_name(), "/")}


def _state(h) -> str:
    """The node's state, asked through its lifecycle get_state service."""
    from lifecycle_msgs.srv import GetState

    client = h.driver.create_client(GetState, f"/{h.node.get_name()}/get_state")
    try:
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(GetState.Request())
        deadline = time.monotonic() + 10
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        return future.result().current_state.label
    finally:
        h.driver.destroy_client(client)


def test_configure_and_cleanup(harness):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    h = harness()
    assert _state(h) == "unconfigured" and h.node.config is None
    assert h.node.trigger_configure() == R.SUCCESS
    assert _state(h) == "inactive" and h.node.config is not None
    assert _eventually(lambda: {f"{h.prefix}/cones", f"{h.prefix}/diagnostics"}
                       <= _published_topics(h))
    assert h.node.trigger_cleanup() == R.SUCCESS
    assert _state(h) == "unconfigured" and h.node.config is None
    assert _eventually(lambda: f"{h.prefix}/cones" not in _published_topics(h))


def test_configure_fails_in_one_line_on_a_bad_parameter(harness):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    h = harness(config_file="missing/node.yaml")
    assert h.node.trigger_configure() == R.FAILURE
    assert _state(h) == "unconfigured"


def test_activate_and_deactivate(harness, clip):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    h = harness().start()
    assert _state(h) == "active" and h.node.active
    h.image_pub.publish(h.image_message(clip[0].image, 0))
    assert h.cones_for(0) is not None
    assert h.node.trigger_deactivate() == R.SUCCESS
    assert _state(h) == "inactive" and not h.node.active
    # The image subscription is gone.
    assert _eventually(lambda: h.image_pub.get_subscription_count() == 0)
    h.image_pub.publish(h.image_message(clip[1].image, 1))
    assert h.cones_for(1, timeout=1.5) is None
    # Active again: frames flow again.
    assert h.node.trigger_activate() == R.SUCCESS
    h.wait_for_subscribers()
    h.image_pub.publish(h.image_message(clip[2].image, 2))
    assert h.cones_for(2) is not None


def test_shutdown_from_active(harness, clip):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    h = harness().start()
    h.image_pub.publish(h.image_message(clip[0].image, 0))
    assert h.cones_for(0) is not None
    assert h.node.trigger_shutdown() == R.SUCCESS
    assert _state(h) == "finalized" and h.node.finalized
    assert h.node.config is None and h.node._backend is None and h.node._runner is None


# ---- parameter guards ---------------------------------------------------------------------

def test_files_binds_and_cameras_cannot_change_while_active(harness, tmp_path):
    from rclpy.parameter import Parameter

    h = harness().start()

    def set_(name, value):
        (result,) = h.node.set_parameters([Parameter(name, value=value)])
        return result

    for name, value in (("config_file", str(tmp_path / "other.yaml")),
                        ("model", str(tmp_path / "model.onnx")),
                        ("camera", "rtsp://10.0.0.9/stream")):
        result = set_(name, value)
        assert not result.successful and f"parameter {name}" in result.reason
        assert "\n" not in result.reason and h.node.get_parameter(name).value != value
    for item in ("publishers.jsonl=" + str(tmp_path / "x.jsonl"),
                 "publishers.zmq=tcp://0.0.0.0:5556", "metrics.prometheus_port=9100",
                 "metrics.prometheus_host=0.0.0.0", "source.uri=csi://1",
                 'publishers={"jsonl": "x.jsonl"}'):
        result = set_("overrides", [BODY_MASK, item])
        assert not result.successful, item
        assert result.reason.startswith("parameter overrides: ")
    # A threshold is not guarded; a topic name neither.
    assert set_("overrides", [BODY_MASK, "model.score_threshold=0.6"]).successful
    assert set_("annotated_topic", f"{h.prefix}/annotated").successful
    # A bad value is refused in any state, with the parameter named.
    result = set_("image_transport", "theora")
    assert not result.successful and result.reason.startswith("parameter image_transport: ")
    h.node.trigger_deactivate()
    assert set_("config_file", str(tmp_path / "other.yaml")).successful
    result = set_("camera", "rtsp://cam/x ! filesink location=/etc/passwd")
    assert not result.successful and "not allowed in a camera URI" in result.reason


# ---- python -m node.ros2 ------------------------------------------------------------------

def test_python_m_node_ros2_runs_on_compressed_images_and_stops_on_sigint(rclpy, clip):
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage
    from vision_msgs.msg import Detection2DArray

    topic = f"/x{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k != "_ROS_WHEELS_BOOTSTRAP_COMPLETE"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.ros2", "--ros-args", "-p", f"image_topic:={topic}",
         "-p", "image_transport:=compressed", "-p", f"overrides:={BODY_MASK}",
         "-r", f"__node:=cone_cli_{os.getpid()}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node = rclpy.create_node(f"cli_driver_{os.getpid()}")
    got = []
    node.create_subscription(Detection2DArray, "/perception/cones", got.append, 10)
    pub = node.create_publisher(CompressedImage, f"{topic}/compressed", qos_profile_sensor_data)
    try:
        deadline = time.monotonic() + 60
        i = 0
        while not got and time.monotonic() < deadline and proc.poll() is None:
            if pub.get_subscription_count():
                msg = CompressedImage()
                msg.format = "jpeg"
                msg.data = cv2.imencode(".jpg", clip[i % 4].image)[1].tobytes()
                msg.header.frame_id = "cam_cli"
                msg.header.stamp.sec = T0 + i
                pub.publish(msg)
                i += 1
            rclpy.spin_once(node, timeout_sec=0.25)
        assert got, "no detections from python -m node.ros2"
        assert got[0].header.frame_id == "cam_cli" and got[0].header.stamp.sec >= T0
        assert len(got[0].detections) >= 3
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        node.destroy_node()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "active: " in out
