"""Ego-motion between frames from static cones, for motion-compensated tracking (numpy only).

Cones do not move; the car does. Between two frames every cone's ground position (camera
x, z) moves by the same rigid 2D transform, the inverse of the car's motion. At 10 fps and
6-14 m/s a cone's box shifts by about its own height per frame, so boxes of consecutive frames
rarely overlap and IoU association alone fails; predicting each track's box through the
estimated ego-motion (the "camera motion compensation" of BoT-SORT, Aharon et al. 2022, done
here on the ground plane from the range estimates instead of from image features) restores it.

The transform is found RANSAC-style (Fischler & Bolles 1981): each pair (track, detection of
a compatible class) within ``max_step_m`` of the constant-velocity prior proposes a
translation for each of a few turns around the prior (the car never reverses); the one that
brings the most tracks within a gate of a detection wins, and among those the one that reaches
the most distinct detections (a shift by the spacing of a regular line of cones can bring in
as many tracks by landing several on one detection), and a weighted 2D Kabsch fit on its
inliers gives rotation and translation.
What the ground-plane fit leaves (yaw error, the pitch jitter of the body) is a near-uniform
image shift, which the tracker removes with ``median_shift`` before its final association.
"""

from __future__ import annotations

import math

import numpy as np

TURNS = np.linspace(-0.12, 0.12, 7)
"""Yaw changes tried around the prior (rad per frame): weaving at speed turns ~0.1 rad."""


def rigid_fit(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted least-squares rotation angle and translation with ``b ≈ R(angle) a + t``.

    Args:
        a, b: (N, 2) corresponding points (x, z); w: (N,) positive weights.
    """
    w = w / w.sum()
    ca, cb = w @ a, w @ b
    a0, b0 = a - ca, b - cb
    # angle maximising sum w * b0 . R a0, with R = [[c, -s], [s, c]]
    cross = float(np.sum(w * (a0[:, 0] * b0[:, 1] - a0[:, 1] * b0[:, 0])))
    dot = float(np.sum(w * (a0[:, 0] * b0[:, 0] + a0[:, 1] * b0[:, 1])))
    angle = math.atan2(cross, dot) if len(a) >= 2 else 0.0
    return angle, cb - rotation(angle) @ ca


def rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def estimate(prev: np.ndarray, prev_sd: np.ndarray, meas: np.ndarray, meas_sd: np.ndarray,
             compat: np.ndarray, prior: tuple[float, np.ndarray], max_step_m: float,
             gate_m: float = 1.0) -> tuple[float, np.ndarray, int]:
    """The rigid motion taking last frame's cone positions to this frame's.

    Args:
        prev: (T, 2) tracks' x, z in the last frame's camera; prev_sd: (T,) their 1-sigma.
        meas: (D, 2) detections' x, z now; meas_sd: (D,) their 1-sigma.
        compat: (T, D) bool, which detection may be which track (class gate).
        prior: (angle, translation) predicted by constant velocity.
        max_step_m: largest departure of the translation from the prior's.
        gate_m: largest distance for an inlier (shrunk for precise positions).

    Returns:
        ``(angle, translation, inliers)``; the prior with 0 inliers when nothing agrees.
    """
    angle0, t0 = prior
    keep = compat.any(axis=1)  # a track no detection may be cannot vote or be an inlier
    prev, prev_sd, compat = prev[keep], prev_sd[keep], compat[keep]
    if len(prev) == 0 or len(meas) == 0:
        return angle0, t0, 0
    gate = np.minimum(gate_m, 0.25 + 1.5 * np.hypot(prev_sd[:, None], meas_sd[None, :]))
    inv_gate2 = 1.0 / (gate * gate)
    angles = angle0 + TURNS
    # Every turn at once: (turns, T) rotated track coordinates and (turns, T, D)
    # translations, one array per axis (numpy is slow on a trailing axis of two).
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    rx = cos * prev[:, 0] - sin * prev[:, 1]
    rz = sin * prev[:, 0] + cos * prev[:, 1]
    hx = meas[None, None, :, 0] - rx[:, :, None]
    hz = meas[None, None, :, 1] - rz[:, :, None]
    ok = compat[None] & ((hx - t0[0]) ** 2 + (hz - t0[1]) ** 2 <= max_step_m * max_step_m)
    ok &= hz <= 0.2  # the car does not reverse: static cones never recede
    # Hypotheses in turn order, each turn's prior first: (turn, translation) pairs.
    per_turn = ok.reshape(len(angles), -1).sum(axis=1)
    turn = np.repeat(np.arange(len(angles)), per_turn + 1)
    first = np.zeros(len(turn), bool)
    first[np.concatenate([[0], np.cumsum(per_turn + 1)[:-1]])] = True
    cands = np.empty((len(turn), 2))
    cands[first] = t0
    cands[~first, 0] = hx[ok]
    cands[~first, 1] = hz[ok]
    # (hypotheses, pairs) squared distances over squared gates, for the compatible (track,
    # detection) pairs only (row-major: grouped by track), then each track's nearest.
    pair_t, pair_d = np.nonzero(compat)
    gather = (turn[:, None], pair_t[None, :])  # one (hypotheses, pairs) gather per axis
    dx = (rx[gather] + cands[:, :1]) - meas[pair_d, 0]
    dz = (rz[gather] + cands[:, 1:]) - meas[pair_d, 1]
    ratio2 = (dx * dx + dz * dz) * inv_gate2[pair_t, pair_d]
    new_track = np.r_[True, pair_t[1:] != pair_t[:-1]]  # pairs are grouped by track
    starts = np.flatnonzero(new_track)  # every track has one
    nearest2 = np.minimum.reduceat(ratio2, starts, axis=1)
    hit = np.sqrt(nearest2)
    inl = hit < 1.0
    tracks = inl.sum(axis=1)
    spread = np.where(inl, hit, 0.0).sum(axis=1)
    # Static cones map one to one. A shift by the spacing of a regular line of cones lands
    # several tracks on one detection: between hypotheses that bring in the most tracks, the
    # one reaching more distinct detections is the true motion.
    reached = np.zeros(len(cands), np.int64)
    tied = np.flatnonzero(tracks == tracks.max())
    if len(tied) > 1:
        group = np.cumsum(new_track) - 1  # pair -> its track's column of nearest2
        near = (ratio2[tied] <= nearest2[tied][:, group]) & (ratio2[tied] < 1.0)
        h_idx, p_idx = np.nonzero(near)
        landed = np.zeros((len(tied), len(meas)), bool)
        landed[h_idx, pair_d[p_idx]] = True
        reached[tied] = landed.sum(axis=1)
    # Most tracks brought in, then most detections reached, then least spread, then the
    # earliest turn and hypothesis.
    k = int(np.lexsort((spread, -reached, -tracks))[0])
    angle_h, t = float(angles[turn[k]]), cands[k]
    rot_prev = prev @ rotation(angle_h).T
    d = np.hypot(rot_prev[:, None, 0] + t[0] - meas[None, :, 0],
                 rot_prev[:, None, 1] + t[1] - meas[None, :, 1])
    d = np.where(compat & (d < gate), d, np.inf)
    rows, cols = [], []
    used_r, used_c = set(), set()
    order = np.argsort(d, axis=None)
    for flat in order[:int(np.isfinite(d).sum())].tolist():
        r, c = divmod(flat, d.shape[1])
        if r in used_r or c in used_c:
            continue
        rows.append(r)
        cols.append(c)
        used_r.add(r)
        used_c.add(c)
    if len(rows) < 2:
        return angle_h, t, len(rows)
    w = 1.0 / (prev_sd[rows] ** 2 + meas_sd[cols] ** 2 + 1e-4)
    angle, trans = rigid_fit(prev[rows], meas[cols], w)
    if abs(angle - angle_h) > 0.05 or np.linalg.norm(trans - t0) > max_step_m:
        return angle_h, t, len(rows)  # a degenerate fit (collinear cones, outliers)
    return angle, trans, len(rows)


def warp_boxes(boxes: np.ndarray, old: np.ndarray, new: np.ndarray,
               view: tuple[float, float, float, float, float]) -> np.ndarray:
    """The boxes of static cones at camera points ``new`` given their boxes at ``old``.

    Each box scales with ``old_z / new_z``; its centre column follows the projection of the
    new position; its bottom row keeps its depth-scaled offset from the horizon row.

    Args:
        boxes: (N, 4) xyxy; old, new: (N, 3) camera-frame positions; view: fx, fy, cx, cy,
            v_hor.
    """
    fx, _, cx, _, v_hor = view
    new_z = np.maximum(new[:, 2], 0.05)
    s = np.maximum(old[:, 2], 0.05) / new_z
    w, h = (boxes[:, 2] - boxes[:, 0]) * s, (boxes[:, 3] - boxes[:, 1]) * s
    u = cx + fx * new[:, 0] / new_z
    bottom = v_hor + (boxes[:, 3] - v_hor) * s
    return np.stack([u - w / 2, bottom - h, u + w / 2, bottom], axis=1)


def median_shift(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    """Median ``(du, dv)`` of box centres from predicted to matched boxes ((N, 4) each)."""
    if len(pred) == 0:
        return np.zeros(2)
    d = (meas[:, :2] + meas[:, 2:]) / 2 - (pred[:, :2] + pred[:, 2:]) / 2
    return np.median(d, axis=0)
