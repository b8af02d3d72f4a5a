"""The synthetic scene renderer: exact labels, YOLO round trip, determinism, coverage, CLI.

Exactness is checked two ways: from the renderer's own geometry (each cone's polygons are
rasterised here, alone, and hidden by the nearer cones and the car), and from the pixels of a
clean render (flat backdrop, no clutter, no camera effects), where every non-backdrop pixel
must be a labelled cone's.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from export.synth import (
    RenderOptions,
    SynthFrame,
    _camera,
    main,
    render_clip,
    render_scene,
    render_view,
    write_dataset,
)
from export.synth.layout import build_scene
from export.synth.scene import Prop
from node.classes import BLUE, CONE_CLASSES, LARGE_ORANGE, ORANGE, YELLOW
from node.evaluate.datasets import read_yolo
from node.evaluate.score import iou_matrix

FLAT = (0, 255, 0)  # no cone paint is pure green
CLEAN = {"flat_background": FLAT, "clutter": False, "car": False, "effects": False,
         "shadows": False}


def _geometry_mask(faces: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons given in continuous pixel coordinates (pixel centres at +0.5)."""
    mask = np.zeros(shape, np.uint8)
    for poly in faces:
        pts = np.rint((np.asarray(poly) - 0.5) * 16).astype(np.int32)
        cv2.fillConvexPoly(mask, pts, 1, cv2.LINE_8, 4)
    return mask.astype(bool)


def _bbox(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _check_geometry(frame: SynthFrame) -> int:
    shape = frame.image.shape[:2]
    hidden = frame.occluder_mask.copy()
    order = np.argsort([c.depth for c in frame.cones])
    for i in order:  # nearest first: each cone is hidden by the nearer ones
        cone = frame.cones[i]
        own = _geometry_mask(cone.faces, shape)
        shown = own.copy()
        if frame.prop_depth is not None:  # props in front of the cone hide it too
            shown &= ~(frame.prop_depth < cone.depth)
        visible = shown & ~hidden
        assert visible.sum() * 2 >= own.sum(), "a cone less than half visible was labelled"
        np.testing.assert_allclose(frame.boxes[i], _bbox(visible), atol=1.0)
        hidden |= shown
    return len(order)


@pytest.mark.parametrize("seed, size", [(0, (640, 640)), (1, (640, 640)), (2, (640, 480)),
                                        (3, (320, 320))])
def test_boxes_are_tight_on_each_cones_own_geometry(seed: int, size: tuple[int, int]) -> None:
    frame = render_scene(seed, *size)
    assert frame.image.shape == (size[1], size[0], 3) and frame.image.dtype == np.uint8
    assert len(frame.boxes) == len(frame.labels) == len(frame.cones) > 0
    assert _check_geometry(frame) == len(frame.boxes)
    assert frame.boxes.dtype == np.float32
    assert (frame.boxes[:, :2] >= 0).all() and (frame.boxes[:, 2] <= size[0]).all()
    assert (frame.boxes[:, 3] <= size[1]).all()


def test_a_prop_in_front_of_a_cone_hides_it_and_its_label() -> None:
    opts = RenderOptions(effects=False, shadows=False)
    scene = build_scene(np.random.default_rng(7), 120.0, (10.0, 50.0))
    camera = _camera(scene, 10.0, 0.0, 0.0, 0.0, 640, 640)
    before = render_view(scene, camera, np.random.default_rng(0), opts)
    # The nearest labelled cone in the open, 6-25 m ahead, and where it stands in the world.
    xz = np.array([c.xz for c in scene.cones])
    cam = camera.to_camera(np.column_stack([xz[:, 0], np.zeros(len(xz)), xz[:, 1]]))
    depths = [c.depth for c in before.cones]
    target = next(i for i in np.argsort(depths) if 6.0 < depths[i] < 25.0
                  and before.cones[i].mask.sum() == _geometry_mask(
                      before.cones[i].faces, (640, 640)).sum())
    k = int(np.argmin(np.abs(cam[:, 2] - depths[target])))  # a cone's depth is its base's z
    # A 2 m wide, 2 m tall board halfway between the camera and that cone, facing the camera.
    mid = (np.asarray(scene.cones[k].xz) + (camera.position[0], camera.position[2])) / 2
    board = Prop("box", (float(mid[0]), float(mid[1])), (2.0, 0.2, 2.0), (200, 200, 200),
                 camera.yaw)
    scene.props.append(board)
    after = render_view(scene, camera, np.random.default_rng(0), opts)
    box = before.boxes[target]
    assert not (iou_matrix(box[None], after.boxes) > 0.3).any()  # its label is gone
    x1, y1, x2, y2 = box.astype(int)
    patch = after.image[y1:y2, x1:x2].reshape(-1, 3).astype(int)
    # and the board's grey, not the cone's colour, fills its box
    assert (np.abs(patch - patch.mean(axis=0)).max(axis=1) < 40).mean() > 0.9
    assert np.isfinite(after.prop_depth[y1:y2, x1:x2]).all()
    assert (after.prop_depth[y1:y2, x1:x2] < depths[target]).all()
    # Only cones behind the board lost their labels; the others keep the same boxes.
    for b, cone in zip(before.boxes, before.cones):
        x1, y1, x2, y2 = b.astype(int)
        behind = (after.prop_depth[y1:y2, x1:x2] < cone.depth).mean()
        kept = any(np.allclose(b, a) for a in after.boxes)
        assert kept == (behind == 0.0) or 0.0 < behind < 1.0, (b, behind)
    assert len(after.boxes) >= len(before.boxes) // 3


def test_clean_render_every_cone_pixel_is_labelled_and_boxes_touch_paint() -> None:
    checked = 0
    for seed in range(4):
        frame = render_scene(seed, **CLEAN)
        painted = (frame.image != FLAT).any(axis=2)
        covered = np.zeros_like(painted)
        for box, cone in zip(frame.boxes.astype(int), frame.cones):
            x1, y1, x2, y2 = box
            covered[y1:y2, x1:x2] = True
            region = np.zeros_like(painted)
            oy, ox = cone.origin[1], cone.origin[0]
            region[oy:oy + cone.mask.shape[0], ox:ox + cone.mask.shape[1]] = cone.mask
            assert painted[region].all()  # its visible pixels are really painted
            np.testing.assert_array_equal(_bbox(region), box)  # and the box is tight on them
            checked += 1
        assert painted.any() and not (painted & ~covered).any()  # no unlabelled paint
    assert checked > 20


def test_cone_paint_matches_its_label() -> None:
    hues: dict[str, list[float]] = {BLUE: [], YELLOW: [], ORANGE: [], LARGE_ORANGE: []}
    for seed in range(6):
        frame = render_scene(seed, **CLEAN)
        hsv = cv2.cvtColor(frame.image, cv2.COLOR_BGR2HSV)
        for cone in frame.cones:
            if cone.mask.sum() < 60:
                continue
            ox, oy = cone.origin
            pix = hsv[oy:oy + cone.mask.shape[0], ox:ox + cone.mask.shape[1]][cone.mask]
            coloured = pix[pix[:, 1] > 120]  # drop the white/black stripes
            hues[cone.label].append(float(np.median(coloured[:, 0])))
    assert all(len(v) >= 3 for v in hues.values()), {k: len(v) for k, v in hues.items()}
    assert all(95 <= h <= 125 for h in hues[BLUE])  # OpenCV hue: blue ~ 100-120
    assert all(20 <= h <= 35 for h in hues[YELLOW])
    assert all(3 <= h <= 18 for h in hues[ORANGE] + hues[LARGE_ORANGE])


def test_large_orange_cones_are_taller_than_small_ones_at_the_same_depth() -> None:
    ratios = []
    for seed in range(12):
        frame = render_scene(seed, **CLEAN)
        for cone in frame.cones:
            if cone.mask.size and cone.box[1] > 0 and cone.box[0] > 0:
                height = cone.box[3] - cone.box[1]
                ratios.append((cone.label, height * cone.depth / frame.camera.fy))
    metres = {label: np.median([r for lab, r in ratios if lab == label]) for label in CONE_CLASSES}
    assert abs(metres[BLUE] - 0.325) < 0.06 and abs(metres[YELLOW] - 0.325) < 0.06
    assert abs(metres[LARGE_ORANGE] - 0.505) < 0.08


def test_yolo_files_round_trip_through_the_reader(tmp_path: Path) -> None:
    frames = list(render_clip(4, 3))
    assert write_dataset(tmp_path, frames) == 3
    samples = read_yolo(tmp_path)  # names come from the written data.yaml
    assert [s.image_path.name for s in samples] == ["00000.jpg", "00001.jpg", "00002.jpg"]
    for sample, frame in zip(samples, frames):
        assert sample.labels == frame.labels
        np.testing.assert_allclose(sample.boxes, frame.boxes, atol=0.01)
        diff = np.abs(sample.load().astype(int) - frame.image.astype(int)).mean()
        assert diff < 3.0
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert [data["names"][i] for i in range(len(CONE_CLASSES))] == list(CONE_CLASSES)


def test_same_seed_same_bytes_other_seed_differs() -> None:
    a, b, c = render_scene(5), render_scene(5), render_scene(6)
    assert a.image.tobytes() == b.image.tobytes()
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert a.image.tobytes() != c.image.tobytes()
    clip_a = [f.image.tobytes() for f in render_clip(9, 3)]
    assert clip_a == [f.image.tobytes() for f in render_clip(9, 3)]
    rng_frame = render_scene(np.random.default_rng(5))
    assert rng_frame.image.tobytes() == a.image.tobytes()


def test_every_class_appears_and_blue_is_left_yellow_right() -> None:
    counts: Counter[str] = Counter()
    side = Counter()
    for seed in range(20):
        frame = render_scene(seed, return_leg=False)
        counts.update(frame.labels)
        width = frame.image.shape[1]
        for cone in frame.cones:
            if cone.depth < 10 and cone.label in (BLUE, YELLOW):
                side[cone.label, (cone.box[0] + cone.box[2]) / 2 < width / 2] += 1
    assert set(counts) == set(CONE_CLASSES)
    assert min(counts.values()) >= 0.05 * sum(counts.values())  # orange is well represented
    assert side[BLUE, True] >= 0.85 * (side[BLUE, True] + side[BLUE, False]) > 10
    assert side[YELLOW, False] >= 0.85 * (side[YELLOW, True] + side[YELLOW, False]) > 10


def test_clip_is_temporally_coherent() -> None:
    frames = list(render_clip(3, 4, fps=10))
    moves = []
    for prev, cur in itertools.pairwise(frames):
        assert prev.camera.position != cur.camera.position
        # Consecutive frames are alike: far closer than two unrelated scenes are.
        near = np.abs(prev.image.astype(int) - cur.image.astype(int)).mean()
        moves.append(near)
    unrelated = np.abs(frames[0].image.astype(int) - render_scene(77).image.astype(int)).mean()
    assert max(moves) < 0.5 * unrelated


def test_cli_writes_dataset_and_matching_video(tmp_path: Path) -> None:
    out, video = tmp_path / "synth", tmp_path / "clip.mp4"
    argv = ["--out", str(out), "--frames", "4", "--seed", "2", "--width", "320", "--height",
            "240", "--video", str(video)]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.jpg" for i in range(4)]
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"{i:05d}.txt" for i in range(4)]
    expected = list(render_clip(2, 4, 320, 240))
    samples = read_yolo(out)
    for sample, frame in zip(samples, expected):
        assert sample.labels == frame.labels and sample.size == (320, 240)
    cap = cv2.VideoCapture(str(video))
    decoded = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        decoded.append(img.astype(int))
    cap.release()
    assert len(decoded) == 4 and decoded[0].shape == (240, 320, 3)
    for i, img in enumerate(decoded):  # video frame i is image i, not its neighbours
        errors = [np.abs(img - f.image.astype(int)).mean() for f in expected]
        assert int(np.argmin(errors)) == i and errors[i] < 6


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--frames", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--frames must be >= 1" in err[0]
    assert main(["--out", str(tmp_path), "--frames", "1", "--width", "64", "--height", "64"]) == 0
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--frames", "1"])
    assert "already holds 1 frames; use --force" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown render option 'fog'"):
        render_scene(0, fog=True)


def test_nose_blue_panels_stay_inside_the_documented_envelope() -> None:
    from export.synth.camera import NOSE_BLUE_ENVELOPE, draw_car_nose, random_car_nose

    size = 320
    envelope = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(envelope, np.rint(np.array(NOSE_BLUE_ENVELOPE) * size).astype(np.int32), 1)
    envelope = cv2.dilate(envelope, np.ones((3, 3), np.uint8)).astype(bool)  # 1 px rounding
    blue_cars = 0
    for seed in range(60):
        car = random_car_nose(np.random.default_rng(seed))
        img = np.zeros((size, size, 3), np.uint8)
        covered = draw_car_nose(img, car, (0.0, 0.0))
        # The car fills the bottom middle; above it only the camera mount's edge tube.
        assert covered[-1, size // 2] and not covered[: size // 3, : size * 9 // 10].any()
        if car.accent_bgr is None:
            continue
        blue = (img == car.accent_bgr).all(axis=2)
        assert blue.sum() > 100 and not (blue & ~envelope).any()
        blue_cars += 1
    assert blue_cars > 20
