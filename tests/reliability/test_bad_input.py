"""Bad input (issue 9): fatal problems are one line on stderr naming the file or key, with a
non-zero exit and no output file; non-fatal ones are skipped, counted, and still get their
JSONL record with an ``error`` field.

The CLI runs in-process (``node.__main__.main``) with stderr captured; one subprocess test
proves no traceback reaches a user.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from node.infer import load_backend
from node.infer.metadata import METADATA_KEY
from node.node_config import load_node_config
from node.pipeline import Pipeline
from node.propose import ExternalBoxProposer, build_proposer
from node.publish.publishers import BagPublisher, JsonlPublisher, VideoPublisher
from node.sources.camera import LiveSource
from node.types import Frame
from tests.node.backend_doubles import META, FakeGpu, make_onnx, write_engine
from tests.reliability.doubles import (
    BLUE,
    YELLOW,
    CollectingPublisher,
    ScriptedCamera,
    cone_folder,
    cone_image,
    run_cli,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three good small frames with a blue and a yellow cone each."""
    return cone_folder(tmp_path_factory.mktemp("frames"), 3)


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def write_video(path: Path, n: int, fourcc: str) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (64, 48))
    for i in range(n):
        writer.write(cone_image(48, 64, [(20, 8, 32, 40, BLUE)], grey=60 + 4 * i))
    writer.release()


def with_metadata(path: Path, text: str) -> Path:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: text})
    onnx.save(model, str(path))
    return path


# ---- fatal: one line naming the file or key, non-zero exit, no output written -------------

def _truncated_mp4(tmp: Path) -> Path:
    write_video(tmp / "full.mp4", 20, "mp4v")
    data = (tmp / "full.mp4").read_bytes()
    (tmp / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov atom) is lost
    return tmp / "cut.mp4"


MODEL_CASES = {
    # name: (make the model file in tmp, expected exit code, fragments of the message)
    "missing model": (lambda tmp: tmp / "gone.onnx", 1, ["gone.onnx", "not found"]),
    "garbage bytes": (lambda tmp: _bytes(tmp / "junk.onnx", b"\x08\x01garbage" * 50), 1,
                      ["junk.onnx", "not a loadable ONNX model"]),
    "zero-byte model": (lambda tmp: _bytes(tmp / "empty.onnx", b""), 1, ["empty.onnx"]),
    "no metadata": (lambda tmp: _onnx(tmp / "bare.onnx", meta=None), 1,
                    ["bare.onnx", "no 'cone_node' metadata", "export"]),
    "metadata not JSON": (lambda tmp: with_metadata(_onnx(tmp / "m.onnx"), "{classes: ["), 1,
                          ["m.onnx", "metadata is not valid JSON"]),
    "metadata input size disagrees": (
        lambda tmp: _onnx(tmp / "s.onnx", meta=META.replace(input_size=48)), 1,
        ["s.onnx", "metadata says N×3×48×48"]),
    "metadata class count disagrees": (lambda tmp: _onnx(tmp / "c.onnx", classes=4), 1,
                                       ["c.onnx", "lists 5 classes"]),
    "foreign class names": (
        lambda tmp: _onnx(tmp / "f.onnx", meta=META.replace(
            classes=["Blue", "Yellow", "Orange", "Big orange", "background"])), 1,
        ["f.onnx", "['Blue', 'Yellow', 'Orange', 'Big orange']", "class names"]),
    "unknown model type": (lambda tmp: _bytes(tmp / "m.pt", b"x"), 1, ["m.pt", "'.pt'"]),
}


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _onnx(path: Path, **kwargs) -> Path:
    make_onnx(path, **kwargs)
    return path


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_missing_malformed_or_disagreeing_model_is_fatal_in_one_line(case, folder, tmp_path,
                                                                         capsys):
    make, exit_code, fragments = MODEL_CASES[case]
    jsonl = tmp_path / "out" / "cones.jsonl"
    code, out, err = run_cli(["replay", folder, "--model", make(tmp_path), "--jsonl", jsonl],
                             capsys)
    line = one_line_error(err)
    assert code == exit_code and out == ""
    for fragment in fragments:
        assert fragment in line, line
    assert not jsonl.exists()  # the model is checked before any output is created


ENGINE_CASES = {
    "built with another TensorRT": ({"version": "8.6.1"}, 1,
                                    ["m.engine", "TensorRT 8.6.1", "runs TensorRT 10.3.0",
                                     "rebuild it with `python -m export.engine"]),
    "built for another GPU": ({"gpu": "Xavier", "cc": "7.2"}, 1,
                              ["m.engine", "for Xavier (compute 7.2)", "on Orin (compute 8.7)",
                               "rebuild"]),
    "batch profile below the candidate cap": ({"profile": (1, 8, 16)}, 2,
                                              ["proposer.max_candidates (96)", "m.engine",
                                               "accepts (16)"]),
}


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_an_engine_built_elsewhere_is_refused_with_a_rebuild_hint(case, model, folder, tmp_path,
                                                                   monkeypatch, capsys):
    FakeGpu(version="10.3.0", name="Orin", cc=(8, 7), profile_max=16).install(monkeypatch)
    opts, exit_code, fragments = ENGINE_CASES[case]
    opts = {"profile": (1, 8, 16), **opts} if "profile" not in opts else opts
    engine = write_engine(model, tmp_path / "m.engine", **opts)
    jsonl = tmp_path / "cones.jsonl"
    code, _, err = run_cli(["replay", folder, "--model", engine, "--jsonl", jsonl], capsys)
    line = one_line_error(err)
    assert code == exit_code
    for fragment in fragments:
        assert fragment in line, line
    assert not jsonl.exists()


def test_an_engine_without_its_sidecar_is_fatal(model, folder, tmp_path, monkeypatch, capsys):
    FakeGpu().install(monkeypatch)
    engine = tmp_path / "lonely.engine"
    engine.write_bytes(model.read_bytes())
    code, _, err = run_cli(["replay", folder, "--model", engine], capsys)
    line = one_line_error(err)
    assert code == 1 and "lonely.engine.json: engine sidecar not found" in line
    (tmp_path / "lonely.engine.json").write_bytes(b"\x80\xff binary garbage")
    code, _, err = run_cli(["replay", folder, "--model", engine], capsys)
    line = one_line_error(err)
    assert code == 1 and "lonely.engine.json: metadata is not valid JSON" in line


CONFIG_CASES = {
    "value above maximum": (["--set", "model.score_threshold=1.5"], "model.score_threshold"),
    "wrong type": (["--set", "model.max_batch=lots"], "model.max_batch"),
    "unknown key": (["--set", "publishers.jsnol=x.jsonl"], "publishers.jsnol"),
    "port out of range": (["--set", "metrics.prometheus_port=70000"],
                          "metrics.prometheus_port"),
    "cap above the batch": (["--set", "proposer.max_candidates=100"],
                            "proposer.max_candidates"),
    "negative backoff": (["--set", "source.reconnect_initial_s=-1"],
                         "source.reconnect_initial_s"),
    "malformed override": (["--set", "model.score_threshold"], "key.path=value"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_bad_config_value_names_the_key_and_exits_2(case, model, folder, tmp_path, capsys):
    flags, key = CONFIG_CASES[case]
    jsonl = tmp_path / "cones.jsonl"
    code, _, err = run_cli(["replay", folder, "--model", model, "--jsonl", jsonl, *flags], capsys)
    assert code == 2 and key in one_line_error(err)
    assert not jsonl.exists()


def test_a_malformed_config_file_names_the_file_and_line(model, folder, tmp_path, capsys):
    bad = tmp_path / "node.yaml"
    bad.write_text("model:\n  score_threshold: 0.5\n  max_batch: [64\n")
    code, _, err = run_cli(["replay", folder, "--model", model, "--config", bad], capsys)
    assert code == 2 and one_line_error(err).endswith("node.yaml: not valid YAML at line 4")


@pytest.mark.parametrize("video", ["truncated mp4", "zero-byte video"])
def test_an_unopenable_video_is_fatal(video, model, tmp_path, capsys):
    if video == "truncated mp4":
        path, fragment = _truncated_mp4(tmp_path), "cut.mp4: cannot open video"
    else:
        path, fragment = _bytes(tmp_path / "empty.mp4", b""), "empty.mp4: video file is empty"
    code, _, err = run_cli(["replay", path, "--model", model], capsys)
    assert code == 1 and fragment in one_line_error(err)


def test_expected_failure_in_a_subprocess_prints_one_line_and_no_traceback(folder, tmp_path):
    junk = _bytes(tmp_path / "junk.onnx", b"\x00garbage" * 100)
    done = subprocess.run([sys.executable, "-m", "node", "replay", str(folder), "--model",
                           str(junk)], capture_output=True, text=True, cwd=REPO, timeout=120,
                          check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "junk.onnx" in done.stderr


# ---- non-fatal: skipped, counted, recorded ---------------------------------------------------

def test_unreadable_files_in_an_image_folder_get_error_records(model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    good = cone_image(60, 80, [(10, 10, 25, 50, BLUE)])
    _, png = cv2.imencode(".png", good)
    for i in (0, 2, 4, 6):
        cv2.imwrite(str(images / f"f{i}.png"), good)
    (images / "f1.png").write_bytes(b"")  # zero bytes
    (images / "f3.jpg").write_text("lap times, not pixels")  # text named like an image
    (images / "f5.png").write_bytes(png.tobytes()[:40])  # truncated PNG
    (images / "f7.txt").write_bytes(np.random.default_rng(0).bytes(500))  # random bytes
    jsonl, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    code, _, err = run_cli(["replay", images, "--model", model, "--jsonl", jsonl, "--summary",
                            summary, "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["source"] for r in records] == ["f0.png", "f1.png", "f2.png", "f3.jpg", "f4.png",
                                              "f5.png", "f6.png", "f7.txt"]
    assert [r["frame"] for r in records] == list(range(8))
    bad = {r["source"]: r for r in records if "error" in r}
    assert sorted(bad) == ["f1.png", "f3.jpg", "f5.png", "f7.txt"]
    for name, rec in bad.items():
        assert rec["error"] == f"{name}: unreadable image" and rec["cones"] == []
    for rec in records:
        if "error" not in rec:
            assert (rec["width"], rec["height"]) == (80, 60) and len(rec["cones"]) <= 1
    data = json.loads(summary.read_text())
    assert data["frames"] == 8 and data["errors"] == 4 and data["unread"] == 0


def test_a_truncated_video_is_replayed_up_to_the_cut_and_the_shortfall_reported(model, tmp_path,
                                                                                capsys):
    write_video(tmp_path / "full.avi", 30, "MJPG")
    data = (tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: int(len(data) * 0.6)])
    jsonl, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    code, out, err = run_cli(["replay", tmp_path / "cut.avi", "--model", model, "--jsonl", jsonl,
                              "--summary", summary, "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    data = json.loads(summary.read_text())
    decoded = len(records)
    assert 0 < decoded < 30 and [r["frame"] for r in records] == list(range(decoded))
    assert data["frames"] == decoded and data["unread"] == 30 - decoded
    note = f"cut.avi: decoding stopped after {decoded} of 30 frames (truncated or corrupt video)"
    assert data["source_warnings"] == [note]
    assert f"warning: {note}" in out  # the printed summary says it too


def test_a_corrupt_frame_mid_video_is_one_error_record_and_decoding_goes_on(model, tmp_path,
                                                                            capsys):
    write_video(tmp_path / "clip.avi", 30, "MJPG")
    data = bytearray((tmp_path / "clip.avi").read_bytes())
    data[len(data) // 2: len(data) // 2 + 200] = bytes(200)  # wreck one frame's JPEG data
    (tmp_path / "bad.avi").write_bytes(bytes(data))
    jsonl, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    code, _, err = run_cli(["replay", tmp_path / "bad.avi", "--model", model, "--jsonl", jsonl,
                            "--summary", summary, "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    bad = [r for r in records if "error" in r]
    data = json.loads(summary.read_text())
    assert [r["frame"] for r in records] == list(range(len(records)))
    assert bad and all(r["error"].startswith("bad.avi: frame ") for r in bad)
    assert records[-1]["frame"] > bad[-1]["frame"]  # frames after the damage were decoded
    assert data["errors"] == len(bad) and data["frames"] + data["unread"] == 30


WRONG_FRAMES = {
    "grayscale": np.full((60, 80), 128, np.uint8),
    "float32 BGR": np.full((60, 80, 3), 0.5, np.float32),
    "uint16 BGR": np.full((60, 80, 3), 4000, np.uint16),
    "BGRA": np.full((60, 80, 4), 128, np.uint8),
    "one channel": np.full((60, 80, 1), 128, np.uint8),
    "1-D": np.zeros(100, np.uint8),
    "empty": np.zeros((0, 80, 3), np.uint8),
    "not an array": [[1, 2, 3]],
}


@pytest.mark.parametrize("sync", [False, True])
def test_frames_of_the_wrong_shape_or_dtype_are_error_records_not_crashes(model, tmp_path, sync):
    good = cone_image(60, 80, [(10, 10, 25, 50, BLUE), (50, 15, 62, 50, YELLOW)])
    frames, expect_error = [], []
    for i, (name, image) in enumerate(WRONG_FRAMES.items()):
        frames += [Frame(2 * i, 1000.0 + 2 * i, good, f"good{i}.png"),
                   Frame(2 * i + 1, 1000.0 + 2 * i + 1, image, f"{name}.png")]
        expect_error += [False, True]
    labels = tmp_path / "labels"
    labels.mkdir()
    for f in frames:
        (labels / f"{Path(f.source_name).stem}.txt").write_text(
            "0 0.22 0.5 0.19 0.67\n0 0.7 0.54 0.15 0.58\n")
    config = load_node_config(None, {"pipeline": {"sync": sync}})
    jsonl, bag, video = tmp_path / "o.jsonl", tmp_path / "bag", tmp_path / "o.mp4"
    publishers = [JsonlPublisher(jsonl), BagPublisher(bag, images=True), VideoPublisher(video)]
    with load_backend(model, threads=1) as backend:
        summary = Pipeline(config, backend, ExternalBoxProposer(labels), publishers).run(frames)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(len(frames)))
    assert ["error" in r for r in records] == expect_error
    for rec in records:
        if "error" in rec:
            assert rec["error"].startswith("frame has shape") and rec["cones"] == []
            assert "expected H×W×3 uint8" in rec["error"]
        else:
            assert len(rec["cones"]) + 0 <= 2 and rec["width"] == 80
    assert summary["frames"] == len(frames) and summary["errors"] == len(WRONG_FRAMES)
    capture = cv2.VideoCapture(str(video))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == len(frames)  # frame-aligned
    capture.release()
    from rosbags.highlevel import AnyReader

    with AnyReader([bag]) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts[BagPublisher.CONES_TOPIC] == len(frames)
    assert counts[BagPublisher.IMAGE_TOPIC] == len(frames) - len(WRONG_FRAMES)


def test_a_live_camera_sending_malformed_frames_keeps_running(model):
    # A driver that hands over float or flat buffers: each is an error record, the capture
    # thread survives (it used to die on a 1-D buffer, leaving the node waiting forever).
    def image(index: int):
        if index % 3 == 1:
            return np.zeros((48, 64), np.float64)
        if index % 3 == 2:
            return np.zeros(64 * 48 * 3, np.uint8)
        return cone_image(48, 64, [(20, 8, 32, 40, BLUE)])

    source = LiveSource(lambda: ScriptedCamera(frames=30, period_s=0.01, image=image),
                        "v4l2:///dev/video0", reconnect=False)
    config = load_node_config(None, {"pipeline": {"sync": True}})
    publisher = CollectingPublisher()
    t0 = time.monotonic()
    with load_backend(model, threads=1) as backend:
        summary = Pipeline(config, backend, build_proposer(config.proposer), [publisher]).run(
            source)
    assert time.monotonic() - t0 < 10
    assert source.captured == 30 and summary["frames"] + summary["dropped"] == 30
    for rec in publisher.records:
        kind = rec["frame"] % 3
        assert ("error" in rec) == (kind != 0), rec
        if kind == 1:
            assert rec["error"] == ("frame has shape (48, 64) dtype float64; expected H×W×3 "
                                    "uint8")
    assert summary["errors"] == sum("error" in r for r in publisher.records) > 0
