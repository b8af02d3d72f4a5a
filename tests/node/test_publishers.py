"""Publishers: JSONL schema, a real ZeroMQ subscriber on loopback, the ROS 2 bag read back
with rosbags (message fields checked), the annotated video, and the shared message mapping."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from node.publish import annotate, ros_msgs
from node.publish.annotate import CLASS_COLOURS, draw_cones
from node.publish.publishers import (
    BagPublisher,
    JsonlPublisher,
    PublisherError,
    VideoPublisher,
    ZmqPublisher,
    build_publishers,
    publish_all,
)
from node.types import Cone, Frame, FrameResult, label_text

STAMP0 = 1_700_000_000.25


def _result(i: int, *, error: str | None = None, cones: int = 2) -> FrameResult:
    image = None if error else np.full((120, 160, 3), 90, dtype=np.uint8)
    frame = Frame(i, STAMP0 + i * 0.05, image, f"{i:05d}.jpg", 1.5, error=error)
    found = [Cone((10.0 + i, 20.0, 30.0 + i, 60.0), "blue_cone", 0.91),
             Cone((100.0, 40.0, 120.0, 80.0), "yellow_cone", 0.875)][:cones] if not error else []
    latency = {"capture": 1.5, "propose": 2.25, "preprocess": 0.5, "infer": 4.0, "post": 0.125,
               "publish": 0.1, "total": 8.5 + i}
    return FrameResult(frame, found, latency, num_candidates=5, error=error)


def test_jsonl_records_follow_design_schema(tmp_path):
    path = tmp_path / "out" / "cones.jsonl"
    with JsonlPublisher(path) as pub:
        for i in range(3):
            pub.publish(_result(i, error="00001.jpg: unreadable image" if i == 1 else None))
    pub.close()  # idempotent
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert list(records[0]) == ["frame", "source", "stamp", "width", "height", "cones",
                                "latency_ms"]
    assert records[0]["cones"][0] == {"box": [10.0, 20.0, 30.0, 60.0], "label": "blue_cone",
                                      "score": 0.91}
    assert (records[0]["width"], records[0]["height"]) == (160, 120)
    assert records[2]["latency_ms"]["total"] == 10.5 and records[2]["source"] == "00002.jpg"
    assert records[1]["error"] == "00001.jpg: unreadable image" and records[1]["cones"] == []
    assert records[1]["width"] is None
    with pytest.raises(PublisherError, match="publish after close"):
        pub.publish(_result(3))


def test_jsonl_dash_is_stdout_and_stays_open(capsys):
    pub = JsonlPublisher("-")
    pub.publish(_result(0))
    pub.close()
    assert json.loads(capsys.readouterr().out)["frame"] == 0
    assert not sys.stdout.closed


def test_zmq_subscriber_on_loopback_receives_every_frame():
    import zmq

    pub = ZmqPublisher("tcp://127.0.0.1:0", topic=b"cones", hwm=1000)
    assert pub.endpoint.startswith("tcp://127.0.0.1:")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, 2000)
    sub.setsockopt(zmq.SUBSCRIBE, b"cones")
    sub.connect(pub.endpoint)
    try:
        # Slow joiner: PUB drops messages until the subscription has propagated. Probe with
        # health messages until one arrives; after that nothing is lost.
        deadline = time.monotonic() + 5
        while True:
            pub.publish_health({"state": "probe"})
            if sub.poll(50):
                topic, _ = sub.recv_multipart()
                assert topic == b"cones.health"
                break
            assert time.monotonic() < deadline, "subscription never propagated"
        n = 100
        for i in range(n):
            pub.publish(_result(i))
        received = []
        while len(received) < n:
            topic, payload = sub.recv_multipart()
            if topic == b"cones":
                received.append(json.loads(payload))
    finally:
        pub.close()
        sub.close(0)
        ctx.term()
    assert [r["frame"] for r in received] == list(range(n))
    assert received[7]["cones"][0]["box"] == [17.0, 20.0, 37.0, 60.0]
    assert received[7]["cones"][1]["label"] == "yellow_cone"
    assert received[7]["latency_ms"]["total"] == 15.5


def test_zmq_bind_failure_is_one_line():
    with pytest.raises(PublisherError, match="tcp://256.0.0.1:1: cannot bind ZeroMQ PUB"):
        ZmqPublisher("tcp://256.0.0.1:1")


def _read_bag(path: Path) -> dict:
    from rosbags.highlevel import AnyReader

    out: dict = {}
    with AnyReader([path]) as reader:  # no default typestore: definitions come from the bag
        for conn in reader.connections:
            out.setdefault("msgdefs", {})[conn.topic] = conn.msgdef.data
        for conn, log_ns, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            out.setdefault(conn.topic, []).append((log_ns, msg))
    return out


def test_bag_round_trip_fields(tmp_path):
    path = tmp_path / "run" / "bag"
    results = [_result(0), _result(1, error="00001.jpg: unreadable image"), _result(2, cones=0)]
    with BagPublisher(path, frame_id="cam_front", images=True, warn_total_ms=9.0) as pub:
        for r in results:
            pub.publish(r)
        pub.publish_health({"state": "reconnecting", "attempts": 2, "last_error": "read failed"},
                           STAMP0 + 1)
    assert (path / "metadata.yaml").is_file()
    bag = _read_bag(path)
    assert "vision_msgs/Point2D" in bag["msgdefs"]["/perception/cones"]

    cones = bag["/perception/cones"]
    assert len(cones) == 3
    log_ns, msg = cones[0]
    assert log_ns == 1_700_000_000_250_000_000
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1_700_000_000, 250_000_000)
    assert msg.header.frame_id == "cam_front" and len(msg.detections) == 2
    det = msg.detections[1]
    assert det.results[0].hypothesis.class_id == "yellow_cone"
    assert det.results[0].hypothesis.score == pytest.approx(0.875)
    assert (det.bbox.center.position.x, det.bbox.center.position.y) == (110.0, 60.0)
    assert (det.bbox.size_x, det.bbox.size_y) == (20.0, 40.0)
    assert det.id == "1" and det.results[0].pose.pose.orientation.w == 1.0
    assert len(cones[1][1].detections) == 0 and len(cones[2][1].detections) == 0
    assert cones[2][0] == ros_msgs.stamp_ns(STAMP0 + 0.1)

    diags = [m.status[0] for _, m in bag["/diagnostics"]]
    assert [d.name for d in diags] == ["cone_node: latency"] * 3 + ["cone_node: camera"]
    assert [d.level for d in diags] == [ros_msgs.DIAG_OK, ros_msgs.DIAG_ERROR,
                                        ros_msgs.DIAG_WARN, ros_msgs.DIAG_WARN]
    values = {kv.key: kv.value for kv in diags[0].values}
    assert values["capture_ms"] == "1.500" and values["propose_ms"] == "2.250"
    assert values["total_ms"] == "8.500" and values["cones"] == "2"
    assert values["candidates"] == "5" and values["frame"] == "0"
    assert diags[1].message == "00001.jpg: unreadable image"
    assert diags[2].message == "total 10.5 ms over budget 9 ms"
    assert {kv.key: kv.value for kv in diags[3].values}["attempts"] == "2"

    images = bag["/perception/cones/image/compressed"]
    assert len(images) == 2  # the unreadable frame has no image
    decoded = cv2.imdecode(np.asarray(images[0][1].data), cv2.IMREAD_COLOR)
    assert images[0][1].format == "jpeg" and decoded.shape == (120, 160, 3)

    with pytest.raises(PublisherError, match="bag already exists"):
        BagPublisher(path)
    BagPublisher(path, overwrite=True).close()
    assert _read_bag(path).get("/perception/cones") is None


def test_video_has_one_frame_per_result_with_class_colours(tmp_path):
    path = tmp_path / "annotated.mp4"
    results = [_result(0, error="00000.jpg: unreadable image")] + [_result(i) for i in (1, 2, 3)]
    with VideoPublisher(path, fps=10) as pub:
        for r in results:
            pub.publish(r)
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    assert len(frames) == 4 and frames[1].shape == (120, 160, 3)
    # left edge of frame 1's blue cone box (x1 = 11) is blue on the grey (90) background,
    # allowing for mp4v's chroma blur of a 1-px line
    b, _, r = frames[1][40, 11].astype(int)
    assert b > 90 + 40 and r < 90 - 30
    assert np.abs(frames[1][100, 80].astype(int) - 90).max() < 10  # untouched background
    assert float(frames[0].mean()) < 60  # dark placeholder for the unreadable frame


def test_webm_video_is_vp9_and_plays_back_every_frame(tmp_path):
    path = tmp_path / "annotated.webm"
    with VideoPublisher(path, fps=10) as pub:
        for i in (1, 2, 3):
            pub.publish(_result(i))
        assert pub.codec in ("VP90", "VP80")  # what browsers play (OpenCV's wheels lack H.264)
    cap = cv2.VideoCapture(str(path))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 3


def test_draw_cones_copies_and_colours():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    out = draw_cones(image, [Cone((20, 30, 60, 90), "yellow_cone", 0.5)], fps=30.0,
                     latency_ms=12.5)
    assert image.max() == 0 and out is not image
    assert tuple(out[60, 20]) == CLASS_COLOURS["yellow_cone"]



def _tracked(result: FrameResult) -> FrameResult:
    """The frame's cones as the tracking stage leaves them (range, position, track id)."""
    result.cones = [dataclasses.replace(c, range_m=7.4 + k, range_sigma_m=0.2,
                                        xyz=(0.5, 1.0, 7.3 + k), range_basis="size",
                                        track_id=12 + k)
                    for k, c in enumerate(result.cones)]
    return result


def test_jsonl_and_bag_carry_the_track(tmp_path):
    with JsonlPublisher(tmp_path / "c.jsonl") as pub:
        pub.publish(_tracked(_result(0)))
    cone = json.loads((tmp_path / "c.jsonl").read_text())["cones"][1]
    assert cone == {"box": [100.0, 40.0, 120.0, 80.0], "label": "yellow_cone", "score": 0.875,
                    "range_m": 8.4, "range_sigma_m": 0.2, "xyz": [0.5, 1.0, 8.3],
                    "range_basis": "size", "track_id": 13}

    path = tmp_path / "bag"
    with BagPublisher(path, frame_id="cam_front") as pub:
        pub.publish(_tracked(_result(0)))
        pub.publish(_result(1))  # untracked cones keep their index as id
    msgs = [m for _, m in _read_bag(path)["/perception/cones"]]
    assert [d.id for d in msgs[0].detections] == ["12", "13"]
    assert [d.id for d in msgs[1].detections] == ["0", "1"]


def test_annotation_tag_is_the_label_text_once_tracked(monkeypatch):
    drawn: list[str] = []
    put_text = annotate.cv2.putText
    monkeypatch.setattr(annotate.cv2, "putText",
                        lambda img, text, *a, **k: (drawn.append(text), put_text(img, text, *a,
                                                                                  **k))[1])
    cone = _tracked(_result(0, cones=1)).cones[0]
    draw_cones(np.zeros((200, 300, 3), np.uint8), [cone])
    assert drawn == [label_text(cone)] == ["blue_cone #12 7.4 m"]
    drawn.clear()
    draw_cones(np.zeros((200, 300, 3), np.uint8), [Cone((20, 30, 60, 90), "yellow_cone", 0.5)])
    assert drawn == ["yellow 0.50"]  # untracked: class and score

def test_build_publishers_and_publish_all(tmp_path):
    pubs = build_publishers(jsonl=tmp_path / "a.jsonl", video=tmp_path / "a.mp4", video_fps=5)
    assert [type(p).__name__ for p in pubs] == ["JsonlPublisher", "VideoPublisher"]
    for i in range(3):
        publish_all(pubs, _result(i), fps=25.0)
    for p in pubs:
        p.close()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("not a bag")
    with pytest.raises(PublisherError, match="taken: bag already exists"):
        build_publishers(jsonl=tmp_path / "b.jsonl", bag=tmp_path / "taken")
    assert not (tmp_path / "b.jsonl").exists()  # a refused start creates no file


def test_image_to_bgr_handles_row_padding_and_rejects_bad_sizes():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), dtype=np.uint8)
    padded[:, :9] = image.reshape(2, 9)
    msg = types.SimpleNamespace(encoding="rgb8", height=2, width=3, step=12,
                                data=padded.reshape(-1))
    np.testing.assert_array_equal(ros_msgs.image_to_bgr(msg), image[..., ::-1])
    msg.step = 5
    with pytest.raises(ValueError, match="step 5 does not match"):
        ros_msgs.image_to_bgr(msg)


def _fake_rosidl(monkeypatch) -> type:
    """Minimal rosidl-style classes (``get_fields_and_field_types``) for DiagnosticArray."""
    def make(name, fields):
        def init(self):
            for key, typ in fields.items():
                setattr(self, key, [] if typ.startswith("sequence") else None)
        return type(name, (), {"__init__": init,
                               "get_fields_and_field_types": classmethod(lambda c: fields)})

    mods = {
        "builtin_interfaces.msg": {"Time": make("Time", {"sec": "int32", "nanosec": "uint32"})},
        "std_msgs.msg": {"Header": make("Header", {"stamp": "builtin_interfaces/Time",
                                                   "frame_id": "string"})},
        "diagnostic_msgs.msg": {
            "KeyValue": make("KeyValue", {"key": "string", "value": "string"}),
            "DiagnosticStatus": make("DiagnosticStatus", {
                "level": "octet", "name": "string", "message": "string",
                "hardware_id": "string", "values": "sequence<diagnostic_msgs/KeyValue>"}),
            "DiagnosticArray": make("DiagnosticArray", {
                "header": "std_msgs/Header",
                "status": "sequence<diagnostic_msgs/DiagnosticStatus>"})},
    }
    for mod_name, classes in mods.items():
        monkeypatch.setitem(sys.modules, mod_name, types.SimpleNamespace(**classes))
    return mods["diagnostic_msgs.msg"]["DiagnosticArray"]


def test_same_fields_build_rclpy_style_messages(monkeypatch):
    array_cls = _fake_rosidl(monkeypatch)
    fields = ros_msgs.diagnostics_fields(_result(1, error="bad frame"))
    msg = ros_msgs.to_rclpy(array_cls, fields)
    assert msg.header.stamp.sec == 1_700_000_000
    assert msg.header.stamp.nanosec == pytest.approx(300_000_000, abs=500)  # float seconds
    status = msg.status[0]
    assert status.level == b"\x02" and status.message == "bad frame"
    assert [(kv.key, kv.value) for kv in status.values][:2] == [("capture_ms", "1.500"),
                                                               ("propose_ms", "2.250")]
    with pytest.raises(KeyError, match="no field 'bogus'"):
        ros_msgs.to_rclpy(array_cls, {"bogus": 1})


def test_label_tags_do_not_pile_up_over_a_row_of_distant_cones():
    from node.publish.annotate import place_tag

    taken: list = []
    # eight small cones side by side, their boxes overlapping (a line of cones seen end-on)
    for i in range(8):
        rect = place_tag([300 + 3 * i, 200, 310 + 3 * i, 215], (60, 12), (640, 480), taken)
        if rect is not None:
            taken.append(rect)
    assert len(taken) >= 4  # as many as fit near the row
    for i, a in enumerate(taken):
        for b in taken[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    # a lone cone's tag sits right above its box
    assert place_tag([100, 100, 120, 130], (60, 12), (640, 480), []) == (100, 88, 160, 100)
