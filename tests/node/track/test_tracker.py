"""Tracker: identities persist on synthetic sequences with known identities."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from node.track import ConeTracker, TrackerConfig, TrackingStage
from node.track.tracker import greedy_assign
from node.types import Cone

from .test_range import calibrated, cone_box


def test_greedy_assign_takes_the_best_pairs_first():
    score = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert sorted(greedy_assign(score, 0.3)) == [(0, 0)]  # (1, 1) is below the threshold
    assert sorted(greedy_assign(score, 0.05)) == [(0, 0), (1, 1)]
    assert greedy_assign(np.zeros((0, 3)), 0.1) == []


def test_still_boxes_keep_their_ids_and_a_new_box_gets_a_new_one():
    tr = ConeTracker()
    boxes = np.array([[100, 100, 120, 140], [300, 200, 330, 260]], float)
    labels = ["blue_cone", "yellow_cone"]
    first = tr.update(boxes, labels, np.array([0.9, 0.9]))
    assert first == [1, 2]
    rng = np.random.default_rng(0)
    for _ in range(10):
        jitter = boxes + rng.normal(0, 1.0, boxes.shape)
        assert tr.update(jitter, labels, np.array([0.9, 0.9])) == [1, 2]
    ids = tr.update(np.vstack([boxes, [[500, 50, 510, 70]]]), labels + ["blue_cone"],
                    np.array([0.9, 0.9, 0.9]))
    assert ids == [1, 2, 3]


def test_a_moving_box_is_followed_by_the_constant_velocity_filter():
    tr = ConeTracker(TrackerConfig(max_centre_dist=0.0))  # IoU only
    ids = []
    for k in range(15):  # 12 px per frame to the right, box 20 px wide: IoU 0.25 unpredicted
        x = 50 + 12 * k
        ids += tr.update(np.array([[x, 100, x + 20, 140]]), ["blue_cone"], np.array([0.9]))
    assert ids == [1] * 15


def test_coasting_through_missed_frames_then_dropping():
    tr = ConeTracker(TrackerConfig(max_age=3))
    box = np.array([[100, 100, 120, 140]], float)
    assert tr.update(box, ["blue_cone"], np.array([0.9])) == [1]
    for _ in range(3):
        tr.update(np.zeros((0, 4)), [], np.zeros(0))
    assert tr.update(box, ["blue_cone"], np.array([0.9])) == [1]  # back after 3 misses
    for _ in range(4):
        tr.update(np.zeros((0, 4)), [], np.zeros(0))
    assert tr.update(box, ["blue_cone"], np.array([0.9])) == [2]  # dropped after 4


def test_class_gate_and_unknown_cones():
    tr = ConeTracker()
    box = np.array([[100, 100, 120, 140]], float)
    tr.update(box, ["blue_cone"], np.array([0.9]))
    assert tr.update(box, ["yellow_cone"], np.array([0.9])) == [2]  # not the blue track
    assert tr.update(box, ["unknown_cone"], np.array([0.9]))[0] in (1, 2)
    open_tr = ConeTracker(TrackerConfig(class_gate=False))
    open_tr.update(box, ["blue_cone"], np.array([0.9]))
    assert open_tr.update(box, ["yellow_cone"], np.array([0.9])) == [1]


def test_low_score_boxes_only_continue_tracks():
    cfg = TrackerConfig(high_score=0.6, low_score=0.2, new_track_score=0.6)
    tr = ConeTracker(cfg)
    box = np.array([[100, 100, 120, 140]], float)
    tr.update(box, ["blue_cone"], np.array([0.9]))
    assert tr.update(box + 1, ["blue_cone"], np.array([0.3])) == [1]  # second stage
    far = np.array([[400, 100, 420, 140]], float)
    assert tr.update(far, ["blue_cone"], np.array([0.3])) == [None]  # no new track
    assert tr.update(far, ["blue_cone"], np.array([0.1])) == [None]  # below low_score


def drive(n_frames: int, step_m: float, yaw_rate: float):
    """Static cones on two lines; the car drives forward. Yields (boxes, labels, ids) per
    frame for the cones in view (true identities: index in the layout)."""
    cfg = calibrated(height_m=1.0, pitch_deg=6.0)
    world = [(side * 1.6, 4.0 + 4.0 * k) for k in range(14) for side in (-1, 1)]
    labels = ["blue_cone" if x < 0 else "yellow_cone" for x, _ in world]
    pos, heading = np.zeros(2), 0.0
    for _ in range(n_frames):
        c, s = math.cos(heading), math.sin(heading)
        boxes, labs, ids = [], [], []
        for i, (wx, wz) in enumerate(world):
            dx, dz = wx - pos[0], wz - pos[1]
            x, z = c * dx - s * dz, s * dx + c * dz  # into the car's frame
            if 2.5 < z < 30 and abs(x) < 0.8 * z:
                box, _ = cone_box(cfg, x, z, 1.0, math.radians(6.0), labels[i])
                boxes.append(box)
                labs.append(labels[i])
                ids.append(i)
        yield cfg, np.array(boxes).reshape(-1, 4), labs, ids
        heading += yaw_rate
        pos = pos + step_m * np.array([math.sin(heading), math.cos(heading)])


def persistence(pairs: list[tuple[int, int | None]], frames: list[list]) -> float:
    kept = total = 0
    for prev, now in itertools.pairwise(frames):
        a, b = dict(prev), dict(now)
        for cone in a.keys() & b.keys():
            total += 1
            kept += a[cone] == b[cone]
    return kept / total


@pytest.mark.parametrize("step_m,yaw_rate", [(1.2, 0.0), (1.0, 0.02)])
def test_ego_motion_keeps_ids_of_static_cones_while_driving(step_m, yaw_rate):
    stage = None
    plain = ConeTracker()
    with_ego, without = [], []
    for cfg, boxes, labels, ids in drive(25, step_m, yaw_rate):
        if stage is None:
            stage = TrackingStage.from_config({"camera": {
                k: v for k, v in cfg.__dict__.items() if v is not None}})
        cones = [Cone(tuple(b), lb, 0.9) for b, lb in zip(boxes, labels)]
        out = stage.update(cones, 640, 640, 0.0)
        with_ego.append(list(zip(ids, [c.track_id for c in out])))
        without.append(list(zip(ids, plain.update(boxes, labels, np.full(len(boxes), 0.9)))))
        assert all(c.range_m is not None and c.range_sigma_m > 0 for c in out)
    assert persistence([], with_ego) == 1.0
    assert persistence([], without) < 0.9  # boxes jump by about their height per frame


@pytest.mark.parametrize("bad,key", [
    ({"match_iou": 1.5}, "match_iou"), ({"max_age": -1}, "max_age"),
    ({"max_age": 2.5}, "max_age"), ({"high_score": float("nan")}, "high_score"),
    ({"low_score": 0.9, "high_score": 0.5}, "low_score"), ({"iou": 0.3}, "iou"),
    ({"class_gate": "yes"}, "class_gate"),
])
def test_bad_tracking_config_names_the_key(bad, key):
    with pytest.raises(ValueError, match=f"tracking.{key}"):
        TrackingStage.from_config({"tracking": bad})


def test_ego_motion_estimate_keeps_the_prior_when_no_track_may_match():
    from node.track import egomotion

    prev = np.array([[0.0, 5.0], [1.0, 8.0], [-1.0, 12.0]])
    meas = prev + np.array([0.0, -1.0])
    prior = (0.01, np.array([0.0, -0.9]))
    none = np.zeros((3, 3), bool)
    angle, trans, inliers = egomotion.estimate(prev, np.full(3, 0.1), meas, np.full(3, 0.1),
                                               none, prior, 2.5)
    assert (angle, inliers) == (0.01, 0) and np.array_equal(trans, prior[1])
    # the same cones, all compatible: the 1 m step is found from the three of them
    angle, trans, inliers = egomotion.estimate(prev, np.full(3, 0.1), meas, np.full(3, 0.1),
                                               np.eye(3, dtype=bool), prior, 2.5)
    assert inliers == 3 and abs(angle) < 1e-6 and np.allclose(trans, [0.0, -1.0], atol=1e-6)


def test_ego_motion_is_not_fooled_by_a_shift_of_one_cone_spacing():
    """A line of cones 2 m apart, driven 0.5 m. Shifted by 2.5 m instead, the line matches all
    but its nearest cone, and three tracks of a tight group (a timing-gate cluster tracked as
    three) land on one detection the true motion leaves alone, while their own is missed:
    7 tracks brought in either way, and the shift's fit is tighter (the two lone cones off the
    line were measured 0.3 m off). The true motion reaches 7 distinct detections, the shift 5."""
    from node.track import egomotion

    line = [[1.5, z] for z in (3.0, 5.0, 7.0, 9.0, 11.0)]
    prev = np.array(line + [[-1.5, 4.0], [0.0, 6.0], [-1.5, 9.8], [-1.5, 10.0], [-1.5, 10.2]])
    meas = np.array([[1.5, z - 0.5] for _, z in line] + [[-1.5, 3.8], [0.0, 5.8], [-1.5, 7.5]])
    compat = np.ones((len(prev), len(meas)), bool)
    angle, trans, inliers = egomotion.estimate(prev, np.full(len(prev), 0.2), meas,
                                               np.full(len(meas), 0.2), compat,
                                               (0.0, np.zeros(2)), 3.0)
    assert inliers == 7 and abs(angle) < 0.05 and np.allclose(trans, [0.0, -0.5], atol=0.15)


def test_many_tracks_are_dropped_in_order_and_ids_stay_unique():
    tr = ConeTracker(TrackerConfig(max_age=1))
    seen: set[int] = set()
    for k in range(6):  # each frame's boxes far from the last frame's: every box is new
        xy = np.stack([k * 1000 + np.arange(20) * 40.0, np.full(20, 300.0)], axis=1)
        boxes = np.concatenate([xy, xy + 20], axis=1)
        ids = tr.update(boxes, ["blue_cone"] * 20, np.full(20, 0.9))
        assert len(set(ids)) == 20 and not seen & set(ids)
        seen |= set(ids)
        assert len(tr.tracks) <= 40  # this frame's tracks and the last frame's, no older
