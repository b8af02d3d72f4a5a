"""Synthetic Formula Student scenes with exact YOLO labels (numpy + cv2 only).

``python -m export.synth --out DIR --frames N --seed S`` writes a YOLO dataset
(``images/NNNNN.jpg``, ``labels/NNNNN.txt``, ``data.yaml`` with the project's class names) and,
with ``--video``, an MP4 whose frame *i* is image *i*. The frames are a clip: the car drives
along a procedurally generated autocross track, seen from a pinhole camera about 1 m up.
Everything is deterministic in the seed.

Cones follow the Formula Student rules (``export.synth.geometry``): small 228x228x325 mm
blue/white, yellow/black and orange/white cones, and large 285x285x505 mm orange cones with
two white stripes. Every drawn cone is labelled, and its box is tight on its own visible
pixels: cones are rasterised near-to-far into their own masks, a cone hidden by nearer cones,
the car's nose or the HUD by half or more (or cut by the frame edge by half or more) is not
drawn at all, and the others are drawn far-to-near. Camera effects (exposure, blur, noise,
JPEG) come after labelling, as on a real sensor.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np

from export.synth.camera import (
    CameraLook,
    apply_camera_look,
    draw_car_nose,
    draw_hud,
    random_camera_look,
)
from export.synth.cones import draw_shadows, tight_box, visible_cones
from export.synth.geometry import Camera, make_camera
from export.synth.layout import Scene, build_scene
from export.synth.scene import (
    draw_clouds,
    draw_ground,
    draw_ground_polygon,
    draw_prop,
    draw_sky,
    tint_ground,
)
from node.classes import CONE_CLASSES

PLATE_SHADE = 0.35  # base plates are dark: the cone's own colour, much darker


@dataclass(frozen=True)
class RenderOptions:
    """Switches for what a frame contains (tests turn clutter off to check labels).

    Attributes:
        clutter: props, painted lines, grass, clouds and the HUD overlay.
        car: the ego car's nose at the bottom of the frame (in most scenes).
        effects: exposure, white balance, blur, noise and JPEG artefacts.
        shadows: cone shadows on the ground.
        flat_background: paint the whole backdrop this BGR colour instead (no sky/ground).
        return_leg: another leg of the course seen across the lot (``None``: random).
        max_distance: farthest cone drawn, in metres.
        min_cone_px: cones shorter than this many pixels are not drawn (nor labelled).
    """

    clutter: bool = True
    car: bool = True
    effects: bool = True
    shadows: bool = True
    flat_background: tuple[int, int, int] | None = None
    return_leg: bool | None = None
    max_distance: float = 35.0
    min_cone_px: float = 8.0


@dataclass
class ConeInstance:
    """A drawn, labelled cone.

    Attributes:
        label: project class name.
        box: (4,) float32 ``x1, y1, x2, y2``, tight on the visible pixels.
        depth: distance along the optical axis, metres.
        faces: the polygons the cone was filled with (continuous pixel coordinates).
        origin: ``(x, y)`` of ``mask``'s top-left pixel in the image.
        mask: bool mask of the cone's visible pixels.
    """

    label: str
    box: np.ndarray
    depth: float
    faces: list[np.ndarray]
    origin: tuple[int, int]
    mask: np.ndarray


@dataclass
class SynthFrame:
    """A rendered frame with its exact labels.

    Attributes:
        image: BGR uint8.
        boxes: (N, 4) float32 ``x1, y1, x2, y2`` in pixels.
        labels: project class names, one per box.
        cones: per-cone geometry, in the order of ``boxes``.
        occluder_mask: bool (H, W) of the car nose and HUD, which hide cones.
        camera: the camera it was rendered from.
        prop_depth: float32 (H, W) camera depth of the props that may stand in front of a
            cone (+inf elsewhere); a cone's pixel is hidden where it is below the cone's
            ``depth``. None without props (a flat backdrop).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: list[str]
    cones: list[ConeInstance]
    occluder_mask: np.ndarray
    camera: Camera
    prop_depth: np.ndarray | None = None


def _options(kwargs: dict) -> RenderOptions:
    known = {f.name for f in fields(RenderOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown render option {unknown[0]!r}; expected one of {sorted(known)}")
    return RenderOptions(**kwargs)


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# --------------------------------------------------------------------------- views


def _draw_backdrop(img: np.ndarray, scene: Scene, camera: Camera,
                   options: RenderOptions) -> np.ndarray | None:
    """Sky, ground and props; returns the props' depth buffer (float32, +inf where no prop
    nearer than the farthest drawn cone was painted), or None without props."""
    h, w = img.shape[:2]
    horizon = int(np.clip(math.ceil(camera.horizon_row), 0, h))
    draw_sky(img, horizon, scene.sky_top, scene.sky_horizon)
    if options.clutter:
        draw_clouds(img, np.random.default_rng(scene.extras.get("cloud_seed", 0)), horizon)
    draw_ground(img, camera, scene.tile, scene.tile_res, scene.sky_horizon, scene.haze_px)
    if scene.grass:
        tint_ground(img, camera, scene.grass, scene.grass_ratio)
    for quad in scene.lines:
        draw_ground_polygon(img, camera, quad, scene.line_bgr)
    if not scene.props:
        return None
    xz = np.array([p.xz for p in scene.props])
    cam = camera.to_camera(np.column_stack([xz[:, 0], np.zeros(len(xz)), xz[:, 1]]))
    reach = np.array([max(p.size) for p in scene.props])
    ok = (cam[:, 2] + reach > 0.5) & (np.abs(cam[:, 0]) - reach < cam[:, 2] * (w / 2) / camera.fx
                                      * 1.2 + 1)
    depth = np.full((h, w), np.inf, np.float32)
    for i in np.flatnonzero(ok)[np.argsort(-cam[ok, 2])]:
        # Only props that may stand in front of a cone need their depth.
        near = cam[i, 2] - reach[i] < options.max_distance
        draw_prop(img, camera, scene.props[i], scene.sun, scene.ambient, scene.sky_horizon,
                  scene.haze_m, depth if near else None)
    return depth


def render_view(scene: Scene, camera: Camera, rng: np.random.Generator,
                options: RenderOptions, look: CameraLook | None = None,
                nose_jitter: tuple[float, float] = (0.0, 0.0), speed_kmh: float = 0.0,
                hud_phase: float = 0.0) -> SynthFrame:
    """Render one view of ``scene`` with exact labels."""
    h, w = camera.height, camera.width
    img = np.empty((h, w, 3), np.uint8)
    prop_depth = None
    if options.flat_background is not None:
        img[:] = options.flat_background
    else:
        prop_depth = _draw_backdrop(img, scene, camera, options)
    overlay = np.zeros_like(img)
    occluder = np.zeros((h, w), bool)
    if scene.car is not None and options.car:
        occluder |= draw_car_nose(overlay, scene.car, nose_jitter)
    if scene.hud_seed is not None and options.clutter:
        occluder |= draw_hud(overlay, scene.hud_seed, hud_phase, speed_kmh)
    occupied = occluder.copy()
    cones = visible_cones(scene, camera, occupied, options.max_distance,
                          options.min_cone_px, prop_depth)
    if options.shadows and options.flat_background is None:
        draw_shadows(img, camera, scene, [d.cone for d in cones])
    for drawn in reversed(cones):  # far to near: nearer cones cover farther ones
        x0, y0 = drawn.origin
        roi = img[y0:y0 + drawn.patch.shape[0], x0:x0 + drawn.patch.shape[1]]
        np.copyto(roi, drawn.patch[..., :3], where=drawn.own[..., None])
    if occluder.any():
        painted = cv2.cvtColor(overlay, cv2.COLOR_BGR2GRAY) > 0
        np.copyto(img, overlay, where=painted[..., None])
    if options.effects and look is not None:
        img = apply_camera_look(img, look, rng)
    instances = [ConeInstance(d.cone.label, tight_box(d.visible, d.origin), d.depth, d.faces,
                              d.origin, d.visible) for d in cones]
    boxes = np.array([c.box for c in instances], np.float32).reshape(-1, 4)
    return SynthFrame(img, boxes, [c.label for c in instances], instances, occluder, camera,
                      prop_depth)


def _camera(scene: Scene, s: float, lateral: float, yaw_offset: float, pitch_offset: float,
            width: int, height: int) -> Camera:
    p, psi = scene.track.pose(s, lateral)
    cam = make_camera(width, height, scene.hfov_deg, scene.horizon_frac, scene.camera_height,
                      (float(p[0]), float(p[1])), psi + yaw_offset)
    return Camera(cam.width, cam.height, cam.fx, cam.fy, cam.position, cam.yaw,
                  cam.pitch + pitch_offset)


# --------------------------------------------------------------------------- public API


def render_scene(seed: int | np.random.Generator, width: int = 640, height: int = 640,
                 **options) -> SynthFrame:
    """Render one random scene.

    Args:
        seed: an int seed or a numpy Generator; the same seed gives the same image bytes.
        width, height: image size in pixels.
        **options: fields of ``RenderOptions``.

    Raises:
        ValueError: an unknown option or a bad image size.
    """
    opts = _options(options)
    _check_size(width, height)
    rng = _rng(seed)
    s0 = float(rng.uniform(5, 25))
    scene = build_scene(rng, s0 + opts.max_distance + 80, (s0, s0 + opts.max_distance + 5),
                        clutter=opts.clutter, car=opts.car, return_leg=opts.return_leg)
    scene.extras["cloud_seed"] = int(rng.integers(1 << 30))
    camera = _camera(scene, s0, float(rng.uniform(-0.5, 0.5)), float(rng.normal(0, 0.06)),
                     float(rng.normal(0, 0.01)), width, height)
    look = random_camera_look(rng)
    jitter = (float(rng.normal(0, 2)), float(rng.normal(0, 2)))
    return render_view(scene, camera, rng, opts, look, jitter, float(rng.uniform(10, 60)),
                       float(rng.random()))


def render_clip(seed: int | np.random.Generator, n_frames: int, width: int = 640,
                height: int = 640, fps: float = 10.0, **options) -> Iterator[SynthFrame]:
    """Yield ``n_frames`` views of one scene as the car drives along the track.

    The car keeps a steady speed (6–14 m/s) and weaves gently about the centreline; the
    light, the car and the props stay fixed, the sensor noise changes every frame.
    """
    opts = _options(options)
    _check_size(width, height)
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    rng = _rng(seed)
    step = float(rng.uniform(6, 14)) / fps
    s0 = 5.0
    s_end = s0 + n_frames * step
    scene = build_scene(rng, s_end + opts.max_distance + 80, (s0, s_end + opts.max_distance + 5),
                        clutter=opts.clutter, car=opts.car, return_leg=opts.return_leg)
    scene.extras["cloud_seed"] = int(rng.integers(1 << 30))
    base_look = random_camera_look(rng)
    amp, wavelength, phase = rng.uniform(0, 0.8), rng.uniform(30, 80), rng.uniform(0, 6.3)
    for i in range(n_frames):
        s = s0 + i * step
        lateral = amp * math.sin(2 * math.pi * s / wavelength + phase)
        slope = amp * 2 * math.pi / wavelength * math.cos(2 * math.pi * s / wavelength + phase)
        camera = _camera(scene, s, lateral, math.atan(slope), float(rng.normal(0, 0.004)),
                         width, height)
        look = replace(base_look, gain=base_look.gain * float(rng.uniform(0.97, 1.03)))
        jitter = (float(rng.normal(0, 0.7)), float(rng.normal(0, 0.7)))
        yield render_view(scene, camera, rng, opts, look, jitter, step * fps * 3.6,
                          i / max(1, n_frames))


def _check_size(width: int, height: int) -> None:
    if not (32 <= width <= 8192 and 32 <= height <= 8192):
        raise ValueError(f"image size must be 32..8192 px per side, got {width}x{height}")


def yolo_lines(frame: SynthFrame) -> list[str]:
    """The frame's labels as YOLO lines, class ids in ``node.classes.CONE_CLASSES`` order."""
    h, w = frame.image.shape[:2]
    lines = []
    for (x1, y1, x2, y2), label in zip(frame.boxes, frame.labels):
        lines.append(f"{CONE_CLASSES.index(label)} {(x1 + x2) / 2 / w:.6f} "
                     f"{(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    return lines


def write_dataset(out_dir: str | Path, frames: Iterable[SynthFrame],
                  video: str | Path | None = None, fps: float = 10.0,
                  comment: str = "Synthetic Formula Student scenes written by "
                                 "python -m export.synth") -> int:
    """Write frames as a YOLO dataset (``images/``, ``labels/``, ``data.yaml``).

    With ``video``, also write an MP4 (``mp4v``) whose frame *i* is image *i*. Any object with
    ``image``, ``boxes`` and ``labels`` is a frame (``export.finetune`` writes pseudo-labels
    with it, named by an optional ``name``; else frame *i* is ``0000i``); ``comment`` heads
    ``data.yaml``.

    Returns:
        The number of frames written.

    Raises:
        ValueError: the video cannot be opened for writing.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    writer = None
    count = 0
    try:
        for i, frame in enumerate(frames):
            name = getattr(frame, "name", None) or f"{i:05d}"
            cv2.imwrite(str(out / "images" / f"{name}.jpg"), frame.image,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            text = "\n".join(yolo_lines(frame))
            (out / "labels" / f"{name}.txt").write_text(text + "\n" if text else "")
            if video is not None:
                if writer is None:
                    h, w = frame.image.shape[:2]
                    Path(video).parent.mkdir(parents=True, exist_ok=True)
                    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                             (w, h))
                    if not writer.isOpened():
                        raise ValueError(f"{video}: cannot open an mp4v video for writing")
                writer.write(frame.image)
            count += 1
    finally:
        if writer is not None:
            writer.release()
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CONE_CLASSES))
    (out / "data.yaml").write_text(
        f"# {comment}\n"
        f"path: .\ntrain: images\nval: images\nnc: {len(CONE_CLASSES)}\nnames:\n{names}")
    return count


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """``python -m export.synth --out DIR --frames N --seed S [--video OUT.mp4]``."""
    parser = _Parser(prog="python -m export.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    parser.add_argument("--frames", type=int, default=100, help="number of frames")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--video", type=Path, help="also write the frames as an MP4")
    parser.add_argument("--fps", type=float, default=10.0, help="video frame rate")
    parser.add_argument("--force", action="store_true",
                        help="replace frames already in --out")
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    old = sorted((args.out / "images").glob("[0-9][0-9][0-9][0-9][0-9].jpg"))
    if old and not args.force:
        parser.error(f"{args.out} already holds {len(old)} frames; use --force to replace them")
    for path in old:
        path.unlink()
        (args.out / "labels" / f"{path.stem}.txt").unlink(missing_ok=True)
    try:
        frames = render_clip(args.seed, args.frames, args.width, args.height, args.fps)
        count = write_dataset(args.out, frames, args.video, args.fps)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(f"wrote {count} frames to {args.out}" + (f" and {args.video}" if args.video else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
