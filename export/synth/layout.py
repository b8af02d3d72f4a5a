"""Layout of a synthetic Formula Student scene: track, cone positions, props and look.

A ``Scene`` is everything that stays fixed while the car drives: the track centreline, every
cone (blue on the left, yellow on the right, orange at timekeeping gates, in acceleration and
skidpad-like lanes, or sprinkled in), the props around the track, painted lines and grass,
the camera rig, the ego car's nose and the light. ``export.synth`` renders views of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from export.synth.camera import CarNose, random_car_nose
from export.synth.geometry import Track, make_track
from export.synth.scene import Prop, asphalt_tile
from node.classes import BLUE, LARGE_ORANGE, ORANGE, YELLOW

# Real blue cones range from a light sky blue in the sun to dark navy in the shade.
BLUE_SHADES = ((215, 120, 35), (200, 105, 30), (230, 150, 60), (170, 85, 25), (130, 60, 20))
CLOTHES = ((30, 110, 250), (40, 200, 230), (160, 70, 20), (25, 25, 25), (230, 230, 230),
           (40, 40, 200), (120, 120, 120))
PROP_PAINT = ((30, 100, 245), (170, 80, 20), (40, 190, 235), (150, 150, 150), (60, 60, 60),
              (210, 210, 210))


PROP_KINDS = ("person", "barrel", "box", "banner", "car", "tyres")
PROP_ODDS = np.cumsum([0.3, 0.15, 0.15, 0.15, 0.1, 0.15])


@dataclass
class SceneCone:
    """One cone in the world: class name, ground position, yaw and a paint tint."""

    label: str
    xz: tuple[float, float]
    yaw: float
    tint: float
    body_bgr: tuple[int, int, int] | None = None
    plate_shade: float = 0.7


@dataclass
class Scene:
    """Everything that stays fixed while the camera drives along the track."""

    track: Track
    cones: list[SceneCone]
    props: list[Prop]
    lines: list[np.ndarray]  # painted ground quads (4, 2)
    line_bgr: tuple[float, float, float]
    grass: list[np.ndarray]  # convex grass patches on the ground (K, 2)
    tile: np.ndarray
    tile_res: float
    sky_top: tuple[float, float, float]
    sky_horizon: tuple[float, float, float]
    grass_ratio: np.ndarray
    sun: np.ndarray
    ambient: float
    hfov_deg: float
    horizon_frac: float
    camera_height: float
    car: CarNose | None
    hud_seed: int | None
    haze_px: float
    haze_m: float
    extras: dict = field(default_factory=dict)


def _normal(psi: float) -> np.ndarray:
    return np.array([math.cos(psi), -math.sin(psi)])


def place_cones(rng: np.random.Generator, track: Track, s_from: float, s_to: float,
                offset: float = 0.0, mirrored: bool = False) -> list[SceneCone]:
    """Boundary cones along ``[s_from, s_to]``, blue left and yellow right, with orange.

    ``offset`` shifts the whole line sideways (another leg of the course seen across the
    lot); ``mirrored`` swaps the sides, as for a leg driven the other way.
    """
    blue_bgr = BLUE_SHADES[rng.integers(len(BLUE_SHADES))]
    plate_shade = float(rng.choice([0.35, 0.7, 0.85]))  # base plates: dark or own colour
    spacing = rng.uniform(3.0, 5.0)
    sprinkle = rng.uniform(0.1, 0.35) if rng.random() < 0.35 else 0.0
    lanes = []
    if rng.random() < 0.3:
        start = rng.uniform(s_from - 10, s_from + 20)
        lanes.append((start, start + rng.uniform(15, 40)))
    gates = []
    s_gate = s_from + rng.uniform(3, 25) if rng.random() < 0.55 else s_from + rng.uniform(40, 90)
    while s_gate < s_to:
        gates.append(s_gate)
        s_gate += rng.uniform(50, 120)
    cones = []
    s = s_from
    while s < s_to:
        bend = abs(track.curvature(s))
        near_gate = any(abs(s - g) < 1.5 for g in gates)
        in_lane = any(lo <= s <= hi for lo, hi in lanes)
        for side in (-1, 1):
            if near_gate:
                continue
            label = BLUE if (side < 0) != mirrored else YELLOW
            if in_lane or rng.random() < sprinkle:
                label = ORANGE
            elif rng.random() < 0.03:
                label = LARGE_ORANGE
            lateral = offset + side * (track.width / 2 + rng.normal(0, 0.08))
            p, _ = track.pose(s, lateral)
            cones.append(SceneCone(label, (float(p[0]), float(p[1])), float(rng.uniform(0, 6.3)),
                                   float(rng.uniform(0.85, 1.1)),
                                   blue_bgr if label == BLUE else None, plate_shade))
        s += spacing * (0.65 if bend > 1 / 25 else 1.0) * rng.uniform(0.9, 1.1)
    for g in gates:  # timekeeping line: two large orange cones on each side
        for side in (-1, 1):
            for ds in (-0.4, 0.4):
                p, _ = track.pose(g + ds, offset + side * (track.width / 2 + 0.3))
                cones.append(SceneCone(LARGE_ORANGE, (float(p[0]), float(p[1])),
                                       float(rng.uniform(0, 6.3)), float(rng.uniform(0.9, 1.1))))
    return cones


def _far_from_track(track: Track, xz: np.ndarray, clearance: float) -> bool:
    d2 = ((track.points[::8] - xz) ** 2).sum(axis=1)
    return bool(d2.min() > clearance ** 2)


def place_props(rng: np.random.Generator, track: Track, s_from: float, s_to: float,
                keep_clear: float) -> list[Prop]:
    """Clutter near the track (people, barrels, boxes, banners, cars) and far scenery."""
    props = []
    for _ in range(int((s_to - s_from) / 6)):
        s = rng.uniform(s_from, s_to)
        side = rng.choice([-1.0, 1.0])
        p, psi = track.pose(s, side * (keep_clear + rng.exponential(6)))
        if not _far_from_track(track, p, keep_clear - 0.2):
            continue
        xz = (float(p[0]), float(p[1]))
        kind = PROP_KINDS[int(np.searchsorted(PROP_ODDS, rng.random()))]
        paint = PROP_PAINT[rng.integers(len(PROP_PAINT))]
        if kind == "person":
            shirt = CLOTHES[rng.integers(len(CLOTHES))]
            pants = CLOTHES[rng.integers(len(CLOTHES))]
            yaw = float(rng.uniform(0, 3.1))
            props += [Prop("box", xz, (0.35, 0.22, 0.85), pants, yaw),
                      Prop("box", xz, (0.45, 0.25, 0.6), shirt, yaw, base=0.85),
                      Prop("blob", xz, (0.11,), (120, 150, 190), base=1.58)]
        elif kind == "barrel":
            props.append(Prop("barrel", xz, (0.29, 0.9), paint,
                              bands=[(0.3, 0.4, (235, 235, 235)), (0.65, 0.75, (235, 235, 235))]
                              if rng.random() < 0.5 else []))
        elif kind == "box":
            props.append(Prop("box", xz, tuple(rng.uniform(0.3, 1.2, 3)), paint,
                              float(rng.uniform(0, 3.1))))
        elif kind == "banner":
            props.append(Prop("box", xz, (rng.uniform(2, 6), 0.05, rng.uniform(0.7, 1.2)), paint,
                              psi + math.pi / 2 + rng.normal(0, 0.2), base=0.1))
        elif kind == "car":
            props.append(Prop("box", xz, (1.8, 4.4, 0.9), paint, psi + rng.normal(0, 0.3),
                              base=0.35))
            props.append(Prop("box", xz, (1.6, 2.2, 0.55), (60, 60, 60), psi, base=1.25))
        else:
            for k in range(int(rng.integers(1, 4))):
                props.append(Prop("barrel", xz, (0.3, 0.2), (30, 30, 30), base=0.2 * k))
    props += place_scenery(rng, track, s_from, s_to)
    return props


def place_scenery(rng: np.random.Generator, track: Track, s_from: float,
                  s_to: float) -> list[Prop]:
    """Backdrop beyond the lot: buildings, tree lines, grandstands, tyre walls and fences."""
    props = []
    for _ in range(int(rng.integers(10, 18) + (s_to - s_from) / 12)):
        p, psi = track.pose(rng.uniform(s_from, s_to + 60), 0.0)
        ang = psi + rng.uniform(-1.4, 1.4) + rng.choice([0.0, math.pi], p=[0.8, 0.2])
        xz = p + rng.uniform(60, 180) * np.array([math.sin(ang), math.cos(ang)])
        if not _far_from_track(track, xz, 45.0):
            continue
        face = ang + math.pi / 2 + rng.normal(0, 0.2)
        kind = rng.random()
        if kind < 0.3:
            tone = rng.uniform(140, 235)
            props.append(Prop("box", tuple(xz), (rng.uniform(20, 80), rng.uniform(8, 20),
                                                 rng.uniform(8, 35)),
                              (tone * rng.uniform(0.85, 1.0), tone * rng.uniform(0.92, 1.02),
                               tone), face, windows=True))
        elif kind < 0.7:
            tangent = np.array([math.cos(face), -math.sin(face)])
            for k in range(int(rng.integers(6, 20))):
                t_xz = xz + tangent * (k * rng.uniform(3, 6)) + rng.normal(0, 2, 2)
                r = rng.uniform(3, 6.5)
                if not _far_from_track(track, t_xz, 40.0):
                    continue
                green = (rng.uniform(25, 60), rng.uniform(60, 110), rng.uniform(35, 75))
                props.append(Prop("blob", tuple(t_xz), (r,), green,
                                  base=r * 0.9 + rng.uniform(1.5, 6), trunk=True))
        elif kind < 0.8:
            props.append(Prop("box", tuple(xz), (rng.uniform(20, 60), 10, rng.uniform(5, 12)),
                              (185, 175, 205), face, windows=True))
        else:  # tyre wall or advertising fence at the edge of the lot
            color = (35, 35, 35) if rng.random() < 0.5 else PROP_PAINT[rng.integers(6)]
            props.append(Prop("box", tuple(xz * 0.5 + p * 0.5), (rng.uniform(20, 70), 0.8,
                                                                 rng.uniform(0.8, 1.6)),
                              color, face))
    return props


def place_ground_marks(rng: np.random.Generator, track: Track, s_from: float,
                       s_to: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Painted parking-lot lines across the lot, and grass beyond one side of it."""
    lines = []
    for _ in range(int(rng.integers(0, 4 + (s_to - s_from) / 15))):
        p, psi = track.pose(rng.uniform(s_from, s_to), rng.normal(0, 10))
        ang = psi + rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.05)
        d = np.array([math.sin(ang), math.cos(ang)])
        n = np.array([d[1], -d[0]]) * rng.uniform(0.06, 0.1)
        length = rng.uniform(4, 30)
        lines.append(np.stack([p - n, p + n, p + n + d * length, p - n + d * length]))
    grass = []
    for _ in range(int(rng.integers(0, 4))):
        p, psi = track.pose(rng.uniform(s_from - 20, s_to), rng.choice([-1.0, 1.0]) *
                            rng.uniform(25, 60))
        half_len, half_wid = rng.uniform(20, 80), rng.uniform(8, 40)
        ang = psi + rng.normal(0, 0.3)
        along = np.array([math.sin(ang), math.cos(ang)])
        across = np.array([along[1], -along[0]])
        rect = p + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) @ np.stack(
            [along * half_len, across * half_wid])
        rel = track.points[::8] - p
        inside = (np.abs(rel @ along) < half_len + 6) & (np.abs(rel @ across) < half_wid + 6)
        if not inside.any():  # never under the track or its cones
            grass.append(rect)
    return lines, grass


def build_scene(rng: np.random.Generator, length: float, s_view: tuple[float, float],
                clutter: bool = True, car: bool = True,
                return_leg: bool | None = None) -> Scene:
    """A random scene with a track of ``length`` m; cones and props cover ``s_view``."""
    width = rng.uniform(3.0, 4.5)
    track = make_track(rng, length, width, straight_start=rng.uniform(0, 30))
    s_from, s_to = s_view
    cones = place_cones(rng, track, s_from - 5, s_to)
    if return_leg if return_leg is not None else rng.random() < 0.45:
        offset = rng.choice([-1.0, 1.0]) * rng.uniform(9, 20)
        cones += place_cones(rng, track, s_from - 5, s_to, offset=offset, mirrored=True)
    overcast = rng.random() < 0.3
    sky_top = (200, 195, 190) if overcast else (rng.uniform(200, 245), rng.uniform(150, 195),
                                                rng.uniform(90, 140))
    sky_horizon = (rng.uniform(210, 240), rng.uniform(205, 235), rng.uniform(195, 225))
    asphalt = np.full(3, rng.uniform(95, 170)) * rng.uniform(0.97, 1.03, 3)
    grass_bgr = np.array([rng.uniform(50, 80), rng.uniform(105, 135), rng.uniform(85, 115)])
    sun_elev, sun_az = math.radians(rng.uniform(15, 70)), rng.uniform(0, 2 * math.pi)
    sun = np.array([math.cos(sun_elev) * math.sin(sun_az), math.sin(sun_elev),
                    math.cos(sun_elev) * math.cos(sun_az)])
    props, lines, grass = [], [], []
    if clutter:
        props = place_props(rng, track, s_from, s_to + 40, keep_clear=width / 2 + 1.5)
        lines, grass = place_ground_marks(rng, track, s_from, s_to + 40)
    line_bgr = tuple(0.75 * 230 + 0.25 * asphalt)
    return Scene(
        track=track, cones=cones, props=props, lines=lines, line_bgr=line_bgr, grass=grass,
        tile=asphalt_tile(rng, asphalt), tile_res=0.08,
        sky_top=sky_top, sky_horizon=sky_horizon, grass_ratio=grass_bgr / asphalt,
        sun=sun, ambient=float(rng.uniform(0.65, 0.8) if overcast else rng.uniform(0.4, 0.6)),
        hfov_deg=float(rng.uniform(75, 95)), horizon_frac=float(rng.uniform(0.28, 0.46)),
        camera_height=float(rng.uniform(0.8, 1.2)),
        car=random_car_nose(rng) if car and rng.random() < 0.9 else None,
        hud_seed=int(rng.integers(1 << 30)) if clutter and rng.random() < 0.35 else None,
        haze_px=float(rng.uniform(4, 20)), haze_m=float(rng.uniform(150, 600)),
    )
