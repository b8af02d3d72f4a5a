"""The tracking stage seam, the JSONL fields and the benchmark's ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from node.track import TrackingStage, label_text
from node.types import Cone


def test_cone_dict_keeps_its_keys_until_tracking_fills_them():
    cone = Cone((1.0, 2.0, 3.0, 4.0), "blue_cone", 0.9)
    assert set(cone.to_dict()) == {"box", "label", "score"}
    stage = TrackingStage.from_config({})
    out = stage.update([cone], 640, 480, 0.0)[0]
    d = out.to_dict()
    assert {"range_m", "range_sigma_m", "xyz", "range_basis", "track_id"} <= set(d)
    assert d["track_id"] == 1 and d["range_basis"] == "size@default_hfov"
    assert cone.track_id is None  # the input is not modified


def test_label_text_for_the_annotated_video():
    cone = Cone((0, 0, 1, 1), "blue_cone", 0.9, range_m=7.43, track_id=12)
    assert label_text(cone) == "blue_cone #12 7.4 m"
    assert label_text(Cone((0, 0, 1, 1), "yellow_cone", 0.9)) == "yellow_cone"


def test_stage_rejects_an_unknown_section():
    with pytest.raises(ValueError, match="cameras"):
        TrackingStage.from_config({"cameras": {}})


def test_empty_frames_pass_through():
    stage = TrackingStage()
    assert stage.update([], 640, 640, 0.0) == []
    assert stage.note.startswith("no intrinsics")


def test_benchmark_truth_matches_the_renderer():
    from export.track_eval import render_truth_clip

    frames = list(render_truth_clip(7, 3))
    assert any(len(f.boxes) for f in frames)
    for tf in frames:
        assert len(tf.ids) == len(tf.boxes) == len(tf.xyz)
        assert np.all(tf.xyz[:, 2] > 0)
        # the base centre projects inside its box's columns, just below or at its bottom
        cfg = tf.camera_config
        u = cfg.cx + cfg.fx * tf.xyz[:, 0] / tf.xyz[:, 2]
        v = cfg.cy + cfg.fy * tf.xyz[:, 1] / tf.xyz[:, 2]
        assert np.all((u > tf.boxes[:, 0] - 1) & (u < tf.boxes[:, 2] + 1))
        assert np.all((v < tf.boxes[:, 3] + 1) & (v > tf.boxes[:, 1]))


def test_benchmark_scores_the_true_boxes_as_every_cone_matched():
    """``export.track_eval.score_clip`` matches detections to the truth (IoU 0.5, greedy by
    score): the true boxes themselves match every cone, and a box moved off its cone by its
    own width matches nothing."""
    from export.track_eval import Score, render_truth_clip, score_clip
    from node.track import TrackerConfig

    frames = list(render_truth_clip(7, 4))
    truths = sum(len(f.boxes) for f in frames)
    exact, moved = Score(), Score()
    dets = [(f.boxes, f.labels, np.full(len(f.boxes), 0.9)) for f in frames]
    score_clip(frames, dets, exact, TrackerConfig())
    assert exact.truths == exact.matched == truths > 0
    assert exact.switches == 0
    shifted = []
    for f in frames:
        b = f.boxes.copy()
        b[:, [0, 2]] += (b[:, 2] - b[:, 0])[:, None]
        shifted.append((b, f.labels, np.full(len(b), 0.9)))
    score_clip(frames, shifted, moved, TrackerConfig())
    assert moved.truths == truths and moved.matched == 0
