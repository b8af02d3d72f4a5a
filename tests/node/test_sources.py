"""Sources: video, folder, glob and ROS 2 bag replay (drop nothing); live reader with a fake
camera (drops counted, reconnect with backoff, give-up); camera pipeline strings."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest

from node.sources import SourceError, camera, natural_key, open_source
from node.sources.camera import LiveSource, capture_factory, csi_pipeline, rtsp_pipeline


def _frame(value: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def _write_video(path: Path, n: int, fps: float = 10.0, fourcc: str = "mp4v") -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        writer.write(_frame((10 + 20 * i) % 250))
    writer.release()


# --- pipeline strings -------------------------------------------------------------------------

def test_csi_pipeline_string():
    p = csi_pipeline(1, width=1920, height=1080, fps=60)
    assert p.startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM)")
    assert "width=(int)1920, height=(int)1080" in p and "framerate=(fraction)60/1" in p
    assert "nvvidconv flip-method=0 ! video/x-raw, format=(string)BGRx ! videoconvert" in p
    assert p.endswith("format=(string)BGR ! appsink drop=true max-buffers=1 sync=false")


def test_rtsp_pipeline_string():
    p = rtsp_pipeline("rtsp://10.0.0.2:8554/cam")
    assert p.startswith('rtspsrc location="rtsp://10.0.0.2:8554/cam" latency=0 timeout=5000000 '
                        "tcp-timeout=5000000 ! decodebin ! videoconvert")
    assert p.endswith("appsink drop=true max-buffers=1 sync=false")


@pytest.mark.parametrize("uri", [
    "rtsp://cam/x ! filesink location=/etc/passwd",   # a second element after the source
    'rtsp://cam/x" ! fakesink name="y',               # breaks out of the quoted location
    "rtsp://cam/x'",
    "rtsp://cam/x\\",
    "rtsp://cam/`id`",
    "rtsp://cam/x\nlatency=9",
])
def test_rtsp_urls_that_would_change_the_pipeline_are_refused(uri):
    from node.sources.camera import check_camera_uri
    from node.sources.files import SourceError

    with pytest.raises(SourceError, match="not allowed in a camera URI"):
        rtsp_pipeline(uri)
    with pytest.raises(SourceError, match="not allowed in a camera URI"):
        capture_factory(uri)
    with pytest.raises(SourceError):
        check_camera_uri(uri)
    # An ordinary URL with credentials, a query and a port is accepted as it is.
    ok = "rtsp://user:pa%40ss@10.0.0.2:8554/stream?channel=1&subtype=0"
    assert check_camera_uri(ok) == ok and f'location="{ok}"' in rtsp_pipeline(ok)


class _RecordingCapture:
    calls: ClassVar[list] = []

    def __init__(self, *args):
        _RecordingCapture.calls.append(args)
        self.props = {}
        self.ffmpeg_options = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS")

    def set(self, prop, value):
        self.props[prop] = value
        return True


def test_capture_factories_pick_backend(monkeypatch):
    monkeypatch.setattr(camera.cv2, "VideoCapture", _RecordingCapture)
    _RecordingCapture.calls = []
    monkeypatch.setattr(camera, "opencv_has_gstreamer", lambda: True)
    capture_factory("csi://0")()
    assert _RecordingCapture.calls[-1] == (csi_pipeline(0), cv2.CAP_GSTREAMER)
    capture_factory("rtsp://cam/x")()
    assert _RecordingCapture.calls[-1] == (rtsp_pipeline("rtsp://cam/x"), cv2.CAP_GSTREAMER)

    monkeypatch.setattr(camera, "opencv_has_gstreamer", lambda: False)
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    cap = capture_factory("rtsp://cam/x")()
    assert _RecordingCapture.calls[-1][:2] == ("rtsp://cam/x", cv2.CAP_FFMPEG)  # + timeouts
    assert cap.ffmpeg_options == "rtsp_transport;tcp|fflags;nobuffer"
    # set only while opening: it must not leak into video files opened later
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ
    with pytest.raises(SourceError, match="csi://0: this OpenCV has no GStreamer"):
        capture_factory("csi://0")

    cap = capture_factory("v4l2:///dev/video3", width=640)()
    assert _RecordingCapture.calls[-1] == ("/dev/video3", cv2.CAP_V4L2)
    assert cap.props[cv2.CAP_PROP_BUFFERSIZE] == 1 and cap.props[cv2.CAP_PROP_FRAME_WIDTH] == 640


def test_bad_uris_are_one_line_errors(tmp_path):
    with pytest.raises(SourceError, match="unknown source scheme 'http://'"):
        open_source("http://example/x")
    with pytest.raises(SourceError, match="missing.mp4: no such file"):
        open_source(str(tmp_path / "missing.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="image folder is empty"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no files match"):
        open_source(str(tmp_path / "*.png"))
    with pytest.raises(SourceError, match="v4l2:///dev/video0: unknown source option 'sensor'"):
        open_source("v4l2:///dev/video0", sensor=3)


# --- replay: video, folder, glob --------------------------------------------------------------

def test_video_replay_yields_every_frame_in_order(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, 12, fps=10.0)
    with open_source(str(path)) as src:
        assert not src.is_live and len(src) == 12
        frames = list(src)
    assert [f.index for f in frames] == list(range(12))
    assert all(f.source_name is None and f.image.shape == (48, 64, 3) for f in frames)
    means = [float(f.image.mean()) for f in frames]
    assert np.allclose(means, [10 + 20 * i for i in range(12)], atol=4)
    steps = np.diff([f.stamp for f in frames])
    assert np.allclose(steps, 0.1, atol=1e-3)  # synthetic stamps: open time + position
    assert src.errors == 0 and src.dropped == 0


def test_truncated_video(tmp_path):
    mp4, avi = tmp_path / "clip.mp4", tmp_path / "clip.avi"
    _write_video(mp4, 30)
    _write_video(avi, 30, fourcc="MJPG")
    cut_mp4, cut_avi = tmp_path / "cut.mp4", tmp_path / "cut.avi"
    cut_mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])  # loses the moov atom
    cut_avi.write_bytes(avi.read_bytes()[: int(avi.stat().st_size * 0.9)])
    with pytest.raises(SourceError, match=r"cut.mp4: cannot open video") as err:
        open_source(str(cut_mp4))
    assert "\n" not in str(err.value)
    t0 = time.monotonic()
    with open_source(str(cut_avi)) as src:
        frames = list(src)
    assert time.monotonic() - t0 < 10
    assert 0 < len(frames) < 30
    assert src.errors == 30 - len(frames)
    note = f"cut.avi: decoding stopped after {len(frames)} of 30 frames (truncated or corrupt video)"
    assert src.warnings == [note]


def test_corrupt_middle_frame_is_an_error_frame_and_nothing_is_unaccounted(tmp_path):
    avi = tmp_path / "clip.avi"
    _write_video(avi, 30, fourcc="MJPG")
    data = bytearray(avi.read_bytes())
    data[len(data) // 2: len(data) // 2 + 200] = bytes(200)  # wreck one frame's JPEG data
    (tmp_path / "bad.avi").write_bytes(bytes(data))
    with open_source(f"file://{tmp_path / 'bad.avi'}") as src:
        frames = list(src)
    bad = [f for f in frames if f.image is None]
    assert bad and all(f.error.startswith("bad.avi: frame ") for f in bad)
    assert [f.index for f in frames] == list(range(len(frames)))
    shortfall = 30 - len(frames)
    assert src.errors == len(bad) + shortfall  # every announced frame is yielded or counted


def _image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in ((1, "f1.png"), (2, "f2.png"), (10, "f10.png")):
        cv2.imwrite(str(folder / name), _frame(i * 10))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden").write_text("skipped")
    return folder


def test_folder_natural_order_and_unreadable_files_are_error_frames(tmp_path):
    with open_source(str(_image_folder(tmp_path))) as src:
        assert len(src) == 5
        frames = list(src)
    assert [f.source_name for f in frames] == ["empty.png", "f1.png", "f2.png", "f10.png",
                                               "notes.txt"]
    assert [f.index for f in frames] == list(range(5))
    assert frames[0].image is None and frames[0].error == "empty.png: unreadable image"
    assert frames[4].image is None and frames[4].error == "notes.txt: unreadable image"
    assert [int(f.image[0, 0, 0]) for f in frames[1:4]] == [10, 20, 100]
    assert src.errors == 2


@pytest.mark.parametrize("read_ahead", [0, 1, 3])
def test_folder_read_ahead_gives_the_same_frames_and_stops_cleanly(tmp_path, read_ahead):
    from node.sources import ImageFilesSource

    folder = _image_folder(tmp_path)
    paths = open_source(str(folder)).paths  # the files a folder source reads, in its order
    src = ImageFilesSource(paths, str(folder), read_ahead=read_ahead)
    frames = list(src)
    assert [f.source_name for f in frames] == ["empty.png", "f1.png", "f2.png", "f10.png",
                                               "notes.txt"]
    assert [f.index for f in frames] == list(range(5))
    assert [f.error for f in frames] == ["empty.png: unreadable image", None, None, None,
                                         "notes.txt: unreadable image"]
    assert [int(f.image[0, 0, 0]) for f in frames[1:4]] == [10, 20, 100]
    assert src.errors == 2
    # Stopped after two frames: the reader thread ends and nothing more is counted.
    before = {t.name for t in threading.enumerate()}
    early = ImageFilesSource(paths, str(folder), read_ahead=read_ahead)
    taken = [next(early), next(early)]
    early.close()
    assert [f.source_name for f in taken] == ["empty.png", "f1.png"]
    assert early.errors == 1 and list(early) == []
    assert not [t for t in threading.enumerate()
                if t.name.startswith("read-ahead") and t.name not in before]


def test_glob_natural_order(tmp_path):
    folder = _image_folder(tmp_path)
    frames = list(open_source(str(folder / "f*.png")))
    assert [f.source_name for f in frames] == ["f1.png", "f2.png", "f10.png"]
    assert all(f.error is None for f in frames)
    assert natural_key("a10") > natural_key("a9")


# --- replay: ROS 2 bags -----------------------------------------------------------------------

def _image_msg(ts, stamp_ns, image, encoding):
    types = ts.types
    sec, nsec = divmod(stamp_ns, 1_000_000_000)
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](
        sec=sec, nanosec=nsec), frame_id="cam")
    image = np.ascontiguousarray(image)
    h, w = image.shape[:2]
    step = image.strides[0]
    return types["sensor_msgs/msg/Image"](header=header, height=h, width=w, encoding=encoding,
                                           is_bigendian=0, step=step,
                                           data=np.ascontiguousarray(image).view(np.uint8).reshape(-1))


def _compressed_msg(ts, stamp_ns, image):
    types = ts.types
    sec, nsec = divmod(stamp_ns, 1_000_000_000)
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](
        sec=sec, nanosec=nsec), frame_id="cam")
    data = cv2.imencode(".png", image)[1].reshape(-1)
    return types["sensor_msgs/msg/CompressedImage"](header=header, format="png", data=data)


BASE_NS = 1_700_000_000_000_000_000


def _write_bag(path: Path, storage: str) -> np.ndarray:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        raw = writer.add_connection("/cam/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        comp = writer.add_connection("/cam/image/compressed", "sensor_msgs/msg/CompressedImage",
                                     typestore=ts)
        writer.add_connection("/odom_text", "std_msgs/msg/String", typestore=ts)
        variants = [(bgr, "bgr8"), (bgr[..., ::-1], "rgb8"),
                    (cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), "bgra8"),
                    (bgr[..., 0], "mono8"), (bgr[..., 0].astype(np.uint16), "16UC1")]
        for i, (image, enc) in enumerate(variants):
            stamp = BASE_NS + i * 50_000_000
            msg = _image_msg(ts, stamp, image, enc)
            writer.write(raw, stamp + 7, ts.serialize_cdr(msg, "sensor_msgs/msg/Image"))
            cmsg = _compressed_msg(ts, stamp, bgr)
            writer.write(comp, stamp + 7, ts.serialize_cdr(cmsg,
                                                           "sensor_msgs/msg/CompressedImage"))
    return bgr


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bag_replay_images_and_compressed(tmp_path, storage):
    bag = tmp_path / f"bag_{storage}"
    bgr = _write_bag(bag, storage)
    stamps = [(BASE_NS + i * 50_000_000) / 1e9 for i in range(5)]
    storage_file = next(bag.glob("*.mcap" if storage == "mcap" else "*.db3"))
    for uri in (str(bag), str(storage_file)):  # bag directory, and the bare storage file
        with open_source(uri) as src:  # default: the first image topic (raw)
            assert len(src) == 5 and src.topic == "/cam/image_raw"
            frames = list(src)
        assert [f.stamp for f in frames] == pytest.approx(stamps, abs=1e-6)
        for f in frames[:3]:
            np.testing.assert_array_equal(f.image, bgr)
        np.testing.assert_array_equal(frames[3].image, cv2.cvtColor(bgr[..., 0],
                                                                    cv2.COLOR_GRAY2BGR))
        assert frames[4].image is None and "unsupported image encoding '16UC1'" in frames[4].error
        assert src.errors == 1
        comp = list(open_source(uri, topic="/cam/image/compressed"))
        assert len(comp) == 5 and all(np.array_equal(f.image, bgr) for f in comp)
    with pytest.raises(SourceError, match="'/odom_text' is not an image topic"):
        open_source(str(bag), topic="/odom_text")


def test_damaged_bag_file_is_one_line_error(tmp_path):
    (tmp_path / "bad.mcap").write_bytes(b"\x89MCAP0\r\n" + bytes(100))
    with pytest.raises(SourceError, match=r"bad.mcap: cannot read ROS 2 bag \(.+\)$"):
        open_source(str(tmp_path / "bad.mcap"))


def test_bag_without_image_topic(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    with Writer(tmp_path / "b", version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        writer.add_connection("/chatter", "std_msgs/msg/String", typestore=ts)
    with pytest.raises(SourceError, match=r"no sensor_msgs Image or CompressedImage topic.*"
                                          r"/chatter \(std_msgs/msg/String\)"):
        open_source(str(tmp_path / "b"))


# --- live reader with a fake camera -----------------------------------------------------------

class FakeCamera:
    """``read()`` returns numbered frames every ``period_s``; fails after ``fail_after``."""

    def __init__(self, tag: int, period_s: float = 0.001, fail_after: int | None = None,
                 raise_on_fail: bool = False, opened: bool = True):
        self.tag, self.period_s, self.fail_after = tag, period_s, fail_after
        self.raise_on_fail, self.opened, self.count, self.released = raise_on_fail, opened, 0, 0

    def isOpened(self):
        return self.opened

    def read(self):
        time.sleep(self.period_s)
        if self.fail_after is not None and self.count >= self.fail_after:
            if self.raise_on_fail:
                raise OSError("USB cable unplugged")
            return False, None
        self.count += 1
        image = _frame(self.tag)
        image[0, 0, 1] = self.count % 256
        return True, image

    def release(self):
        self.released += 1


def test_live_source_keeps_newest_frame_and_counts_drops():
    cam = FakeCamera(tag=1, period_s=0.001)
    src = LiveSource(lambda: cam, "fake://fast")
    consumed = []
    for frame in src:
        consumed.append(frame)
        time.sleep(0.01)  # a slow consumer: about 10 frames arrive per frame consumed
        if len(consumed) == 15:
            break
    src.close()
    indices = [f.index for f in consumed]
    assert indices == sorted(set(indices))
    assert src.dropped > 15  # most frames were overwritten, not queued
    pending = 1 if src._slot is not None else 0
    assert src.captured == len(consumed) + src.dropped + pending
    assert indices[-1] - indices[0] + 1 - len(consumed) <= src.dropped
    assert src.is_live and src.health["state"] == "ok"


def test_live_source_reconnects_with_backoff_and_frames_resume():
    opened = []

    def open_capture():
        n = len(opened)
        cam = (FakeCamera(tag=1, fail_after=3) if n == 0 else
               FakeCamera(tag=2, raise_on_fail=True, fail_after=0) if n == 1 else
               FakeCamera(tag=3, opened=False) if n == 2 else FakeCamera(tag=4, period_s=0.005))
        opened.append(cam)
        if n == 1:
            raise OSError("no such device")
        return cam

    src = LiveSource(open_capture, "fake://flaky", reconnect_initial_s=0.05,
                     reconnect_max_s=0.08)
    tags, states = [], set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and 4 not in tags:
        states.add(src.health["state"])
        frame = src.read(timeout=0.005)
        if frame is not None:
            tags.append(int(frame.image[0, 0, 0]))
    health = src.health
    src.close()
    assert 4 in tags and set(tags) <= {1, 4}  # frames resumed from the reopened camera
    assert "reconnecting" in states
    assert health["state"] == "ok" and health["attempts"] == 3 and src.reconnects == 1
    assert opened[0].released == 1 and opened[2].released == 1


def test_live_source_gives_up_after_max_attempts_with_clear_error():
    calls = []

    def open_capture():
        calls.append(1)
        return FakeCamera(tag=1, fail_after=2 if len(calls) == 1 else 0,
                          opened=len(calls) == 1)

    src = LiveSource(open_capture, "v4l2:///dev/video7", reconnect_initial_s=0.01,
                     reconnect_max_s=0.02, max_attempts=3)
    got = []  # the camera delivers 2 frames; a slow reader may see only the newer one
    with pytest.raises(SourceError, match=r"v4l2:///dev/video7: camera lost, gave up after 3 "
                                          r"reconnect attempts \(capture did not open\)"):
        while True:
            frame = src.read(timeout=2)
            if frame is not None:
                got.append(frame)
    assert 1 <= len(got) <= 2 and len(calls) == 4
    assert src.health["state"] == "failed"
    src.close()


def test_live_source_first_open_failure_is_an_error_without_reconnect():
    # (With reconnect, a camera absent at start is retried: tests/reliability.)
    with pytest.raises(SourceError, match="fake://none: cannot open camera"):
        LiveSource(lambda: FakeCamera(tag=0, opened=False), "fake://none", reconnect=False)


def test_video_file_as_live_source_ends_at_eof(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, 20)
    with open_source(str(path), live=True) as src:
        assert src.is_live
        frames = []
        for frame in src:
            frames.append(frame)
            time.sleep(0.005)
    assert src.captured == 20
    assert len(frames) + src.dropped == 20
    assert threading.active_count() < 50
