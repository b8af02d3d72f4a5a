"""Train and export the candidate-box refiner: ``python -m export.refiner_train --out DIR``.

The second stage of ``node.propose.refiner``: a small CNN looks at a 32 px crop of each candidate
(a square of twice the box's longer side, cut by the node's own ``crop_batch``) and predicts
how far each edge of the cone's box lies from the candidate's, in fractions of the square.
Loss: smooth L1 on the four offsets plus GIoU (Rezatofighi et al., 2019) of the moved box.

Training boxes come from the proposer's frame cache (``export.proposer_data``: real training
clips at 640 px plus synthetic scenes; the held-out clips are never in it) in two kinds:

- the bundled heatmap proposer's own candidates on those frames that overlap a labelled cone
  (IoU >= 0.3), with that cone as target: the errors the refiner meets at run time;
- every labelled cone jittered afresh each epoch (centre by ~12 % of its size, width and
  height by ~20 % in log scale), so the refiner also learns errors the proposer does not make
  on frames it was trained on.

Crops get random white balance, brightness, contrast, noise and horizontal flips; with
``--camera`` the frames are first randomised as another camera would record them
(``export.camera_aug``: exposure, blur, lens drops, noise, JPEG). The
validation clip (``--val-clips``, default ``autox4``, also kept out of the proposer's
training) is scored through the node's own proposer before and after refinement. Writes
``<out>/best.pt``, ``<out>/history.jsonl``, ``<out>/cone_refiner.onnx`` (opset 17, dynamic
batch, metadata JSON under ``cone_refiner``) and copies it to ``--model``.
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.camera_aug import FRAME_PROFILES, CameraRandomisation, random_camera
from export.data import DataError
from export.proposer_data import SYNTH_CLIP, ProposerFrames
from export.proposer_train import (
    cached_frames,
    export_with_metadata,
    finish_export,
    giou_loss,
    log_epoch,
    pick_device,
    run_cli,
    start_run,
    trainer_parser,
)
from export.train import Schedule, optimizer_step
from node.evaluate.score import iou_matrix
from node.propose.refiner import INPUT, OUTPUT, RefinerMetadata, box_targets, refiner_crops

CHANNELS = (16, 32, 48)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class BoxRefinerNet(nn.Module):
    """Raw BGR crops (N, 3, S, S), 0..255 → edge offsets (N, 4) in fractions of the crop.

    One stride-2 3x3 convolution per entry of ``channels`` keeps where things are; a small
    fully-connected head reads the last map. The last layer starts at zero, so an untrained
    refiner leaves boxes where they are.
    """

    def __init__(self, input_size: int = 32, channels: tuple[int, ...] = CHANNELS,
                 hidden: int = 96) -> None:
        super().__init__()
        layers, cin = [], 3
        for c in channels:
            layers.append(_conv(cin, c, 2))
            cin = c
        self.features = nn.Sequential(*layers)
        cells = (input_size >> len(channels)) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * cells, hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, 4))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * (1.0 / 255.0) - 0.5))


def import_refiner(path: str | Path) -> tuple[BoxRefinerNet, RefinerMetadata]:
    """The net of an exported refiner ONNX (e.g. the bundled ``models/cone_refiner.onnx``) and
    its metadata, to train further with its BatchNorms frozen (``export.onnx_import``).
    Raises ``DataError`` naming the file when it is not such a net."""
    from export.onnx_import import import_weights
    from node.propose.refiner import RefinerModelError, open_refiner

    try:
        meta = open_refiner(path)[1]
        net = BoxRefinerNet(meta.input_size, tuple(meta.extra.get("channels", CHANNELS)))
        import_weights(net, path)
    except (RefinerModelError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path}: cannot load as a box refiner "
                        f"({str(exc).splitlines()[0]})") from None
    return net, meta


def jitter_boxes(gt: np.ndarray, rng: np.random.Generator, copies: int, shift: float = 0.12,
                 scale: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` perturbed versions of each box and the index of the box each came from."""
    src = np.repeat(np.arange(len(gt)), copies)
    g = gt[src]
    w, h = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    cx = (g[:, 0] + g[:, 2]) * 0.5 + rng.normal(0, shift, len(g)) * w
    cy = (g[:, 1] + g[:, 3]) * 0.5 + rng.normal(0, shift, len(g)) * h
    w = w * np.exp(rng.normal(0, scale, len(g)))
    h = h * np.exp(rng.normal(0, scale, len(g)))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)
    return boxes, src


def proposer_pairs(frames: ProposerFrames, proposer, min_iou: float = 0.3) -> list:
    """Per frame, the proposer's boxes that overlap a labelled cone, and that cone's index."""
    from node.types import Frame

    pairs = []
    for i in range(len(frames)):
        gt = frames.frame_boxes(i)
        boxes = proposer.propose(Frame(i, 0.0, frames.images[i]))
        if len(gt) == 0 or len(boxes) == 0:
            pairs.append((np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
            continue
        m = iou_matrix(boxes, gt)
        keep = m.max(1) >= min_iou
        pairs.append((boxes[keep], m[keep].argmax(1)))
    return pairs


def epoch_samples(frames: ProposerFrames, pairs: list, meta: RefinerMetadata,
                  rng: np.random.Generator, copies: int, min_height: float = 6.0,
                  camera: CameraRandomisation | None = None, camera_prob: float = 0.8
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch's crops (N, S, S, 3) uint8, their boxes' offsets to the cone (N, 4), and the
    boxes themselves (N, 4). With ``camera``, ``camera_prob`` of the frames are first seen as
    another camera would (``export.camera_aug.random_camera`` on the whole frame, so blur and
    lens drops have a frame's size around every cone)."""
    crops, deltas, inputs = [], [], []
    for i in range(len(frames)):
        gt = frames.frame_boxes(i)
        gt = gt[(gt[:, 3] - gt[:, 1]) >= min_height]
        if len(gt) == 0:
            continue
        jit, src = jitter_boxes(gt, rng, copies)
        # A jittered box that now overlaps another cone more is that cone's box.
        m = iou_matrix(jit, gt)
        keep = (m.max(1) >= 0.25) & (m.argmax(1) == src)
        boxes, target = jit[keep], gt[src[keep]]
        pb, pg = pairs[i]
        if len(pb):
            full = frames.frame_boxes(i)
            boxes, target = np.concatenate([boxes, pb]), np.concatenate([target, full[pg]])
        if len(boxes) == 0:
            continue
        image = frames.images[i]
        if camera is not None and rng.random() < camera_prob:
            image = random_camera(image, rng, camera)
        crops.append(refiner_crops(image, boxes, meta))
        deltas.append(box_targets(boxes, target, meta))
        inputs.append(boxes)
    return np.concatenate(crops), np.concatenate(deltas), np.concatenate(inputs)


def photometric(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random white balance, brightness, contrast and noise on raw 0..255 crops (N, 3, S, S)."""
    n = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.7, 1.3, 1, 1, 1) + mean
    x = x * u(0.85, 1.15, 3, 1, 1) + u(-25, 25, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=gen) * u(0, 6, 1, 1, 1)
    return x.clamp(0, 255)


def hflip(crops: torch.Tensor, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror crops (N, 3, S, S) left to right, and their offsets with them: the left edge's
    offset becomes the right edge's, negated."""
    return crops.flip(-1), torch.stack([-deltas[:, 2], deltas[:, 1], -deltas[:, 0],
                                        deltas[:, 3]], 1)


def refine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 on the offsets (in fractions of the crop) plus GIoU of the moved boxes, both
    in crop units (the input box is the same for both, so it cancels except in GIoU)."""
    l1 = nn.functional.smooth_l1_loss(pred, target, beta=0.02, reduction="mean") * 10.0
    base = torch.tensor([0.25, 0.25, 0.75, 0.75], dtype=pred.dtype, device=pred.device)
    giou = giou_loss((base + pred)[..., None], (base + target)[..., None]).mean()
    return l1 + giou


def train(net: BoxRefinerNet, frames: ProposerFrames, pairs: list, meta: RefinerMetadata,
          epochs: int, copies: int = 4, batch_size: int = 256, lr: float = 3e-3,
          device: torch.device | str = "cpu", seed: int = 0, log: Path | None = None,
          freeze_bn: bool = False, budget_s: float | None = None,
          camera: CameraRandomisation | None = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; fresh jitter (and, with ``camera``, fresh
    camera randomisation, ``epoch_samples``) every epoch. Returns the mean
    loss of each epoch. ``freeze_bn`` keeps the BatchNorms in eval mode (a net imported from
    ONNX); ``budget_s`` ends training after that many seconds (``export.train.Schedule``),
    after one step at least."""
    from export.onnx_import import freeze_batchnorm

    device = torch.device(device)
    net.to(device).train()
    if freeze_bn:
        freeze_batchnorm(net)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history, t0, step = [], time.perf_counter(), 0
    crops, deltas, _ = epoch_samples(frames, pairs, meta, rng, copies, camera=camera)
    # The schedule is set from the first epoch's size (the jitter changes it a little).
    total = epochs * max(1, len(crops) // batch_size)
    schedule = Schedule(opt, total, max(1, total // 20) if budget_s is None else 10, budget_s)
    sched = schedule.sched
    for epoch in range(epochs):
        if step and schedule.over:
            break
        if epoch:
            crops, deltas, _ = epoch_samples(frames, pairs, meta, rng, copies, camera=camera)
        steps = max(1, len(crops) // batch_size)
        order = rng.permutation(len(crops))
        losses = []
        for k in range(steps):
            if step >= total or (step and schedule.over):
                break
            idx = order[k * batch_size:(k + 1) * batch_size]
            x = torch.from_numpy(crops[idx]).permute(0, 3, 1, 2).float()
            t = torch.from_numpy(deltas[idx]).clone()
            x = photometric(x, gen)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x[flip], t[flip] = hflip(x[flip], t[flip])
            x, t = x.to(device), t.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = refine_loss(net(x).float(), t)
            optimizer_step(loss, opt, scaler, sched)
            step += 1
            losses.append(float(loss.detach()))
        if not losses:  # the budget ran out while this epoch's crops were drawn
            break
        history.append(float(np.mean(losses)))
        log_epoch({"epoch": epoch + 1, "loss": round(history[-1], 4), "samples": len(crops),
                   "seconds": round(time.perf_counter() - t0, 1)}, log)
    net.eval()
    return history


def export_refiner(net: BoxRefinerNet, meta: RefinerMetadata, path: str | Path) -> Path:
    """ONNX (opset 17, dynamic batch) with ``meta`` as JSON under ``cone_refiner``."""
    from node.propose.refiner import METADATA_KEY

    extra = dict(meta.extra)
    extra["torch"] = torch.__version__
    value = dataclasses.replace(meta, extra=extra).to_json()
    dummy = torch.zeros(2, 3, meta.input_size, meta.input_size)
    return export_with_metadata(net.cpu().eval(), dummy, path, [INPUT], [OUTPUT], METADATA_KEY,
                                value, "cone_node.export.refiner_train",
                                {INPUT: {0: "n"}, OUTPUT: {0: "n"}})


def validate(model_path: Path, samples: list, proposer_config) -> dict:
    """Proposals alone on the validation frames, without and with the refiner."""
    from dataclasses import replace

    from node.evaluate.score import score_proposals
    from node.propose import build_proposer

    out = {}
    for name, cfg in (("proposer", replace(proposer_config, refiner_model=None)),
                      ("refined", replace(proposer_config, refiner_model=str(model_path)))):
        rep = score_proposals(build_proposer(cfg), samples)
        out[name] = {"recall_ge12": rep["recall_ge12"],
                     "recall_by_height": {k: v["recall"]
                                          for k, v in rep["recall_by_height"].items()},
                     "propose_ms_median": rep["propose_ms"]["median"]}
    return out


def candidate_proposer(node_config: str, overrides: list[str], proposer: str | None):
    """The proposer section whose candidates the refiner learns from: the node config's, with
    its ``--set`` overrides and ``proposer`` (an .onnx) when given, unrefined and unmasked.

    Raises:
        ConfigError: naming the file or the overridden key.
    """
    from dataclasses import replace

    from node.node_config import load_node_config

    cfg = replace(load_node_config(node_config, overrides).proposer, refiner_model=None,
                  body_mask=[])
    return replace(cfg, heatmap_model=proposer) if proposer else cfg


def main(argv: list[str] | None = None) -> int:
    parser = trainer_parser("python -m export.refiner_train", __doc__, "runs/refiner",
                            "training clips kept out of training, scored before and after")
    parser.add_argument("--copies", type=int, default=4,
                        help="jittered boxes per labelled cone per epoch")
    parser.add_argument("--node-config", default="configs/node.yaml",
                        help="its proposer section makes the candidates trained and scored on")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="node config override for that proposer, as the node's --set "
                             "(repeatable)")
    parser.add_argument("--cache", default="cache/proposer_640.npz",
                        help="the proposer's frame cache (built when missing)")
    parser.add_argument("--real-only", action="store_true",
                        help="train on the real frames of the cache only (no synthetic scenes)")
    parser.add_argument("--input-size", type=int, default=32, help="crop side in px")
    parser.add_argument("--min-aspect", type=float, default=1.0,
                        help="each side of a crop window at least this fraction (0..1] of "
                             "the other; 1 = the square of twice the longer side")
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS),
                        help="one stride-2 convolution per entry")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--proposer", default=None,
                        help="proposer .onnx whose candidates are trained and scored on "
                             "(default: the one --node-config names)")
    parser.add_argument("--camera", default="none", choices=list(FRAME_PROFILES),
                        help="camera randomisation profile of the training frames "
                             "(export.camera_aug.FRAME_PROFILES)")
    return run_cli(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from export.proposer_train import validation_samples
    from node.propose import build_proposer

    if args.input_size % (1 << len(args.channels)) or args.input_size < 8:
        raise DataError(f"--input-size {args.input_size}: must be a multiple of "
                        f"{1 << len(args.channels)} for {len(args.channels)} --channels")
    if not 0.0 < args.min_aspect <= 1.0:
        raise DataError(f"--min-aspect {args.min_aspect}: must be in (0, 1]")
    if args.epochs < 1 or args.copies < 0:
        raise DataError(f"--epochs {args.epochs} and --copies {args.copies}: need at least "
                        f"one epoch and no negative copies")
    proposer_cfg = candidate_proposer(args.node_config, args.set, args.proposer)
    out, heldout, root = start_run(args)
    frames = cached_frames(Path(args.cache), root, heldout, 640, args.synth_frames,
                           args.synth_seed)
    keep = ~np.isin(frames.clips, args.val_clips)
    if args.real_only:
        keep &= frames.clips != SYNTH_CLIP
    train_frames = frames.subset(keep)
    t0 = time.perf_counter()
    pairs = proposer_pairs(train_frames, build_proposer(proposer_cfg))
    print(f"{sum(len(p[0]) for p in pairs)} proposer boxes on labelled cones in "
          f"{len(train_frames)} training frames ({time.perf_counter() - t0:.0f} s)", flush=True)
    meta = RefinerMetadata(input_size=args.input_size, min_aspect=args.min_aspect)
    device = pick_device(args.device)
    net = BoxRefinerNet(args.input_size, tuple(args.channels))
    (out / "history.jsonl").write_text("")
    camera = FRAME_PROFILES[args.camera]
    train(net, train_frames, pairs, meta, args.epochs, args.copies, args.batch_size, args.lr,
          device, seed=args.seed, log=out / "history.jsonl", camera=camera)
    torch.save({"state_dict": net.cpu().state_dict(), "channels": list(args.channels),
                "input_size": args.input_size}, out / "best.pt")
    meta.extra = {"arch": "box_refiner_net", "channels": list(args.channels),
                  "training_clips": sorted(set(train_frames.clips.tolist())),
                  "validation_clips": list(args.val_clips), "heldout": list(heldout),
                  "epochs": args.epochs, "copies": args.copies, "camera": args.camera,
                  "seed": args.seed, "proposer": proposer_cfg.heatmap_model}
    onnx_path = export_refiner(net, meta, out / "cone_refiner.onnx")
    val = validation_samples(root, list(args.val_clips))
    if val:
        scores = validate(onnx_path, val, proposer_cfg)
        print(json.dumps(scores))
        meta.extra["validation"] = scores
        onnx_path = export_refiner(net, meta, onnx_path)
    return finish_export(onnx_path, args.model)


if __name__ == "__main__":
    sys.exit(main())
