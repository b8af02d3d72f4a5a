"""Cone rasterisation with exact visibility for the synthetic scenes.

Each cone is painted into its own small BGRA patch from the convex polygons of
``export.synth.geometry.cone_polygons``; the alpha channel is exactly the cone's pixels.
Cones are taken nearest first: one that the car, the HUD, nearer cones or props in front of it
(parked cars, people, trees, fences: a depth buffer the backdrop fills) hide by half or more,
or that the frame edge cuts by half or more, is dropped (never drawn, never labelled).
The rest keep a mask of their visible pixels, and their label box is tight on that mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from export.synth.geometry import CONE_SPECS, Camera, cone_polygons
from export.synth.layout import Scene, SceneCone
from export.synth.scene import darken_ground, fill


@dataclass
class DrawnCone:
    """A cone kept for drawing: its patch, own and visible pixels, and outline polygons."""

    cone: SceneCone
    faces: list[np.ndarray]
    patch: np.ndarray  # BGRA, clipped to the frame
    own: np.ndarray  # bool, the cone's own pixels inside the frame
    origin: tuple[int, int]
    depth: float
    visible: np.ndarray  # bool, same shape as patch


def rasterise_cone(camera: Camera, cone: SceneCone, depth: float, sun: np.ndarray,
                    ambient: float):
    """The cone's outline polygons, its BGRA patch (not clipped to the frame), patch origin."""
    spec = CONE_SPECS[cone.label]
    approx_px = camera.fy * spec.height / depth
    sides = 8 if approx_px < 15 else (12 if approx_px < 50 else 20)
    polygons = cone_polygons(camera, spec, cone.xz, cone.yaw, sides, sun, ambient)
    if polygons is None:
        return None
    pts = np.concatenate([poly for poly, _, _, _ in polygons])
    x0, y0 = (int(v) - 1 for v in np.floor(pts.min(axis=0)))
    x1, y1 = (int(v) + 1 for v in np.ceil(pts.max(axis=0)))
    patch = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
    body = [float(v) * cone.tint for v in (cone.body_bgr or spec.body_bgr)]
    paints = {"body": body, "plate": [v * cone.plate_shade for v in body],
              "stripe": [float(v) for v in spec.stripe_bgr]}
    outline = []
    for poly, part, light, is_outline in polygons:
        color = [min(255.0, v * light) for v in paints[part]] + [255.0]
        fill(patch, poly, color, offset=(x0, y0))
        if is_outline:
            outline.append(poly)
    return outline, patch, (x0, y0)


def visible_cones(scene: Scene, camera: Camera, occupied: np.ndarray,
                  max_distance: float, min_px: float,
                  prop_depth: np.ndarray | None = None) -> list[DrawnCone]:
    """Rasterise cones near-to-far; keep those at least half visible and inside the frame.

    ``occupied`` (bool H x W, the car nose and HUD on entry) collects the kept cones' pixels.
    ``prop_depth`` (float32 H x W, camera depth of the props drawn there, +inf elsewhere)
    hides the pixels of cones that stand behind a prop: they are neither drawn nor counted
    as visible.
    """
    h, w = occupied.shape
    if not scene.cones:
        return []
    xz = np.array([c.xz for c in scene.cones])
    cam = camera.to_camera(np.column_stack([xz[:, 0], np.zeros(len(xz)), xz[:, 1]]))
    heights = np.array([CONE_SPECS[c.label].height for c in scene.cones])
    z = np.maximum(cam[:, 2], 1e-3)
    u = camera.cx + camera.fx * cam[:, 0] / z
    ok = (cam[:, 2] > 0.8) & (cam[:, 2] < max_distance)
    ok &= camera.fy * heights / z >= min_px
    ok &= (u > -camera.fx * 0.2 / z) & (u < w + camera.fx * 0.2 / z)
    kept = []
    for i in np.flatnonzero(ok)[np.argsort(cam[ok, 2])]:
        drawn = rasterise_cone(camera, scene.cones[i], float(z[i]), scene.sun, scene.ambient)
        if drawn is None:
            continue
        faces, patch, (x0, y0) = drawn
        own = patch[..., 3] > 0
        total = int(np.count_nonzero(own))
        rows = np.flatnonzero(own.any(axis=1))
        if total == 0 or rows[-1] - rows[0] + 1 < min_px:
            continue
        fx0, fy0 = max(0, x0), max(0, y0)
        fx1, fy1 = min(w, x0 + patch.shape[1]), min(h, y0 + patch.shape[0])
        if fx1 <= fx0 or fy1 <= fy0:
            continue
        patch = patch[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
        inside = own[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
        if np.count_nonzero(inside) * 2 < total:
            continue  # cut by the frame edge by more than half
        if prop_depth is not None:
            inside = inside & ~(prop_depth[fy0:fy1, fx0:fx1] < z[i])
        visible = inside & ~occupied[fy0:fy1, fx0:fx1]
        if np.count_nonzero(visible) * 2 < total:
            continue  # mostly hidden behind nearer cones, props, the car or the HUD
        occupied[fy0:fy1, fx0:fx1] |= inside
        kept.append(DrawnCone(scene.cones[i], faces, patch, inside, (fx0, fy0), float(z[i]),
                               visible))
    return kept


def tight_box(mask: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, y0 = origin
    return np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1],
                    dtype=np.float32)


def draw_shadows(img: np.ndarray, camera: Camera, scene: Scene, cones: list[SceneCone]) -> None:
    """Darken the ground under every cone's shadow (one mask, one blend)."""
    if not cones:
        return
    shadows = []
    for cone in cones:
        spec = CONE_SPECS[cone.label]
        offset = -spec.height * np.array([scene.sun[0], scene.sun[2]]) / max(scene.sun[1], 0.15)
        length = float(np.hypot(*offset))
        if length > 4.0:
            offset *= 4.0 / length
        r = spec.plate_side / 2
        base = np.asarray(cone.xz) + r * np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]])
        tip = (np.asarray(cone.xz) + offset)[None]
        hull = cv2.convexHull(np.concatenate([base, tip]).astype(np.float32))[:, 0]
        shadows.append(hull.astype(np.float64))
    strength = 0.5 * (1.0 - scene.ambient) / 0.6
    darken_ground(img, camera, shadows, 1.0 - strength)
