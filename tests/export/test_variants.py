"""Tests of ``export.variants`` and ``export.validate``: each camera variant moves the labels
with the pixels (a painted box stays under its label), the horizon lands where it is asked,
corruptions keep the size and grow with their strength, and the validation run scores the
node's real detections on rendered frames against their ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.variants import CORRUPTIONS, build_variants, estimate_horizon

H = W = 640


def painted_frame(boxes: np.ndarray) -> np.ndarray:
    """A dark frame with a white rectangle where every box is."""
    img = np.full((H, W, 3), 40, np.uint8)
    for x1, y1, x2, y2 in boxes.astype(int):
        img[y1:y2, x1:x2] = 255
    return img


BOXES = np.array([[100, 300, 120, 340], [400, 250, 410, 266], [300, 500, 360, 600]],
                 np.float32)


@pytest.mark.parametrize("variant", [v for v in build_variants() if v.kind == "geometry"],
                         ids=lambda v: v.name)
def test_geometry_variants_move_the_labels_with_the_pixels(variant):
    img, boxes, kept = variant.apply(painted_frame(BOXES), BOXES, 0.4, 0)
    assert img.dtype == np.uint8 and img.ndim == 3
    assert len(boxes) == int(kept.sum()) >= 1
    for x1, y1, x2, y2 in boxes:
        inner = img[int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2]
        assert inner.size and inner.mean() > 200  # the white box is under its label
        if y1 > 3:
            assert img[int(y1) - 3, int((x1 + x2) / 2)].mean() < 200  # and ends at its edge


def test_sizes_and_aspect_of_the_sensor_variants():
    by_name = {v.name: v for v in build_variants()}
    img, boxes, _ = by_name["unstretch"].apply(painted_frame(BOXES), BOXES, 0.4, 0)
    assert img.shape[:2] == (640, 1138)
    np.testing.assert_allclose((boxes[:, 2] - boxes[:, 0]) / (BOXES[:, 2] - BOXES[:, 0]),
                               1138 / 640, rtol=1e-3)
    for name, size in (("wide_2592x640", (640, 2592)), ("large_2048x1536", (1536, 2048)),
                       ("small_800x320", (320, 800))):
        img, boxes, _ = by_name[name].apply(painted_frame(BOXES), BOXES, 0.4, 0)
        assert img.shape[:2] == size
        aspect = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
        np.testing.assert_allclose(aspect, (BOXES[:, 2] - BOXES[:, 0])
                                   / (BOXES[:, 3] - BOXES[:, 1]) * 16 / 9, rtol=0.03)


@pytest.mark.parametrize("variant", [v for v in build_variants() if v.kind == "geometry"],
                         ids=lambda v: v.name)
def test_each_variant_declares_how_much_taller_it_makes_a_cone(variant):
    _, boxes, kept = variant.apply(painted_frame(BOXES), BOXES, 0.4, 0)
    grown = (boxes[:, 3] - boxes[:, 1]) / (BOXES[kept, 3] - BOXES[kept, 1])
    np.testing.assert_allclose(grown, variant.scale(W, H), rtol=0.01)


def test_horizon_lands_where_asked():
    assert estimate_horizon([BOXES, BOXES + 10], H) == pytest.approx((266 + 276) / 2 / H)
    by_name = {v.name: v for v in build_variants()}
    for target in (25, 40, 60):
        _, boxes, kept = by_name[f"horizon_{target}"].apply(painted_frame(BOXES), BOXES,
                                                            0.5, 0)
        dy = (target / 100 - 0.5) * H
        moved = np.clip(BOXES + [0, dy, 0, dy], 0, H)[kept]  # clipped where it leaves
        np.testing.assert_allclose(boxes, moved, atol=1)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_keep_the_frame_and_grow_with_strength(name):
    rng = np.random.default_rng(0)
    img = (rng.integers(0, 255, (H, W // 4, 3)) * 0.3 + 90).astype(np.uint8)
    img = np.ascontiguousarray(np.repeat(img, 4, axis=1))  # some low-frequency detail
    by_name = {v.name: v for v in build_variants([name])}
    change = []
    for k in (1, 2, 3):
        out, boxes, kept = by_name[f"{name}_{k}"].apply(img, BOXES, 0.4, 7)
        assert out.shape == img.shape and out.dtype == np.uint8 and kept.all()
        np.testing.assert_array_equal(boxes, BOXES)
        change.append(np.abs(out.astype(int) - img).mean())
    assert 0 < change[0] <= change[1] <= change[2]


def test_overexposure_burns_bright_surfaces_out_and_defocus_spreads_an_edge():
    """``overexposed``: grey 100 becomes 150, 200 and 255 (clipped); ``defocus``: a sharp
    step spreads over more pixels at each strength."""
    by_name = {v.name: v for v in build_variants(["overexposed", "defocus"])}
    grey = np.full((H, W, 3), 100, np.uint8)
    levels = [int(by_name[f"overexposed_{k}"].apply(grey, BOXES, 0.4, 0)[0][0, 0, 0])
              for k in (1, 2, 3)]
    assert levels == [150, 200, 255]
    step = np.zeros((H, W, 3), np.uint8)
    step[:, W // 2:] = 200
    rows = [by_name[f"defocus_{k}"].apply(step, BOXES, 0.4, 0)[0][H // 2, :, 0] for k in (1, 2, 3)]
    spread = [int((row % 200 != 0).sum()) for row in rows]  # neither 0 nor 200: the blurred edge
    assert 0 < spread[0] < spread[1] < spread[2]


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="--variants fog: unknown variant"):
        build_variants(["fog"])


@pytest.mark.slow
def test_validation_scores_the_node_on_rendered_frames(tmp_path):
    """Four rendered frames through the whole node, base and two variants: the base recall
    matches a replay of the same frames scored by ``node.evaluate``, the proposals' recall
    bounds the node's, and the table, JSON and plot are written."""
    pytest.importorskip("export.synth")
    from export.synth import main as synth_main
    from export.validate import main

    data = tmp_path / "synth"
    assert synth_main(["--out", str(data), "--frames", "4", "--seed", "31"]) == 0
    out = tmp_path / "val"
    rc = main(["variants", "--data", f"yolo:{data}", "--out", str(out),
               "--variants", "noise_1", "unstretch", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "variants.json").read_text())["variants"]
    assert list(report) == ["base", "unstretch", "noise_1"]
    base = report["base"]["all"]
    assert base["frames"] == 4 and base["labelled_cones"] > 10
    assert base["recall_ge12"] >= 0.6  # the shipped node finds most rendered cones
    assert report["base"]["recall_vs_base"] == 1.0
    assert report["unstretch"]["size"] == [1138, 640]
    assert "| unstretch | 1138×640 |" in (out / "variants.md").read_text()
    # The node's cones are a subset of the proposals, so the proposals find at least as many.
    for row in report.values():
        assert row["all"]["recall_ge12"] <= row["proposal_recall_ge12"] <= 1.0
    assert "proposals' recall %" in (out / "variants.md").read_text()
    # The camera check's readings of each variant's frames: noise raises the noise reading.
    for row in report.values():
        assert set(row["camera_check"]) == {"clipped", "blur", "noise"}
        assert all(0.0 <= v["beyond"] <= 1.0 for v in row["camera_check"].values())
    assert (report["noise_1"]["camera_check"]["noise"]["median"]
            > report["base"]["camera_check"]["noise"]["median"] + 2.0)
    assert "`node check`: burnt out / blur px / noise |" in (out / "variants.md").read_text()
