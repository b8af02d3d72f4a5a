"""Fine-tune the bundled networks on a team's own frames: ``python -m export finetune``.

    python -m export finetune --data yolo:DIR --out RUN [--val yolo:VALDIR | --val-clips CLIP ...
        | --val-fraction 0.2] [--minutes 30] [--pseudo-label VIDEO_OR_FOLDER ...
        --pseudo-threshold 0.9] [--models models] [--install]

The proposer, the box refiner and the classifier start from the ONNX files in ``--models``
(``export.onnx_import`` loads them back into torch; their BatchNorms, folded at export, stay
frozen) and are trained at a low learning rate on the team's YOLO folder, with the project's
augmentation: the proposer on windows of its frames at their own scale and aspect (the node's
``keep_aspect`` input) with scale, aspect and camera randomisation (``export.proposer_data``,
``export.camera_aug``), the refiner on the new proposer's candidates and jittered labels, the
classifier on crops of the labelled cones and safely mined background (``export.data``) with
camera randomisation, RandAugment and MixUp/CutMix (``export.augment``). Class ids are mapped
by the folder's class names (``node.evaluate.datasets``).

Time is a budget (``--minutes``, 30 by default): once the data is read and the bundled models
scored, what is left after a reserve for the closing steps is shared among the three nets
(``SHARES``); each net's learning rate decays with the clock and its training stops when its
share is used (``export.train.Schedule``). The classifier's two INT8 twins, TensorRT's and
ONNX Runtime's CPU one (the node's default model), are calibrated again (``calib.quantize``)
when the budget leaves time for them.

``--nets`` retrains only the networks it names (the others are copied from ``--models``, and
their share of the time goes to the named ones).

The validation split is a separate folder (``--val``), named clips (``--val-clips``: a frame's
clip is its BGRacing clip name, else the folder under ``images/`` it lies in), or the last
``--val-fraction`` of every clip's frames in name order. ``--train-clips`` limits training to
some clips. The whole node (``export.node_run.run_node``, scored by ``node.evaluate``) and the
classifier on the true boxes (``export.evaluate``) are scored on it before (bundled models) and
after (fine-tuned); ``RUN/report.md`` and ``RUN/report.json`` hold both, and ``python -m node
check``'s report on the team's frames (``check_camera``). ``RUN/models/`` holds
the new models with the bundled models' metadata; ``--install`` copies them over ``--models``.

``--pseudo-label`` runs the node (``--models``) on unlabelled videos or image folders (every
``--pseudo-stride``-th frame) and keeps the cones scoring at least ``--pseudo-threshold`` as
labels. A cone found below it is covered with the frame's mean colour, all but where confident
cones' boxes lie (an ignore region: taught neither as a cone nor as background). With
``--pseudo-mask candidates`` a second run of the node masks every other candidate of the
proposer that the classifier does not call background too (before overlap suppression; one
mostly inside a confident cone's box is taken for a part of it). A frame
where more than half of such a cone lies under confident boxes, or without a confident cone,
is dropped. The kept frames and their cones are written as YOLO
folders under ``RUN/pseudo/`` (one per source, files named by frame index) and trained on with
the labelled frames.
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

import argparse
import json
import math
import shutil
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from export.data import DataError, clip_and_frame, is_heldout

SHARES = {"proposer": 0.45, "refiner": 0.15, "classifier": 0.40}
"""Each net's share of the training time."""
LR = {"proposer": 3e-4, "refiner": 1e-3, "classifier": 5e-4}
"""Peak learning rates: a tenth to a third of the bundled models' first stages."""
PROPOSER_WINDOW = 320
"""Side of the proposer's training windows (the trainer's default: half the input size)."""
CLASSIFIER_SAMPLES_PER_EPOCH = 2048
CLOSING_S = 20.0
"""Reserve for exporting three ONNX files with the classifier's parity check."""
INT8_S = 30.0
"""Reserve for each INT8 calibration; skipped when less than this is left."""
NETS = ("proposer", "refiner", "classifier")
MODEL_FILES = {"proposer": "cone_proposer.onnx", "refiner": "cone_refiner.onnx",
               "classifier": "cone_classifier.onnx"}
INT8_TWINS = {"cpu": ("cone_classifier.cpu.int8.onnx", "cone_classifier.cpu.int8.calib.json"),
              "tensorrt": ("cone_classifier.int8.onnx", "cone_classifier.int8.calib.json")}
"""The classifier's INT8 twins by ``calib.quantize`` target: model file and calibration cache.
The CPU twin, the node's default model, comes first."""
INT8_FILES = [name for pair in INT8_TWINS.values() for name in pair]


class Budget:
    """The wall-clock budget of a run, its stages' times and its progress bar."""

    def __init__(self, minutes: float, show: bool = True) -> None:
        from tqdm import tqdm

        self.t0, self.total = time.perf_counter(), 60.0 * minutes
        self.times: dict[str, float] = {}
        self.bar = tqdm(total=round(self.total), unit="s", desc="finetune", disable=not show,
                        file=sys.stderr, bar_format="{desc} {percentage:3.0f}%|{bar}| "
                        "{n:.0f}/{total:.0f} s of the budget {postfix}")
        self._done = threading.Event()
        if show:  # the bar moves with the clock, not only between stages
            threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        while not self._done.wait(2.0):
            self.tick()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()

    def tick(self) -> None:
        self.bar.n = min(self.bar.total, round(self.elapsed()))
        self.bar.refresh()

    @contextmanager
    def stage(self, name: str):
        self.bar.set_postfix_str(name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - t, 1)
            self.tick()

    def close(self) -> None:
        self._done.set()
        self.tick()
        self.bar.close()


# --------------------------------------------------------------------------- data

def read_frames(spec: str) -> list:
    """The labelled frames of a ``yolo:DIR`` folder; errors name the folder or file."""
    from node.evaluate.datasets import load_samples, parse_data_spec

    kind, path = parse_data_spec(spec)
    if kind != "yolo":
        raise DataError(f"{spec}: only yolo:DIR folders can be fine-tuned on")
    samples = load_samples(spec)
    if not samples:
        raise DataError(f"{path}: no images under images/")
    return samples


def split_frames(samples: list, args: argparse.Namespace) -> tuple[list, list]:
    """Training and validation frames (see the module docstring)."""
    if args.val:
        train, val = list(samples), read_frames(args.val)
    elif args.val_clips:
        held = [is_heldout(*clip_and_frame(s.image_path), args.val_clips) for s in samples]
        train = [s for s, h in zip(samples, held) if not h]
        val = [s for s, h in zip(samples, held) if h]
    else:
        by_clip: dict[str, list] = {}
        for s in samples:  # natural order of the paths, so each clip's frames in time order
            by_clip.setdefault(clip_and_frame(s.image_path)[0], []).append(s)
        train, val = [], []
        for frames in by_clip.values():
            n_val = math.ceil(args.val_fraction * len(frames)) if len(frames) > 1 else 0
            train += frames[:len(frames) - n_val]
            val += frames[len(frames) - n_val:]
    if args.train_clips:
        train = [s for s in train if is_heldout(*clip_and_frame(s.image_path), args.train_clips)]
    if not val:
        raise DataError(f"{args.val or args.data}: no validation frames (check --val-clips or "
                        f"--val-fraction)")
    if not train:
        raise DataError(f"{args.data}: no training frames left after the validation split"
                        + (" and --train-clips" if args.train_clips else ""))
    return train, val


def clips_of(samples: list) -> list[str]:
    return [clip_and_frame(s.image_path)[0] for s in samples]


# --------------------------------------------------------------------------- the node

def node_config(args: argparse.Namespace, models: Path, extra: tuple[str, ...] = ()):
    """The node's config with the three networks of ``models``, ``--set`` overrides and then
    ``extra`` ones."""
    from node.node_config import load_node_config

    return load_node_config(args.config, [
        *args.set, f"model.path={models / MODEL_FILES['classifier']}",
        f"proposer.heatmap_model={models / MODEL_FILES['proposer']}",
        f"proposer.refiner_model={models / MODEL_FILES['refiner']}", *extra])


def score_models(args: argparse.Namespace, models: Path, val: list) -> dict:
    """The whole node on the validation frames (``export.validate``'s in-process run and
    ``node.evaluate`` scoring) and the classifier on their true boxes by box height
    (``export.evaluate``)."""
    from export.evaluate import score_true_boxes
    from export.node_run import open_node
    from export.validate import validate_variants
    from node.sources.exposure import Exposure

    config = node_config(args, models)
    with open_node(config) as (backend, proposer):
        node = validate_variants(val, config, backend, proposer, ["base"], False,
                                 camera_check=False)["base"]  # check_camera reads the frames
    crop_scores = score_true_boxes(models / MODEL_FILES["classifier"], val, 0,
                                   Exposure.from_config(config.exposure))
    crop_scores.pop("confusion")
    return {"node": node["all"], "node_clips": node["clips"], "crops": crop_scores}


CHECK_FRAMES = 60
"""Frames of the team's footage the camera check reads (``python -m node check``'s default)."""


def check_camera(args: argparse.Namespace, samples: list) -> dict:
    """``python -m node check`` on the team's labelled frames (at most ``CHECK_FRAMES``, spread
    over them): how burnt out, blurred and noisy the camera is against where the node was seen
    to lose cones, which a fine-tune may or may not make up for."""
    from node.sources.exposure import Exposure
    from node.sources.frame_check import look_at, summarise

    config = node_config(args, Path(args.models))
    stage = Exposure(config.exposure)
    step = max(1, len(samples) // CHECK_FRAMES)
    looks = [look_at(s.load(), config, stage) for s in samples[::step][:CHECK_FRAMES]]
    return summarise(looks, config).to_dict()


MASK_GROW = 0.15
"""Each side of an uncertain cone's box grows by this fraction of its size before masking."""
MASK_MAX_HIDDEN = 0.5
"""A frame is dropped when more than this share of an uncertain cone's box lies under
confident cones' boxes (which are never painted, so that much of it would stay visible)."""


def ignore_fill(image: np.ndarray) -> np.ndarray:
    """The colour ``mask_uncertain`` paints with: the frame's mean, as uint8 BGR."""
    return image.reshape(-1, 3).mean(0).round().astype(np.uint8)


def box_window(box, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The rows and columns of an image of ``shape`` under an integer box, clipped to it."""
    x1, y1, x2, y2 = box
    return np.s_[max(0, y1):min(shape[0], y2), max(0, x1):min(shape[1], x2)]


def mask_uncertain(image: np.ndarray, uncertain: np.ndarray, confident: np.ndarray,
                   candidates: np.ndarray | None = None) -> np.ndarray | None:
    """The frame with every uncertain cone's box (grown by ``MASK_GROW``) filled with
    ``ignore_fill``, an ignore region: a cone the node is unsure of is then taught neither as
    a cone nor as background. The confident cones' boxes are left as they are, so a labelled
    cone is never painted over. None (the frame is dropped) when more than
    ``MASK_MAX_HIDDEN`` of an uncertain cone's own box lies under confident boxes.

    ``candidates`` (``--pseudo-mask candidates``) are masked the same way, except that one
    with more than ``MASK_MAX_HIDDEN`` of its box under confident boxes is taken for a part of
    such a cone and left alone."""
    candidates = np.zeros((0, 4)) if candidates is None else candidates
    if not len(uncertain) and not len(candidates):
        return image
    keep = np.zeros(image.shape[:2], bool)
    for box in np.round(confident).astype(int):
        keep[box_window(box, keep.shape)] = True
    both = np.concatenate([np.reshape(uncertain, (-1, 4)), np.reshape(candidates, (-1, 4))])
    boxes = np.round(both).astype(int)
    w, h = (boxes[:, 2:] - boxes[:, :2]).T
    grown = np.round(both + MASK_GROW * np.stack([-w, -h, w, h], 1)).astype(int)
    paint = np.zeros_like(keep)
    for i, (box, big) in enumerate(zip(boxes, grown, strict=True)):
        inside = keep[box_window(box, keep.shape)]
        if inside.size and inside.mean() > MASK_MAX_HIDDEN:
            if i < len(uncertain):
                return None
            continue
        paint[box_window(big, paint.shape)] = True
    out = image.copy()
    out[paint & ~keep] = ignore_fill(image)
    return out


MASK_RUN_SET = ("post.nms_iou=null", "post.nested_inside=null", "model.score_threshold=0")
"""Node overrides of ``--pseudo-mask candidates``' second run: every candidate whose winning
class is not background, at any score and before any overlap suppression."""
MASK_RUN_HEAT = 0.4
"""The second run's proposer threshold, as a share of the node config's: the cones the node
misses outright are mostly heatmap peaks under its threshold, not candidates the classifier
rejected."""


def pseudo_label(args: argparse.Namespace, models: Path, out: Path) -> tuple[list, dict]:
    """Pseudo-labelled frames of ``--pseudo-label`` sources (see the module docstring), written
    as one YOLO folder per source under ``out``; returns their samples and the counts."""
    from export.node_run import open_node, run_node
    from export.synth import write_dataset
    from node.classes import CONE_CLASSES
    from node.evaluate.datasets import load_samples
    from node.infer.postprocess import iou_matrix
    from node.sources import open_source

    config = node_config(args, models)
    heat = MASK_RUN_HEAT * config.proposer.heatmap_threshold
    mask_config = node_config(args, models, (*MASK_RUN_SET, f"proposer.heatmap_threshold={heat:g}")
                              ) if args.pseudo_mask == "candidates" else None
    samples: list = []
    stats = {"sources": [], "threshold": args.pseudo_threshold, "stride": args.pseudo_stride,
             "mask": args.pseudo_mask, "frames_run": 0, "frames_kept": 0,
             "dropped_no_confident_cone": 0, "dropped_uncertain_cone": 0,
             "masked_uncertain_cones": 0, "masked_candidates": 0, "cones": 0}
    with open_node(config) as (backend, proposer), \
            (open_node(mask_config) if mask_config else nullcontext((None, None))) as (
                mask_backend, mask_proposer):
        for n, src in enumerate(args.pseudo_label):
            frames = []
            with open_source(src) as source:
                for frame in source:
                    if frame.image is not None and frame.index % args.pseudo_stride == 0:
                        frames.append(frame)
                    if len(frames) >= args.pseudo_max_frames:
                        break
            results, _ = run_node(config, backend, proposer, frames)
            masks = (run_node(mask_config, mask_backend, mask_proposer, frames)[0]
                     if mask_backend else [None] * len(frames))
            kept = []
            for frame, result, mask in zip(frames, results, masks, strict=True):
                confident = [c.score >= args.pseudo_threshold and c.label in CONE_CLASSES
                             for c in result.cones]
                sure = [c for c, ok in zip(result.cones, confident) if ok]
                unsure = [c for c, ok in zip(result.cones, confident) if not ok]
                if not sure:
                    stats["dropped_no_confident_cone"] += 1
                    continue
                boxes = np.array([c.box for c in sure], np.float32).reshape(-1, 4)
                other = np.array([c.box for c in unsure], np.float32).reshape(-1, 4)
                more = np.array([c.box for c in mask.cones] if mask else [],
                                np.float32).reshape(-1, 4)
                # A duplicate of a confident cone is harmless; so is one of an uncertain cone.
                other = other[iou_matrix(other, boxes).max(1) < args.pseudo_overlap]
                more = more[iou_matrix(more, np.concatenate([boxes, other])).max(1)
                            < args.pseudo_overlap]
                image = mask_uncertain(frame.image, other, boxes, more)
                if image is None:
                    stats["dropped_uncertain_cone"] += 1
                    continue
                stats["masked_uncertain_cones"] += len(other)
                stats["masked_candidates"] += len(more)
                kept.append(SimpleNamespace(image=image, boxes=boxes,
                                            labels=[c.label for c in sure],
                                            name=f"{frame.index:06d}"))
            name = f"{n:02d}_{Path(src.rstrip('/')).stem or 'source'}"
            write_dataset(out / name, kept, comment=(
                f"Pseudo-labels of {Path(src).name}: the node's cones scoring >= "
                f"{args.pseudo_threshold} (python -m export finetune --pseudo-label)"))
            found = load_samples(f"yolo:{out / name}") if kept else []
            samples += found
            stats["sources"].append({"source": Path(src).name, "folder": name,
                                     "frames_run": len(frames), "frames_kept": len(kept)})
            stats["frames_run"] += len(frames)
            stats["frames_kept"] += len(kept)
            stats["cones"] += sum(len(k.boxes) for k in kept)
    return samples, stats


# --------------------------------------------------------------------------- the three nets

def finetune_proposer(bundled: Path, frames, budget_s: float, out: Path, device, log: Path,
                      val_clips: list[str]) -> dict:
    from export.camera_aug import FRAME_PROFILES
    from export.proposer_train import export_proposer, import_proposer, train
    from node.propose.heatmap import open_session

    meta = open_session(bundled)[1]
    net = import_proposer(bundled, meta.extra.get("stem", "patch4"))
    # The camera randomisation the bundled proposer was last trained with, so that the
    # fine-tune keeps what it learnt about other cameras.
    camera = (meta.extra.get("stages") or [{}])[-1].get("camera", "default")
    if camera not in FRAME_PROFILES:
        camera = "default"
    t0 = time.perf_counter()
    history = train(net, frames, meta, 10**6, batch_size=16, lr=LR["proposer"], device=device,
                    log=log, crop=PROPOSER_WINDOW, freeze_bn=True, budget_s=budget_s,
                    augmentation={"camera": FRAME_PROFILES[camera]})
    seconds = round(time.perf_counter() - t0, 1)
    clips = sorted(set(frames.clips.tolist()))
    stage = {"finetune": True, "init": bundled.name, "lr": LR["proposer"], "seconds": seconds,
             "window": PROPOSER_WINDOW, "frames": len(frames), "camera": camera}
    meta.extra = dict(meta.extra, training_clips=clips, validation_clips=val_clips,
                      stages=list(meta.extra.get("stages", [])) + [stage])
    export_proposer(net, meta, out)
    return {"epochs": len(history), "seconds": seconds, "first_loss": _round(history[:1]),
            "last_loss": _round(history[-1:])}


def finetune_refiner(bundled: Path, frames, proposer_config, budget_s: float, out: Path,
                     device, log: Path, val_clips: list[str]) -> dict:
    from export.refiner_train import export_refiner, import_refiner, proposer_pairs, train
    from node.propose import build_proposer

    t0 = time.perf_counter()
    net, meta = import_refiner(bundled)
    proposer = build_proposer(replace(proposer_config, refiner_model=None))
    try:
        pairs = proposer_pairs(frames, proposer)
    finally:
        proposer.close()
    left = max(1.0, budget_s - (time.perf_counter() - t0))
    history = train(net, frames, pairs, meta, 10**4, lr=LR["refiner"], device=device, log=log,
                    freeze_bn=True, budget_s=left)
    seconds = round(time.perf_counter() - t0, 1)
    meta.extra = dict(meta.extra, training_clips=sorted(set(frames.clips.tolist())),
                      validation_clips=val_clips, proposer=MODEL_FILES["proposer"],
                      finetune={"init": bundled.name, "lr": LR["refiner"], "seconds": seconds,
                                "epochs": len(history)})
    meta.extra.pop("validation", None)  # scored on the bundled model's validation clip
    export_refiner(net, meta, out)
    return {"epochs": len(history), "seconds": seconds, "proposer_boxes":
            int(sum(len(p[0]) for p in pairs)), "first_loss": _round(history[:1]),
            "last_loss": _round(history[-1:])}


def finetune_classifier(bundled: Path, samples: list, budget_s: float, work: Path, out: Path,
                        device, train_config: str, val_clips: list[str]) -> dict:
    """Crops of ``samples`` (cones jittered, background mined; ``export.data``), the bundled
    classifier trained on them until ``budget_s`` is used, exported with its parity check."""
    from export.augment import BatchAugmenter
    from export.background import HeightByRow
    from export.checkpoint import import_classifier
    from export.data import CropSet, real_crops
    from export.onnx import export_checkpoint
    from export.train import (
        MEAN,
        STD,
        Dist,
        build_loss,
        build_optimizer,
        build_tensors,
        train_one_epoch,
    )
    from export.train_config import load_train_config
    from node.classes import CLASSIFIER_CLASSES
    from node.infer.metadata import sha256_file

    t0 = time.perf_counter()
    model, meta = import_classifier(bundled)
    if list(meta.classes) != list(CLASSIFIER_CLASSES):
        raise DataError(f"{bundled}: classes {meta.classes}, expected {list(CLASSIFIER_CLASSES)}")
    cfg = load_train_config(train_config, [
        f"optim.lr={LR['classifier']}", f"optim.samples_per_epoch={CLASSIFIER_SAMPLES_PER_EPOCH}",
        "optim.warmup_epochs=0.2", "run.progress=false"])
    rng = np.random.default_rng(cfg.data.seed)
    size, policy = meta.input_size, meta.crop_policy
    x, y, clip, _ = real_crops(samples, size, policy, cfg.data, False, rng,
                               HeightByRow.fit(samples))
    empty = np.zeros((0, size, size, 3), np.uint8)
    crops = CropSet(x, y, empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64), clip,
                    np.array([], dtype="U16"), list(meta.classes), size, dict(meta.crop))
    data = build_tensors(crops, cfg, device)
    model.to(device)
    steps = max(1, cfg.optim.samples_per_epoch // cfg.optim.batch_size)
    left = max(1.0, budget_s - (time.perf_counter() - t0))
    t_train = time.perf_counter()
    opt, sched = build_optimizer(cfg, model, steps, budget_s=left)
    loss_fn = build_loss(cfg, data["y"], len(meta.classes)).to(device)
    augmenter = BatchAugmenter(cfg.augment, len(meta.classes), MEAN, STD, policy.pad_value,
                               1.0 / policy.min_aspect)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    losses: list[float] = []
    def over() -> bool:
        return time.perf_counter() - t_train >= left

    while not losses or not over():
        losses.append(train_one_epoch(model, data, augmenter, loss_fn, opt, sched, scaler, cfg,
                                      len(losses), Dist(), device, freeze_bn=True, stop=over))
    model.eval().cpu()
    ckpt = work / "classifier.pt"
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "arch": meta.arch, "classes": list(meta.classes), "input_size": size,
                "mean": list(meta.mean), "std": list(meta.std),
                "channel_order": meta.channel_order, "crop": dict(meta.crop),
                "epoch": len(losses), "metrics": {"train_loss": losses[-1]},
                "config": {"data": {"heldout": val_clips}}}, ckpt)
    parity = export_checkpoint(ckpt, out, parity_data=samples)
    return {"epochs": len(losses), "crops": len(y),
            "crops_by_class": {c: int((y == i).sum()) for i, c in enumerate(meta.classes)},
            "seconds": round(time.perf_counter() - t0, 1), "first_loss": _round(losses[:1]),
            "last_loss": _round(losses[-1:]), "parity": parity.summary(),
            "checkpoint_sha256": sha256_file(ckpt)}


def _round(values: list[float]) -> float | None:
    return round(float(values[0]), 4) if values else None


# --------------------------------------------------------------------------- the report

def _load(values: list[float] | None) -> str:
    return "unknown" if values is None else " / ".join(f"{v:.1f}" for v in values)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


PSEUDO_RISK = (
    "**Risk: confirmation bias.** Pseudo-labels are the starting models' own answers. Cones the "
    "node misses are taught as background, and a confident mistake (a colour swap, a box on a "
    "look-alike) is taught as truth, so the fine-tuned models can grow surer of the starting "
    "models' errors. Check a sample of `pseudo/*/images` against their labels, keep the "
    "threshold high, and judge the result only on hand-labelled validation frames (as above). "
    "Where some of an image folder's frames are hand-labelled, `python -m export pseudo_check "
    "pseudo/NN_NAME --source FOLDER --data yolo:DIR` counts the cones the pseudo-labels cover, "
    "mask, and leave to be taught as background.")


VERDICT = (("whole-node recall", "node", "recall_ge12"),
           ("whole-node precision", "node", "precision_ge20"),
           ("label accuracy", "node", "label_accuracy"),
           ("crop cone top-1", "crops", "cone_accuracy"),
           ("background rejection", "crops", "background_rejection"))


def verdict(before: dict, after: dict, start: str = "bundled") -> str:
    """One line: what changed by a point or more, and whether to keep the ``start`` models
    (``start_label``)."""
    moves = []
    for name, part, key in VERDICT:
        b, a = before[part][key], after[part][key]
        if a is not None and b is not None and abs(a - b) >= 0.01:
            moves.append((name, 100 * (a - b)))
    if not moves:
        return "No figure moved by a point or more."
    text = "After − before: " + ", ".join(f"{n} {d:+.1f} points" for n, d in moves) + "."
    if any(d < 0 for _, d in moves):
        text += (f" Keep the {start} models where the fine-tuned ones are worse on what "
                 "matters to you (the report does not choose).")
    return text


def start_label(models: str) -> str:
    """How the report names the models a run starts from (``--models`` as given): "bundled"
    for the bundled folder, else the folder itself."""
    from node.node_config import resolve_path

    return "bundled" if resolve_path(models) == resolve_path("models") else f"`{models}`"


def format_report(report: dict) -> str:
    """``report.md``: the before/after table, then what was trained on and how long."""
    b, a = report["before"], report["after"]
    start = report.get("start", "bundled")
    rows = [("whole node: recall, cones ≥ 12 px", lambda r: r["node"]["recall_ge12"])]
    for bucket in ("12-24", "24-48", ">=48"):
        rows.append((f"  recall, {bucket.replace('-', '–')} px",
                     lambda r, k=bucket: r["node"]["recall_by_height"][k]["recall"]))
    rows += [("whole node: precision, detections ≥ 20 px", lambda r: r["node"]["precision_ge20"]),
             ("whole node: label accuracy of matched cones", lambda r: r["node"]["label_accuracy"]),
             ("classifier on the true boxes: cone top-1", lambda r: r["crops"]["cone_accuracy"])]
    for bucket in ("12-24", "24-48", ">=48"):
        rows.append((f"  cone top-1, {bucket.replace('-', '–')} px",
                     lambda r, k=bucket: r["crops"]["by_size"][k]["accuracy"]))
    rows.append(("classifier: background rejected", lambda r: r["crops"]["background_rejection"]))
    val = report["data"]
    lines = [
        "# Fine-tune report", "",
        f"Validation: {val['val_frames']} frames of {', '.join(val['val_clips'])} "
        f"({b['node']['labelled_cones']} labelled cones, {b['crops']['count']} crops with "
        f"mined background). Training: {val['train_frames']} labelled frames of "
        f"{', '.join(val['train_clips'])}"
        + (f" and {report['pseudo']['frames_kept']} pseudo-labelled frames"
           if report.get("pseudo") else "") + ".", "",
        f"| | before ({start}) | after (fine-tuned) |", "|---|---:|---:|"]
    lines += [f"| {name} | {_pct(get(b))} | {_pct(get(a))} |" for name, get in rows]
    called = [sum(r["crops"]["by_size"][k]["called_background"] for k in ("12-24", "24-48",
                                                                          ">=48"))
              for r in (b, a)]
    lines += [f"| cones ≥ 12 px called background | {called[0]} | {called[1]} |", "",
              verdict(b, a, start), "",
              "Cones per size bucket on the true boxes: " + ", ".join(
                  f"{k} px {b['crops']['by_size'][k]['cones']}" for k in ("12-24", "24-48",
                                                                          ">=48")) + ".", ""]
    if report.get("camera_check"):
        from node.cli.check import table_lines
        from node.sources.frame_check import CheckReport

        check = CheckReport.from_dict(report["camera_check"])
        lines += ["## The camera (`python -m node check`)", "",
                  (f"{check.frames} frames of your footage (training, pseudo-labelled and "
                   "validation), against the lines where the node was seen to lose cones on "
                   "camera variants of its own data:"),
                  "", *table_lines(check), ""]
    t = report["timing"]
    lines += ["## Training", "",
              (f"Budget {t['budget_s']:.0f} s; the run took {t['wall_s']:.0f} s (load average "
               f"{_load(t['load_average']['start'])} at the start, "
               f"{_load(t['load_average']['end'])} at the end). Seconds per stage: "
               + ", ".join(f"{k} {v:.0f}" for k, v in t["stages"].items()) + "."), ""]
    for net in NETS:
        n = report["nets"][net]
        if not n["retrained"]:
            lines.append(f"- {net}: not retrained (`--nets`); the file of `--models` is copied")
            continue
        lines.append(f"- {net}: {n['epochs']} epochs in {n['seconds']:.0f} s at lr "
                     f"{LR[net]:g}, loss {n['first_loss']} → {n['last_loss']}")
    lines += [f"- INT8 twins: {report['int8']}", "",
              f"The models are in `models/` here, with the {start} models' metadata; the "
              "proposer's score threshold is the node config's, not re-tuned. "
              + (f"They were copied over the {start} models (`--install`). "
                 + report.get("install_note", "") if report.get("installed") else
                 f"Copy them over the {start} ones, or run again with `--install`."), ""]
    if report.get("pseudo"):
        p = report["pseudo"]
        lines += ["## Pseudo-labels", "",
                  (f"{p['frames_run']} frames run through the node ({start} models, "
                   f"stride {p['stride']}), {p['frames_kept']} kept with {p['cones']} cones scoring "
                   f"≥ {p['threshold']}. {p['masked_uncertain_cones']} cones below it were "
                   "covered with the frame's mean colour (taught neither as cones nor as "
                   f"background; confident cones' boxes were left unpainted)"
                   + (f", and so were {p['masked_candidates']} more candidates the classifier "
                      "did not call background (`--pseudo-mask candidates`)"
                      if p.get("mask") == "candidates" else "") + "; "
                   f"{p['dropped_uncertain_cone']} frames were dropped because more than half of "
                   f"such a cone lay under confident ones, {p['dropped_no_confident_cone']} for "
                   "having no confident cone. Folders: `pseudo/`."), "", PSEUDO_RISK, ""]
    lines += [("The validation frames were never trained on"
               + (" (the last frames of each clip: their neighbours in time were trained on, "
                  "so the figures are optimistic)." if report["data"]["split"] == "fraction"
                  else ".")), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export finetune",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, metavar="yolo:DIR",
                        help="the team's labelled frames (YOLO folder; data.yaml names map ids)")
    parser.add_argument("--out", required=True, help="run folder, e.g. runs/finetune")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val", metavar="yolo:VALDIR", help="validation frames in another folder")
    val.add_argument("--val-clips", nargs="+", metavar="CLIP",
                     help="clips of --data kept for validation (CLIP or CLIP:FIRST-LAST)")
    val.add_argument("--val-fraction", type=float, default=0.2,
                     help="else the last fraction of each clip's frames (default 0.2)")
    parser.add_argument("--train-clips", nargs="+", metavar="CLIP",
                        help="train only on these clips of --data (default: all but validation)")
    parser.add_argument("--minutes", type=float, default=30.0, help="time budget (default 30)")
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS),
                        help="the networks to retrain (default all three); the others are "
                             "copied from --models and their share of the time goes to these")
    parser.add_argument("--models", default="models",
                        help="folder of the models to start from (default: the bundled ones)")
    parser.add_argument("--install", action="store_true",
                        help="copy the fine-tuned models over those in --models at the end")
    parser.add_argument("--pseudo-label", nargs="+", default=[], metavar="VIDEO_OR_FOLDER",
                        help="unlabelled videos or image folders to pseudo-label and train on")
    parser.add_argument("--pseudo-threshold", type=float, default=0.9,
                        help="classifier score a cone needs to become a label (default 0.9)")
    parser.add_argument("--pseudo-stride", type=int, default=5,
                        help="pseudo-label every Nth frame (default 5)")
    parser.add_argument("--pseudo-max-frames", type=int, default=200,
                        help="at most this many frames per pseudo-label source (default 200)")
    parser.add_argument("--pseudo-overlap", type=float, default=0.3,
                        help="a cone below the threshold is harmless when it overlaps a "
                             "confident cone at least this much (IoU; default 0.3)")
    parser.add_argument("--pseudo-mask", choices=("unsure", "candidates"), default="unsure",
                        help="what is masked besides the confident cones: the node's cones "
                             "below the threshold (unsure), or those and every weak candidate "
                             "the classifier does not call background (candidates: no gain "
                             "measured, docs/validation.md; default unsure)")
    parser.add_argument("--config", default="configs/node.yaml", help="node config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="node config override for pseudo-labelling and scoring")
    parser.add_argument("--train-config", default="configs/train.yaml",
                        help="the classifier's crop, background mining and augmentation")
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 calibration")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val-fraction {args.val_fraction}: must be between 0 and 1")
    if not 0 < args.pseudo_threshold <= 1 or args.pseudo_stride < 1 or args.minutes <= 0:
        raise DataError("--pseudo-threshold must be in (0, 1], --pseudo-stride >= 1 and "
                        "--minutes > 0")
    for name in MODEL_FILES.values():
        if not (Path(args.models) / name).is_file():
            raise DataError(f"{Path(args.models) / name}: model not found (--models)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as exc:  # DataError, DatasetError, ConfigError, ...: one line
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from export.proposer_train import pick_device
    from node.node_config import resolve_path

    start = start_label(args.models)
    args.models = str(resolve_path(args.models))
    check_args(args)
    samples = read_frames(args.data)
    train, val = split_frames(samples, args)
    out = Path(args.out)
    models_in, models_out, work = Path(args.models), out / "models", out / "work"
    for folder in (models_out, work):
        folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, args.threads))
    device = pick_device(args.device)
    budget, load_start = Budget(args.minutes, not args.no_progress), load_average()
    split = "folder" if args.val else "clips" if args.val_clips else "fraction"
    report: dict[str, Any] = {"data": {
        "train_frames": len(train), "train_clips": sorted(set(clips_of(train))),
        "val_frames": len(val), "val_clips": sorted(set(clips_of(val))), "split": split},
        "start": start}
    print(f"fine-tuning on {len(train)} frames of {', '.join(report['data']['train_clips'])}; "
          f"validation {len(val)} frames of {', '.join(report['data']['val_clips'])}; "
          f"budget {args.minutes:g} min on {device}", flush=True)
    try:
        if args.pseudo_label:
            with budget.stage("pseudo-label"):
                extra, report["pseudo"] = pseudo_label(args, models_in, out / "pseudo")
            train = train + extra
        with budget.stage("camera check"):
            report["camera_check"] = check_camera(args, train + val)
        with budget.stage("score before"):
            report["before"] = score_models(args, models_in, val)
        after_s = budget.times["score before"] * 1.3  # the same scoring, at the end
        reserve = after_s + CLOSING_S + (0 if args.no_int8 else INT8_S * len(INT8_TWINS))
        report["nets"] = train_nets(args, train, report["data"]["val_clips"], budget, reserve,
                                    models_in, models_out, work, device)
        with budget.stage("INT8"):
            report["int8"] = calibrate_int8(args, budget, after_s, train, models_out)
        for name in ("colour_model.json",):  # unchanged: the colour proposer is not retrained
            if (models_in / name).is_file():
                shutil.copyfile(models_in / name, models_out / name)
        with budget.stage("score after"):
            report["after"] = score_models(args, models_out, val)
    finally:
        budget.close()
    report["timing"] = {"budget_s": budget.total, "wall_s": round(budget.elapsed(), 1),
                        "stages": budget.times, "load_average": {"start": load_start,
                                                                 "end": load_average()}}
    if args.install:
        cpu_file = INT8_TWINS["cpu"][0]
        if (report["nets"]["classifier"]["retrained"] and not args.no_int8
                and not (models_out / cpu_file).is_file()):
            # The node's default model must not stay the old classifier's twin: calibrated now,
            # past the budget (about 10 s).
            report["int8"] += "; " + calibrate_twin("cpu", train, models_out,
                                                    "at --install, past the budget")
        for name in list(MODEL_FILES.values()) + INT8_FILES:
            if (models_out / name).is_file():
                shutil.copyfile(models_out / name, models_in / name)
        report["installed"] = True
        stale = [(target, file) for target, (file, _) in INT8_TWINS.items()
                 if not (models_out / file).is_file()]
        if report["nets"]["classifier"]["retrained"] and stale:
            report["install_note"] = "; ".join(
                f"{models_in / file} is still the INT8 twin of the classifier before; "
                f"recalibrate it: python -m calib.quantize {models_in / MODEL_FILES['classifier']}"
                f" --data {args.data} --target {target} -o {models_in / file}"
                for target, file in stale)
            print(f"warning: {report['install_note']}", file=sys.stderr)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = format_report(report)
    (out / "report.md").write_text(text)
    print(text)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {models_out}/")
    return 0


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (other work slows a run down)."""
    try:
        import os

        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def train_nets(args, train: list, val_clips: list[str], budget: Budget, reserve: float,
               models_in: Path, models_out: Path, work: Path, device) -> dict:
    """The three nets, one after another, each in its share of what the budget leaves."""
    from export.proposer_data import sample_frames
    from node.node_config import load_node_config

    proposer_cfg = load_node_config(args.config, args.set).proposer
    with budget.stage("frames"):
        frames = sample_frames(train, clips_of(train), None, proposer_cfg.heatmap_max_pixels,
                               not args.no_progress, proposer_cfg.heatmap_min_pixels)
    nets: dict[str, dict] = {}
    shares_left = sum(SHARES[name] for name in args.nets)
    for name in NETS:
        src, dst = models_in / MODEL_FILES[name], models_out / MODEL_FILES[name]
        if name not in args.nets:
            shutil.copyfile(src, dst)
            nets[name] = {"retrained": False}
            continue
        share = max(1.0, (budget.left() - reserve) * SHARES[name] / shares_left)
        shares_left -= SHARES[name]
        with budget.stage(name):
            if name == "proposer":
                nets[name] = finetune_proposer(src, frames, share, dst, device,
                                               work / "proposer.jsonl", val_clips)
            elif name == "refiner":
                cfg = replace(proposer_cfg, heatmap_model=str(models_out / MODEL_FILES[
                    "proposer"]), body_mask=[])
                nets[name] = finetune_refiner(src, frames, cfg, share, dst, device,
                                              work / "refiner.jsonl", val_clips)
            else:
                nets[name] = finetune_classifier(src, train, share, work, dst, device,
                                                 args.train_config, val_clips)
        nets[name].update(retrained=True, budget_s=round(share, 1))
    return nets


def calibrate_int8(args, budget: Budget, after_s: float, train: list, models_out: Path) -> str:
    """Calibrate the fine-tuned classifier's INT8 twins (``INT8_TWINS``) on the training frames
    while the budget leaves time for each besides the ``after_s`` the last scoring needs; says
    what was done."""
    if args.no_int8:
        return "skipped (--no-int8)"
    if "classifier" not in args.nets:
        for name in INT8_FILES:
            if (Path(args.models) / name).is_file():
                shutil.copyfile(Path(args.models) / name, models_out / name)
        return "not recalibrated: the classifier was not retrained (the bundled twins are copied)"
    done = []
    for target in INT8_TWINS:
        left = budget.left() - after_s
        if left < INT8_S:
            done.append(f"{target}: skipped, {max(0.0, left):.0f} s of the budget left, the "
                        f"calibration needs about {INT8_S:.0f} s; run python -m calib.quantize "
                        f"--target {target} on models/{MODEL_FILES['classifier']} later")
        else:
            done.append(calibrate_twin(target, train, models_out))
    return "; ".join(done)


def calibrate_twin(target: str, train: list, models_out: Path, when: str = "") -> str:
    """Calibrate the classifier's INT8 twin for ``target`` on the training frames; says so."""
    from calib.quantize import quantize_with_config

    file, cache = INT8_TWINS[target]
    t = time.perf_counter()
    rep = quantize_with_config(models_out / MODEL_FILES["classifier"], models_out / file, train,
                               cache=models_out / cache, note="the fine-tune's training frames",
                               target=target)
    return (f"{target}: calibrated {when + ' ' if when else ''}in "
            f"{time.perf_counter() - t:.0f} s on the training frames ({rep.summary()})")


if __name__ == "__main__":
    sys.exit(main())
