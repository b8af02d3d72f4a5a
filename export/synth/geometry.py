"""Geometry of the synthetic Formula Student scenes: pinhole camera, track, cone solids.

The world is a flat ground plane with ``Y`` up; ground points are ``(x, z)``. A heading ``psi``
points along ``(sin psi, cos psi)`` with ``(cos psi, -sin psi)`` to its right. The camera is a
pinhole pitched down, with different horizontal and vertical focal lengths: the real on-board
frames were 16:9 video squashed to a square, so cones look narrower than they are and the
renderer applies the same horizontal squeeze.

Solids are drawn as vertical frustums (an n-sided prism with a smaller top): a cone body band,
a square base plate, a barrel or a box are all one. Only faces turned towards the camera are
returned, so the faces of one convex solid never overlap in the image.

Cone dimensions follow the Formula Student rules: small cones 228 x 228 x 325 mm, large orange
cones 285 x 285 x 505 mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import cv2
import numpy as np

from node.classes import BLUE, LARGE_ORANGE, ORANGE, YELLOW

NEAR_M = 0.3  # near clipping distance in metres


@dataclass(frozen=True)
class ConeSpec:
    """Shape and paint of one cone class (metres; colours BGR before lighting).

    ``stripes`` are ``(low, high)`` fractions of the body height painted ``stripe_bgr``.
    """

    plate_side: float
    plate_height: float
    height: float
    r_bottom: float
    r_top: float
    body_bgr: tuple[int, int, int]
    stripe_bgr: tuple[int, int, int]
    stripes: tuple[tuple[float, float], ...]


CONE_SPECS: dict[str, ConeSpec] = {
    BLUE: ConeSpec(0.228, 0.03, 0.325, 0.090, 0.022, (165, 80, 20), (230, 230, 230),
                   ((0.42, 0.62),)),
    YELLOW: ConeSpec(0.228, 0.03, 0.325, 0.090, 0.022, (25, 200, 240), (30, 30, 30),
                     ((0.42, 0.62),)),
    ORANGE: ConeSpec(0.228, 0.03, 0.325, 0.090, 0.022, (30, 95, 245), (235, 235, 235),
                     ((0.42, 0.62),)),
    LARGE_ORANGE: ConeSpec(0.285, 0.035, 0.505, 0.118, 0.025, (30, 95, 245), (235, 235, 235),
                           ((0.28, 0.40), (0.56, 0.68))),
}


@dataclass(frozen=True)
class Camera:
    """A pinhole camera over the ground plane.

    Attributes:
        width, height: image size in pixels.
        fx, fy: focal lengths in pixels (``fx < fy`` models the 16:9 → square squeeze).
        position: ``(x, y, z)`` of the optical centre, ``y`` = height above the ground.
        yaw: heading of the camera on the ground plane (radians).
        pitch: downward tilt (radians); sets the horizon row.
    """

    width: int
    height: int
    fx: float
    fy: float
    position: tuple[float, float, float]
    yaw: float
    pitch: float

    @property
    def cx(self) -> float:
        return self.width / 2.0

    @property
    def cy(self) -> float:
        return self.height / 2.0

    @property
    def horizon_row(self) -> float:
        """Image row (continuous coordinates) of the horizon."""
        return self.cy - self.fy * math.tan(self.pitch)

    @cached_property
    def rotation(self) -> np.ndarray:
        """3x3 matrix from world offsets to camera axes (x right, y down, z optical axis)."""
        s, c = math.sin(self.yaw), math.cos(self.yaw)
        sp, cp = math.sin(self.pitch), math.cos(self.pitch)
        fwd = np.array([s, 0.0, c])
        right = np.array([c, 0.0, -s])
        up = np.array([0.0, 1.0, 0.0])
        return np.stack([right, -(up * cp + fwd * sp), fwd * cp - up * sp])

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """World points (N, 3) to camera coordinates (N, 3)."""
        return (np.asarray(points, dtype=np.float64) - self.position) @ self.rotation.T

    def project(self, cam_points: np.ndarray) -> np.ndarray:
        """Camera points (N, 3) with ``z > 0`` to continuous pixel coordinates (N, 2).

        Pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``; its centre is at ``(j + .5, i + .5)``.
        """
        return cam_points[:, :2] / cam_points[:, 2:3] * self._focal + self._centre

    @cached_property
    def _focal(self) -> np.ndarray:
        return np.array([self.fx, self.fy])

    @cached_property
    def _centre(self) -> np.ndarray:
        return np.array([self.cx, self.cy])

    def ground_homography(self) -> np.ndarray:
        """3x3 matrix mapping ground ``(x, z, 1)`` to homogeneous continuous pixel coords."""
        rot = self.rotation
        pos = np.asarray(self.position)
        m = np.stack([rot[:, 0], rot[:, 2], -rot @ pos], axis=1)
        k = np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])
        return k @ m


def make_camera(width: int, height: int, hfov_deg: float, horizon_frac: float,
                height_m: float, xz: tuple[float, float], yaw: float) -> Camera:
    """A camera whose 16:9 field of view ``hfov_deg`` is squeezed into ``width x height``.

    ``horizon_frac`` places the horizon at that fraction of the image height from the top.
    """
    f_native = (16.0 / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)  # in 16:9 frame units
    fx, fy = f_native * width / 16.0, f_native * height / 9.0
    pitch = math.atan((height / 2.0 - horizon_frac * height) / fy)
    return Camera(width, height, fx, fy, (xz[0], height_m, xz[1]), yaw, pitch)


# --------------------------------------------------------------------------- track


@dataclass
class Track:
    """A centreline sampled every ``ds`` metres, with its headings and the track width."""

    points: np.ndarray  # (M, 2) ground x, z
    heading: np.ndarray  # (M,)
    ds: float
    width: float

    @property
    def length(self) -> float:
        return (len(self.points) - 1) * self.ds

    def pose(self, s: float, lateral: float = 0.0) -> tuple[np.ndarray, float]:
        """Ground point ``lateral`` metres right of the centreline at arc length ``s``."""
        i = min(max(s / self.ds, 0.0), len(self.points) - 1.001)
        i0, t = int(i), i - int(i)
        x = self.points[i0, 0] * (1 - t) + self.points[i0 + 1, 0] * t
        z = self.points[i0, 1] * (1 - t) + self.points[i0 + 1, 1] * t
        psi = float(self.heading[i0] * (1 - t) + self.heading[i0 + 1] * t)
        return np.array([x + lateral * math.cos(psi), z - lateral * math.sin(psi)]), psi

    def curvature(self, s: float) -> float:
        i = int(np.clip(s / self.ds, 0, len(self.heading) - 2))
        return float((self.heading[i + 1] - self.heading[i]) / self.ds)


def make_track(rng: np.random.Generator, length: float, width: float,
               straight_start: float = 0.0) -> Track:
    """A random autocross-like centreline: straights and arcs of 9–40 m radius, smoothed.

    ``straight_start`` metres at the beginning are kept straight.
    """
    ds = 0.25
    n = int(length / ds) + 2
    curvature = np.zeros(n)
    i = int(straight_start / ds)
    while i < n:
        if rng.random() < 0.4:
            i += int(rng.uniform(8, 35) / ds)
            continue
        radius = rng.uniform(9, 40)
        arc = radius * math.radians(rng.uniform(25, 160))
        j = min(n, i + int(arc / ds))
        curvature[i:j] = rng.choice([-1.0, 1.0]) / radius
        i = j
    kernel = np.ones(int(4 / ds)) / int(4 / ds)
    curvature = np.convolve(curvature, kernel, mode="same")
    heading = np.concatenate([[0.0], np.cumsum(curvature[:-1] * ds)])
    steps = np.stack([np.sin(heading), np.cos(heading)], axis=1) * ds
    points = np.concatenate([[[0.0, 0.0]], np.cumsum(steps[:-1], axis=0)])
    return Track(points, heading, ds, width)


# --------------------------------------------------------------------------- solids


def frustum_faces(camera: Camera, center: tuple[float, float], r_bottom: float, r_top: float,
                  y_bottom: float, y_top: float, sides: int, phase: float = 0.0,
                  cap: bool = True) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Camera-facing faces of a vertical ``sides``-gon frustum.

    Returns:
        ``(polygon (K, 2) pixels, outward unit normal (3,))`` per visible face, the top cap
        last; ``None`` if any corner lies closer than the near plane.
    """
    ang = phase + np.arange(sides + 1) * (2 * math.pi / sides)
    cos_a, sin_a = np.cos(ang), np.sin(ang)
    cx, cz = center
    ring_bottom = np.stack([cx + r_bottom * cos_a, np.full_like(ang, y_bottom),
                            cz + r_bottom * sin_a], axis=1)
    ring_top = np.stack([cx + r_top * cos_a, np.full_like(ang, y_top), cz + r_top * sin_a], 1)
    cam = camera.to_camera(np.concatenate([ring_bottom, ring_top]))
    if cam[:, 2].min() < NEAR_M:
        return None
    pix = camera.project(cam)
    pb, pt = pix[: sides + 1], pix[sides + 1:]
    mid = ang[:-1] + math.pi / sides
    slope = math.atan2(r_bottom - r_top, y_top - y_bottom)
    normals = np.stack([np.cos(mid) * math.cos(slope), np.full_like(mid, math.sin(slope)),
                        np.sin(mid) * math.cos(slope)], axis=1)
    r_mid = (r_bottom + r_top) / 2
    centres = np.stack([cx + r_mid * np.cos(mid), np.full_like(mid, (y_bottom + y_top) / 2),
                        cz + r_mid * np.sin(mid)], axis=1)
    facing = np.einsum("ij,ij->i", normals, np.asarray(camera.position) - centres) > 0
    faces = [(np.stack([pb[k], pb[k + 1], pt[k + 1], pt[k]]), normals[k])
             for k in np.flatnonzero(facing)]
    if cap and r_top > 0 and camera.position[1] > y_top:
        faces.append((pt[:-1].copy(), np.array([0.0, 1.0, 0.0])))
    return faces


def cone_polygons(camera: Camera, spec: ConeSpec, center: tuple[float, float], yaw: float,
                  sides: int, sun: np.ndarray | None = None,
                  ambient: float = 1.0) -> list[tuple[np.ndarray, str, float, bool]] | None:
    """The convex polygons a cone is painted with, in painting order.

    The base plate is a box and every paint band of the body is a frustum; each is convex, so
    its image is the convex hull of its corners. Seen from above (the camera is higher than
    any cone), painting plate, then bands from the bottom up, leaves exactly the visible
    surface: each band hides the top of the one below it. With a ``sun``, each band is
    followed by its shadowed side: the hull of its ring points that face the camera but not
    the sun. That polygon lies inside the band's, so it never changes the cone's outline.

    Returns:
        ``(polygon (K, 2) continuous pixels, part, light factor, is_outline)`` with ``part``
        one of ``plate``, ``body``, ``stripe``; ``is_outline`` is False for the shadowed-side
        overlays. ``None`` if the cone reaches behind the near plane.
    """
    cx, cz = center
    c, s = math.cos(yaw), math.sin(yaw)
    turn = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    unit = _unit_rings(spec, sides) @ turn
    cam = camera.to_camera(unit + (cx, 0.0, cz))
    if cam[:, 2].min() < NEAR_M:
        return None
    pix = camera.project(cam).astype(np.float32)
    lit, dark = 1.0, None
    if sun is not None:
        normals = _ring_normals(spec, sides) @ turn
        lambert = normals @ sun
        to_cam = np.asarray(camera.position) - (unit[8:] + (cx, 0.0, cz))
        front = np.einsum("ij,ij->i", normals, to_cam) > 0
        lit_front = front & (lambert > 0)
        lit = ambient + (1 - ambient) * (float(lambert[lit_front].mean()) if lit_front.any()
                                         else 0.0)
        dark = front & (lambert <= 0)
    out = [(_hull(pix[:8]), "plate", lit, True)]
    cuts = _cuts(spec)
    stripe_starts = {lo for lo, _ in spec.stripes}
    for k, lo in enumerate(cuts[:-1]):
        part = "stripe" if lo in stripe_starts else "body"
        ring = slice(8 + k * sides, 8 + (k + 2) * sides)
        out.append((_hull(pix[ring]), part, lit, True))
        if dark is not None and dark[ring.start - 8:ring.stop - 8].sum() >= 3:
            shaded = pix[ring][dark[ring.start - 8:ring.stop - 8]]
            out.append((_hull(shaded), part, ambient, False))
    return out


def _cuts(spec: ConeSpec) -> list[float]:
    """Heights (fractions of the body) where the paint changes, from 0 to 1."""
    return sorted({0.0, 1.0, *[t for band in spec.stripes for t in band]})


@lru_cache(maxsize=64)
def _unit_rings(spec: ConeSpec, sides: int) -> np.ndarray:
    """Plate corners (8) then one ring of ``sides`` points per paint cut, around (0, 0)."""
    r_plate = spec.plate_side / math.sqrt(2)
    corner = math.pi / 4 + np.arange(4) * (math.pi / 2)
    plate = np.stack([np.tile(r_plate * np.cos(corner), 2),
                      np.repeat([0.0, spec.plate_height], 4),
                      np.tile(r_plate * np.sin(corner), 2)], axis=1)
    t = np.asarray(_cuts(spec))[:, None]
    radius = spec.r_bottom + (spec.r_top - spec.r_bottom) * t
    ang = np.arange(sides)[None, :] * (2 * math.pi / sides)
    heights = np.broadcast_to(spec.plate_height + t * (spec.height - spec.plate_height),
                              radius.shape[:1] + (sides,))
    rings = np.stack([(radius * np.cos(ang)).ravel(), heights.ravel(),
                      (radius * np.sin(ang)).ravel()], axis=1)
    unit = np.concatenate([plate, rings])
    unit.flags.writeable = False
    return unit


@lru_cache(maxsize=64)
def _ring_normals(spec: ConeSpec, sides: int) -> np.ndarray:
    """Outward surface normals of the body at the ring points of ``_unit_rings`` (yaw 0)."""
    slope = math.atan2(spec.r_bottom - spec.r_top, spec.height - spec.plate_height)
    ang = np.tile(np.arange(sides) * (2 * math.pi / sides), len(_cuts(spec)))
    normals = np.stack([np.cos(ang) * math.cos(slope), np.full_like(ang, math.sin(slope)),
                        np.sin(ang) * math.cos(slope)], axis=1)
    normals.flags.writeable = False
    return normals


def _hull(points: np.ndarray) -> np.ndarray:
    return cv2.convexHull(points)[:, 0].astype(np.float64)


def project_ground_polygon(camera: Camera, polygon_xz: np.ndarray) -> np.ndarray | None:
    """Project a ground polygon, clipped against the near plane; ``None`` if nothing is left."""
    pts = np.asarray(polygon_xz, dtype=np.float64)
    world = np.stack([pts[:, 0], np.zeros(len(pts)), pts[:, 1]], axis=1)
    cam = camera.to_camera(world)
    inside = cam[:, 2] >= NEAR_M
    if inside.all():
        return camera.project(cam)
    if not inside.any():
        return None
    clipped = []
    for k in range(len(cam)):  # Sutherland-Hodgman against the plane z = NEAR_M
        a, b = cam[k], cam[(k + 1) % len(cam)]
        a_in, b_in = a[2] >= NEAR_M, b[2] >= NEAR_M
        if a_in:
            clipped.append(a)
        if a_in != b_in:
            t = (NEAR_M - a[2]) / (b[2] - a[2])
            clipped.append(a + t * (b - a))
    return camera.project(np.asarray(clipped)) if len(clipped) >= 3 else None


def shade(normal: np.ndarray, light: np.ndarray, ambient: float) -> float:
    """Lambert shading factor for a face normal under a unit light direction."""
    return ambient + (1.0 - ambient) * max(0.0, float(np.dot(normal, light)))
