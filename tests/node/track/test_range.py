"""Monocular range: known geometry gives known ranges (node.track.range)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from node.track import CameraConfig, RangeEstimator, pinhole_sigma
from node.track.range import plate_reach

W = H_IMG = 640


def calibrated(**kw) -> CameraConfig:
    base = {"fx": 400.0, "fy": 500.0, "cx": 320.0, "cy": 300.0, "image_width": W,
            "image_height": H_IMG, "box_pad_px": 0.0, "sigma_h_rel": 0.0}
    base.update(kw)
    return CameraConfig(**base)


def to_camera(x: float, y_up: float, z_fwd: float, cam_h: float, pitch: float) -> np.ndarray:
    """World point (camera foot at the origin, y up) to camera axes (x right, y down, z fwd)."""
    cp, sp = math.cos(pitch), math.sin(pitch)
    dy = y_up - cam_h
    return np.array([x, -(dy * cp + z_fwd * sp), z_fwd * cp - dy * sp])


def cone_box(cfg: CameraConfig, x: float, z_fwd: float, cam_h: float, pitch: float,
             label: str = "blue_cone", cone_h: float = 0.325) -> tuple[np.ndarray, np.ndarray]:
    """Exact box of a cone at ground (x, z_fwd): tip on top, plate's front edge at the bottom;
    returns the box and the base centre in camera axes."""
    top = to_camera(x, cone_h, z_fwd, cam_h, pitch)
    dist = math.hypot(x, z_fwd)
    r = plate_reach(label)
    front = to_camera(x * (1 - r / dist), 0.0, z_fwd * (1 - r / dist), cam_h, pitch)
    v_top = cfg.cy + cfg.fy * top[1] / top[2]
    v_bot = cfg.cy + cfg.fy * front[1] / front[2]
    centre = to_camera(x, 0.0, z_fwd, cam_h, pitch)
    u = cfg.cx + cfg.fx * centre[0] / centre[2]
    half = cfg.fx * 0.1 / centre[2]
    return np.array([u - half, v_top, u + half, v_bot]), centre


def test_textbook_pinhole_on_the_horizon_row():
    # A box whose bottom sits on the horizon row: Z = fy * H / h exactly.
    cfg = calibrated()
    h = 500.0 * 0.325 / 10.0
    est = RangeEstimator(cfg).estimate(np.array([[310, 300 - h, 330, 300]]), ["blue_cone"],
                                       W, H_IMG)
    assert est.xyz[0, 2] == pytest.approx(10.0, rel=1e-9)
    assert est.basis == ["size"]
    large = RangeEstimator(cfg).estimate(np.array([[310, 300 - h, 330, 300]]),
                                         ["large_orange_cone"], W, H_IMG)
    assert large.xyz[0, 2] == pytest.approx(10.0 * 0.505 / 0.325, rel=1e-9)


@pytest.mark.parametrize("z_fwd", [3.0, 7.5, 15.0, 25.0])
def test_size_with_plate_correction_is_exact_at_zero_pitch(z_fwd):
    cfg = calibrated(pitch_deg=0.0)
    box, centre = cone_box(cfg, 0.0, z_fwd, 1.0, 0.0)
    est = RangeEstimator(cfg).estimate(box[None], ["blue_cone"], W, H_IMG)
    assert est.xyz[0, 2] == pytest.approx(centre[2], rel=1e-6)
    # without the plate correction the textbook formula is biased low near the car
    naive = 500.0 * 0.325 / (box[3] - box[1])
    assert naive < centre[2] * (0.99 if z_fwd < 10 else 1.0)


@pytest.mark.parametrize("x,z_fwd", [(-1.5, 4.0), (1.5, 9.0), (2.0, 18.0)])
def test_ground_plane_with_known_height_and_pitch(x, z_fwd):
    pitch = math.radians(8.0)
    cfg = calibrated(height_m=1.1, pitch_deg=8.0)
    box, centre = cone_box(cfg, x, z_fwd, 1.1, pitch)
    est = RangeEstimator(cfg).estimate(box[None], ["yellow_cone"], W, H_IMG)
    assert est.basis == ["size+ground"]
    assert est.range_m[0] == pytest.approx(np.linalg.norm(centre), rel=0.01)
    assert est.xyz[0] == pytest.approx(centre, abs=0.02 * z_fwd)


def test_ground_plane_outweighs_a_wrong_box_height():
    # The box is 30 % too tall (a detector error); its bottom row is right. With the camera
    # height and a steady pitch the ground estimate dominates and the range stays close.
    cfg = calibrated(height_m=1.2, pitch_deg=5.0, sigma_pitch_deg=0.0)
    box, centre = cone_box(cfg, 0.5, 8.0, 1.2, math.radians(5.0))
    box[1] = box[3] - 1.3 * (box[3] - box[1])
    fused = RangeEstimator(cfg).estimate(box[None], ["blue_cone"], W, H_IMG)
    size = RangeEstimator(calibrated(pitch_deg=5.0)).estimate(box[None], ["blue_cone"], W,
                                                             H_IMG)
    truth = np.linalg.norm(centre)
    assert abs(size.range_m[0] - truth) / truth > 0.15
    assert abs(fused.range_m[0] - truth) / truth < 0.05


def test_sigma_is_the_pinhole_formula():
    assert pinhole_sigma(10.0, 1.0, 500.0, 0.325) == pytest.approx(100 / 162.5)
    cfg = calibrated(sigma_h_px=2.0, pitch_deg=0.0)
    h = 500.0 * 0.325 / 10.0
    # on the horizon row the plate term vanishes; off-axis the range is longer than Z
    box = np.array([[600, 300 - h, 620, 300]])
    est = RangeEstimator(cfg).estimate(box, ["blue_cone"], W, H_IMG)
    z = est.xyz[0, 2]
    assert est.sigma_m[0] == pytest.approx(z * z * 2.0 / (500 * 0.325) * est.range_m[0] / z)
    assert est.range_m[0] > z
    # relative noise adds in quadrature: sigma_h = sqrt(2^2 + (0.1 h)^2)
    rel = RangeEstimator(calibrated(sigma_h_px=2.0, sigma_h_rel=0.1, pitch_deg=0.0)).estimate(
        box, ["blue_cone"], W, H_IMG)
    assert rel.sigma_m[0] / est.sigma_m[0] == pytest.approx(math.hypot(2, 0.1 * h) / 2)
    # an unconfigured pitch widens the interval: sigma_Z^2 + Z^2 ((off_axis s)^2 + (s^2/2)^2)
    unknown = RangeEstimator(calibrated(sigma_h_px=2.0)).estimate(box, ["blue_cone"], W, H_IMG)
    s = math.radians(8.0)
    off_axis = (300 - h / 2 - 300) / 500.0
    extra = z * math.hypot(off_axis * s, s * s / 2)
    assert unknown.sigma_m[0] == pytest.approx(
        math.hypot(z * z * 2.0 / (500 * 0.325), extra) * est.range_m[0] / z)


def test_range_grows_as_cones_sit_higher_in_the_image():
    cfg = calibrated(height_m=1.0, pitch_deg=6.0)
    boxes = [cone_box(cfg, 0.0, z, 1.0, math.radians(6.0))[0] for z in (3, 5, 8, 12, 18, 26)]
    est = RangeEstimator(cfg).estimate(np.array(boxes), ["blue_cone"] * 6, W, H_IMG)
    rows = np.array(boxes)[:, 3]
    assert np.all(np.diff(rows) < 0) and np.all(np.diff(est.range_m) > 0)


def test_default_field_of_view_is_documented_in_the_basis():
    est = RangeEstimator(CameraConfig()).estimate(np.array([[300, 280, 310, 300]]),
                                                  ["blue_cone"], 640, 360)
    assert est.basis == ["size@default_hfov"]
    fx, fy, cx, cy = CameraConfig().intrinsics(640, 360)
    assert (fx, fy, cx, cy) == pytest.approx((320.0, 320.0, 320.0, 180.0))
    # frames squeezed from 16:9 to a square: fy is 16/9 times fx
    fx, fy, _, _ = CameraConfig(native_aspect=16 / 9).intrinsics(640, 640)
    assert fy / fx == pytest.approx(16 / 9)
    assert "default" in RangeEstimator().note


def test_intrinsics_scale_with_the_frame_and_come_from_camera_info():
    cfg = CameraConfig.from_camera_info({"k": [800, 0, 640, 0, 810, 360, 0, 0, 1],
                                         "width": 1280, "height": 720}, height_m=1.0)
    assert cfg.intrinsics(640, 360) == pytest.approx((400.0, 405.0, 320.0, 180.0))
    assert cfg.height_m == 1.0

    class Info:  # a sensor_msgs/CameraInfo-like message
        k = (500.0, 0, 320, 0, 500, 240, 0, 0, 1)
        width, height = 640, 480

    assert CameraConfig.from_camera_info(Info()).fy == 500.0


@pytest.mark.parametrize("bad,key", [
    ({"hfov_deg": float("nan")}, "hfov_deg"), ({"hfov_deg": 200}, "hfov_deg"),
    ({"height_m": -1.0}, "height_m"), ({"sigma_h_px": float("inf")}, "sigma_h_px"),
    ({"fx": 500.0}, "cx"), ({"pitch": 3}, "pitch"), ({"height_m": "1"}, "height_m"),
    ({"fx": 1.0, "fy": 1.0, "cx": 1.0, "cy": 1.0}, "image_width"),
])
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(ValueError, match=f"camera.{key}"):
        RangeEstimator.from_config(bad)
