"""Shutdown (issue 9): SIGINT or SIGTERM during ``python -m node replay`` (a subprocess) stops
the node cleanly: the JSONL holds only whole lines, the bag opens with rosbags, the summary is
written, and records equal frames processed (summary frames == JSONL lines == bag messages).
The exit code is 130 after SIGINT, as shells report Ctrl-C, and 0 after SIGTERM, a requested
stop (systemd's ``systemctl stop``) (issue 20)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from tests.node.backend_doubles import make_onnx
from tests.reliability.doubles import BLUE, ORANGE, YELLOW, cone_image

REPO = Path(__file__).resolve().parents[2]
FRAMES = 1500


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of small frames with six cones each, and a classifier slow enough (a few ms
    per frame) that the replay is still running when the signal comes."""
    root = tmp_path_factory.mktemp("shutdown")
    images = root / "images"
    images.mkdir()
    cones = [(10 + 25 * i, 40, 22 + 25 * i, 70, (BLUE, YELLOW, ORANGE)[i % 3]) for i in range(6)]
    _, png = cv2.imencode(".png", cone_image(96, 160, cones))
    for i in range(FRAMES):
        (images / f"{i:05d}.png").write_bytes(png.tobytes())
    model = root / "slow.onnx"
    make_onnx(model, convs=4, width=24)
    return images, model


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_replay_leaves_whole_consistent_outputs(clip, tmp_path, sig):
    from rosbags.highlevel import AnyReader

    images, model = clip
    jsonl, bag, summary = tmp_path / "cones.jsonl", tmp_path / "bag", tmp_path / "summary.json"
    node = subprocess.Popen(
        [sys.executable, "-m", "node", "replay", str(images), "--model", str(model), "--jsonl",
         str(jsonl), "--bag", str(bag), "--summary", str(summary), "--no-progress",
         "--set", "model.threads=1", "--set", "proposer.kind=colour"],  # drawn colour blobs
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while lines_in(jsonl) < 50 and node.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.poll() is None, "the replay ended before the signal: make it longer"
        node.send_signal(sig)
        out, err = node.communicate(timeout=60)
    finally:
        if node.poll() is None:
            node.kill()
    assert node.returncode == (130 if sig == signal.SIGINT else 0), err
    assert "Traceback" not in err
    data = json.loads(summary.read_text())
    assert data["interrupted"] is True and 50 <= data["frames"] < FRAMES
    assert "interrupted: stopped by signal" in out
    raw = jsonl.read_bytes()
    assert raw.endswith(b"\n")  # only whole lines
    records = [json.loads(line) for line in raw.decode().splitlines()]  # each one parses
    assert [r["frame"] for r in records] == list(range(data["frames"]))
    assert [r["source"] for r in records] == [f"{i:05d}.png" for i in range(data["frames"])]
    assert all(len(r["cones"]) <= 6 and "error" not in r for r in records)
    with AnyReader([bag]) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        cones = [c for c in reader.connections if c.topic == "/perception/cones"]
        stamps = [ts for _, ts, _ in reader.messages(connections=cones)]
    assert counts["/perception/cones"] == counts["/diagnostics"] == data["frames"]
    assert len(stamps) == data["frames"]
