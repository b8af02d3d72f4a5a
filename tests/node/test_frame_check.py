"""Tests of ``node.sources.frame_check`` and ``python -m node check``: what each reading measures
(burnt-out share, blur, noise), the lines and the share of frames that flags a property,
the exposure stage's caps, and the command's report on sharp, blurred and burnt-out frames
(written as image folders). With ``../shared`` present, the recorded held-out frames pass
and their blurred and burnt-out variants are flagged."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from node.__main__ import main as node_main
from node.node_config import load_node_config
from node.sources.frame_check import (
    LINES,
    MAX_BLUR_PX,
    WARN_SHARE,
    CameraWatch,
    blur_px,
    clipped_share,
    judge,
    look_at,
    noise_sigma,
    proposer_view,
    sharpness,
    summarise,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "bgracing"
LINE = {line.name: line for line in LINES}


def blocks_frame(seed: int = 0, height: int = 480, width: int = 640) -> np.ndarray:
    """Hard-edged rectangles of random colours on grey, as a sharp camera sees cones, lines
    and kerbs: every edge a one-pixel step."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 110, np.uint8)
    for _ in range(60):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        w, h = int(rng.integers(4, 40)), int(rng.integers(8, 60))
        img[y:y + h, x:x + w] = rng.integers(20, 240, 3)
    return img


def motion_blurred(img: np.ndarray, length: int) -> np.ndarray:
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2] = 1.0 / length
    return cv2.filter2D(img, -1, kernel)


@pytest.fixture(scope="module")
def config():
    return load_node_config(None, [])


def test_burnt_out_share_counts_white_pixels_only():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :5] = 255              # a quarter burnt out to white
    img[:, 5:10] = (255, 0, 0)    # saturated blue: a strong colour, not burnt out
    img[:, 10:12] = (255, 255, 249)  # one channel just below the level
    assert clipped_share(img) == pytest.approx(0.25)


def test_blur_reads_the_sigma_of_a_gaussian_blur_and_crosses_the_line(config):
    sharp = blocks_frame()
    assert blur_px(sharpness(proposer_view(sharp, config))) < 0.3   # step edges
    for sigma in (0.7, 1.0, 2.0, 3.0):
        blurred = cv2.GaussianBlur(sharp, (0, 0), sigma)
        assert blur_px(sharpness(proposer_view(blurred, config))) == pytest.approx(sigma,
                                                                                   rel=0.1)
    # Noise and JPEG's block edges do not pass for detail.
    rng = np.random.default_rng(5)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 2.0).astype(np.float32)
    noisy = np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8)
    _, jpeg = cv2.imencode(".jpg", blurred.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 20])
    for img in (noisy, cv2.imdecode(jpeg, cv2.IMREAD_COLOR)):
        assert blur_px(sharpness(proposer_view(img, config))) == pytest.approx(2.0, rel=0.15)
    # A motion blur's flat profile reads as a wider Gaussian; 9 and 15 px (the lengths of
    # the variants that lost cones) read beyond the line.
    for length in (9, 15):
        blurred = motion_blurred(sharp, length)
        assert LINE["blur"].limit < blur_px(sharpness(proposer_view(blurred, config))) \
            <= MAX_BLUR_PX
    assert np.isnan(sharpness(np.full((64, 64), 90, np.float32)))  # no edge at all
    assert np.isnan(blur_px(float("nan"))) and blur_px(1.0) == MAX_BLUR_PX
    assert blur_px(2.0) == 0.0


def test_noise_estimate_reads_the_added_sigma():
    rng = np.random.default_rng(3)
    flat = np.full((240, 320), 120.0, np.float32)
    assert noise_sigma(flat) == pytest.approx(0.0, abs=1e-6)
    for sigma in (3.0, 10.0):
        noisy = flat + rng.normal(0, sigma, flat.shape).astype(np.float32)
        assert noise_sigma(noisy) == pytest.approx(sigma, rel=0.05)


def test_a_large_frame_is_read_as_the_proposer_shrinks_it_and_a_small_one_as_it_is(config):
    big = np.zeros((1536, 2048, 3), np.uint8)     # 3.1 M pixels: shrunk to 2 M
    small = np.zeros((320, 800, 3), np.uint8)     # enlarged by the proposer: read as it is
    assert proposer_view(big, config).shape == (1224, 1632)
    assert proposer_view(small, config).shape == (320, 800)
    look = look_at(small, config)
    assert (look.view_width, look.view_height) == (1011, 404)  # what the proposer sees
    # heatmap_resize: square squashes every frame to the model's input (640 px, its metadata).
    square = load_node_config(None, ["proposer.heatmap_resize=square"])
    wide = np.zeros((640, 2592, 3), np.uint8)
    assert proposer_view(wide, square).shape == (640, 640)


def test_judge_flags_a_property_once_enough_frames_cross_its_line():
    line = LINE["blur"]
    n = 20
    beyond = int(np.ceil(WARN_SHARE * n))
    values = [line.limit + 0.5] * beyond + [line.limit - 0.5] * (n - beyond)
    got = judge({"blur": values})["blur"]
    assert got["beyond"] == pytest.approx(beyond / n) and got["flagged"]
    fewer = judge({"blur": values[1:] + [line.limit - 0.5]})["blur"]
    assert not fewer["flagged"]
    # Frames without edges are left out, not counted as sharp or blurred.
    assert judge({"blur": [float("nan")] * 3 + [line.limit + 1]})["blur"]["beyond"] == 1.0
    assert judge({"blur": [float("nan")]})["blur"] == {"median": None, "beyond": 0.0,
                                                       "flagged": False}
    assert judge({"noise": [LINE["noise"].limit + 1]})["noise"]["flagged"]
    assert set(judge({"clipped": [0.0], "other": [1.0]})) == {"clipped"}


def test_the_exposure_stage_caps_are_reported(config):
    dark = (blocks_frame(1) // 40).astype(np.uint8)     # bright end about 6: past x8
    look = look_at(dark, config)
    assert look.brightening == pytest.approx(config.exposure.max_gain)
    assert look.brightening_capped
    normal = look_at(blocks_frame(1), config)
    assert not normal.brightening_capped and normal.brightening == pytest.approx(1.0)
    cast = blocks_frame(2).astype(np.float32)
    cast[..., 0] *= 0.2                                  # blue channel at a fifth: beyond x2
    assert look_at(cast.astype(np.uint8), config).wb_capped
    assert not normal.wb_capped


def test_summarise_rows_and_advice(config):
    looks = [look_at(blocks_frame(s), config) for s in range(3)]
    looks += [look_at(cv2.GaussianBlur(blocks_frame(s), (0, 0), 2.5), config) for s in range(3)]
    report = summarise(looks, config)
    rows = {v.name: v for v in report.verdicts}
    assert list(rows)[:3] == ["clipped", "blur", "noise"]
    assert rows["blur"].flagged and rows["blur"].beyond == pytest.approx(0.5)
    assert "blurred" in rows["blur"].note and "focus" in rows["blur"].advice
    assert not rows["clipped"].flagged and rows["clipped"].note == ""
    assert report.sizes == [(640, 480, 739, 554)]
    assert report.to_dict()["flagged"] == ["blur"]
    with pytest.raises(ValueError, match="no frame"):
        summarise([], config)


def test_the_watch_reads_a_frame_every_period_in_its_own_thread(config):
    watch = CameraWatch(config, every_s=5.0, window=3)
    try:
        sharp, blurred = blocks_frame(), cv2.GaussianBlur(blocks_frame(), (0, 0), 3.0)
        for stamp in (0.0, 1.0, 4.9):          # one read: the others come too soon
            watch.offer(sharp, stamp)
            assert watch.wait_idle()
        assert watch.read == 1 and watch.warning() is None
        for stamp in (5.0, 10.0, 15.0):        # three blurred frames fill the window of 3
            watch.offer(blurred, stamp)
            assert watch.wait_idle()
        report = watch.report()
        assert report["read"] == 4 and report["window"] == 3
        assert report["blur"]["flagged"] and report["blur"]["beyond"] == 1.0
        assert report["blur"]["median"] == pytest.approx(3.0, rel=0.1)
        warning = watch.warning()
        assert warning.startswith("camera: blur ") and "line 2.2" in warning
        assert "blurred" in warning and "python -m node check" in warning
        assert watch.diagnostic_values()["camera_frames_read"] == 4
        watch.offer(sharp, 3.0)                # the stream went back (a new clip): read
        assert watch.wait_idle() and watch.read == 5
        watch.offer(None, 100.0)               # an unreadable frame is no reading
        assert watch.wait_idle() and watch.read == 5
    finally:
        watch.close()
    assert not watch._thread.is_alive()
    watch.offer(sharp, 200.0)                  # closed: ignored
    assert watch.read == 5


def test_the_watch_is_off_at_zero(config):
    assert CameraWatch.from_config(load_node_config(None, ["camera_watch.every_s=0"])) is None
    watch = CameraWatch.from_config(config)
    try:
        assert watch.every_s == 5.0 and watch.report() == {"read": 0, "window": 0}
    finally:
        watch.close()


def test_a_live_run_logs_the_camera_warning_when_it_appears_changes_and_clears():
    from types import SimpleNamespace

    from node.pipeline import Pipeline

    said = {"now": None}
    lines: list[str] = []
    pipeline = SimpleNamespace(camera_watch=SimpleNamespace(warning=lambda: said["now"]),
                               _camera_said=None, report=lines.append)
    for now in (None, "camera: blur 2.9", "camera: blur 2.9", "camera: blur 3.1", None, None):
        said["now"] = now
        Pipeline._report_camera(pipeline)
    assert lines == ["warning: camera: blur 2.9", "warning: camera: blur 3.1",
                     "camera: the frames read lie within the validated range again"]


def test_a_replay_of_blurred_frames_warns_in_its_summary(tmp_path, capsys):
    frames = [cv2.GaussianBlur(blocks_frame(s), (0, 0), 3.0) for s in range(6)]
    folder = _folder(tmp_path / "fog", frames)
    summary = tmp_path / "summary.json"
    # Image folders are stamped as they are read: a tiny period reads as many as it can.
    assert node_main(["replay", str(folder), "--sync", "--no-progress", "--summary",
                      str(summary), "--set", "camera_watch.every_s=0.000001"]) == 0
    report = json.loads(summary.read_text())
    assert 1 <= report["camera_watch"]["read"] <= 6
    assert report["camera_watch"]["blur"]["flagged"]
    assert report["camera_warning"].startswith("camera: blur ")
    assert f"warning: {report['camera_warning']}" in capsys.readouterr().out
    sharp = _folder(tmp_path / "clear", [blocks_frame(s) for s in range(6)])
    assert node_main(["replay", str(sharp), "--sync", "--no-progress", "--summary",
                      str(summary), "--overwrite", "--set", "camera_watch.every_s=0.000001"]) == 0
    report = json.loads(summary.read_text())
    assert report["camera_watch"]["read"] >= 1 and "camera_warning" not in report


def _folder(path: Path, frames: list[np.ndarray]) -> Path:
    path.mkdir()
    for i, img in enumerate(frames):
        cv2.imwrite(str(path / f"{i:03d}.png"), img)
    return path


def test_check_command_passes_a_sharp_camera_and_flags_a_blurred_one(tmp_path, capsys):
    sharp = _folder(tmp_path / "sharp", [blocks_frame(s) for s in range(4)])
    assert node_main(["check", str(sharp), "--json", str(tmp_path / "sharp.json")]) == 0
    out = capsys.readouterr().out
    assert "4 frames checked (every 1), 640x480 (proposer sees 739x554)" in out
    assert "**check**" not in out and "Nothing beyond" in out
    assert json.loads((tmp_path / "sharp.json").read_text())["flagged"] == []

    blurred = _folder(tmp_path / "blurred", [motion_blurred(blocks_frame(s), 15)
                                             for s in range(4)])
    assert node_main(["check", str(blurred), "--json", str(tmp_path / "blurred.json")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| blur"))
    assert row.endswith("| 100% | **check** |")
    assert "focus the lens" in out.lower()
    assert json.loads((tmp_path / "blurred.json").read_text())["flagged"] == ["blur"]


def test_check_command_flags_burnt_out_frames_and_spreads_its_frames(tmp_path, capsys):
    frames = []
    for s in range(12):
        img = blocks_frame(s)
        if s % 2:
            img[:350] = 255           # 73 % of the frame white
        frames.append(img)
    folder = _folder(tmp_path / "sun", frames)
    assert node_main(["check", str(folder), "--frames", "6", "--every", "1",
                      "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["frames"] == 6 and report["flagged"] == ["clipped"]
    rows = {v["name"]: v for v in report["verdicts"]}
    assert rows["clipped"]["beyond"] == pytest.approx(0.5)
    capsys.readouterr()
    assert node_main(["check", str(folder), "--frames", "4"]) == 0
    assert "4 frames checked (every 3)" in capsys.readouterr().out


def test_check_command_spreads_its_frames_over_a_video(tmp_path, capsys):
    video = tmp_path / "drive.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (640, 480))
    for s in range(30):
        writer.write(blocks_frame(s))
    writer.release()
    assert node_main(["check", str(video), "--frames", "6"]) == 0
    out = capsys.readouterr().out
    assert "6 frames checked (every 5), 640x480" in out and "Nothing beyond" in out


def test_check_command_errors_name_the_problem(tmp_path, capsys):
    assert node_main(["check", str(tmp_path / "missing")]) == 1
    assert "missing: no such file or directory" in capsys.readouterr().err
    assert node_main(["check", str(tmp_path), "--frames", "0"]) == 1
    assert "--frames 0: expected at least 1" in capsys.readouterr().err
    assert node_main(["check", str(tmp_path), "--set", "exposure.nope=1"]) == 2
    assert "exposure.nope" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/bgracing")
def test_recorded_frames_pass_and_their_blurred_and_burnt_out_variants_are_flagged(config):
    from export.data import clip_and_frame, is_heldout
    from export.variants import CORRUPTIONS
    from node.evaluate.datasets import load_samples

    samples = [s for s in load_samples(f"yolo:{SHARED}")
               if is_heldout(*clip_and_frame(s.image_path), ["accel", "autox2", "skidpad:20-37"])]
    images = [s.load() for s in samples[::2]]

    def flagged(fn=None, strength=0) -> list[str]:
        looks = [look_at(fn(im, strength, np.random.default_rng(i)) if fn else im, config)
                 for i, im in enumerate(images)]
        return [v.name for v in summarise(looks, config).flagged]

    assert flagged() == []
    # The node keeps >= 0.90 of its recall on these (docs/validation.md): not flagged.
    for name, strength in (("motion_blur", 1), ("defocus", 1), ("overexposed", 2),
                           ("noise", 3), ("tint_cool", 3), ("haze", 3)):
        assert flagged(CORRUPTIONS[name], strength) == [], name
    # And loses cones on these: flagged.
    assert flagged(CORRUPTIONS["motion_blur"], 3) == ["blur"]
    assert flagged(CORRUPTIONS["defocus"], 3) == ["blur"]
    assert flagged(CORRUPTIONS["overexposed"], 3) == ["clipped"]
