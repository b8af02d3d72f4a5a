"""Crop datasets for the classifier: real cones, safely mined background, synthetic cones.

Every crop is made by ``node.infer.crop.crop_batch`` under the configured ``CropPolicy``, the same
function the node runs, and stored as uint8 BGR at the model's input size. Boxes of real and
synthetic cones are jittered the way the node's colour proposals are off (centre shift, scale,
aspect). Background is mined only far from every labelled box and outside the horizon band
(``export.background``), because the labels are not exhaustive. The train/held-out split is by
clip (``is_heldout``), driven by ``data.heldout`` in ``configs/train.yaml``; training frames
that repeat a held-out frame are dropped (``near_duplicates``). The cache stores the crops as
lossless WebP strips, so it stays small enough to copy to a GPU machine.

``python -m export.data --config configs/train.yaml --out cache/crops_32.npz`` writes the crop
cache that ``export.train`` reads with ``data.cache=PATH`` (no shared data or renderer needed).
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from export.background import HeightByRow, contact_sheet, mine_background
from node.classes import BACKGROUND, CLASSIFIER_CLASSES
from node.infer.crop import CropPolicy, crop_batch
from node.sources.exposure import frame_normaliser

CLASS_INDEX = {name: i for i, name in enumerate(CLASSIFIER_CLASSES)}


# Mined background crops by kind, and their titles on the contact sheet.
BACKGROUND_KINDS = {"random": "random", "nose": "nose", "colour": "colour blobs",
                    "proposal": "proposer candidates"}


class DataError(ValueError):
    """The data or the crop cache cannot be used; the message names the file."""


# --------------------------------------------------------------------------- split by clip

def parse_heldout(rules: list[str]) -> list[tuple[str, int | None, int | None]]:
    """``["accel", "skidpad:20-37"]`` → ``[("accel", None, None), ("skidpad", 20, 37)]``."""
    out = []
    for rule in rules:
        clip, _, span = rule.partition(":")
        if not span:
            out.append((clip, None, None))
            continue
        lo, sep, hi = span.partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
            raise ValueError(f"data.heldout: {rule!r} must be CLIP or CLIP:FIRST-LAST")
        out.append((clip, int(lo), int(hi)))
    return out


def clip_and_frame(path: str | Path) -> tuple[str, int | None]:
    """Clip name and frame number of a BGRacing frame; the frame is ``None`` for the few
    single frames named ``<clip>_<n>_jpg.rf.<hash>.jpg`` (not part of the clip's video). Frames
    of other YOLO folders belong to the clip of their folder (``frame_clip``), without a frame
    number."""
    from node.evaluate.datasets import frame_clip, frame_index

    name = Path(path).name
    return frame_clip(path), (frame_index(name) if "_mp4-" in name else None)


def is_heldout(clip: str, frame: int | None, rules: list[str]) -> bool:
    """Whether a frame belongs to the held-out set. A whole-clip rule holds out every frame of
    the clip, single frames included; a segment rule holds out only video frames in it."""
    for rule_clip, lo, hi in parse_heldout(rules):
        if clip != rule_clip:
            continue
        if lo is None or (frame is not None and lo <= frame <= hi):
            return True
    return False


def thumbnail(image_path: str | Path, side: int = 64) -> np.ndarray:
    import cv2

    grey = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise DataError(f"{image_path}: image missing or unreadable")
    return cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)


def near_duplicates(train: list, held: list, threshold: float) -> list[tuple[str, str, float]]:
    """Training frames that repeat a held-out frame: mean absolute difference of 64x64 grey
    thumbnails below ``threshold`` (grey levels). In BGRacing the single frame ``skidpad_2``
    is a re-export of held-out ``skidpad`` frame 21 (0.4; consecutive frames differ by 5-25).

    Returns:
        (training frame name, held-out frame name, difference) per duplicate.
    """
    if threshold <= 0 or not train or not held:
        return []
    held_th = np.stack([thumbnail(s.image_path) for s in held])
    out = []
    for s in train:
        diff = np.abs(held_th - thumbnail(s.image_path)).mean(axis=(1, 2))
        j = int(diff.argmin())
        if diff[j] < threshold:
            out.append((s.image_path.name, held[j].image_path.name, float(diff[j])))
    return out


# --------------------------------------------------------------------------- crops

def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, shift: float, scale_min: float,
                 scale_max: float, aspect: float) -> np.ndarray:
    """Perturb boxes like proposal error: centre shift (fraction of size), log-uniform scale,
    and an aspect change of up to ``±aspect`` (log scale)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = boxes.shape[0]
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 + rng.uniform(-shift, shift, n) * w
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + rng.uniform(-shift, shift, n) * h
    s = np.exp(rng.uniform(np.log(scale_min), np.log(scale_max), n))
    a = np.exp(rng.uniform(-aspect, aspect, n))
    w2, h2 = w * s * a / 2, h * s / a / 2
    return np.stack([cx - w2, cy - h2, cx + w2, cy + h2], 1).astype(np.float32)


@dataclass
class CropSet:
    """In-memory crops (uint8 BGR, N×S×S×3) with class indices into ``classes``."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    synth_x: np.ndarray
    synth_y: np.ndarray
    train_clip: np.ndarray
    val_clip: np.ndarray
    classes: list[str] = field(default_factory=lambda: list(CLASSIFIER_CLASSES))
    input_size: int = 32
    crop: dict = field(default_factory=lambda: CropPolicy().to_dict())
    info: dict = field(default_factory=dict)

    def counts(self, which: str) -> dict[str, int]:
        y = getattr(self, f"{which}_y")
        return {c: int((y == i).sum()) for i, c in enumerate(self.classes)}


def crops_of_sample(image: np.ndarray, boxes: np.ndarray, labels: list[str], size: int,
                    policy: CropPolicy, copies: dict[str, int] | int, jitter,
                    rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the known cone boxes of one frame: ``copies`` jittered crops per box (one
    count, or a count per class name) when ``rng`` is given, else exactly one unjittered crop
    per box. Unknown cones are skipped."""
    keep = [i for i, name in enumerate(labels) if name in CLASS_INDEX and name != BACKGROUND]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[keep]
    y = np.array([CLASS_INDEX[labels[i]] for i in keep], np.int64)
    if rng is not None and len(keep):
        reps = np.array([copies if isinstance(copies, int) else copies.get(labels[i], 1)
                         for i in keep])
        boxes, y = np.repeat(boxes, reps, axis=0), np.repeat(y, reps)
        boxes = jitter_boxes(boxes, rng, jitter.shift, jitter.scale_min, jitter.scale_max,
                             jitter.aspect)
    return crop_batch(image, boxes, size, policy), y


def cone_mask(height: int, width: int) -> np.ndarray:
    """A cone's silhouette in its box, as a bool (height, width) mask: a trapezoid from a tip a
    fifth of the box wide down to the full width at the base."""
    rows = (np.arange(height) + 0.5) / max(height, 1)
    half = 0.5 * width * (0.2 + 0.8 * rows)[:, None]
    cols = np.abs(np.arange(width) + 0.5 - 0.5 * width)[None, :]
    return cols <= half


def crowd_frame(image: np.ndarray, target: np.ndarray, donor: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """A copy of ``image`` with the cone of box ``donor`` pasted beside the cone of box
    ``target`` (x1, y1, x2, y2): scaled to ×0.75–1.33 of the target's height, its base within
    15 % of the target's height of the target's base, to the left or right with 40 % of their
    widths overlapping down to a gap of a tenth; in front of the target or behind it (the
    target's own silhouette kept). Only the pixels of the donor's silhouette change."""
    out = image.copy()
    h_img, w_img = image.shape[:2]
    tx1, ty1, tx2, ty2 = (float(v) for v in target)
    dx1, dy1, dx2, dy2 = (round(float(v)) for v in donor)
    patch = image[max(dy1, 0):min(dy2, h_img), max(dx1, 0):min(dx2, w_img)]
    th, tw = ty2 - ty1, tx2 - tx1
    if patch.size == 0 or th < 2 or tw < 1:
        return out
    ph = max(2, round(th * np.exp(rng.uniform(np.log(0.75), np.log(1.33)))))
    pw = max(1, round(patch.shape[1] * ph / patch.shape[0]))
    patch = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_LINEAR)
    gap = 0.5 * (tw + pw) * rng.uniform(0.6, 1.1)
    cx = 0.5 * (tx1 + tx2) + (gap if rng.random() < 0.5 else -gap)
    bottom = ty2 + rng.uniform(-0.15, 0.15) * th
    x0, y0 = round(cx - pw / 2), round(bottom - ph)
    mask = cone_mask(ph, pw)
    ys, xs = np.nonzero(mask)
    fx, fy = xs + x0, ys + y0
    inside = (fx >= 0) & (fx < w_img) & (fy >= 0) & (fy < h_img)
    out[fy[inside], fx[inside]] = patch[ys[inside], xs[inside]]
    if rng.random() < 0.5:  # behind: the target stands in front
        ix1, iy1 = round(tx1), round(ty1)
        own = cone_mask(round(ty2) - iy1, round(tx2) - ix1)
        oy, ox = np.nonzero(own)
        oy, ox = oy + iy1, ox + ix1
        ok = (ox >= 0) & (ox < w_img) & (oy >= 0) & (oy < h_img)
        out[oy[ok], ox[ok]] = image[oy[ok], ox[ok]]
    return out


def crowd_crops(image: np.ndarray, boxes: np.ndarray, labels: list[str], size: int,
                policy: CropPolicy, copies: int, jitter, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` crops per known cone box of a frame with another of its cones pasted beside
    it (``crowd_frame``), jittered as the plain crops; the label stays the box's own. A frame
    with fewer than two known cones gives none."""
    keep = [i for i, name in enumerate(labels) if name in CLASS_INDEX and name != BACKGROUND]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[keep]
    if copies < 1 or len(keep) < 2:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    xs, ys = [], []
    for k, i in enumerate(keep):
        for _ in range(copies):
            d = int(rng.integers(len(keep) - 1))
            d += d >= k  # any other cone of the frame
            frame = crowd_frame(image, boxes[k], boxes[d], rng)
            box = jitter_boxes(boxes[k:k + 1], rng, jitter.shift, jitter.scale_min,
                               jitter.scale_max, jitter.aspect)
            xs.append(crop_batch(frame, box, size, policy))
            ys.append(CLASS_INDEX[labels[i]])
    return np.concatenate(xs), np.array(ys, np.int64)


def background_proposer(cfg):
    """The node's heatmap proposer (``data.background.proposer_model``, unrefined) whose
    candidates away from every label are mined as background, or None when
    ``proposals_per_frame`` is 0."""
    if not cfg.proposals_per_frame:
        return None
    from node.node_config import ProposerConfig, resolve_path
    from node.propose import build_proposer

    path = resolve_path(cfg.proposer_model)
    if not path.is_file():
        raise DataError(f"{path}: data.background.proposer_model not found")
    return build_proposer(ProposerConfig(kind="heatmap", heatmap_model=str(path),
                                         refiner_model=None))


def real_crops(samples: list, size: int, policy: CropPolicy, cfg, heldout: bool,
               rng: np.random.Generator, heights: HeightByRow, proposer=None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Cone and background crops of real frames. Held-out frames get unjittered cone crops.
    With ``proposer`` (``background_proposer``), its candidates away from every label are
    mined as background too.

    Returns:
        crops, class indices, clip name per crop, and the background crops by kind (for the
        contact sheet).
    """
    from node.types import Frame

    xs, ys, clips = [], [], []
    bg_by_kind: dict[str, list] = {k: [] for k in BACKGROUND_KINDS}
    bg_index = CLASS_INDEX[BACKGROUND]
    prepare = frame_normaliser(cfg.normalise)
    for i, sample in enumerate(samples):
        raw = sample.load()
        image = prepare(raw)
        proposals = proposer.propose(Frame(i, 0.0, raw)) if proposer is not None else None
        clip, _ = clip_and_frame(sample.image_path)
        x, y = crops_of_sample(image, sample.boxes, sample.labels, size, policy,
                               cfg.copies_per_class, cfg.jitter, None if heldout else rng)
        if not heldout and cfg.crowd_copies:
            cx, cy = crowd_crops(image, sample.boxes, sample.labels, size, policy,
                                 cfg.crowd_copies, cfg.jitter, rng)
            x, y = np.concatenate([x, cx]), np.concatenate([y, cy])
        mined = mine_background(image, sample.boxes, rng, cfg.background, heights, proposals)
        for kind, boxes in mined.items():
            if kind == "proposal" and not heldout:  # few and hard: jittered copies weigh them
                j = cfg.jitter
                boxes = np.concatenate([boxes, *(
                    jitter_boxes(boxes, rng, j.shift, j.scale_min, j.scale_max, j.aspect)
                    for _ in range(cfg.background.proposal_copies - 1))])
            bx = crop_batch(image, boxes, size, policy)
            bg_by_kind[kind].append(bx)
            x = np.concatenate([x, bx])
            y = np.concatenate([y, np.full(len(bx), bg_index, np.int64)])
        xs.append(x)
        ys.append(y)
        clips += [clip] * len(y)
    sheets = [np.concatenate(v) if v else np.zeros((0, size, size, 3), np.uint8)
              for v in bg_by_kind.values()]
    return (np.concatenate(xs) if xs else np.zeros((0, size, size, 3), np.uint8),
            np.concatenate(ys) if ys else np.zeros(0, np.int64), np.array(clips, dtype="U16"),
            sheets)


def synth_crops(cfg, size: int, policy: CropPolicy, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """Jittered crops of rendered cones, up to ``synth.per_class`` per class (rare classes)."""
    from export.synth import render_scene

    want = {CLASS_INDEX[k]: v for k, v in cfg.synth.per_class.items()}
    got: dict[int, list[np.ndarray]] = {k: [] for k in want}
    have = dict.fromkeys(want, 0)
    prepare = frame_normaliser(cfg.normalise)
    for i in range(cfg.synth.frames):
        if all(have[k] >= want[k] for k in want):
            break
        scene = render_scene(cfg.synth.seed + i, cfg.synth.width, cfg.synth.height)
        x, y = crops_of_sample(prepare(scene.image), scene.boxes, list(scene.labels), size,
                               policy, cfg.synth.copies_per_box, cfg.jitter, rng)
        for k in want:
            part = x[y == k][: max(0, want[k] - have[k])]
            got[k].append(part)
            have[k] += len(part)
    xs = [np.concatenate(v) for v in got.values() if v]
    ys = [np.full(sum(len(p) for p in v), k, np.int64) for k, v in got.items() if v]
    if not xs:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def build_cropset(cfg, size: int, sheet_path: str | Path | None = None) -> CropSet:
    """Crops of the real data split by clip, plus synthetic ones, per the ``data`` config."""
    from node.evaluate.datasets import load_samples

    root = Path(cfg.root)
    if not (root / "images").is_dir():
        raise DataError(f"{root}: no images/ folder; set data.root or data.cache")
    samples = load_samples(f"yolo:{root}")
    policy = cfg.crop.policy()
    rng = np.random.default_rng(cfg.seed)
    held = [s for s in samples if is_heldout(*clip_and_frame(s.image_path), cfg.heldout)]
    train = [s for s in samples if not is_heldout(*clip_and_frame(s.image_path), cfg.heldout)]
    dups = near_duplicates(train, held, cfg.duplicate_threshold)
    if dups:
        drop = {d[0] for d in dups}
        train = [s for s in train if s.image_path.name not in drop]
        print("not training on near-duplicates of held-out frames: " + ", ".join(
            f"{a} (~{b}, {d:.1f})" for a, b, d in dups), file=sys.stderr)
    heights = HeightByRow.fit(train)
    proposer = background_proposer(cfg.background)
    tx, ty, tclip, sheets = real_crops(train, size, policy, cfg, False, rng, heights, proposer)
    vx, vy, vclip, _ = real_crops(held, size, policy, cfg, True,
                                  np.random.default_rng(cfg.seed + 1), heights, proposer)
    if sheet_path is not None:
        contact_sheet(sheets, list(BACKGROUND_KINDS.values()), sheet_path, rng)
    sx, sy = (synth_crops(cfg, size, policy, rng) if cfg.synth.enabled and cfg.synth.frames
              else (np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)))
    info = {"heldout": list(cfg.heldout), "train_frames": len(train), "heldout_frames": len(held),
            "dropped_duplicates": [list(d) for d in dups], "normalise": cfg.normalise,
            "heldout_clips": sorted(set(vclip.tolist())), "height_by_row": heights.to_list()}
    return CropSet(tx, ty, vx, vy, sx, sy, tclip, vclip, list(CLASSIFIER_CLASSES), size,
                   policy.to_dict(), info)


# --------------------------------------------------------------------------- cache

_WEBP_MAX_SIDE = 16000  # WebP images are at most 16383 px on a side


def encode_crops(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crops → lossless WebP strips (about 2.3x smaller than zlib on these crops).

    Returns:
        the concatenated bytes of all strips, and the end offset of each strip.
    """
    import cv2

    n, size = crops.shape[0], crops.shape[1]
    per_strip = max(1, _WEBP_MAX_SIDE // size)
    blobs = []
    for i in range(0, n, per_strip):
        ok, buf = cv2.imencode(".webp", np.ascontiguousarray(crops[i:i + per_strip]).reshape(
            -1, size, 3), [cv2.IMWRITE_WEBP_QUALITY, 101])  # quality > 100 = lossless
        if not ok:
            raise DataError("OpenCV could not encode crops as WebP")
        blobs.append(buf.reshape(-1))
    data = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
    return data, np.cumsum([len(b) for b in blobs]).astype(np.int64)


def decode_crops(data: np.ndarray, ends: np.ndarray, size: int) -> np.ndarray:
    import cv2

    strips, start = [], 0
    for end in ends:
        img = cv2.imdecode(data[start:end], cv2.IMREAD_COLOR)
        if img is None:
            raise DataError("corrupt WebP strip")
        strips.append(img.reshape(-1, size, size, 3))
        start = int(end)
    return np.concatenate(strips) if strips else np.zeros((0, size, size, 3), np.uint8)


_IMAGE_SETS = ("train", "val", "synth")


def save_cache(crops: CropSet, path: str | Path) -> None:
    """Write the crops as one ``.npz``: lossless WebP strips, int16 labels, JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"classes": crops.classes, "input_size": crops.input_size, "crop": crops.crop,
            "info": crops.info}
    arrays = {"meta": np.array(json.dumps(meta)), "train_clip": crops.train_clip,
              "val_clip": crops.val_clip}
    for name in _IMAGE_SETS:
        data, ends = encode_crops(getattr(crops, f"{name}_x"))
        arrays[f"{name}_webp"], arrays[f"{name}_ends"] = data, ends
        arrays[f"{name}_y"] = getattr(crops, f"{name}_y").astype(np.int16)
    np.savez(path, **arrays)


def load_cache(path: str | Path) -> CropSet:
    """Read a crop cache written by ``save_cache``; raises ``DataError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: crop cache not found; build it with "
                        f"`python -m export.data --config configs/train.yaml --out {path}`")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays["meta"]))
        size = int(meta["input_size"])
        images = {}
        for name in _IMAGE_SETS:
            images[name] = (decode_crops(arrays[f"{name}_webp"], arrays[f"{name}_ends"], size),
                            arrays[f"{name}_y"].astype(np.int64))
            if len(images[name][0]) != len(images[name][1]):
                raise ValueError(f"{name}: {len(images[name][0])} crops but "
                                 f"{len(images[name][1])} labels")
        return CropSet(*images["train"], *images["val"], *images["synth"], arrays["train_clip"],
                       arrays["val_clip"], meta["classes"], size, meta["crop"],
                       meta.get("info", {}))
    except (KeyError, ValueError, OSError, DataError) as exc:
        raise DataError(f"{path}: not a crop cache ({exc})") from None


def crops_to_tensor(crops: np.ndarray, device: str = "cpu"):
    """uint8 BGR N×S×S×3 crops → uint8 RGB N×3×S×S torch tensor (the network's order)."""
    import torch

    rgb = np.ascontiguousarray(crops[..., ::-1].transpose(0, 3, 1, 2))
    return torch.from_numpy(rgb).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.data", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--config", default="configs/train.yaml")
    parser.add_argument("--out", required=True, help="cache file, e.g. cache/crops_32.npz")
    parser.add_argument("--sheet", default=None, help="PNG contact sheet of mined background")
    parser.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    args = parser.parse_args(argv)
    from export.train_config import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
        t0 = time.perf_counter()
        crops = build_cropset(cfg.data, cfg.model.input_size, args.sheet)
        save_cache(crops, args.out)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mb = Path(args.out).stat().st_size / 1e6
    print(f"wrote {args.out} ({mb:.1f} MB, {time.perf_counter() - t0:.0f} s): "
          f"train {crops.counts('train')}, held-out {crops.counts('val')}, "
          f"synthetic {crops.counts('synth')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
