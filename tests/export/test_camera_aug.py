"""Tests of ``export.camera_aug``: the randomised camera keeps the image's size and type,
varies it with the seed, never turns one cone colour into another, and its effects do what
they say (blur lowers detail, noise adds variance, drops change only round patches)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from export.camera_aug import (
    CROP,
    CROP_SATURATION,
    FRAME_PROFILES,
    PROFILES,
    STRONG_BRIGHT,
    CameraRandomisation,
    blur,
    lens_drops,
    random_aspect,
    random_camera,
    scale_saturation,
)

# BGR patches of the three cone colours as the real frames show them.
PATCHES = {"blue": (160, 70, 20), "yellow": (20, 200, 230), "orange": (20, 90, 235)}


def hue_class(bgr: np.ndarray) -> str:
    hsv = cv2.cvtColor(bgr.reshape(1, 1, 3).astype(np.uint8), cv2.COLOR_BGR2HSV)[0, 0]
    h = int(hsv[0])
    if 90 <= h <= 135:
        return "blue"
    if 20 <= h < 40:
        return "yellow"
    if h < 20 or h >= 170:
        return "orange"
    return f"other ({h})"


def test_shape_dtype_and_seed():
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    a = random_camera(img, np.random.default_rng(1))
    b = random_camera(img, np.random.default_rng(1))
    c = random_camera(img, np.random.default_rng(2))
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 1.0


def test_no_draw_turns_a_cone_colour_into_another():
    """White balance is bounded so that hue survives; noise and JPEG are off here because
    they act on single pixels, not on a patch's colour."""
    for profile in (p for p in PROFILES.values() if p is not None):
        cfg = replace(profile, p_noise=0.0, p_jpeg=0.0, p_drops=0.0)
        for name, bgr in PATCHES.items():
            patch = np.full((32, 32, 3), bgr, np.uint8)
            for seed in range(200):
                out = random_camera(patch, np.random.default_rng(seed), cfg)
                mean = out[8:24, 8:24].reshape(-1, 3).mean(0)
                if mean.max() < 25:  # too dark to have a hue at all
                    continue
                assert hue_class(mean) == name, (profile, name, seed, mean)


def test_burnt_out_frames_are_drawn_for_the_proposer_only():
    """``strong_bright`` burns out part of its draws (an orange patch clips to white or turns
    yellow), so it is a frame trainer's profile and the classifier's config refuses it."""
    import pytest

    from export.train_config import load_train_config

    assert "strong_bright" in FRAME_PROFILES and "strong_bright" not in PROFILES
    cfg = replace(STRONG_BRIGHT, p_noise=0.0, p_jpeg=0.0, p_drops=0.0, p_blur=0.0)
    patch = np.full((32, 32, 3), PATCHES["orange"], np.uint8)
    draws = [random_camera(patch, np.random.default_rng(seed), cfg)[16, 16] for seed in range(200)]
    not_orange = sum(hue_class(d.astype(np.float64)) != "orange" and d.max() >= 25
                     for d in draws)
    assert 3 <= not_orange <= 100  # some draws (8 of these 200), not most
    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ValueError, match="strong_bright"):
        load_train_config(root / "configs" / "train.yaml",
                          ["augment.camera.profile=strong_bright"])


def test_crop_profile_blurs_and_covers_a_crop_as_a_frame_blur_covers_a_small_cone():
    """On a 32 px crop the frame profile's blur is halved (it is sized for 64 px and more);
    the crop profile's is not, and its drops cover far more of the crop."""
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8)
    only = {"exposure": (1.0, 1.0), "white_balance": 0.0, "contrast": (1.0, 1.0),
            "gamma": (1.0, 1.0), "p_noise": 0.0, "p_jpeg": 0.0}

    def detail(cfg: CameraRandomisation) -> float:
        outs = [random_camera(img, np.random.default_rng(s), cfg) for s in range(100)]
        return float(np.mean([np.abs(np.diff(o.astype(float), axis=1)).mean() for o in outs]))

    frame_blur = replace(PROFILES["default"], p_blur=1.0, p_drops=0.0, **only)
    crop_blur = replace(CROP, p_blur=1.0, p_drops=0.0, **only)
    assert detail(crop_blur) < 0.8 * detail(frame_blur)

    def covered(cfg: CameraRandomisation) -> float:
        outs = [random_camera(img, np.random.default_rng(s), cfg) for s in range(100)]
        return float(np.mean([(np.abs(o.astype(int) - img).max(2) > 1).mean() for o in outs]))

    frame_drops = replace(PROFILES["default"], p_blur=0.0, p_drops=1.0, **only)
    crop_drops = replace(CROP, p_blur=0.0, p_drops=1.0, **only)
    assert covered(crop_drops) > 2 * covered(frame_drops)


def test_blur_lowers_detail_and_drops_stay_local():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (96, 96, 3)).astype(np.float32)
    blurred = blur(img, np.random.default_rng(3), 9)
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.6 * np.abs(np.diff(img, axis=1)).mean()
    dropped = lens_drops(img, np.random.default_rng(4), count=(1, 1))
    changed = np.abs(dropped - img).max(2) > 1
    assert 0 < changed.mean() < 0.2  # one drop: a small round patch


def test_aspect_is_drawn_within_its_range():
    rng = np.random.default_rng(0)
    draws = np.array([random_aspect(rng, 0.8, 2.0) for _ in range(500)])
    assert draws.min() >= 0.8 and draws.max() <= 2.0
    assert (draws > 1.5).mean() > 0.2 and (draws < 1.0).mean() > 0.1


def test_classifier_crops_get_other_cameras_repeatably():
    torch = __import__("pytest").importorskip("torch")
    from export.augment import other_cameras

    crops = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(other_cameras(crops, 0.0, (0.8, 1.9)), crops)
    torch.manual_seed(5)
    a = other_cameras(crops, 1.0, (0.8, 1.9))
    torch.manual_seed(5)
    b = other_cameras(crops, 1.0, (0.8, 1.9))
    assert a.shape == crops.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    changed = (a.int() - crops.int()).abs().float().mean((1, 2, 3))
    assert (changed > 2).all()
    # A narrowing stretch pads with the crop policy's grey at both sides.
    torch.manual_seed(0)
    narrow = other_cameras(torch.full((4, 3, 32, 32), 200, dtype=torch.uint8), 1.0, (0.5, 0.5),
                           pad_value=114)
    assert narrow.shape == (4, 3, 32, 32)


def test_saturation_is_scaled_keeping_hue_and_value_and_drawn_only_when_asked():
    patch = np.full((8, 8, 3), PATCHES["blue"], np.uint8)
    hsv = cv2.cvtColor(patch, cv2.COLOR_BGR2HSV)[0, 0].astype(int)
    pale = np.clip(scale_saturation(patch.astype(np.float32), 0.4), 0, 255).astype(np.uint8)
    pale_hsv = cv2.cvtColor(pale, cv2.COLOR_BGR2HSV)[0, 0].astype(int)
    assert abs(pale_hsv[1] - 0.4 * hsv[1]) <= 2  # saturation
    assert abs(pale_hsv[0] - hsv[0]) <= 1 and abs(pale_hsv[2] - hsv[2]) <= 1  # hue, value
    # The profile with saturation draws pale and vivid crops; without it, never pale ones.
    def saturations(profile):
        cfg = replace(profile, p_noise=0.0, p_jpeg=0.0, p_drops=0.0, p_blur=0.0)
        return [cv2.cvtColor(random_camera(patch, np.random.default_rng(seed), cfg),
                             cv2.COLOR_BGR2HSV)[..., 1].mean() for seed in range(100)]

    pale_and_vivid = saturations(CROP_SATURATION)
    assert min(pale_and_vivid) < 0.5 * hsv[1] and max(pale_and_vivid) > 0.95 * hsv[1]
    assert min(saturations(CROP)) > 0.7 * hsv[1]


def test_blur_x_scale_stretches_the_same_blur_horizontally():
    point = np.zeros((63, 63, 3), np.float32)
    point[31, 31] = 1000.0

    def spread(img: np.ndarray) -> tuple[float, float]:
        w = img[..., 0] / img[..., 0].sum()
        ys, xs = np.mgrid[:63, :63]
        return float((w * (xs - 31) ** 2).sum()), float((w * (ys - 31) ** 2).sum())

    for seed in range(12):  # both kinds: defocus and motion blur of random direction
        vx1, vy1 = spread(blur(point, np.random.default_rng(seed), 12.0))
        vx2, vy2 = spread(blur(point, np.random.default_rng(seed), 12.0, x_scale=2.0))
        assert abs(vy2 - vy1) <= 0.05 * vy1 + 0.05  # vertically the same blur
        assert 3.5 * vx1 <= vx2 <= 5.5 * vx1 + 1.5  # twice as wide: about 4x the variance
    # x_scale 1 is the blur as it was: the same draws and the same pixels.
    a = blur(point, np.random.default_rng(3), 12.0)
    np.testing.assert_array_equal(a, blur(point, np.random.default_rng(3), 12.0, x_scale=1.0))
