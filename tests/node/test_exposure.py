"""Tests of ``node.sources.exposure`` and the pipeline's exposure stage: white-balance gains
that make grey pixels grey, the brightening a frame gets from its own bright end, the colour
a pale frame gets back, frames that need nothing left alone, the smoothing against amplified noise, and the whole node finding the
cones of dark and colour-cast synthetic clips that it misses without the stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.evaluate.score import match_greedy
from node.node_config import ExposureConfig, load_node_config
from node.sources.exposure import (
    GRID,
    LUMA,
    Exposure,
    apply_gains,
    beyond_tolerance,
    bright_level,
    chroma_level,
    dark_level,
    exposure_gain,
    grey_gains,
    sample_pixels,
)
from node.types import Frame

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "cone_classifier.cpu.int8.onnx"
PROPOSER = REPO / "models" / "cone_proposer.onnx"


def gradient_frame(height: int, width: int) -> np.ndarray:
    """Grey levels 0..255 rising left to right, the same in every channel."""
    row = np.linspace(0, 255, width).astype(np.uint8)
    return np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=2)


def road_frame(cast=(1.0, 1.0, 1.0), seed: int = 0) -> np.ndarray:
    """Grey asphalt of varied brightness with a few strongly coloured patches (cones, grass),
    a white line and a shadow, seen through a per-channel ``cast`` (B, G, R)."""
    rng = np.random.default_rng(seed)
    img = np.repeat(rng.uniform(60, 200, (240, 320, 1)), 3, axis=2)
    img[20:60, 30:50] = (200, 80, 20)    # a blue cone (BGR)
    img[100:140, 200:220] = (20, 200, 230)  # a yellow one
    img[180:240, :] = (40, 140, 60)      # grass along the bottom
    img[170:178, :] = 245                # a white line: the bright end needs no brightening
    img[:24, 260:] = 12                  # a shadow: the dark end of a frame not veiled
    return np.clip(img * np.asarray(cast), 0, 255).astype(np.uint8)


def pale(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` (float or uint8 BGR) with every pixel's chroma times ``factor`` about its
    luma: a camera with weak colour."""
    luma = (image.astype(np.float64) @ LUMA.astype(np.float64))[..., None]
    return luma + factor * (image - luma)


@pytest.mark.parametrize("size", [(640, 640), (320, 800), (1536, 2048)])
def test_statistics_read_a_fixed_grid_of_pixels_at_any_frame_size(size):
    image = gradient_frame(*size)
    pixels = sample_pixels(image)
    assert len(pixels) == 3
    assert all(c.dtype == np.float32 for c in pixels)
    assert len({c.size for c in pixels}) == 1 and 18 * 18 <= pixels[0].size <= GRID * GRID
    # The grid spans the frame: the gradient's values from near 0 to near 255.
    assert pixels[1].min() < 255 / GRID and pixels[1].max() > 255 * (1 - 1 / GRID)
    image[..., 0] //= 4  # a dimmer channel does not count: the brightest does
    full = np.percentile(image.max(axis=2), 99)
    assert abs(bright_level(sample_pixels(image), 99.0) - full) <= 255 / GRID


@pytest.mark.parametrize("cast", [(1.3, 1.0, 0.75), (0.75, 1.0, 1.3), (0.8, 1.2, 0.8)])
def test_white_balance_makes_the_grey_pixels_grey_again(cast):
    neutral, tinted = road_frame(), road_frame(cast)
    gains = grey_gains(sample_pixels(tinted))
    assert gains.mean() == pytest.approx(1.0, abs=1e-5)  # brightness kept
    # The gains undo the cast up to a common factor.
    undone = gains * np.asarray(cast, np.float32)
    np.testing.assert_allclose(undone / undone.mean(), 1.0, atol=0.03)
    corrected = apply_gains(tinted, gains).astype(float)
    asphalt = (slice(60, 100), slice(60, 190))
    channel_means = corrected[asphalt].reshape(-1, 3).mean(axis=0)
    assert np.ptp(channel_means) < 0.03 * channel_means.mean()
    # The coloured patches keep their colour: a blue cone stays blue.
    b, g, r = corrected[30, 40]
    assert b > 2 * r and b > 1.5 * g
    # A neutral frame with the same coloured patches needs (almost) nothing.
    np.testing.assert_allclose(grey_gains(sample_pixels(neutral)), 1.0, atol=0.03)


def test_only_the_part_of_a_cast_beyond_the_tolerance_is_corrected():
    mild = np.array([1.06, 1.0, 0.95], np.float32)  # within 10 %: the networks take it
    np.testing.assert_allclose(beyond_tolerance(mild, 0.1), 1.0, atol=1e-6)
    strong = np.array([1.3, 1.0, 0.75], np.float32)
    kept = beyond_tolerance(strong, 0.1)
    assert kept.mean() == pytest.approx(1.0, abs=1e-5)
    # the blue-to-red ratio 1.3 / 0.75 = 1.73 is corrected down to 1.73 / 1.1**2 = 1.43
    assert kept[0] / kept[2] == pytest.approx(1.3 / 0.75 / 1.1 ** 2, rel=1e-4)
    np.testing.assert_allclose(beyond_tolerance(strong, 0.0), strong / strong.mean(), rtol=1e-5)
    # continuous: a cast just beyond the tolerance is barely corrected
    edge = beyond_tolerance(np.array([1.101, 1.0, 1 / 1.101], np.float32), 0.1)
    np.testing.assert_allclose(edge, 1.0, atol=2e-3)
    # a frame whose cast is within the tolerance is not copied; a stronger one is corrected
    within = road_frame((1.03, 1.0, 0.97))
    assert Exposure(ExposureConfig(auto_gain=False))(within) is within  # default 5 %
    beyond = road_frame((1.3, 1.0, 0.75))
    assert Exposure(ExposureConfig(auto_gain=False))(beyond) is not beyond
    mild = road_frame((1.08, 1.0, 0.92))  # beyond 5 %, within 10 %
    assert Exposure(ExposureConfig(auto_gain=False))(mild) is not mild
    assert Exposure(ExposureConfig(auto_gain=False, wb_tolerance=0.1))(mild) is mild


def test_white_balance_gains_are_bounded():
    blue = np.zeros((100, 100, 3), np.uint8)
    blue[..., 0] = 200
    blue[..., 1:] = 20
    gains = grey_gains(sample_pixels(blue), max_gain=2.0)
    ratio = gains / gains.mean()
    assert ratio.max() / ratio.min() <= 4.0 + 1e-4  # at most 2x either way before normalising


def test_a_frame_that_needs_nothing_is_left_untouched():
    image = gradient_frame(120, 160)
    assert exposure_gain(bright_level(sample_pixels(image)), 230.0, 8.0) == 1.0
    assert Exposure()(image) is image  # grey and bright: no copy, no change


def test_a_dark_frame_is_scaled_so_its_bright_end_reaches_the_target():
    bright = gradient_frame(120, 160)
    dark = (bright.astype(np.float32) * 0.25).astype(np.uint8)
    level = bright_level(sample_pixels(dark))
    gain = exposure_gain(level, 230.0, 8.0)
    assert gain == pytest.approx(230.0 / level) and 3.5 < gain < 4.5
    out = Exposure(ExposureConfig(white_balance=False, denoise_sigma=0.0))(dark)
    assert abs(bright_level(sample_pixels(out)) - 230.0) <= 1.0
    # The same picture, brighter: proportional to the original within the rounding of the
    # darkening (1 level, times the gain).
    np.testing.assert_allclose(out.astype(float), bright * 0.25 * gain, atol=gain + 1.0)
    assert dark.max() == 63  # the input is not modified in place


def test_a_veiled_frame_is_stretched_from_max_black_to_the_target():
    """Haze or glare (the frame blended half-way with grey 200) lifts the dark end from 12 to
    106: the stage maps the dark end back to ``max_black`` and the bright end to
    the target, in proportion between them; a frame whose dark end is below ``max_black`` is
    left alone, and the report counts the veiled frames."""
    from node.sources.exposure import describe

    clear = road_frame()
    veiled = (clear.astype(np.float32) * 0.5 + 100).astype(np.uint8)
    pixels = sample_pixels(veiled)
    dark, bright = dark_level(pixels), bright_level(pixels)
    assert dark_level(sample_pixels(clear)) < 30 < dark
    stage = Exposure(ExposureConfig(white_balance=False, saturation=False, denoise_sigma=0.0))
    assert stage(clear) is clear
    out = stage(veiled)
    after = sample_pixels(out)
    assert dark_level(after) == pytest.approx(30, abs=1.5)
    assert bright_level(after) == pytest.approx(230, abs=1.5)
    gain = (230 - 30) / (bright - dark)
    np.testing.assert_allclose(out.astype(float), np.clip(30 + (veiled - dark) * gain, 0, 255),
                               atol=1.0)
    report = stage.report()
    assert report["black_lowered"] == 1 and report["mean_black_lowered"] == pytest.approx(
        dark - 30, abs=0.1)
    assert "1 of 2 veiled" in describe(report)
    off = Exposure(ExposureConfig(white_balance=False, saturation=False, black_level=False))
    assert dark_level(sample_pixels(off(veiled))) > 100  # brightened only, still veiled


def test_the_gain_is_capped_and_a_black_frame_stays_black():
    black = np.zeros((64, 64, 3), np.uint8)
    assert exposure_gain(bright_level(sample_pixels(black)), 230.0, 8.0) == 8.0
    assert not Exposure()(black).any()


def test_a_brightened_frame_is_smoothed_against_the_noise_the_gain_amplifies():
    rng = np.random.default_rng(0)
    dark = np.clip(40 + rng.normal(0, 4.0, (200, 200, 3)), 0, 255).astype(np.uint8)
    dark[:4, :4] = 50  # a bright corner sets the level: gain 230 / 50 = 4.6
    def brightened(sigma: float) -> np.ndarray:
        stage = Exposure(ExposureConfig(white_balance=False, denoise_sigma=sigma))
        return stage(dark)[8:, 8:].astype(float)

    raw, smoothed = brightened(0.0), brightened(0.5)
    assert raw.std() > 15.0  # the noise, amplified by the gain
    assert smoothed.std() < 0.6 * raw.std()
    assert abs(smoothed.mean() - raw.mean()) < 1.0  # smoothing keeps the brightness


def test_a_pale_frame_gets_its_colour_raised_to_the_floor_and_greys_stay_grey():
    colourful = road_frame()
    assert chroma_level(sample_pixels(colourful)) > 100
    assert Exposure()(colourful) is colourful  # colourful enough: untouched
    washed = np.clip(pale(road_frame(), 0.15), 0, 255).astype(np.uint8)
    level = chroma_level(sample_pixels(washed))
    assert 15 < level < 35
    stage = Exposure()
    gain = stage.gains(washed)[2]
    assert gain == pytest.approx(40.0 / level)
    out = stage(washed)
    # The most coloured pixels reach the floor (40 grey levels of chroma), within rounding.
    assert abs(chroma_level(sample_pixels(out)) - 40.0) <= 2.0
    asphalt = (slice(60, 100), slice(60, 190))  # grey stays grey, at the same brightness
    np.testing.assert_array_equal(out[asphalt], washed[asphalt])
    b, g, r = out[30, 40].astype(int)  # the blue cone: its chroma times the gain
    b0, g0, r0 = washed[30, 40].astype(int)
    assert abs((b - r) - gain * (b0 - r0)) <= 1.5 and abs((g - r) - gain * (g0 - r0)) <= 1.5
    luma = LUMA.astype(float)
    assert abs(out[30, 40] @ luma - washed[30, 40] @ luma) <= 1.5
    # Capped: a nearly grey frame is raised by at most max_saturation_gain.
    faint = np.clip(pale(road_frame(), 0.02), 0, 255).astype(np.uint8)
    stage = Exposure(ExposureConfig(max_saturation_gain=2.0))
    assert stage.gains(faint)[2] == 2.0
    off = Exposure(ExposureConfig(saturation=False))
    assert off.gains(washed)[2] == 1.0 and off(washed) is washed


def test_the_stage_reports_what_it_corrected():
    from node.sources.exposure import describe

    stage = Exposure()
    grey = gradient_frame(60, 80)
    washed = np.clip(pale(road_frame(), 0.15), 0, 255).astype(np.uint8)
    for image in (grey, road_frame((1.3, 1.0, 0.75)), (grey * 0.25).astype(np.uint8), washed):
        stage(image)
    report = stage.report()
    assert report["frames"] == 4
    assert report["white_balanced"] == 1 and report["brightened"] == 1
    assert report["saturated"] == 1 and 1.2 < report["mean_saturation"] <= 2.0
    b, _, r = report["mean_wb_gains"]
    assert b < 1.0 < r
    assert 3.5 < report["mean_brightening"] < 4.5
    line = describe(report)
    assert "1 of 4 frames white-balanced" in line and "1 of 4 brightened" in line
    assert "1 of 4 more colourful" in line
    assert describe(Exposure().report()) is None  # nothing corrected: nothing to say


def test_exposure_settings_are_checked():
    from node.config import ConfigError

    with pytest.raises(ConfigError, match="exposure.max_gain"):
        load_node_config(None, {"exposure": {"max_gain": 0.5}})
    with pytest.raises(ConfigError, match="exposure.max_wb_gain"):
        load_node_config(None, {"exposure": {"max_wb_gain": 0.9}})
    with pytest.raises(ConfigError, match="exposure.max_saturation_gain"):
        load_node_config(None, {"exposure": {"max_saturation_gain": 0.5}})
    with pytest.raises(ConfigError, match="exposure.min_chroma"):
        load_node_config(None, {"exposure": {"min_chroma": 300}})
    with pytest.raises(ConfigError, match="exposure.max_black"):
        load_node_config(None, {"exposure": {"max_black": -1}})
    section = load_node_config(None).exposure
    assert section.auto_gain and section.white_balance and section.saturation  # on by default
    assert section.black_level


def test_a_classifier_trained_on_other_white_balanced_frames_is_named_in_a_warning():
    """A classifier whose metadata says its training frames were white-balanced with one
    tolerance (``data.normalise``) gets a warning line when the config's stage differs, none
    when it agrees or the model says nothing; the run summary prints it."""
    from node.cli.common import format_summary
    from node.sources.exposure import training_mismatch

    trained = {"normalise": {"wb_tolerance": 0.0}}
    assert training_mismatch({}, ExposureConfig()) is None
    assert training_mismatch({"normalise": {"wb_tolerance": True}}, ExposureConfig()) is None
    assert training_mismatch(trained, ExposureConfig(wb_tolerance=0.0)) is None
    line = training_mismatch(trained, ExposureConfig(wb_tolerance=0.1))
    assert line == ("the classifier was trained on frames white-balanced with wb_tolerance 0, "
                    "but exposure.wb_tolerance is 0.1")
    off = training_mismatch(trained, ExposureConfig(white_balance=False, wb_tolerance=0.0))
    assert off is not None and "exposure.white_balance is off" in off
    summary = {"mode": "sync", "cones": 0, "candidates_per_frame": 0.0, "frames": 0, "fps": 0.0,
               "wall_s": 0.0, "dropped": 0, "errors": 0, "exposure_warning": line}
    assert f"warning: {line}" in format_summary(summary).splitlines()


@pytest.mark.skipif(not (BUNDLED.is_file() and PROPOSER.is_file()),
                    reason="bundled models not present")
def test_the_node_finds_the_cones_of_dark_and_colour_cast_clips_only_with_the_stage():
    """A synthetic clip as rendered, darkened as by a camera at dusk (gain 0.12, sensor noise
    sigma 4), seen through a white balance off towards blue (B x1.5, R x0.6), by a camera
    of weak colour (chroma x0.15) and through haze or glare (x0.3 + 140): the whole node with
    the default config, and on the altered clips also with the stage off. Publishers get the
    frames as captured."""
    synth = pytest.importorskip("export.synth")
    from node.cli.demo import SYNTH_BODY_MASK
    from node.infer import load_backend
    from node.pipeline import Pipeline
    from node.propose import build_proposer

    rng = np.random.default_rng(5)
    scenes = list(synth.render_clip(11, 20))
    looks = {"as rendered": lambda im: im,
             "dark": lambda im: im * 0.12 + rng.normal(0, 4.0, im.shape),
             "cool": lambda im: im * np.array([1.5, 1.0, 0.6]),
             "pale": lambda im: pale(im, 0.15),
             "veiled": lambda im: im * 0.3 + 140}
    clips = {name: [Frame(i, float(i), np.clip(look(s.image), 0, 255).astype(np.uint8))
                    for i, s in enumerate(scenes)] for name, look in looks.items()}

    class Recorder:
        wants_image = False

        def __init__(self) -> None:
            self.results = []

        def publish(self, result, image=None) -> None:
            self.results.append(result)

        def close(self) -> None:
            pass

    recall = {}
    runs = [("as rendered", True), ("dark", False), ("dark", True), ("cool", False),
            ("cool", True), ("pale", False), ("pale", True), ("veiled", False),
            ("veiled", True)]
    for clip, stage in runs:
        frames = clips[clip]
        config = load_node_config(None, {"proposer": {"body_mask": SYNTH_BODY_MASK},
                                         "exposure": {"auto_gain": stage,
                                                      "white_balance": stage,
                                                      "saturation": stage,
                                                      "black_level": stage}})
        publisher = Recorder()
        with load_backend(BUNDLED) as backend:
            summary = Pipeline(config, backend, build_proposer(config.proposer),
                               [publisher]).run(frames)
        if stage:  # the run's summary says what the stage did
            report = summary["exposure"]
            assert report["frames"] == len(frames)
            if clip == "dark":
                assert report["brightened"] == len(frames)
                assert 5.0 < report["mean_brightening"] <= 8.0  # 0.12 darkening, capped at 8
            if clip == "cool":
                assert report["white_balanced"] == len(frames) and report["brightened"] == 0
                b, _, r = report["mean_wb_gains"]
                assert b < 0.8 and r > 1.25  # undoes B x1.5, R x0.6 down to the tolerance
            if clip == "pale":
                assert report["saturated"] == len(frames) and report["brightened"] == 0
                assert 1.3 < report["mean_saturation"] < 1.8  # chroma about 26 raised to 40
        else:
            assert "exposure" not in summary
        found = total = 0
        for scene, frame, result in zip(scenes, frames, publisher.results, strict=True):
            assert result.frame.image is frame.image  # published as captured
            tall = scene.boxes[scene.boxes[:, 3] - scene.boxes[:, 1] >= 16]
            boxes = np.array([c.box for c in result.cones], np.float32).reshape(-1, 4)
            scores = np.array([c.score for c in result.cones], np.float64)
            found += int((match_greedy(boxes, scores, tall) >= 0).sum())
            total += len(tall)
        recall[clip, stage] = found / total
    print("synthetic clip, recall of cones >= 16 px: "
          + "; ".join(f"{clip}, stage {'on' if on else 'off'} {r:.3f}"
                      for (clip, on), r in recall.items()))
    # Measured (2026-12-07): 106/116 = 0.914 as rendered; darkened 0.802 without the stage and
    # 0.914 with it; colour-cast 0.000 without and 0.914 with it (a milder cast, B x1.3 and
    # R x0.75, does not hurt on these rendered frames; on real ones it does,
    # docs/validation.md); pale (chroma x0.15) 0.603 without and 0.793 with it (raised to
    # x0.23 of the rendered colour, as these frames are far more colourful than real ones);
    # veiled (x0.3 + 140, its blacks at 140) 0.759 without and 0.905 with it.
    assert total >= 100
    reference = recall["as rendered", True]
    for clip in ("dark", "cool"):
        assert recall[clip, True] >= reference - 0.03
        assert recall[clip, False] <= recall[clip, True] - 0.06
    assert recall["pale", True] >= recall["pale", False] + 0.1
    assert recall["veiled", True] >= reference - 0.03
    assert recall["veiled", True] >= recall["veiled", False] + 0.1
