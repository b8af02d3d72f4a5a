"""Tests of ``node.propose.heatmap``: CenterNet decoding on hand-made heatmaps (known peaks →
exact boxes), the cap, clipping to the frame, the model's metadata contract, and the shipped
model's recall on synthetic frames it was not trained on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from node.evaluate.score import match_greedy
from node.node_config import ProposerConfig, load_node_config
from node.propose import build_proposer
from node.propose.heatmap import (
    HeatmapModelError,
    HeatmapProposer,
    ProposerMetadata,
    decode_heatmap,
    heatmap_band,
    input_geometry,
    open_session,
)
from node.types import Frame

MODEL = Path(__file__).resolve().parents[2] / "models" / "cone_proposer.onnx"
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="models/cone_proposer.onnx absent")
G, STRIDE = 20, 4


def outputs_with_peaks(peaks: list[tuple[int, int, float, float, float, float, float]]):
    """Heat, log size and offset maps with peaks (ix, iy, score, h, w, off_x, off_y)."""
    heat = np.full((G, G), 0.01, np.float32)
    size = np.zeros((2, G, G), np.float32)
    offset = np.zeros((2, G, G), np.float32)
    for ix, iy, score, h, w, ox, oy in peaks:
        heat[iy, ix] = score
        if ix + 1 < G:
            heat[iy, ix + 1] = 0.5 * score  # a shoulder, not a peak
        size[:, iy, ix] = np.log(h), np.log(w)
        offset[:, iy, ix] = ox, oy
    return heat, size, offset


def cones_found_in_rescaled_scenes(proposers: dict, seeds, side: int, min_px: float
                                   ) -> tuple[dict, int]:
    """Rendered 640x640 scenes resized to ``side`` x ``side`` (area shrinking, bilinear
    enlarging): each proposer's labelled cones >= ``min_px`` found at IoU 0.5 (its boxes stay
    inside the frame), and the number of such cones."""
    pytest.importorskip("export.synth")
    from export.synth import render_scene

    found = dict.fromkeys(proposers, 0)
    total = 0
    for seed in seeds:
        scene = render_scene(seed, 640, 640)
        image = cv2.resize(scene.image, (side, side), interpolation=cv2.INTER_AREA
                           if side < 640 else cv2.INTER_LINEAR)
        truth = scene.boxes * (side / 640)
        truth = truth[(truth[:, 3] - truth[:, 1]) >= min_px]
        total += len(truth)
        for name, proposer in proposers.items():
            boxes = proposer.propose(Frame(0, 0.0, image))
            assert boxes.size == 0 or (boxes[:, 2].max() <= side and boxes[:, 3].max() <= side)
            match = match_greedy(boxes, -np.arange(len(boxes), dtype=float), truth)
            found[name] += int((match >= 0).sum())
    return found, total


def test_decoder_turns_known_peaks_into_exact_boxes():
    heat, size, offset = outputs_with_peaks([(5, 6, 0.9, 12.0, 6.0, 0.25, 0.5),
                                             (12, 3, 0.6, 8.0, 4.0, 0.0, 0.75)])
    boxes, scores = decode_heatmap(heat, size, offset, STRIDE, 0.3, 10, scale=(2.0, 2.0))
    # Centre (5.25, 6.5) cells = (21, 26) input px = (42, 52) frame px; 12x6 input px = 24x12.
    np.testing.assert_allclose(boxes, [[36, 40, 48, 64], [92, 22, 100, 38]], atol=1e-4)
    np.testing.assert_allclose(scores, [0.9, 0.6], atol=1e-6)  # shoulders are not peaks


def test_decoder_threshold_and_cap_keep_the_highest_peaks():
    peaks = [(2 * i % G, 2 * i // G * 2, 0.2 + 0.05 * i, 8.0, 4.0, 0.5, 0.5) for i in range(12)]
    heat, size, offset = outputs_with_peaks(peaks)
    boxes, scores = decode_heatmap(heat, size, offset, STRIDE, 0.42, 3)
    assert len(boxes) == 3
    np.testing.assert_allclose(scores, [0.75, 0.70, 0.65], atol=1e-6)
    boxes, scores = decode_heatmap(heat, size, offset, STRIDE, 0.42, 100)
    assert len(boxes) == 7 and scores.min() >= 0.42  # 0.45 .. 0.75


def test_decoder_clips_boxes_to_the_frame():
    heat, size, offset = outputs_with_peaks([(0, 0, 0.9, 40.0, 30.0, 0.1, 0.1),
                                             (19, 19, 0.8, 40.0, 30.0, 0.9, 0.9)])
    boxes, _ = decode_heatmap(heat, size, offset, STRIDE, 0.3, 10, (1.0, 1.0), (80, 80))
    assert len(boxes) == 2
    assert boxes.min() >= 0 and boxes[:, [0, 2]].max() <= 80 and boxes[:, [1, 3]].max() <= 80
    np.testing.assert_allclose(boxes[0], [0, 0, 15.4, 20.4], atol=1e-4)


def test_decoder_places_a_band_at_its_top_row():
    heat, size, offset = outputs_with_peaks([(5, 6, 0.9, 12.0, 6.0, 0.25, 0.5)])
    boxes, _ = decode_heatmap(heat, size, offset, STRIDE, 0.3, 10, (2.0, 2.0), None, 64)
    # As in the exact-boxes test, 64 input rows (128 frame rows) lower.
    np.testing.assert_allclose(boxes, [[36, 40 + 128, 48, 64 + 128]], atol=1e-4)


def two_overlapping_cones():
    """Cone A's peak at cell (5, 6), 12x6 input px; cone B one cell to its right of A's
    neighbour, at (7, 6), whose heat (0.6) is a shoulder of A's (the cell between them holds
    0.8), so B has no peak. Every cell of a cone's region regresses to that cone's box, as the
    proposer is trained: the cells at (6, 6) and (8, 6) point back at A and at B."""
    heat = np.full((G, G), 0.01, np.float32)
    size = np.zeros((2, G, G), np.float32)
    offset = np.zeros((2, G, G), np.float32)
    for ix, score, cone_x in ((5, 0.9, 5.25), (6, 0.8, 5.25), (7, 0.6, 7.5), (8, 0.5, 7.5)):
        heat[6, ix] = score
        size[:, 6, ix] = np.log(12.0), np.log(6.0)
        offset[:, 6, ix] = cone_x - ix, 0.5
    return heat, size, offset


def test_decoder_finds_a_cone_on_its_neighbours_shoulder():
    heat, size, offset = two_overlapping_cones()
    boxes, scores = decode_heatmap(heat, size, offset, STRIDE, 0.3, 10)
    # Peaks only: A, centre (21, 26) input px.
    np.testing.assert_allclose(boxes, [[18, 20, 24, 32]], atol=1e-4)
    boxes, scores = decode_heatmap(heat, size, offset, STRIDE, 0.3, 10, shoulders=True)
    # And B, centre (30, 26); (6, 6) decodes into A's box and (8, 6) into B's: not cones.
    np.testing.assert_allclose(boxes, [[18, 20, 24, 32], [27, 20, 33, 32]], atol=1e-4)
    np.testing.assert_allclose(scores, [0.9, 0.6], atol=1e-6)
    # Below the threshold a shoulder is not a cone either; the cap keeps the strongest.
    boxes, _ = decode_heatmap(heat, size, offset, STRIDE, 0.65, 10, shoulders=True)
    assert len(boxes) == 1
    boxes, _ = decode_heatmap(heat, size, offset, STRIDE, 0.3, 1, shoulders=True)
    np.testing.assert_allclose(boxes, [[18, 20, 24, 32]], atol=1e-4)


def test_shoulders_never_split_one_cone():
    """One cone's blob of heat, every cell above the threshold: each cell inside the cone's
    box, whatever it regresses to, and each that regresses to the cone, is the same cone."""
    heat = np.full((G, G), 0.01, np.float32)
    size = np.zeros((2, G, G), np.float32)
    offset = np.zeros((2, G, G), np.float32)
    yy, xx = np.mgrid[0:G, 0:G]
    blob = (np.abs(yy - 10) <= 2) & (np.abs(xx - 10) <= 2)
    heat[blob] = (0.9 - 0.1 * np.hypot(yy - 10, xx - 10))[blob]
    size[0][blob], size[1][blob] = np.log(24.0), np.log(10.0)  # 6 x 2.5 cells
    offset[0][blob], offset[1][blob] = 10.5 - xx[blob], 10.5 - yy[blob]  # back to the centre
    offset[:, 9:12, 9:12] = 0.5  # inside the box, pointing at itself
    boxes, scores = decode_heatmap(heat, size, offset, STRIDE, 0.3, 10, shoulders=True)
    np.testing.assert_allclose(boxes, [[37, 30, 47, 54]], atol=1e-4)
    np.testing.assert_allclose(scores, [0.9], atol=1e-6)


def test_band_rows_widen_outwards_to_the_network_grid():
    assert heatmap_band([0.0, 1.0], 640) == (0, 640)
    assert heatmap_band([0.2, 1.0], 640) == (128, 640)
    assert heatmap_band([0.26, 0.9], 640) == (160, 576)
    assert heatmap_band([0.26, 0.91], 640) == (160, 608)
    assert heatmap_band([0.5, 0.501], 640) == (320, 352)  # never empty
    assert heatmap_band([0.99, 1.0], 320) == (288, 320)


def test_input_keeps_any_frame_size_and_aspect_within_the_pixel_budget():
    meta = ProposerMetadata(640, 4, "BGR", [0.0] * 3, [1 / 255] * 3)
    for w, h in ((640, 640), (800, 320), (2592, 640), (1138, 640)):
        geo = input_geometry(w, h, meta, "keep_aspect", 2_000_000, [0.0, 1.0])
        assert geo.size == (w, h) and geo.scale == (1.0, 1.0)  # a 12 px cone stays 12 px
        assert geo.padded[0] % 32 == 0 and geo.padded[1] % 32 == 0
        assert 0 <= geo.padded[0] - w < 32 and 0 <= geo.padded[1] - h < 32
        assert geo.rows == (0, geo.padded[1])
    big = input_geometry(2048, 1536, meta, "keep_aspect", 2_000_000, [0.0, 1.0])
    assert big.size[0] * big.size[1] <= 2_000_000
    assert abs(big.scale[0] - big.scale[1]) < 0.01 and big.scale[0] > 1.0  # one factor
    square = input_geometry(2592, 640, meta, "square", 2_000_000, [0.0, 1.0])
    assert square.size == (640, 640) and square.scale == (2592 / 640, 1.0)
    band = input_geometry(800, 320, meta, "keep_aspect", 2_000_000, [0.25, 1.0])
    assert band.rows == (64, 320)


def test_a_small_frame_is_enlarged_to_the_least_pixel_budget():
    meta = ProposerMetadata(640, 4, "BGR", [0.0] * 3, [1 / 255] * 3)
    geo = input_geometry(800, 320, meta, "keep_aspect", 2_000_000, [0.0, 1.0], 409_600)
    assert geo.size == (1011, 404)  # x sqrt(409600 / 256000) = 1.265, one factor
    assert abs(geo.scale[0] - geo.scale[1]) < 0.01 and geo.scale[0] < 1.0
    assert geo.padded == (1024, 416) and geo.rows == (0, 416)
    thumb = input_geometry(160, 120, meta, "keep_aspect", 2_000_000, [0.0, 1.0], 409_600)
    assert thumb.size == (320, 240)  # at most MAX_ENLARGE = 2
    for w, h in ((640, 640), (1138, 640), (2592, 640)):  # at or above the budget: as they are
        assert input_geometry(w, h, meta, "keep_aspect", 2_000_000, [0.0, 1.0],
                              409_600).size == (w, h)
    assert input_geometry(800, 320, meta, "keep_aspect", 2_000_000, [0.0, 1.0], 0).size == \
        (800, 320)  # 0 never enlarges
    square = input_geometry(320, 320, meta, "square", 2_000_000, [0.0, 1.0], 409_600)
    assert square.size == (640, 640)


def test_least_pixel_budget_is_checked():
    assert load_node_config(None, []).proposer.heatmap_min_pixels == 409_600
    for bad in ("-1", "2000001"):  # negative; above heatmap_max_pixels (2,000,000)
        with pytest.raises(ValueError, match="heatmap_min_pixels"):
            load_node_config(None, [f"proposer.heatmap_min_pixels={bad}"])


@needs_model
def test_enlarging_a_small_frame_finds_more_of_its_cones():
    """Rendered scenes shrunk to 320x320 (cones 6-60 px): searched at their own scale, the
    bundled proposer finds 68 of their 94 cones >= 6 px; enlarged to 640x640 by the default
    heatmap_min_pixels, 89 (measured 2026-12-06)."""
    native, enlarged = (HeatmapProposer(ProposerConfig(kind="heatmap", max_candidates=64,
                                                       heatmap_min_pixels=m))
                        for m in (0, 409_600))
    assert enlarged.geometry(320, 320).size == (640, 640)
    found, total = cones_found_in_rescaled_scenes(
        {"native": native, "enlarged": enlarged}, range(90030, 90038), 320, 6)
    assert total >= 60
    assert found["enlarged"] >= found["native"] + 0.1 * total
    assert found["enlarged"] >= 0.85 * total


def test_default_config_searches_the_whole_frame_at_its_own_scale():
    """No default depends on where one camera sat: all rows, no squashing."""
    proposer = load_node_config(None, []).proposer
    assert list(proposer.heatmap_rows) == [0.0, 1.0]
    assert proposer.heatmap_resize == "keep_aspect"
    assert proposer.heatmap_pyramid is False


@needs_model
def test_a_wide_frame_finds_the_cones_of_its_square_part():
    """A rendered 640x640 scene placed inside a 2592x640 frame (grey either side) gives the
    same boxes, moved by the offset: the proposer neither squashes nor shrinks the frame."""
    pytest.importorskip("export.synth")
    from export.synth import render_scene

    proposer = HeatmapProposer(ProposerConfig(kind="heatmap", max_candidates=64,
                                              heatmap_pyramid=False))
    found = total = 0
    for seed in range(90010, 90013):
        image = render_scene(seed, 640, 640).image
        wide = np.full((640, 2592, 3), 114, np.uint8)
        wide[:, 960:1600] = image
        a = proposer.propose(Frame(0, 0.0, image))
        b = proposer.propose(Frame(0, 0.0, wide)) - np.array([960, 0, 960, 0], np.float32)
        match = match_greedy(b, -np.arange(len(b), dtype=float), a, 0.8)
        found += int((match >= 0).sum())
        total += len(a)
    assert total >= 10
    assert found >= 0.9 * total


@needs_model
def test_a_large_sensor_is_also_searched_at_the_model_scale():
    """Rendered scenes upscaled 5x to 3200x3200 and searched at 2645x2645: the cones are
    four times bigger than the largest the network was trained on, and the second pyramid
    level, at the model's scale, finds them (measured with the bundled proposer: 19 of 24
    cones >= 80 px with one level, 24 with two)."""
    one = HeatmapProposer(ProposerConfig(kind="heatmap", max_candidates=64,
                                         heatmap_pyramid=False, heatmap_max_pixels=7_000_000))
    two = HeatmapProposer(ProposerConfig(kind="heatmap", max_candidates=64,
                                         heatmap_pyramid=True, heatmap_max_pixels=7_000_000))
    assert len(one.levels(3200, 3200)) == 1 and len(two.levels(3200, 3200)) == 2
    assert len(two.levels(640, 640)) == 1  # frames of the model's size: one pass
    found, total = cones_found_in_rescaled_scenes({"one": one, "two": two},
                                                  range(90020, 90024), 3200, 80)
    assert total >= 10
    assert found["two"] >= found["one"] + 3
    assert found["two"] >= 0.9 * total


def test_band_setting_is_checked():
    for bad in ([0.5, 0.5], [0.6, 0.2], [-0.1, 1.0], [0.0, 1.2], [0.2]):
        with pytest.raises(ValueError, match="heatmap_rows"):
            load_node_config(None, [f"proposer.heatmap_rows={json.dumps(bad)}"])


def test_metadata_round_trip_and_rejects_bad_contracts():
    meta = ProposerMetadata(320, 4, "RGB", [0.5] * 3, [0.25] * 3, {"training_clips": ["autox"]})
    back = ProposerMetadata.from_json(meta.to_json(), "m.onnx")
    assert back == meta
    bad = json.loads(meta.to_json())
    bad["input_size"] = 322
    with pytest.raises(HeatmapModelError, match="m.onnx: inconsistent"):
        ProposerMetadata.from_json(json.dumps(bad), "m.onnx")
    with pytest.raises(HeatmapModelError, match="m.onnx: bad cone_proposer"):
        ProposerMetadata.from_json("{}", "m.onnx")


def test_missing_model_and_classifier_model_are_clear_errors(tmp_path):
    with pytest.raises(HeatmapModelError, match="nope.onnx: proposer model not found"):
        open_session(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(HeatmapModelError, match="junk.onnx: not a loadable ONNX model"):
        open_session(junk)


@needs_model
def test_config_selects_the_heatmap_proposer():
    cfg = load_node_config(None, ["proposer.kind=heatmap", "proposer.max_candidates=7",
                                  "proposer.refiner_model=null"])
    proposer = build_proposer(cfg.proposer)
    assert isinstance(proposer, HeatmapProposer)
    assert proposer.meta.input_size % proposer.meta.stride == 0
    assert proposer.meta.extra["training_clips"]  # provenance travels with the model
    assert not set(proposer.meta.extra["training_clips"]) & {"accel", "autox2"}


@needs_model
def test_shipped_model_finds_synthetic_cones_within_the_cap():
    """Seeds 90000+ were never rendered for training (training uses 20000..20299)."""
    pytest.importorskip("export.synth")
    from export.synth import render_scene

    proposer = HeatmapProposer(ProposerConfig(kind="heatmap", max_candidates=32))
    capped = HeatmapProposer(ProposerConfig(kind="heatmap", max_candidates=3,
                                            heatmap_threshold=0.05))
    found = total = 0
    for seed in range(90000, 90006):
        scene = render_scene(seed, 640, 640)
        frame = Frame(0, 0.0, scene.image)
        boxes = proposer.propose(frame)
        assert boxes.dtype == np.float32 and len(boxes) <= 32
        assert boxes.min(initial=0) >= 0 and boxes[:, [0, 2]].max(initial=0) <= 640
        assert boxes[:, [1, 3]].max(initial=0) <= 640
        tall = (scene.boxes[:, 3] - scene.boxes[:, 1]) >= 16
        match = match_greedy(boxes, -np.arange(len(boxes), dtype=float), scene.boxes[tall])
        found += int((match >= 0).sum())
        total += int(tall.sum())
        assert len(capped.propose(frame)) == 3
    assert total > 20
    assert found / total >= RECALL_FLOOR_SYNTH


@needs_model
def test_shoulders_add_boxes_and_keep_every_peaks_box():
    """On rendered scenes the shipped network's peaks give the same boxes with shoulders on,
    in the same order among themselves; shoulders only add boxes."""
    pytest.importorskip("export.synth")
    from export.synth import render_scene

    heat_config = {"kind": "heatmap", "max_candidates": 200, "refiner_model": None}
    peaks = HeatmapProposer(ProposerConfig(**heat_config, heatmap_shoulders=False))
    both = HeatmapProposer(ProposerConfig(**heat_config))
    added = 0
    for seed in range(90000, 90004):
        frame = Frame(0, 0.0, render_scene(seed, 640, 640).image)
        only, more = peaks.propose(frame), both.propose(frame)
        is_peak = (more[:, None] == only[None]).all(axis=2).any(axis=1)
        np.testing.assert_array_equal(more[is_peak], only)
        added += int((~is_peak).sum())
    assert added > 0


@needs_model
def test_a_band_of_rows_finds_the_same_cones_below_its_top():
    """The network sees only rows 0.3..1 of the frame: no box is centred above the band, and
    the cones well inside it get the same boxes as from the whole frame."""
    pytest.importorskip("export.synth")
    from export.synth import render_scene

    whole = HeatmapProposer(ProposerConfig(kind="heatmap", max_candidates=64,
                                           heatmap_rows=[0.0, 1.0]))
    band = HeatmapProposer(ProposerConfig(kind="heatmap", max_candidates=64,
                                          heatmap_rows=[0.3, 1.0]))
    assert band.geometry(640, 640).rows == (192, 640)
    same = inside = 0
    for seed in range(90000, 90004):
        image = render_scene(seed, 640, 640).image
        a, b = whole.propose(Frame(0, 0.0, image)), band.propose(Frame(0, 0.0, image))
        assert ((b[:, 1] + b[:, 3]) / 2 >= 192 - 4).all()
        deep = a[(a[:, 1] + a[:, 3]) / 2 >= 192 + 96]
        inside += len(deep)
        match = match_greedy(b, -np.arange(len(b), dtype=float), deep, 0.9)
        same += int((match >= 0).sum())
    assert inside >= 10
    assert same >= 0.9 * inside


@needs_model
def test_a_fixed_height_model_refuses_a_band(tmp_path):
    import onnx

    proto = onnx.load(str(MODEL))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 640, 640
    for out in proto.graph.output:
        for d in out.type.tensor_type.shape.dim[2:]:
            d.dim_value = 160
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    whole = ProposerConfig(heatmap_model=str(fixed), heatmap_rows=[0.0, 1.0],
                           heatmap_resize="square")
    assert len(HeatmapProposer(whole).propose(
        Frame(0, 0.0, np.zeros((480, 800, 3), np.uint8)))) == 0
    for bad in ({"heatmap_rows": [0.2, 1.0], "heatmap_resize": "square"},
                {"heatmap_rows": [0.0, 1.0], "heatmap_resize": "keep_aspect"}):
        with pytest.raises(HeatmapModelError, match="fixed.onnx: fixed input size 640x640.*"
                                                    "heatmap_resize"):
            HeatmapProposer(ProposerConfig(heatmap_model=str(fixed), **bad))


RECALL_FLOOR_SYNTH = 0.75
"""Recall of cones >= 16 px on seeds 90000..90005 was 42 / 48 = 0.875 with the shipped model
(full-resolution ``patch4`` net, threshold 0.25); the floor leaves a margin. Over seeds
90000..90059 it was 499 / 532 = 0.938. (The previous 320 px model: 0.625 and 0.78.)"""


REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bgracing"


@pytest.mark.shared_data
@pytest.mark.skipif(not (REAL_DATA / "images").is_dir(), reason="shared BGRacing data absent")
@needs_model
def test_shoulders_find_more_held_out_cones_for_a_few_more_candidates():
    """The 44 held-out real frames, the default proposer with and without shoulders: measured
    89.2 -> 90.8 % of the cones >= 12 px at IoU 0.5, for 21.8 -> 24.8 candidates per frame."""
    from dataclasses import replace

    from node.evaluate.datasets import load_samples
    from node.evaluate.score import score_proposals
    from node.evaluate.splits import select_samples

    samples = select_samples(load_samples(f"yolo:{REAL_DATA}"), "heldout")
    config = load_node_config(None, []).proposer
    assert config.heatmap_shoulders
    reports = {}
    for shoulders in (False, True):
        proposer = build_proposer(replace(config, heatmap_shoulders=shoulders))
        try:
            reports[shoulders] = score_proposals(proposer, samples)
        finally:
            proposer.close()
    off, on = reports[False], reports[True]
    assert on["recall_ge12"] >= off["recall_ge12"] + 0.01, (off, on)
    assert on["candidates_per_frame"] <= 1.2 * off["candidates_per_frame"], (off, on)
