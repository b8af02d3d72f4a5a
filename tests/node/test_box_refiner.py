"""Tests of ``node.propose.refiner``: the offset arithmetic (exact round trip), the crops against
hand-placed squares, the metadata contract and its one-line errors, the wrapper's order and
cap, and the shipped refiner's gain in IoU on synthetic cones it was never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.node_config import load_node_config
from node.propose import Proposer, build_proposer
from node.propose.refiner import (
    BoxRefiner,
    RefinedProposer,
    RefinerMetadata,
    RefinerModelError,
    apply_deltas,
    box_targets,
    open_refiner,
    refiner_crops,
)
from node.types import Frame

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "cone_refiner.onnx"
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="models/cone_refiner.onnx absent")


def iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of a[i] with b[i]."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter)


def test_offsets_round_trip_and_scale_with_the_crop_square():
    meta = RefinerMetadata(input_size=32, context=0.5, min_side=16.0)
    boxes = np.array([[100, 50, 110, 70], [0, 0, 4, 4], [300, 200, 360, 320]], np.float32)
    target = np.array([[98, 48, 111, 72], [1, 1, 5, 6], [290, 190, 370, 330]], np.float32)
    deltas = box_targets(boxes, target, meta)
    # Squares: twice the longer side (40, 120), or min_side 16 for the 4 px box.
    np.testing.assert_allclose(deltas[0], np.array([-2, -2, 1, 2]) / 40, atol=1e-6)
    np.testing.assert_allclose(deltas[1], np.array([1, 1, 1, 2]) / 16, atol=1e-6)
    np.testing.assert_allclose(apply_deltas(boxes, deltas, meta), target, atol=1e-4)
    np.testing.assert_allclose(apply_deltas(boxes, np.zeros_like(deltas), meta), boxes)


def test_crops_sample_the_square_about_each_box():
    # A frame whose pixel value encodes its column (blue) and row (green).
    h, w = 240, 320
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.dstack([xs % 256, ys % 256, np.zeros_like(xs)]).astype(np.uint8)
    meta = RefinerMetadata(input_size=16, context=0.5, min_side=8.0)
    boxes = np.array([[100, 60, 108, 76], [10, 10, 14, 14]], np.float32)
    crops = refiner_crops(image, boxes, meta)
    assert crops.shape == (2, 16, 16, 3) and crops.dtype == np.uint8
    # Box 0: square 32 px about (104, 68), from (88, 52): output pixel k samples 88 + 2k + 0.5.
    np.testing.assert_allclose(crops[0, 0, :, 0], 88 + 2 * np.arange(16) + 0.5, atol=1)
    np.testing.assert_allclose(crops[0, :, 0, 1], 52 + 2 * np.arange(16) + 0.5, atol=1)
    # Box 1: the 8 px min_side square about (12, 12), from (8, 8): half a pixel per output.
    np.testing.assert_allclose(crops[1, 0, :, 0], 8 + 0.5 * np.arange(16) - 0.25, atol=1)
    # A square past the frame's edge replicates the edge pixels.
    edge = refiner_crops(image, np.array([[-6, 100, 2, 116]], np.float32), meta)
    assert (edge[0, :, :4, 0] == 0).all()
    # A preallocated buffer is filled in place; no boxes, no crops.
    buf = np.zeros((4, 16, 16, 3), np.uint8)
    assert refiner_crops(image, boxes, meta, buf) is not None
    np.testing.assert_array_equal(buf[:2], crops)
    assert refiner_crops(image, np.zeros((0, 4), np.float32), meta).shape == (0, 16, 16, 3)


def test_narrow_windows_keep_a_thin_cones_width():
    # min_aspect 0.5: a 6 x 24 px box gets a 24 x 48 px window (twice max(6, 12) by twice 24),
    # a 30 x 20 px box a 60 x 40 px one (its height is at least half its width, 15 < 20).
    meta = RefinerMetadata(input_size=16, context=0.5, min_side=8.0, min_aspect=0.5)
    boxes = np.array([[100, 60, 106, 84], [200, 100, 230, 120]], np.float32)
    np.testing.assert_allclose(meta.windows(boxes),
                               [[91, 48, 115, 96], [185, 90, 245, 130]], atol=1e-4)
    target = boxes + np.array([[-1, 2, 1, -3], [3, 0, -3, 2]], np.float32)
    deltas = box_targets(boxes, target, meta)
    # Each edge's offset is in units of its window's side along it.
    np.testing.assert_allclose(deltas[0], [-1 / 24, 2 / 48, 1 / 24, -3 / 48], atol=1e-6)
    np.testing.assert_allclose(apply_deltas(boxes, deltas, meta), target, atol=1e-4)
    # The crop samples the window: 1.5 px a step across, 3 px a step down.
    h, w = 240, 320
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.dstack([xs % 256, ys % 256, np.zeros_like(xs)]).astype(np.uint8)
    crops = refiner_crops(image, boxes[:1], meta)
    np.testing.assert_allclose(crops[0, 0, :, 0], 91 + 1.5 * np.arange(16) + 0.25, atol=1)
    np.testing.assert_allclose(crops[0, :, 0, 1], 48 + 3 * np.arange(16) + 1, atol=1)
    # The square window (the default) of the same box is 48 px across: the cone spans 2 crop
    # pixels there against 4 in the narrow window.
    square = RefinerMetadata(input_size=16, context=0.5, min_side=8.0)
    np.testing.assert_allclose(square.windows(boxes[:1]), [[79, 48, 127, 96]], atol=1e-4)


def test_metadata_round_trip_and_rejects_bad_contracts():
    meta = RefinerMetadata(24, 0.4, 12.0, {"training_clips": ["autox"]}, min_aspect=0.6)
    back = RefinerMetadata.from_json(meta.to_json(), "m.onnx")
    assert (back.input_size, back.context, back.min_side, back.extra, back.min_aspect) == \
        (24, 0.4, 12.0, {"training_clips": ["autox"]}, 0.6)
    bad = json.loads(meta.to_json())
    # Models exported before min_aspect existed read as square windows.
    old = {k: v for k, v in bad.items() if k != "min_aspect"}
    assert RefinerMetadata.from_json(json.dumps(old), "m.onnx").min_aspect == 1.0
    for key, value in (("format", "cone-proposer/1"), ("context", 5.0), ("input_size", 4),
                       ("min_aspect", 0.0), ("min_aspect", 1.5)):
        broken = dict(bad, **{key: value})
        with pytest.raises(RefinerModelError, match=r"^m\.onnx: "):
            RefinerMetadata.from_json(json.dumps(broken), "m.onnx")
    with pytest.raises(RefinerModelError, match="m.onnx: bad cone_refiner metadata"):
        RefinerMetadata.from_json("{", "m.onnx")


def test_missing_and_foreign_models_are_one_line_errors(tmp_path):
    with pytest.raises(RefinerModelError, match="nope.onnx: box refiner model not found"):
        open_refiner(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(RefinerModelError, match="junk.onnx: not a loadable ONNX model"):
        open_refiner(junk)
    proposer = ROOT / "models" / "cone_proposer.onnx"
    if proposer.is_file():  # a valid ONNX model, but not a refiner
        with pytest.raises(RefinerModelError, match="no 'cone_refiner' metadata"):
            open_refiner(proposer)
    cfg = load_node_config(None, {"proposer": {"kind": "hsv",
                                               "refiner_model": str(tmp_path / "nope.onnx")}})
    with pytest.raises(RefinerModelError, match="nope.onnx"):
        build_proposer(cfg.proposer)


class FixedBoxes(Proposer):
    """A proposer returning given boxes with given scores."""

    def __init__(self, boxes, scores, max_candidates=64):
        super().__init__(max_candidates)
        self.boxes, self.scores = np.asarray(boxes, np.float32), np.asarray(scores, float)

    def _propose(self, frame):
        return self.boxes, self.scores


class ShiftRight:
    """A stand-in refiner that moves every box 3 px to the right."""

    def __call__(self, image, boxes):
        return boxes + np.array([3, 0, 3, 0], np.float32)


def test_refined_proposer_keeps_the_inner_ranking_cap_and_frame_clipping():
    boxes = [[10, 10, 20, 30], [50, 10, 60, 30], [95, 5, 99, 25], [30, 30, 40, 50]]
    inner = FixedBoxes(boxes, [0.2, 0.9, 0.5, 0.1], max_candidates=3)
    wrapped = RefinedProposer(inner, ShiftRight(), max_candidates=3)
    out = wrapped.propose(Frame(0, 0.0, np.zeros((60, 100, 3), np.uint8)))
    # Best first (0.9, 0.5, 0.2); the lowest is capped away; shifted and clipped at x = 100.
    np.testing.assert_allclose(out, [[53, 10, 63, 30], [98, 5, 100, 25], [13, 10, 23, 30]])


class DegenerateSession:
    """Stands in for the refiner's ONNX Runtime session: its offsets invert the first box,
    send the second off the frame and leave the third alone."""

    def __init__(self, meta):
        self.meta = meta

    def run(self, _outputs, feeds):
        boxes = np.asarray(self.boxes, np.float32)
        target = boxes.copy()
        target[0] = target[0, [2, 3, 0, 1]]
        target[1] += 500
        return [box_targets(boxes, target, self.meta)]


@needs_model
def test_a_degenerate_refinement_falls_back_to_the_box_as_proposed():
    boxes = [[10, 10, 20, 30], [50, 10, 60, 30], [30, 30, 40, 50]]
    refiner = BoxRefiner(MODEL)
    refiner.session = DegenerateSession(refiner.meta)
    refiner.session.boxes = boxes
    inner = FixedBoxes(boxes, [0.9, 0.5, 0.2])
    out = RefinedProposer(inner, refiner, 3).propose(
        Frame(0, 0.0, np.zeros((60, 100, 3), np.uint8)))
    np.testing.assert_allclose(out, boxes)  # none lost, none reordered


@needs_model
def test_config_wraps_the_proposer_with_the_shipped_refiner():
    cfg = load_node_config(None, {"proposer": {"refiner_model": "models/cone_refiner.onnx"}})
    proposer = build_proposer(cfg.proposer)
    assert isinstance(proposer, RefinedProposer)
    extra = proposer.refiner.meta.extra
    assert not set(extra["training_clips"]) & {"accel", "autox2"}
    assert "autox4" not in extra["training_clips"]


@needs_model
def test_shipped_refiner_tightens_jittered_boxes_of_unseen_synthetic_cones():
    """Seeds 90000+ were never rendered for training (training uses 20000..20299)."""
    pytest.importorskip("export.synth")
    from export.synth import render_scene

    refiner = BoxRefiner(MODEL)
    rng = np.random.default_rng(0)
    before, after = [], []
    for seed in range(90000, 90006):
        scene = render_scene(seed, 640, 640)
        gt = scene.boxes[(scene.boxes[:, 3] - scene.boxes[:, 1]) >= 12].astype(np.float32)
        w, h = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
        # Errors like the heatmap's: centre off by ~12 % of the size, sides by ~20 %.
        cx = (gt[:, 0] + gt[:, 2]) / 2 + rng.normal(0, 0.12, len(gt)) * w
        cy = (gt[:, 1] + gt[:, 3]) / 2 + rng.normal(0, 0.12, len(gt)) * h
        w, h = w * np.exp(rng.normal(0, 0.2, len(gt))), h * np.exp(rng.normal(0, 0.2, len(gt)))
        jit = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)
        before.append(iou_pairs(jit, gt))
        after.append(iou_pairs(refiner(scene.image, jit), gt))
    before, after = np.concatenate(before), np.concatenate(after)
    print(f"IoU with the cone, mean: {before.mean():.3f} -> {after.mean():.3f}; "
          f">= 0.5: {(before >= 0.5).mean():.3f} -> {(after >= 0.5).mean():.3f} "
          f"({len(before)} cones)")
    assert len(before) > 40
    assert after.mean() >= before.mean() + REFINER_IOU_GAIN
    # At least half of the boxes below IoU 0.5 are brought above it.
    assert (after < 0.5).mean() <= REFINER_MISS_SHARE * (before < 0.5).mean()


REFINER_IOU_GAIN = 0.1
REFINER_MISS_SHARE = 0.5
"""Bounds looser than what the shipped refiner gave here: mean IoU 0.628 -> 0.793, and IoU
>= 0.5 for 0.913 -> 1.000 of 69 cones (a share of boxes below 0.5 that falls from 8.7 % to
none)."""


@needs_model
def test_proposer_providers_reach_both_sessions_and_a_missing_one_is_a_clear_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA: the error path cannot be shown here")
    from node.propose.heatmap import HeatmapModelError

    cfg = load_node_config(None, {"proposer": {"providers": ["CUDAExecutionProvider"]}})
    with pytest.raises(HeatmapModelError, match=r"cone_proposer\.onnx: execution provider\(s\) "
                                                r"\['CUDAExecutionProvider'\] not available"):
        build_proposer(cfg.proposer)
    with pytest.raises(RefinerModelError, match=r"cone_refiner\.onnx: execution provider"):
        BoxRefiner(MODEL, providers=["CUDAExecutionProvider"])
    # "auto" takes what this ONNX Runtime has (here the CPU) for both sessions.
    auto = build_proposer(load_node_config(None, {"proposer": {"providers": "auto"}}).proposer)
    assert "CPUExecutionProvider" in auto.refiner.session.get_providers()
    assert "CPUExecutionProvider" in auto.inner.session.get_providers()
    frame = Frame(0, 0.0, np.full((640, 640, 3), 100, np.uint8))
    assert auto.propose(frame).shape[1] == 4
