"""Training frames of the cone-heatmap proposer: downscaled frames, boxes, CenterNet targets.

Frames are the real training clips of ``../shared/data/bgracing`` (split by clip with
``export.data.is_heldout`` on ``configs/train.yaml``'s ``data.heldout``, and training frames
that repeat a held-out frame dropped by ``export.data.near_duplicates``) plus scenes rendered
by ``export.synth.render_scene``. Each is resized to the proposer's square input (area
interpolation, as the node does) and cached with its boxes as one ``.npz`` under ``cache/``.

Targets follow CenterNet (Zhou et al., "Objects as Points", 2019): a Gaussian peak per cone
centre on the stride-4 grid, with the radius CornerNet's ``gaussian_radius`` gives at minimum
overlap 0.7 (Law and Deng, 2018), plus log height, log width and the centre's offset, set
densely over the cells about each centre (TTFNet) so that a peak one cell off still decodes to
the right box. Augmentation (``augment_frame``) draws its random parameters, then applies them
to image and boxes together: scale jitter about a random point, horizontal flip, brightness,
contrast and a mild white-balance shift.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from export.camera_aug import DEFAULT as DEFAULT_CAMERA
from export.camera_aug import CameraRandomisation, random_aspect, random_camera
from export.data import DataError, clip_and_frame, is_heldout, near_duplicates

SYNTH_CLIP = "synth"


@dataclass
class ProposerFrames:
    """Downscaled frames with boxes in input pixels.

    Attributes:
        images: (N, S, S, 3) uint8 BGR.
        boxes: (M, 4) float32 x1, y1, x2, y2 of all frames, in input pixels.
        box_start: (N + 1,) int64, frame i's boxes are ``boxes[box_start[i]:box_start[i+1]]``.
        clips: (N,) clip name per frame (``synth`` for rendered frames).
        names: (N,) source image name (or ``synth-<seed>``).
        info: how the set was built (held-out rules, dropped duplicates, seeds).
    """

    images: np.ndarray
    boxes: np.ndarray
    box_start: np.ndarray
    clips: np.ndarray
    names: np.ndarray
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def frame_boxes(self, i: int) -> np.ndarray:
        return self.boxes[self.box_start[i]:self.box_start[i + 1]]

    def subset(self, keep: np.ndarray) -> ProposerFrames:
        """The frames where ``keep`` (bool per frame) is true."""
        idx = np.flatnonzero(keep)
        parts = [self.frame_boxes(i) for i in idx]
        starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        boxes = np.concatenate(parts) if parts else np.zeros((0, 4), np.float32)
        return ProposerFrames(self.images[idx], boxes.astype(np.float32), starts,
                              self.clips[idx], self.names[idx], dict(self.info))


def _pack(images: list, boxes: list, clips: list, names: list, info: dict) -> ProposerFrames:
    """Frames of one size as one (N, H, W, 3) array; of several sizes as an object array."""
    starts = np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64)
    flat = np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    if len({im.shape for im in images}) <= 1:
        stacked = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    else:
        stacked = np.empty(len(images), dtype=object)
        stacked[:] = images
    return ProposerFrames(stacked, flat.reshape(-1, 4), starts, np.array(clips, dtype="U64"),
                          np.array(names, dtype="U200"), info)


def resize_frame(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A frame and its pixel boxes at the square input size (the node's resize)."""
    h, w = image.shape[:2]
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    scale = np.array([size / w, size / h, size / w, size / h], np.float32)
    return small, np.asarray(boxes, np.float32).reshape(-1, 4) * scale


def native_frame(image: np.ndarray, boxes: np.ndarray, max_pixels: int, min_pixels: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A frame and its pixel boxes at the scale the node's ``keep_aspect`` input has: as they
    are, shrunk by one factor to ``max_pixels``, or enlarged to ``min_pixels``
    (``node.propose.heatmap.input_geometry``)."""
    from node.propose.heatmap import ProposerMetadata, input_geometry, resize_image

    h, w = image.shape[:2]
    geo = input_geometry(w, h, ProposerMetadata(), "keep_aspect", max_pixels, [0.0, 1.0],
                         min_pixels)
    if geo.size == (w, h):
        return image, np.asarray(boxes, np.float32).reshape(-1, 4)
    small = resize_image(image, geo.size)
    scale = np.array([1 / geo.scale[0], 1 / geo.scale[1]] * 2, np.float32)
    return small, np.asarray(boxes, np.float32).reshape(-1, 4) * scale


def sample_frames(samples: list, clips: list[str], size: int | None = None,
                  max_pixels: int = 2_000_000, progress: bool = False,
                  min_pixels: int = 0) -> ProposerFrames:
    """Labelled frames of any YOLO folder (``node.evaluate.datasets`` samples, class ids
    already mapped by name) with their clip names: squashed to the ``size`` square, or with
    ``size`` None at the scale the node's input gives them (``native_frame``), any size
    each; train on windows of them (``augment_frame(..., out_size=...)``)."""
    from tqdm import tqdm

    images, boxes, names = [], [], []
    for s in tqdm(samples, desc="frames", unit="frame", disable=not progress, file=sys.stderr,
                  leave=False):
        image = s.load()
        small, b = (resize_frame(image, s.boxes, size) if size
                    else native_frame(image, s.boxes, max_pixels, min_pixels))
        images.append(small)
        boxes.append(b)
        names.append(s.image_path.name)
    info = {"size": size, "max_pixels": max_pixels, "min_pixels": min_pixels,
            "clips": sorted(set(clips))}
    return _pack(images, boxes, list(clips), names, info)


def build_proposer_frames(root: str | Path, heldout: list[str], size: int, synth_frames: int,
                          synth_seed: int, duplicate_threshold: float = 5.0) -> ProposerFrames:
    """Real training frames (never held-out ones) and rendered scenes at the input size."""
    from node.evaluate.datasets import load_samples

    images, boxes, clips, names = [], [], [], []
    dropped: list = []
    root = Path(root)
    if (root / "images").is_dir():
        samples = load_samples(f"yolo:{root}")
        held = [s for s in samples if is_heldout(*clip_and_frame(s.image_path), heldout)]
        train = [s for s in samples if not is_heldout(*clip_and_frame(s.image_path), heldout)]
        dropped = near_duplicates(train, held, duplicate_threshold)
        drop = {d[0] for d in dropped}
        train = [s for s in train if s.image_path.name not in drop]
        real = sample_frames(train, [clip_and_frame(s.image_path)[0] for s in train], size)
        images, boxes = list(real.images), [real.frame_boxes(i) for i in range(len(real))]
        clips, names = real.clips.tolist(), real.names.tolist()
    elif synth_frames == 0:
        raise DataError(f"{root}: no images/ folder and no synthetic frames requested")
    else:
        print(f"warning: {root}: no real frames; training on synthetic frames only",
              file=sys.stderr)
    from export.synth import render_scene

    for i in range(synth_frames):
        scene = render_scene(synth_seed + i, 640, 640)
        small, b = resize_frame(scene.image, scene.boxes, size)
        images.append(small)
        boxes.append(b)
        clips.append(SYNTH_CLIP)
        names.append(f"synth-{synth_seed + i}")
    info = {"heldout": list(heldout), "size": size, "synth_frames": synth_frames,
            "synth_seed": synth_seed, "dropped_duplicates": [list(d) for d in dropped],
            "clips": sorted(set(clips))}
    return _pack(images, boxes, clips, names, info)


def save_frames(frames: ProposerFrames, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=frames.images, boxes=frames.boxes,
                        box_start=frames.box_start, clips=frames.clips, names=frames.names,
                        info=np.array(json.dumps(frames.info)))


def load_frames(path: str | Path) -> ProposerFrames:
    """Read a cache written by ``save_frames``; raises ``DataError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: proposer frame cache not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return ProposerFrames(z["images"], z["boxes"], z["box_start"], z["clips"],
                                  z["names"], json.loads(str(z["info"])))
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a proposer frame cache ({exc})") from None


# --------------------------------------------------------------------------- augmentation

def augment_frame(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
                  scale_range: tuple[float, float] = (0.6, 2.0), flip: bool = True,
                  out_size: int | None = None,
                  aspect_range: tuple[float, float] | None = (0.8, 2.0),
                  camera: CameraRandomisation | None = DEFAULT_CAMERA
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Another camera's view of a training frame (square, or any size at its native scale
    when ``out_size`` is given): scale jitter, a horizontal stretch (cones
    as wide as on a camera whose frames were not squashed to a square, or narrower), a random
    window of ``out_size`` (default: the whole frame), horizontal flip, and the camera's
    look (``export.camera_aug.random_camera``: exposure, white balance, blur, noise, lens
    drops, JPEG). The network is fully convolutional, so training on windows of the frame is
    training on the frame, at a fraction of the cost.

    Returns:
        the augmented uint8 image (``out_size`` square) and its boxes (cones mostly outside
        the window are dropped; the others are clipped to it).
    """
    h, w = image.shape[:2]
    out = out_size or h
    zoom = float(np.exp(rng.uniform(*np.log(scale_range))))
    stretch = random_aspect(rng, *aspect_range) if aspect_range else 1.0
    zx = zoom * stretch
    window_x, window_y = out / zx, out / zoom
    ox = rng.uniform(-0.1 * window_x, max(w - 0.9 * window_x, -0.1 * window_x + 1e-3))
    oy = rng.uniform(-0.1 * window_y, max(h - 0.9 * window_y, -0.1 * window_y + 1e-3))
    mirror = flip and rng.random() < 0.5
    # x' = zx * (x - ox), mirrored as out - zx * (x - ox); y' = zoom * (y - oy).
    sx, tx = (-zx, out + zx * ox) if mirror else (zx, -zx * ox)
    ty = -zoom * oy
    mat = np.array([[sx, 0, tx], [0, zoom, ty]], np.float32)
    warped = cv2.warpAffine(image, mat, (out, out), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT_101)
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    # warpAffine maps pixel centres (index u to sx * u + tx); boxes are in edge coordinates
    # (pixel u spans [u, u + 1)), which therefore move by sx * x + tx + (1 - sx) / 2: a
    # mirrored window would otherwise place its boxes (1 + zx) / 2 pixels left of the cones.
    xs = b[:, [0, 2]] * sx + tx + 0.5 * (1.0 - sx)
    ys = b[:, [1, 3]] * zoom + ty + 0.5 * (1.0 - zoom)
    nb = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1)
    clipped = np.clip(nb, 0, out)
    area = np.prod(nb[:, 2:] - nb[:, :2], 1)
    kept = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), 1)
    nb = clipped[kept >= 0.5 * np.maximum(area, 1e-6)]
    if camera is not None:
        warped = random_camera(warped, rng, camera)
    return warped, nb.astype(np.float32)


# --------------------------------------------------------------------------- targets

def gaussian_radius(height: np.ndarray, width: np.ndarray, min_overlap: float = 0.7
                    ) -> np.ndarray:
    """CornerNet's radius: the largest corner shift that keeps IoU >= ``min_overlap``."""
    h, w = np.asarray(height, np.float64), np.asarray(width, np.float64)
    b1, c1 = h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + np.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + np.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + np.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return np.minimum(np.minimum(r1, r2), r3)


def centre_targets(boxes: np.ndarray, size: int, stride: int,
                   min_sigma: float = 0.6) -> dict[str, np.ndarray]:
    """CenterNet targets of one frame on the ``size / stride`` grid, with TTFNet's dense
    box regression (Liu et al., "Training-Time-Friendly Network for Real-Time Object
    Detection", 2020): size and offset are trained at every cell near a centre, not only at the
    centre cell, so a peak one cell off still decodes to the cone's box.

    Returns:
        ``heat`` (1, G, G) Gaussian peaks (1.0 exactly at each centre cell); ``size`` (2, G, G)
        log(h), log(w) in input pixels and ``offset`` (2, G, G) x, y of the centre relative to
        the cell (cells; in [0, 1) at the centre cell), both set over each cone's regression
        region; ``weight`` (1, G, G) the Gaussian weight of a cell in that region, summing to 1
        per cone (a cell near two cones belongs to the one whose Gaussian is the stronger there,
        a tie to the smaller one, so every centre cell keeps its own cone's box unless two
        cones share it); ``mask`` (1, G, G) 1 at the centre cells.
    """
    g = size // stride
    heat = np.zeros((g, g), np.float32)
    reg = np.zeros((2, g, g), np.float32)
    off = np.zeros((2, g, g), np.float32)
    mask = np.zeros((g, g), np.float32)
    owner = np.full((g, g), -1, np.int64)
    gain = np.zeros((g, g), np.float32)
    weight = np.zeros((g, g), np.float32)
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(b):
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        keep = (w > 0.5) & (h > 0.5)
        b, w, h = b[keep], w[keep], h[keep]
        radius = np.maximum(0, np.floor(gaussian_radius(h / stride, w / stride))).astype(int)
        cx, cy = (b[:, 0] + b[:, 2]) / (2 * stride), (b[:, 1] + b[:, 3]) / (2 * stride)
        ix = np.clip(np.floor(cx).astype(int), 0, g - 1)
        iy = np.clip(np.floor(cy).astype(int), 0, g - 1)
        # Larger cones first, so a small cone's targets win a shared cell.
        for k in np.argsort(-(w * h)):
            r, x, y = radius[k], ix[k], iy[k]
            sigma = (2 * r + 1) / 6.0
            yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
            gauss = np.exp(-(xx * xx + yy * yy) / (2 * sigma * sigma)).astype(np.float32)
            x0, x1, y0, y1 = max(0, x - r), min(g, x + r + 1), max(0, y - r), min(g, y + r + 1)
            patch = gauss[y0 - y + r:y1 - y + r, x0 - x + r:x1 - x + r]
            np.maximum(heat[y0:y1, x0:x1], patch, out=heat[y0:y1, x0:x1])
            # Regression region: the Gaussian disk, at least the 3x3 cells about the centre.
            rr = max(r, 1)
            sig = max(sigma, min_sigma)
            x0, x1, y0, y1 = max(0, x - rr), min(g, x + rr + 1), max(0, y - rr), min(g, y + rr + 1)
            gy, gx = np.mgrid[y0:y1, x0:x1]
            near = np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * sig * sig))
            # A cell shared with a cone already placed goes to the one whose Gaussian is the
            # stronger there (ties to this, the smaller, cone): each centre cell keeps its own
            # cone's box, so touching cones decode to their own boxes.
            take = near >= gain[y0:y1, x0:x1]
            reg[0, y0:y1, x0:x1][take] = np.log(h[k])
            reg[1, y0:y1, x0:x1][take] = np.log(w[k])
            off[0, y0:y1, x0:x1][take] = (cx[k] - gx)[take]
            off[1, y0:y1, x0:x1][take] = (cy[k] - gy)[take]
            owner[y0:y1, x0:x1][take] = k
            gain[y0:y1, x0:x1][take] = near[take]
            mask[y, x] = 1.0
        for k in np.unique(owner[owner >= 0]):
            cells = owner == k
            weight[cells] = gain[cells] / gain[cells].sum()
    return {"heat": heat[None], "size": reg, "offset": off, "weight": weight[None],
            "mask": mask[None]}
