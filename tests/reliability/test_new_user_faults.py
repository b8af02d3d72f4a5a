"""Faults a new user hit (issue 20): a camera absent at start, clobbered outputs, a full disk,
non-finite config values, output paths checked late, a hanging RTSP open, misleading exit
codes and messages, and broken symlinks in an image folder. Each test reproduces the fault as
the issue describes it (the bag recovery of item 2 is in ``test_bag_recovery.py``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from node.config import ConfigError
from node.infer import load_backend
from node.node_config import load_node_config
from node.pipeline import Pipeline
from node.propose import build_proposer
from node.sources.camera import LiveSource, capture_factory
from node.sources.files import SourceError
from tests.reliability.doubles import (
    CameraScript,
    CollectingPublisher,
    FaultyBackend,
    ScriptedCamera,
    cone_folder,
    run_cli,
)

REPO = Path(__file__).resolve().parents[2]
COLOUR = ["--set", "proposer.kind=colour", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Thirty small frames with a blue and a yellow cone each."""
    return cone_folder(tmp_path_factory.mktemp("frames"), 30)


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def node_process(argv: list, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-m", "node", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ---- 1. camera absent at start ---------------------------------------------------------------

def test_camera_absent_at_start_is_retried_with_the_reconnect_backoff(model):
    # The camera is not there for the first three opens (raises, does not open, raises), then
    # it is plugged in. The source must not give up at start: it retries with the same
    # doubling backoff as a mid-run loss, and frames flow once the camera is there.
    script = CameraScript(OSError("no such device"), None, OSError("no such device"),
                          ScriptedCamera((48, 64), period_s=0.01))
    source = LiveSource(script, "v4l2:///dev/video99", reconnect_initial_s=0.2,
                        reconnect_max_s=0.5)
    config = load_node_config(None, {"metrics": {"print_interval_s": 0.1}})

    def stop_after_five(record):
        if len(publisher.records) >= 5:
            pipeline.request_stop()

    publisher = CollectingPublisher(stop_after_five)
    with load_backend(model, threads=1) as backend:
        pipeline = Pipeline(config, backend, build_proposer(config.proposer), [publisher])
        timer = threading.Timer(15.0, pipeline.request_stop)  # a hang fails, never blocks CI
        timer.start()
        pipeline.run(source)
        timer.cancel()
    assert len(publisher.records) >= 5 and all("error" not in r for r in publisher.records)
    assert len(script.opened_at) == 4
    gaps = np.diff(script.opened_at)  # 0.2, 0.4, 0.5 (doubling, capped at the max)
    assert gaps[1] / gaps[0] == pytest.approx(2.0, rel=0.3)
    assert gaps[2] / gaps[1] == pytest.approx(1.25, rel=0.3)
    assert publisher.health and publisher.health[0][1]["state"] == "reconnecting"


def test_camera_absent_at_start_logs_each_attempt_once_at_a_bounded_rate(caplog):
    # A very short backoff gives many attempts per second; the log gets at most about one line
    # per second, and each line says how many attempts it stands for.
    script = CameraScript(None)
    with caplog.at_level(logging.WARNING, logger="node.sources.camera"):
        source = LiveSource(script, "v4l2:///dev/video99", reconnect_initial_s=0.01,
                            reconnect_max_s=0.01)
        try:
            while len(script.opened_at) < 150:
                time.sleep(0.05)
            started = script.opened_at[0]
            elapsed = time.monotonic() - started
        finally:
            source.close()
    attempts = len(script.opened_at)
    lines = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert 1 <= len(lines) <= elapsed / 1.0 + 2, lines
    assert len(lines) < attempts / 10
    assert "video99" in lines[0] and "attempt 1 " in lines[0]
    numbers = [int(line.split("attempt ")[1].split()[0]) for line in lines]
    assert numbers == sorted(set(numbers))  # no attempt logged twice


def test_camera_absent_at_start_gives_up_only_after_max_attempts():
    source = LiveSource(CameraScript(None), "v4l2:///dev/video99", reconnect_initial_s=0.01,
                        reconnect_max_s=0.02, max_attempts=3)
    try:
        with pytest.raises(SourceError, match=r"video99.*gave up after 3"):
            while True:
                source.read(timeout=0.5)
    finally:
        source.close()


def test_run_on_an_absent_camera_stays_up_until_stopped(model):
    # The command: `python -m node run v4l2:///dev/video99` exited rc 1 in 0.24 s.
    assert not Path("/dev/video99").exists()
    node = node_process(["run", "v4l2:///dev/video99", "--model", model, *COLOUR,
                         "--set", "source.reconnect_initial_s=0.05",
                         "--set", "source.reconnect_max_s=0.1",
                         "--set", "metrics.print_interval_s=0.2"])
    try:
        lines: list[str] = []
        retries = 0
        for line in node.stderr:  # wait until it has retried several times
            lines.append(line)
            retries += "attempt" in line or "camera reconnecting" in line
            if retries >= 3:
                break
        assert retries >= 3 and node.poll() is None, "".join(lines)
        node.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = node.communicate(timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
    text = "".join(lines) + err
    assert "video99" in text and "Traceback" not in text
    assert node.returncode == 130


# ---- 3. outputs are not clobbered --------------------------------------------------------------

@pytest.mark.parametrize("flag,name", [("--jsonl", "cones.jsonl"), ("--video-out", "v.mp4"),
                                       ("--summary", "s.json")])
def test_an_existing_output_is_refused_and_kept(flag, name, folder, model, tmp_path, capsys):
    target = tmp_path / name
    target.write_text("precious\n")
    code, _, err = run_cli(["replay", folder, "--model", model, flag, target, *COLOUR],
                           capsys)
    line = one_line_error(err)
    assert code != 0 and str(target) in line and "--overwrite" in line
    assert target.read_text() == "precious\n"


def test_a_refused_start_does_not_truncate_an_existing_jsonl(folder, model, tmp_path, capsys):
    zmq = pytest.importorskip("zmq")
    jsonl = tmp_path / "cones.jsonl"
    jsonl.write_text("precious\n")
    (tmp_path / "bag").mkdir()
    (tmp_path / "bag" / "metadata.yaml").write_text("x")
    # The bag exists: refused, and the JSONL is kept.
    code, _, err = run_cli(["replay", folder, "--model", model, "--jsonl", jsonl, "--bag",
                            tmp_path / "bag", *COLOUR], capsys)
    assert code != 0 and "already exists" in one_line_error(err)
    assert jsonl.read_text() == "precious\n"
    # The ZeroMQ port is busy: refused, and --overwrite does not truncate the JSONL either.
    context = zmq.Context()
    busy = context.socket(zmq.PUB)
    port = busy.bind_to_random_port("tcp://127.0.0.1")
    try:
        code, _, err = run_cli(["replay", folder, "--model", model, "--jsonl", jsonl,
                                "--zmq", f"tcp://127.0.0.1:{port}", "--overwrite", *COLOUR],
                               capsys)
    finally:
        busy.close(0)
        context.term()
    assert code != 0 and str(port) in one_line_error(err)
    assert jsonl.read_text() == "precious\n"


def test_overwrite_replaces_existing_outputs(folder, model, tmp_path, capsys):
    jsonl, summary = tmp_path / "cones.jsonl", tmp_path / "s.json"
    jsonl.write_text("old\n")
    summary.write_text("old\n")
    code, _, err = run_cli(["replay", folder, "--model", model, "--jsonl", jsonl, "--summary",
                            summary, "--overwrite", *COLOUR], capsys)
    assert code == 0, err
    assert len(jsonl.read_text().splitlines()) == 30
    assert json.loads(summary.read_text())["frames"] == 30


# ---- 4. full disk ------------------------------------------------------------------------------

def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    return apply


def test_a_full_disk_under_the_jsonl_is_named_and_leaves_whole_lines(folder, model, tmp_path):
    jsonl = tmp_path / "cones.jsonl"
    node = node_process(["replay", folder, "--model", model, "--jsonl", jsonl, *COLOUR],
                        preexec_fn=_file_size_limit(2500))  # room for a dozen records
    _, err = node.communicate(timeout=120)
    assert node.returncode == 1, err
    line = one_line_error(err)
    assert str(jsonl) in line and "Traceback" not in err
    raw = jsonl.read_bytes()
    assert raw.endswith(b"\n")  # whole lines only
    records = [json.loads(x) for x in raw.decode().splitlines()]
    assert 1 <= len(records) < 30 and [r["frame"] for r in records] == list(range(len(records)))


def test_a_full_disk_under_the_video_is_named_not_rc_0(tmp_path, model):
    images = tmp_path / "noise"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):  # noise compresses badly: the video outgrows the limit
        cv2.imwrite(str(images / f"{i:02d}.png"), rng.integers(0, 255, (240, 320, 3), np.uint8))
    video = tmp_path / "out.mp4"
    node = node_process(["replay", images, "--model", model, "--video-out", video, *COLOUR],
                        preexec_fn=_file_size_limit(200_000))
    _, err = node.communicate(timeout=120)
    assert node.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and str(video) in errors[0] and "Traceback" not in err


# ---- 5. non-finite config values -----------------------------------------------------------------

@pytest.mark.parametrize("override", ["model.score_threshold=.nan", "post.nms_iou=.nan",
                                      "post.nms_iou=.inf", "post.nested_inside=.nan",
                                      "exposure.min_chroma=.inf", "source.fps=.inf",
                                      "metrics.print_interval_s=-.inf",
                                      "proposer.heatmap_rows=[0.2, .nan]"])
def test_a_non_finite_number_in_the_config_is_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"command line: {key}.*not a finite number"):
        load_node_config(None, [override])


def test_a_non_finite_number_in_a_config_file_names_the_file_and_key(tmp_path, folder, model,
                                                                     capsys):
    config = tmp_path / "node.yaml"
    config.write_text("model:\n  score_threshold: .nan\n")
    code, _, err = run_cli(["replay", folder, "--model", model, "--config", config, *COLOUR],
                           capsys)
    line = one_line_error(err)
    assert code == 2 and str(config) in line and "model.score_threshold" in line


# ---- 6. output paths checked before the first frame --------------------------------------------

@pytest.mark.parametrize("flag", ["--video-out", "--summary", "--jsonl", "--bag"])
def test_an_unwritable_output_path_is_refused_before_any_work(flag, folder, model, tmp_path,
                                                              capsys):
    bad = "/proc/none/x.out"
    jsonl, summary = tmp_path / "cones.jsonl", tmp_path / "s.json"
    argv = ["replay", folder, "--model", model, flag, bad, *COLOUR]
    if flag != "--jsonl":
        argv += ["--jsonl", jsonl]
    if flag != "--summary":
        argv += ["--summary", summary]
    code, out, err = run_cli(argv, capsys)
    line = one_line_error(err)
    assert code != 0 and bad in line
    assert not jsonl.exists() and not summary.exists()  # nothing written, no frame processed
    assert "frames" not in out


# ---- 7. a hanging open ends on SIGINT --------------------------------------------------------

def test_sigint_ends_a_hanging_camera_open(model):
    released = threading.Event()
    opened = threading.Event()

    def hanging_open():  # an RTSP server that accepts the connection and never answers
        opened.set()
        released.wait(8.0)

    config = load_node_config(None, {"metrics": {"print_interval_s": 0.1}})
    with load_backend(model, threads=1) as backend:
        pipeline = Pipeline(config, backend, build_proposer(config.proposer),
                            [CollectingPublisher()])

        def interrupt():  # Ctrl-C once the node is waiting for the camera
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                    opened.is_set() and signal.getsignal(signal.SIGINT) == pipeline.request_stop):
                time.sleep(0.01)
            if opened.is_set() and signal.getsignal(signal.SIGINT) == pipeline.request_stop:
                os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt, daemon=True).start()
        try:
            summary = pipeline.run(LiveSource(hanging_open, "rtsp://camera.invalid/stream",
                                              reconnect_initial_s=0.05))
            still_hanging = not released.is_set()
        finally:
            released.set()
    assert still_hanging, "the node waited for the open to return"
    assert summary["interrupted"] is True and summary["frames"] == 0


def test_rtsp_is_opened_with_a_timeout(monkeypatch):
    calls = []

    class FakeCapture:
        def __init__(self, *args):
            calls.append(args)

        def isOpened(self):
            return False

    monkeypatch.setattr("node.sources.camera.opencv_has_gstreamer", lambda: False)
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    capture_factory("rtsp://camera.invalid/stream")()
    (args,) = calls
    params = dict(zip(args[2][::2], args[2][1::2]))
    assert 0 < params[cv2.CAP_PROP_OPEN_TIMEOUT_MSEC] <= 10_000
    assert 0 < params[cv2.CAP_PROP_READ_TIMEOUT_MSEC] <= 10_000


# ---- 8. exit codes ---------------------------------------------------------------------------

class _FailingBackend(FaultyBackend):
    """Every batch's inference fails (a dead accelerator)."""

    def __init__(self, path, **kwargs):
        self._real = load_backend(path, threads=1)
        super().__init__(self._real, raise_in_wait=range(10_000))

    def __enter__(self):
        self._real.__enter__()
        self.inner, self.meta, self.max_batch = self._real, self._real.meta, self._real.max_batch
        return self

    def __exit__(self, *exc):
        return self._real.__exit__(*exc)


def test_rc_is_non_zero_when_every_inference_failed(folder, model, tmp_path, monkeypatch,
                                                    capsys):
    monkeypatch.setattr("node.infer.load_backend", _FailingBackend)
    jsonl = tmp_path / "cones.jsonl"
    code, _, err = run_cli(["replay", folder, "--model", model, "--jsonl", jsonl, *COLOUR],
                           capsys)
    assert code == 1
    assert "every inference failed" in one_line_error(err) and "CUDA error" in err
    assert len(jsonl.read_text().splitlines()) == 30  # the records are still all there


def test_rc_is_non_zero_when_no_frame_could_be_processed(model, tmp_path, capsys):
    images = tmp_path / "broken"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"")
    code, _, err = run_cli(["replay", images, "--model", model, *COLOUR], capsys)
    assert code == 1 and "no frame" in one_line_error(err)


# ---- 9. broken and looping symlinks ---------------------------------------------------------

def test_broken_and_looping_symlinks_are_counted_and_reported(folder, model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "c.png"):
        (images / name).symlink_to(folder / "f00.png")
    (images / "b.png").symlink_to(tmp_path / "gone.png")  # broken
    (images / "d.png").symlink_to(images / "d.png")  # loops
    jsonl, summary = tmp_path / "cones.jsonl", tmp_path / "s.json"
    code, _, err = run_cli(["replay", images, "--model", model, "--jsonl", jsonl,
                            "--summary", summary, *COLOUR], capsys)
    assert code == 0, err
    records = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [r["source"] for r in records] == ["a.png", "b.png", "c.png", "d.png"]
    assert "broken symbolic link" in records[1]["error"]
    assert "symbolic link loop" in records[3]["error"]
    assert "error" not in records[0] and "error" not in records[2]
    assert json.loads(summary.read_text())["errors"] == 2


# ---- 10. messages ------------------------------------------------------------------------------

def test_a_bad_set_blames_the_command_line_not_the_config_file(folder, model, capsys):
    code, _, err = run_cli(["replay", folder, "--model", model, *COLOUR,
                            "--set", "model.score_threshold=2"], capsys)
    line = one_line_error(err)
    assert code == 2 and "model.score_threshold" in line
    assert "command line" in line and "node.yaml" not in line


def test_a_model_path_that_is_a_directory_says_so(folder, tmp_path, capsys):
    models = tmp_path / "model.onnx"
    models.mkdir()
    code, _, err = run_cli(["replay", folder, "--model", models, *COLOUR], capsys)
    line = one_line_error(err)
    assert code == 1 and str(models) in line and "is a directory" in line
    assert "not found" not in line


# ---- 11. the soak benchmark ----------------------------------------------------------------

def test_the_soak_benchmark_runs_every_publisher_and_reports_rss_growth(model, capsys):
    # The figure itself (20k frames, < 20 MB) comes from running the script: docs/reliability.md.
    from node.bench.soak import main as soak

    code = soak(["--frames", "90", "--warm-up", "30", "--every", "30", "--model", str(model),
                 "--set", "proposer.kind=colour"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["frames"] == 90 and result["errors"] == 0
    assert [i for i, _ in result["rss_samples_mb"]] == [30, 60, 90]
    assert result["rss_growth_mb"] == pytest.approx(
        result["rss_end_mb"] - result["rss_after_warm_up_mb"], abs=0.1)
    assert {"soak.jsonl", "soak.mp4", "bag.mcap", "metadata.yaml"} <= set(result["output_bytes"])
    assert all(size > 0 for size in result["output_bytes"].values())
