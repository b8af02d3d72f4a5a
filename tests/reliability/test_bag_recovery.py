"""A bag interrupted by ``kill -9`` (issue 20, item 2): the node flushes whole MCAP chunks at
least every second, and ``python -m node reindex DIR`` (like ``ros2 bag reindex``) makes the
interrupted bag readable with every message up to the last flushed chunk."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import cv2
import pytest

from node.__main__ import main
from node.cli.reindex import recover
from node.publish.publishers import BagPublisher
from node.types import Cone, Frame, FrameResult
from tests.reliability.doubles import BLUE, ORANGE, YELLOW, cone_image

REPO = Path(__file__).resolve().parents[2]
FRAMES = 3000


def result(i: int) -> FrameResult:
    image = cone_image(48, 64, [(10, 10, 20, 40, BLUE)])
    frame = Frame(i, 1_700_000_000.0 + i / 30, image, f"{i}.png", 0.0)
    cone = Cone((10.0, 10.0, 20.0, 40.0), "blue_cone", 0.9)
    return FrameResult(frame, [cone], {"capture": 1.0, "total": 2.0}, 1, None)


def read_bag(path: Path) -> dict[str, list[int]]:
    from rosbags.highlevel import AnyReader

    with AnyReader([path]) as reader:
        out: dict[str, list[int]] = {c.topic: [] for c in reader.connections}
        for connection, stamp, _ in reader.messages():
            out[connection.topic].append(stamp)
    return out


def killed_copy(bag: Path, dest: Path, keep: int | None = None) -> Path:
    """What a SIGKILL leaves: the MCAP file as written so far (its first ``keep`` bytes when
    the kill came in the middle of a write), no summary, no footer and no metadata.yaml."""
    dest.mkdir()
    (mcap,) = bag.glob("*.mcap")
    data = mcap.read_bytes()
    (dest / mcap.name).write_bytes(data[:keep])
    return dest


def test_reindex_recovers_every_message_of_the_flushed_chunks(tmp_path, capsys):
    publisher = BagPublisher(tmp_path / "bag", flush_interval_s=0.0)  # a chunk per frame
    try:
        for i in range(5):
            publisher.publish(result(i))
        whole = killed_copy(tmp_path / "bag", tmp_path / "whole")
        before = (whole / "bag.mcap").stat().st_size
        publisher.publish(result(5))
        after = (tmp_path / "bag" / "bag.mcap").stat().st_size
        # Killed halfway through writing frame 5's chunk: that chunk is lost, the rest is not.
        torn = killed_copy(tmp_path / "bag", tmp_path / "torn", keep=(before + after) // 2)
    finally:
        publisher.close()
    for bag in (whole, torn):
        with pytest.raises(Exception):  # noqa: B017 - unreadable before reindex
            read_bag(bag)
        assert main(["reindex", str(bag)]) == 0
    out = capsys.readouterr().out
    assert out.count("/perception/cones: 5 messages") == 2  # the report counts per topic
    stamps = [int((1_700_000_000.0 + i / 30) * 1e9) for i in range(5)]
    for bag in (whole, torn):
        topics = read_bag(bag)
        assert len(topics["/perception/cones"]) == 5 == len(topics["/diagnostics"])
        assert topics["/perception/cones"] == pytest.approx(stamps, abs=1000)


def test_a_chunk_reaches_the_disk_at_least_every_second(tmp_path, monkeypatch):
    # A clock that advances 0.25 s per frame: small messages never fill rosbags' 1 MiB chunk,
    # so without a periodic flush nothing would be on disk when the node is killed.
    clock = [1000.0]
    monkeypatch.setattr("node.publish.publishers.time", types.SimpleNamespace(
        monotonic=lambda: clock[0], time=time.time, perf_counter=time.perf_counter))
    publisher = BagPublisher(tmp_path / "bag")
    try:
        for i in range(12):
            clock[0] += 0.25
            publisher.publish(result(i))
            data = (tmp_path / "bag" / "bag.mcap").read_bytes()
            found = recover(data) if data else None  # the header too may still be buffered
            on_disk = 0 if found is None else sum(
                found.channels[c][1] == "/perception/cones" for _, c, _ in found.messages)
            assert on_disk >= i + 1 - 4, f"frame {i}: only {on_disk} frames on disk"
    finally:
        publisher.close()


def test_reindex_refuses_a_folder_without_a_bag_in_one_line(tmp_path, capsys):
    assert main(["reindex", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and len(err.splitlines()) == 1


def test_reindex_leaves_a_whole_bag_as_it_is(tmp_path, capsys):
    with BagPublisher(tmp_path / "bag") as publisher:
        for i in range(3):
            publisher.publish(result(i))
    before = {p.name: p.read_bytes() for p in (tmp_path / "bag").iterdir()}
    assert main(["reindex", str(tmp_path / "bag")]) == 0
    assert "readable" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "bag").iterdir()} == before


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    images = tmp_path_factory.mktemp("killed") / "images"
    images.mkdir()
    cones = [(10 + 25 * i, 40, 22 + 25 * i, 70, (BLUE, YELLOW, ORANGE)[i % 3]) for i in range(6)]
    _, png = cv2.imencode(".png", cone_image(96, 160, cones))
    for i in range(FRAMES):
        (images / f"{i:05d}.png").write_bytes(png.tobytes())
    return images


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_9_while_writing_a_bag_then_reindex_recovers_it(clip, model, tmp_path):
    jsonl, bag = tmp_path / "cones.jsonl", tmp_path / "bag"
    node = subprocess.Popen(
        [sys.executable, "-m", "node", "replay", str(clip), "--model", str(model), "--jsonl",
         str(jsonl), "--bag", str(bag), "--no-progress", "--set", "model.threads=1",
         "--set", "proposer.kind=colour"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while lines_in(jsonl) < 20 and node.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        published = lines_in(jsonl)  # frames published at least this long before the kill:
        time.sleep(1.6)  # a chunk is flushed at least every second
        assert node.poll() is None, "the replay ended before the kill: make it longer"
        at_kill = lines_in(jsonl)
        node.send_signal(signal.SIGKILL)
        node.communicate(timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
    assert at_kill > published  # it was still working
    assert not (bag / "metadata.yaml").exists()
    done = subprocess.run([sys.executable, "-m", "node", "reindex", str(bag)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    topics = read_bag(bag)
    cones = topics["/perception/cones"]
    assert published <= len(cones) <= at_kill
    assert len(topics["/diagnostics"]) == len(cones)
    assert cones == sorted(cones)
