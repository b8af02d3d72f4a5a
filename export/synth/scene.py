"""Backdrop, clutter and camera effects of the synthetic Formula Student scenes.

Everything that is *not* a labelled cone: sky and skyline, the perspective asphalt and grass,
painted lines and shadows on the ground, props next to the track (buildings, trees, parked
cars, people, barrels, boxes and banners, many of them blue or orange so that a colour
proposer fires on them), the ego car's nose with its blue parts, a HUD overlay like the one
burnt into the real videos, and the camera's exposure, white balance, blur, noise and JPEG.

Props live in world coordinates, so a clip rendered from a moving camera stays coherent.
Only numpy and cv2 are used.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np

from export.synth.geometry import NEAR_M, Camera, frustum_faces, project_ground_polygon, shade

SHIFT = 4  # cv2 sub-pixel bits: polygon corners keep 1/16 px precision
_SCALE = float(1 << SHIFT)


def to_cv_points(poly: np.ndarray, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Continuous pixel coordinates → cv2 fixed-point points (cv2 puts pixel centres on
    integers, the renderer at ``+0.5``)."""
    pts = (poly - (0.5 + offset[0], 0.5 + offset[1])) * _SCALE
    return np.rint(pts).astype(np.int32)


def fill(img: np.ndarray, poly: np.ndarray, color, offset=(0.0, 0.0)) -> None:
    """Fill a convex polygon given in continuous pixel coordinates."""
    cv2.fillConvexPoly(img, to_cv_points(poly, offset), color, cv2.LINE_8, SHIFT)


# --------------------------------------------------------------------------- props


@dataclass
class Prop:
    """A world object that is not a cone: ``kind`` picks how it is drawn.

    ``box``: ``size = (width, depth, height)`` rotated by ``yaw``, lifted by ``base``;
    ``barrel``: ``size = (radius, height)``; ``blob``: a sphere-like ellipse, ``size = (r,)``
    centred at height ``base``; ``stripe``: painted rings/bands are ``bands``.
    """

    kind: str
    xz: tuple[float, float]
    size: tuple[float, ...]
    bgr: tuple[int, int, int]
    yaw: float = 0.0
    base: float = 0.0
    bands: list[tuple[float, float, tuple[int, int, int]]] = field(default_factory=list)
    windows: bool = False
    trunk: bool = False


_UNIT_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                         np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False))], axis=1)
_BOX_CORNERS = np.array([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
DEPTH_STRIP_M = 2.0
"""Widest strip of a box wall written at one depth into the props' depth buffer."""


def _box_bottom(prop: Prop) -> np.ndarray:
    """World corners (4, 3) of a box prop's bottom face, counter-clockwise seen from above."""
    w, d, _ = prop.size
    c, s = math.cos(prop.yaw), math.sin(prop.yaw)
    corners = (_BOX_CORNERS * (w, d)) @ np.array([[c, s], [-s, c]]) + prop.xz
    return np.column_stack([corners[:, 0], np.full(4, prop.base), corners[:, 1]])


def _box_faces(camera: Camera, prop: Prop, bottom: np.ndarray):
    """Camera-facing faces of a box prop whose bottom corners are ``bottom`` (``_box_bottom``):
    ``(polygon, normal, corner index)`` (index 4 is the roof); None if behind the camera."""
    h = prop.size[2]
    cam = camera.to_camera(np.concatenate([bottom, bottom + (0.0, h, 0.0)]))
    if cam[:, 2].min() < NEAR_M:
        return None
    pix = camera.project(cam)
    edge = np.roll(bottom, -1, axis=0) - bottom
    normals = np.column_stack([edge[:, 2], np.zeros(4), -edge[:, 0]])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    mids = (bottom + np.roll(bottom, -1, axis=0)) / 2 + (0.0, h / 2, 0.0)
    facing = np.einsum("ij,ij->i", normals, camera.position - mids) > 0
    faces = [(pix[[k, (k + 1) % 4, (k + 1) % 4 + 4, k + 4]], normals[k], int(k))
             for k in np.flatnonzero(facing)]
    if camera.position[1] > prop.base + h:
        faces.append((pix[4:], np.array([0.0, 1.0, 0.0]), 4))
    return faces


def _box_depth(depth: np.ndarray, camera: Camera, prop: Prop, faces,
               bottom: np.ndarray) -> None:
    """Write the camera depth of a box prop's drawn ``faces`` (of ``_box_faces``, from the same
    ``bottom``) into ``depth``: each wall in vertical strips at most ``DEPTH_STRIP_M`` wide,
    each strip at its corners' mean depth (a long fence seen at an angle spans tens of metres
    of depth)."""
    h = prop.size[2]
    for poly, _, k in faces:
        if k == 4:
            z = camera.to_camera(bottom + (0.0, h, 0.0))[:, 2].mean()
            fill(depth, poly, float(z))
            continue
        a, b = bottom[k], bottom[(k + 1) % 4]
        n = max(1, math.ceil(float(np.linalg.norm(b - a)) / DEPTH_STRIP_M))
        t = np.linspace(0.0, 1.0, n + 1)[:, None]
        base = a + t * (b - a)
        cam = camera.to_camera(np.concatenate([base, base + (0.0, h, 0.0)]))
        pix = camera.project(cam)
        for j in range(n):
            quad = [j, j + 1, n + 2 + j, n + 1 + j]
            fill(depth, pix[quad], float(cam[quad, 2].mean()))


def draw_prop(img: np.ndarray, camera: Camera, prop: Prop, light: np.ndarray,
              ambient: float, haze_bgr, haze_m: float, depth: np.ndarray | None = None) -> None:
    """Draw one prop with Lambert shading and distance haze.

    With ``depth`` (float32, the image's size), the prop's pixels there are set to their
    distance along the camera axis, so that cones behind it can be hidden: walls in strips,
    round props (trees, heads, barrels) at their centre's depth less their radius.
    """
    dist = math.hypot(prop.xz[0] - camera.position[0], prop.xz[1] - camera.position[2])
    haze = 1.0 - math.exp(-dist / haze_m)

    def paint(color, k):
        return [(1 - haze) * min(255.0, float(v) * k) + haze * float(hz)
                for v, hz in zip(color, haze_bgr)]

    if prop.kind == "blob":
        cam = camera.to_camera(np.array([[prop.xz[0], prop.base, prop.xz[1]]]))
        if cam[0, 2] < NEAR_M:
            return
        (u, v), = camera.project(cam)
        r = prop.size[0]
        axes = (camera.fx * r / cam[0, 2], camera.fy * r * 0.9 / cam[0, 2])
        if axes[0] < 0.5 or not (-axes[0] < u < img.shape[1] + axes[0]):
            return
        if prop.trunk:  # a tree: trunk down to the ground, then the crown over it
            (_, v_ground), = camera.project(camera.to_camera(
                np.array([[prop.xz[0], 0.0, prop.xz[1]]])))
            half = max(0.5, camera.fx * 0.15 / cam[0, 2])
            trunk = np.array([[u - half, v], [u + half, v], [u + half, v_ground],
                              [u - half, v_ground]])
            fill(img, trunk, paint((40, 50, 60), 1.0))
            if depth is not None:
                fill(depth, trunk, float(cam[0, 2]))
        fill(img, _UNIT_CIRCLE * axes + (u, v), paint(prop.bgr, 0.9))
        if depth is not None:
            fill(depth, _UNIT_CIRCLE * axes + (u, v), float(cam[0, 2] - r))
        if axes[0] > 3:  # a lit cap on the crown's sunny side
            fill(img, _UNIT_CIRCLE * (axes[0] * 0.75, axes[1] * 0.65) + (u, v - axes[1] * 0.25),
                 paint(prop.bgr, 1.15))
        return
    if prop.kind == "box":
        bottom = _box_bottom(prop)
        faces = _box_faces(camera, prop, bottom)
        if faces is None:
            return
        for poly, normal, _ in faces:
            fill(img, poly, paint(prop.bgr, shade(normal, light, ambient)))
            if prop.windows and normal[1] < 0.5:
                _draw_windows(img, poly, paint(prop.bgr, 0.45))
        if depth is not None:
            _box_depth(depth, camera, prop, faces, bottom)
        return
    radius, height = prop.size  # barrel: a 10-gon prism with painted bands
    cuts = sorted({0.0, 1.0, *[t for lo, hi, _ in prop.bands for t in (lo, hi)]})
    if depth is not None:
        z = float(camera.to_camera(np.array([[prop.xz[0], 0.0, prop.xz[1]]]))[0, 2]) - radius
    for lo, hi in itertools.pairwise(cuts):
        color = next((c for blo, bhi, c in prop.bands if blo <= lo < bhi), prop.bgr)
        faces = frustum_faces(camera, prop.xz, radius, radius, prop.base + lo * height,
                              prop.base + hi * height, 10, prop.yaw, cap=hi == 1.0)
        if faces is None:
            return
        for poly, normal in faces:
            fill(img, poly, paint(color, shade(normal, light, ambient)))
            if depth is not None:
                fill(depth, poly, z)


def _draw_windows(img: np.ndarray, face: np.ndarray, color) -> None:
    """Rows of dark windows across a building face (the quad's bottom edge is 0-1)."""
    height = abs(face[3, 1] - face[0, 1])
    floors = int(min(5, height / 8))
    for f in range(1, floors):
        t = f / floors
        left, right = face[0] + t * (face[3] - face[0]), face[1] + t * (face[2] - face[1])
        band = max(1.0, height / floors * 0.35)
        fill(img, np.stack([left, right, right - [0, band], left - [0, band]]), color)


# --------------------------------------------------------------------------- backdrop


@lru_cache(maxsize=4)
def _asphalt_grain(variant: int, size: int = 256) -> np.ndarray:
    """A wrap-around asphalt luminance texture (fine grain over faint blotches, cracks).

    A small fixed pool, seeded by ``variant`` alone, so scenes share the costly noise and
    stay deterministic; each scene colours, rotates and stains its pick.
    """
    rng = np.random.default_rng(1000 + variant)
    tex = np.zeros((size, size), np.float32)
    for cells, amp in ((4, 0.03), (16, 0.015), (64, 0.03), (size, 0.07)):
        noise = rng.standard_normal((cells, cells)).astype(np.float32)
        scale = size / cells
        warp = np.array([[scale, 0, scale / 2 - 0.5], [0, scale, scale / 2 - 0.5]], np.float32)
        tex += amp * cv2.warpAffine(noise, warp, (size, size), flags=cv2.INTER_CUBIC,
                                    borderMode=cv2.BORDER_WRAP)
    for _ in range(rng.integers(0, 5)):
        pts = np.cumsum(rng.normal(0, 6, (8, 2)), axis=0) + rng.integers(0, size, 2)
        cv2.polylines(tex, [pts.astype(np.int32)], False, -0.2, 1)
    tex.flags.writeable = False
    return tex


def asphalt_tile(rng: np.random.Generator, base_bgr, size: int = 256) -> np.ndarray:
    """A wrap-around asphalt tile in ``base_bgr`` with tar patches and tyre marks."""
    tex = np.rot90(_asphalt_grain(int(rng.integers(4)), size), int(rng.integers(4))).copy()
    for _ in range(rng.integers(1, 6)):
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        ax = tuple(int(v) for v in rng.integers(4, size // 5, 2))
        cv2.ellipse(tex, c, ax, float(rng.uniform(0, 180)), 0, 360, -rng.uniform(0.03, 0.12), -1)
    tile = np.clip((1.0 + tex)[..., None] * np.asarray(base_bgr, np.float32), 0, 255)
    return tile.astype(np.uint8)


def draw_sky(img: np.ndarray, horizon: int, top_bgr, horizon_bgr) -> None:
    """Vertical sky gradient above the horizon row."""
    if horizon <= 0:
        return
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None] ** 0.7
    rows = (1 - t) * np.asarray(top_bgr, np.float32) + t * np.asarray(horizon_bgr, np.float32)
    img[:horizon] = cv2.resize(rows.astype(np.uint8)[:, None, :], (img.shape[1], horizon),
                               interpolation=cv2.INTER_NEAREST)


def draw_clouds(img: np.ndarray, rng: np.random.Generator, horizon: int) -> None:
    """Soft white clouds in the sky band (drawn at quarter size, then blurred up)."""
    if horizon < 20:
        return
    small = np.zeros((horizon // 4 + 1, img.shape[1] // 4 + 1), np.float32)
    for _ in range(rng.integers(0, 6)):
        c = (int(rng.integers(0, small.shape[1])), int(rng.integers(0, small.shape[0])))
        ax = (int(rng.integers(4, 22)), int(rng.integers(1, 6)))
        cv2.ellipse(small, c, ax, 0, 0, 360, float(rng.uniform(0.3, 0.9)), -1)
    if not small.any():
        return
    small = cv2.GaussianBlur(small, (0, 0), 2.2)
    layer = cv2.resize(small, (img.shape[1], horizon), interpolation=cv2.INTER_LINEAR)[..., None]
    img[:horizon] = (img[:horizon] * (1 - layer) + 245 * layer).astype(np.uint8)


def draw_ground(img: np.ndarray, camera: Camera, tile: np.ndarray, res_m: float,
                haze_bgr, haze_px: float) -> int:
    """Warp the wrapping ground tile into the image below the horizon, with haze.

    Returns the first image row painted.
    """
    h, w = img.shape[:2]
    top = max(0, math.floor(camera.horizon_row) + 1)
    if top >= h:
        return h
    # Warp at half resolution: the texture is low-frequency, and this halves the cost.
    half = np.array([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 1.0]])
    shift = np.array([[1, 0, -0.5], [0, 1, -0.5 - top], [0, 0, 1.0]])  # to pixel indices
    tex = np.array([[res_m, 0, 0], [0, res_m, 0], [0, 0, 1.0]])  # tile px → ground metres
    m = half @ shift @ camera.ground_homography() @ tex
    out_h = (h - top + 1) // 2
    ground = cv2.warpPerspective(tile, m, ((w + 1) // 2, out_h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_WRAP)
    ground = cv2.resize(ground, (w, out_h * 2), interpolation=cv2.INTER_LINEAR)[: h - top]
    img[top:] = ground
    n_haze = min(h - top, int(haze_px * 6) + 1)  # below that, the haze is under 1/255
    rows = np.arange(top, top + n_haze, dtype=np.float32) + 0.5 - camera.horizon_row
    a = np.exp(-np.maximum(rows, 0) / haze_px)[:, None, None]
    band = img[top:top + n_haze]
    band[:] = (band * (1 - a) + np.asarray(haze_bgr, np.float32) * a).astype(np.uint8)
    return top


def _ground_points(camera: Camera, polygon_xz: np.ndarray) -> np.ndarray | None:
    pix = project_ground_polygon(camera, polygon_xz)
    if pix is None:
        return None
    return to_cv_points(np.clip(pix, -1e5, 1e5))  # a guard: the near plane bounds them anyway


def draw_ground_polygon(img: np.ndarray, camera: Camera, polygon_xz: np.ndarray, color) -> None:
    """Paint a convex ground-plane polygon (a painted line, a patch)."""
    pts = _ground_points(camera, polygon_xz)
    if pts is not None:
        cv2.fillConvexPoly(img, pts, color, cv2.LINE_8, SHIFT)


def ground_mask(shape: tuple[int, int], camera: Camera, polygons) -> np.ndarray | None:
    """uint8 mask of convex ground polygons; ``None`` if none is in view."""
    mask = np.zeros(shape, np.uint8)
    drawn = False
    for poly in polygons:
        pts = _ground_points(camera, poly)
        if pts is not None:
            cv2.fillConvexPoly(mask, pts, 255, cv2.LINE_8, SHIFT)
            drawn = True
    return mask if drawn else None


def darken_ground(img: np.ndarray, camera: Camera, polygons, factor: float) -> None:
    """Multiply the image by ``factor`` under small ground polygons (shadows)."""
    h, w = img.shape[:2]
    for poly in polygons:
        pts = _ground_points(camera, poly)
        if pts is None:
            continue
        x, y, bw, bh = cv2.boundingRect(pts >> SHIFT)
        x0, y0, x1, y1 = max(0, x - 1), max(0, y - 1), min(w, x + bw + 2), min(h, y + bh + 2)
        if x1 <= x0 or y1 <= y0:
            continue
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillConvexPoly(mask, pts - (np.array([x0, y0], np.int32) << SHIFT), 255,
                           cv2.LINE_8, SHIFT)
        roi = img[y0:y1, x0:x1]
        np.copyto(roi, cv2.convertScaleAbs(roi, alpha=factor), where=(mask > 0)[..., None])


def tint_ground(img: np.ndarray, camera: Camera, polygons, ratio: np.ndarray) -> None:
    """Re-tint the ground under polygons by per-channel ``ratio`` (grass over asphalt)."""
    mask = ground_mask(img.shape[:2], camera, polygons)
    if mask is not None:
        tinted = cv2.transform(img, np.diag(np.asarray(ratio, np.float32)))
        np.copyto(img, tinted, where=(mask > 0)[..., None])
