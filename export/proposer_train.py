"""Train and export the cone-heatmap proposer: ``python -m export.proposer_train --out DIR``.

A tiny CenterNet (Zhou et al., "Objects as Points", 2019): a fully-convolutional net on the
frame resized to 320x320 predicts, at output stride 4, a cone-centre heatmap (focal loss of
CenterNet / CornerNet, alpha 2, beta 4), log box size and centre offset (L1 and GIoU, trained
densely about each centre as in TTFNet). Channels 16-24-32-48 with stride-2 steps and two
top-down merges (as in a feature pyramid); the stride-4 convolutions are depthwise-separable (MobileNet) to keep the CPU cost
at about 3 ms per frame on one core. The frames come from ``export.proposer_data`` (real
training clips + synthetic scenes, cached under ``cache/``).

Training runs on the CPU (``--threads``, default 2) or on CUDA with automatic mixed precision
(``--device auto|cpu|cuda``). One training clip (``--val-clips``, default ``autox4``) is kept
out of training: the score threshold is tuned on it with the exported model running through
the node's own ``HeatmapProposer`` (never on the held-out clips). Writes ``<out>/best.pt``,
``<out>/config.yaml``, ``<out>/history.jsonl``, ``<out>/cone_proposer.onnx`` (opset 17,
metadata JSON under ``cone_proposer`` in ``metadata_props``) and copies it to ``--model``.
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.camera_aug import FRAME_PROFILES
from export.data import DataError
from export.proposer_data import ProposerFrames, augment_frame, centre_targets
from export.train import Schedule, optimizer_step
from node.propose.heatmap import OUTPUTS, ProposerMetadata

STRIDE = 4
CHANNELS = (16, 24, 32, 48)


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (at ``stride``) + pointwise 1x1, each with BN and ReLU (MobileNet v1)."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                         nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


STEMS = ("conv", "patch4", "patch4-lite")
INPUT_SCALE, INPUT_SHIFT = 1.0 / 63.75, -2.0
"""The ``patch4`` net's own normalisation of raw pixels: (x / 255 - 0.5) / 0.25."""


def stem_metadata(stem: str, input_size: int) -> ProposerMetadata:
    """The input contract of a stem: ``conv`` takes RGB normalised by the node; ``patch4``
    raw BGR pixels (mean 0, std 1/255: the node's normalisation is the identity)."""
    if stem.startswith("patch4"):
        return ProposerMetadata(input_size=input_size, stride=STRIDE, channel_order="BGR",
                                mean=[0.0] * 3, std=[1.0 / 255.0] * 3)
    return ProposerMetadata(input_size=input_size, stride=STRIDE)


class ConeHeatmapNet(nn.Module):
    """Centre heatmap (logits), log size and offset at stride 4: (B,1,G,G), (B,2,G,G) x2.

    Args:
        channels: widths at strides 4, 8, 16 and 32 of the input (``conv`` stem: 2, 4, 8, 16).
        stem: ``conv`` takes the input to stride 4 with two stride-2 3x3 convolutions (meant
            for a frame downscaled to 320 px); ``patch4`` with one 4x4 stride-4 convolution
            over non-overlapping patches, so the full-resolution frame (640 px) costs about
            what the half-resolution one does with ``conv``, at twice the output resolution.
            This stem takes raw 0..255 BGR pixels (``stem_metadata``) and normalises them
            itself, so the node only transposes the frame. ``patch4-lite`` is ``patch4``
            without the separable block at stride 4 and with depthwise-separable stride-2
            steps to strides 8 and 16: about 30 % less network time (2.5 against 3.5 ms per
            640 px frame on one core here).
    """

    def __init__(self, channels: tuple[int, int, int, int] = CHANNELS, stem: str = "conv"
                 ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem {stem!r}: expected one of {STEMS}")
        c1, c2, c3, c4 = channels
        self.stem_kind = stem
        self.normalise_input = stem.startswith("patch4")
        if stem == "conv":
            # Widths c1 (stride 2), c2 (4), c3 (8), c4 (16); heads on c2 at stride 4.
            self.stem = conv_bn(3, c1, 2)
            self.stage4 = nn.Sequential(conv_bn(c1, c2, 2), separable(c2, c2))
            self.stage8 = nn.Sequential(conv_bn(c2, c3, 2), separable(c3, c3))
            self.stage16 = nn.Sequential(conv_bn(c3, c4, 2), conv_bn(c4, c4))
            self.lateral16 = nn.Conv2d(c4, c2, 1)
            self.lateral8 = nn.Conv2d(c3, c2, 1)
            width = c2
        else:
            # Widths c1 (stride 4), c2 (8), c3 (16), c4 (32); heads on c1 at stride 4.
            self.stem = nn.Sequential(nn.Conv2d(3, c1, 4, 4, bias=False), nn.BatchNorm2d(c1),
                                      nn.ReLU(inplace=True))
            lite = stem == "patch4-lite"
            down = separable if lite else conv_bn
            self.stage4 = nn.Identity() if lite else separable(c1, c1)
            self.stage8 = nn.Sequential(down(c1, c2, 2), separable(c2, c2))
            self.stage16 = nn.Sequential(down(c2, c3, 2), separable(c3, c3))
            self.stage32 = nn.Sequential(conv_bn(c3, c4, 2), conv_bn(c4, c4))
            self.lateral32 = nn.Conv2d(c4, c2, 1)
            self.lateral16 = nn.Conv2d(c3, c2, 1)
            self.fuse8 = separable(c2, c2)
            self.lateral8 = nn.Conv2d(c2, c1, 1)
            width = c1
        self.fuse = separable(width, width)
        self.heat = nn.Conv2d(width, 1, 1)
        self.size = nn.Conv2d(width, 2, 1)
        self.offset = nn.Conv2d(width, 2, 1)
        nn.init.constant_(self.heat.bias, -4.6)  # CenterNet's prior: sigmoid ~ 0.01
        nn.init.constant_(self.size.bias, 2.5)   # exp(2.5) ~ 12 px, a typical cone at 320
        nn.init.constant_(self.offset.bias, 0.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-4 features the three heads read."""
        if self.normalise_input:
            x = x * INPUT_SCALE + INPUT_SHIFT

        def up(t: torch.Tensor) -> torch.Tensor:
            return nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")

        f4 = self.stage4(self.stem(x))
        f8 = self.stage8(f4)
        if self.stem_kind == "conv":
            t8 = up(self.lateral16(self.stage16(f8))) + self.lateral8(f8)
        else:
            f16 = self.stage16(f8)
            t16 = up(self.lateral32(self.stage32(f16))) + self.lateral16(f16)
            t8 = self.lateral8(self.fuse8(up(t16) + f8))
        return self.fuse(up(t8) + f4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.heat(f), self.size(f), self.offset(f)


def fold_input_normalisation(net: ConeHeatmapNet) -> ConeHeatmapNet:
    """A copy of ``net`` whose stem convolution absorbs the input normalisation, so the exported
    graph does no per-pixel arithmetic before it. Exact for ``patch4`` (its 4x4 stride-4 stem
    has no padding); other nets are returned as copies unchanged."""
    import copy

    net = copy.deepcopy(net)
    if not net.normalise_input:
        return net
    conv = net.stem[0]
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       bias=True)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * INPUT_SCALE)
        folded.bias.copy_(INPUT_SHIFT * conv.weight.sum((1, 2, 3)))
    net.stem[0] = folded
    net.normalise_input = False
    return net


def import_proposer(path: str | Path, stem: str = "patch4") -> ConeHeatmapNet:
    """The net of an exported proposer ONNX (e.g. the bundled ``models/cone_proposer.onnx``),
    to train further: its input normalisation stays folded into the stem and its BatchNorms
    are the identity plus the folded bias (``export.onnx_import``); train it with
    ``freeze_bn``. Its widths come from the model's metadata (``extra["channels"]``, else
    ``CHANNELS``). Raises ``DataError`` naming the file when it is not such a net."""
    from export.onnx_import import OnnxImportError, load_conv_weights, onnx_initialisers

    try:
        channels = onnx_channels(path)
        net = fold_input_normalisation(ConeHeatmapNet(channels, stem=stem))
        load_conv_weights(net, path, skip=("heads",))
        nodes, init = onnx_initialisers(path)
        heads = [n for n in nodes if n.op_type == "Conv" and n.name.startswith("/heads/")]
        if len(heads) != 1:
            raise OnnxImportError(f"{path}: no merged heads convolution; not a proposer export")
        w = torch.from_numpy(init[heads[0].input[1]].copy())
        b = torch.from_numpy(init[heads[0].input[2]].copy())
        with torch.no_grad():
            for head, rows in ((net.heat, slice(0, 1)), (net.size, slice(1, 3)),
                               (net.offset, slice(3, 5))):
                head.weight.copy_(w[rows])
                head.bias.copy_(b[rows])
    except (ValueError, RuntimeError) as exc:
        raise DataError(f"{path}: cannot load into a {stem} proposer "
                        f"({str(exc).splitlines()[0]})") from None
    return net.eval()


def onnx_channels(path: str | Path) -> tuple[int, int, int, int]:
    """The widths an exported proposer names in its metadata (``CHANNELS`` for one that names
    none); ValueError when the metadata cannot be read or the widths are not four numbers."""
    from node.propose.heatmap import open_session

    channels = open_session(path)[1].extra.get("channels", list(CHANNELS))
    if (not isinstance(channels, list) or len(channels) != 4
            or not all(isinstance(c, int) and c > 0 for c in channels)):
        raise ValueError(f"metadata channels {channels!r}: expected four positive widths")
    return tuple(channels)


def net_channels(net: ConeHeatmapNet) -> tuple[int, int, int, int]:
    """The widths a net was built with, at strides 4, 8, 16 and 32 (``conv``: 2, 4, 8, 16)."""
    if net.stem_kind == "conv":
        return (net.stem[0].out_channels, net.stage4[0][0].out_channels,
                net.stage8[0][0].out_channels, net.stage16[0][0].out_channels)
    return (net.stem[0].out_channels, net.stage8[1][3].out_channels,
            net.stage16[1][3].out_channels, net.stage32[1][0].out_channels)


def widen(net: ConeHeatmapNet, channels: tuple[int, int, int, int]) -> ConeHeatmapNet:
    """A copy of ``net`` with ``channels`` widths (each at least the old one) that computes
    exactly what ``net`` computes (Net2Net's function-preserving widening, Chen et al., ICLR
    2016, in its zero-weight form): every old weight and statistic is copied; the new
    channels get the constructor's random weights on their inputs, and every old channel
    reads them with weight zero. Training then grows the new channels from the old solution:
    more capacity for new camera effects without starting from scratch."""
    old = net.state_dict()
    wide = ConeHeatmapNet(tuple(channels), stem=net.stem_kind)
    if not net.normalise_input:  # an imported (folded) net stays folded
        wide = fold_input_normalisation(wide)
    state = wide.state_dict()
    for name, new in state.items():
        was = old.get(name)
        if was is None or was.dim() != new.dim():
            raise ValueError(f"widen: {name} has no counterpart in the narrower net")
        if any(a > b for a, b in zip(was.shape, new.shape)):
            raise ValueError(f"widen: {name} {tuple(new.shape)} is narrower than "
                             f"{tuple(was.shape)}")
        if was.dim() == 0:
            new.copy_(was)
            continue
        if was.dim() == 4 and was.shape[1] > 1:  # old outputs read no new input channel
            new[:was.shape[0], was.shape[1]:] = 0
        new[tuple(slice(0, n) for n in was.shape)] = was
    wide.load_state_dict(state)
    return wide.train(net.training)


class ExportWrapper(nn.Module):
    """What the node runs: the heatmap as probabilities. The three 1x1 heads run as one
    convolution with five outputs, sliced (one pass over the stride-4 features, not three)."""

    def __init__(self, net: ConeHeatmapNet) -> None:
        super().__init__()
        self.net = net
        heads = (net.heat, net.size, net.offset)
        self.heads = nn.Conv2d(net.heat.in_channels, 5, 1)
        with torch.no_grad():
            self.heads.weight.copy_(torch.cat([h.weight for h in heads]))
            self.heads.bias.copy_(torch.cat([h.bias for h in heads]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.heads(self.net.features(x))
        return torch.sigmoid(out[:, :1]), out[:, 1:3], out[:, 3:5]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0,
               beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, normalised by the peak count."""
    logits = logits.float()
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1.0).float()
    log_p, log_not_p = nn.functional.logsigmoid(logits), nn.functional.logsigmoid(-logits)
    pos_loss = -(log_p * (1 - p) ** alpha * pos).sum()
    neg_loss = -(log_not_p * p ** alpha * (1 - target) ** beta * (1 - pos)).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def decode_grid(size: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Boxes (B, 4, G, G) x1, y1, x2, y2 in cells that every cell's size and offset decode to
    (the node's ``decode_heatmap`` arithmetic, in cells instead of pixels; sizes in pixels are
    divided by ``STRIDE``)."""
    g_h, g_w = size.shape[-2:]
    gy, gx = torch.meshgrid(torch.arange(g_h, device=size.device, dtype=size.dtype),
                            torch.arange(g_w, device=size.device, dtype=size.dtype),
                            indexing="ij")
    cx, cy = gx + offset[:, 0], gy + offset[:, 1]
    half_h = 0.5 * torch.exp(size[:, 0].clamp(-2.0, 8.0)) / STRIDE
    half_w = 0.5 * torch.exp(size[:, 1].clamp(-2.0, 8.0)) / STRIDE
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalised IoU (Rezatofighi et al., 2019) of boxes (B, 4, ...) cell by cell."""
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    iw = (torch.minimum(pred[:, 2], target[:, 2]) - torch.maximum(pred[:, 0], target[:, 0]))
    ih = (torch.minimum(pred[:, 3], target[:, 3]) - torch.maximum(pred[:, 1], target[:, 1]))
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    union = (area_p + area_t - inter).clamp(min=1e-6)
    hull = ((torch.maximum(pred[:, 2], target[:, 2]) - torch.minimum(pred[:, 0], target[:, 0]))
            * (torch.maximum(pred[:, 3], target[:, 3]) - torch.minimum(pred[:, 1], target[:, 1])))
    return 1 - inter / union + (hull - union) / hull.clamp(min=1e-6)


def detection_loss(outputs: tuple, targets: dict[str, torch.Tensor],
                   size_weight: float = 1.0, offset_weight: float = 1.0,
                   giou_weight: float = 2.0) -> torch.Tensor:
    """Focal heatmap loss, plus L1 on log size and offset and a GIoU loss on the decoded box,
    each weighted over every cone's regression region (``centre_targets``' ``weight``, one in
    total per cone) and averaged over the cones."""
    heat, size, offset = outputs
    size, offset = size.float(), offset.float()
    weight = targets["weight"]
    n = targets["mask"].sum().clamp(min=1.0)
    l_size = (torch.abs(size - targets["size"]) * weight).sum() / n
    l_off = (torch.abs(offset - targets["offset"]) * weight).sum() / n
    l_giou = (giou_loss(decode_grid(size, offset), decode_grid(targets["size"],
                                                               targets["offset"]))
              * weight[:, 0]).sum() / n
    return (focal_loss(heat, targets["heat"]) + size_weight * l_size + offset_weight * l_off
            + giou_weight * l_giou)


def normalise_batch(images: np.ndarray, meta: ProposerMetadata) -> torch.Tensor:
    """uint8 BGR (B, S, S, 3) → float (B, 3, S, S), the same arithmetic as the node's
    ``node.propose.heatmap.to_input_tensor``."""
    x = images[..., ::-1] if meta.channel_order == "RGB" else images
    mean = np.asarray(meta.mean, np.float32) * 255.0
    scale = 1.0 / (np.asarray(meta.std, np.float32) * 255.0)
    x = (x.astype(np.float32) - mean) * scale
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def make_batch(frames: ProposerFrames, idx: np.ndarray, meta: ProposerMetadata,
               rng: np.random.Generator | None, device: torch.device, crop: int | None = None,
               augmentation: dict | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images and CenterNet targets of frames ``idx`` (augmented windows of ``crop`` px when
    ``rng`` is given, else the whole frames); ``augmentation`` overrides
    ``augment_frame``'s keyword arguments (scale, aspect and camera randomisation)."""
    images, targets = [], []
    for i in idx:
        img, boxes = frames.images[i], frames.frame_boxes(i)
        if rng is not None:
            img, boxes = augment_frame(img, boxes, rng, out_size=crop, **(augmentation or {}))
        images.append(img)
        targets.append(centre_targets(boxes, img.shape[0], meta.stride))
    x = normalise_batch(np.stack(images), meta).to(device, non_blocking=True)
    t = {k: torch.from_numpy(np.stack([d[k] for d in targets])).to(device) for k in targets[0]}
    return x, t


def load_init(path: str | Path, stem: str) -> tuple[dict, list[dict], tuple[int, ...]]:
    """The weights of a run's ``best.pt`` to start from, the training stages that made them
    (empty for a checkpoint written before stages were recorded) and the widths of its net;
    raises ``DataError`` naming the file when it is missing, unreadable, not a proposer's or
    holds a net of another stem."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        kind, widths, weights = state.get("stem", "conv"), state["channels"], state["state_dict"]
    except Exception as exc:  # noqa: BLE001 (torch.load raises whatever the bytes provoke)
        raise DataError(f"{path}: not a proposer checkpoint ({str(exc).splitlines()[0]})"
                        ) from None
    if kind != stem:
        raise DataError(f"{path}: a {kind} net with channels {list(widths)}, not --stem {stem}")
    return weights, list(state.get("stages", [])), tuple(widths)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def train(net: ConeHeatmapNet, frames: ProposerFrames, meta: ProposerMetadata, epochs: int,
          batch_size: int = 16, lr: float = 3e-3, device: torch.device | str = "cpu",
          seed: int = 0, log: Path | None = None, max_steps: int | None = None,
          crop: int | None = None, augmentation: dict | None = None,
          freeze_bn: bool = False, budget_s: float | None = None,
          frame_weights: np.ndarray | None = None) -> list[float]:
    """AdamW (linear warm-up, cosine decay) on augmented ``crop``-px windows (None: whole frames;
    ``augmentation``: ``augment_frame`` keyword arguments); returns the mean loss of every
    epoch (or of every step when ``max_steps`` is set). ``freeze_bn`` keeps the BatchNorms in
    eval mode (a net imported from ONNX, whose BatchNorms hold the folded biases).
    ``frame_weights`` (one per frame, summing to 1) draws each epoch's frames with replacement
    in those proportions (``clip_weights``) instead of visiting every frame once.
    ``budget_s`` ends training after that many seconds (the decay follows the clock,
    ``export.train.Schedule``), after one step at least."""
    from export.onnx_import import freeze_batchnorm

    device = torch.device(device)
    net.to(device).train()
    if freeze_bn:
        freeze_batchnorm(net)
    rng = np.random.default_rng(seed)
    steps_per_epoch = max(1, len(frames) // batch_size)
    total = max_steps or epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = Schedule(opt, total, max(1, total // 20) if budget_s is None else 10, budget_s)
    sched = schedule.sched
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history, step, t0 = [], 0, time.perf_counter()
    while step < total and not (step and schedule.over):
        order = (rng.permutation(len(frames)) if frame_weights is None
                 else rng.choice(len(frames), len(frames), p=frame_weights))
        losses = []
        for k in range(steps_per_epoch):
            if step >= total or (step and schedule.over):
                break
            x, t = make_batch(frames, order[k * batch_size:(k + 1) * batch_size], meta, rng,
                              device, crop, augmentation)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = detection_loss(net(x), t)
            optimizer_step(loss, opt, scaler, sched)
            step += 1
            losses.append(float(loss.detach()))
            if max_steps:
                history.append(losses[-1])
        if not max_steps and losses:  # none: the budget ran out as the epoch began
            history.append(float(np.mean(losses)))
            log_epoch({"epoch": len(history), "loss": round(history[-1], 4),
                       "seconds": round(time.perf_counter() - t0, 1)}, log)
    net.eval()
    return history


def clip_weights(clips: np.ndarray, power: float) -> np.ndarray:
    """Sampling weights per frame that give each clip (the rendered frames count as one) a
    share of the training proportional to its frame count to the ``power``: 1 keeps every
    frame equal (a large clip dominates), 0 gives every clip the same share, 0.5 is between
    (temperature sampling). Sums to 1."""
    _names, inverse, counts = np.unique(clips, return_inverse=True, return_counts=True)
    weights = counts.astype(np.float64) ** (power - 1.0)
    per_frame = weights[inverse]
    return per_frame / per_frame.sum()


def log_epoch(record: dict, log: Path | None) -> None:
    """Print an epoch's record as one JSON line, and append it to ``log`` if given."""
    line = json.dumps(record)
    print(line, flush=True)
    if log is not None:
        with open(log, "a") as fh:
            fh.write(line + "\n")


def export_with_metadata(module: nn.Module, dummy: torch.Tensor, path: str | Path,
                         inputs: list[str], outputs: list[str], key: str, value: str,
                         producer: str, dynamic_axes: dict | None = None) -> Path:
    """TorchScript ONNX export (opset 17) with ``value`` under ``key`` in ``metadata_props``,
    checked by ``onnx.checker``; the file is written to ``path``."""
    import warnings

    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(module, (dummy,), str(path), input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic_axes, opset_version=17,
                          dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {key: value})
    proto.producer_name = producer
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def export_proposer(net: ConeHeatmapNet, meta: ProposerMetadata, path: str | Path) -> Path:
    """ONNX (opset 17, batch 1, any height and width that are multiples of 32) with ``meta``
    as JSON under ``cone_proposer``."""
    from node.propose.heatmap import METADATA_KEY

    wrapper = ExportWrapper(fold_input_normalisation(net.cpu().eval())).eval()
    dummy = torch.zeros(1, 3, meta.input_size, meta.input_size)
    extra = dict(meta.extra)
    extra["torch"] = torch.__version__
    value = ProposerMetadata(meta.input_size, meta.stride, meta.channel_order, meta.mean,
                             meta.std, extra).to_json()
    # Height and width are dynamic: the network is fully convolutional, and the node may feed
    # it only a band of rows (proposer.heatmap_rows) of the input-size frame.
    axes = {"image": {2: "height", 3: "width"}}
    axes.update({name: {2: "rows", 3: "cols"} for name in OUTPUTS})
    return export_with_metadata(wrapper, dummy, path, ["image"], list(OUTPUTS), METADATA_KEY,
                                value, "cone_node.export.proposer_train", axes)


def tune_threshold(model_path: Path, samples: list, thresholds: list[float],
                   max_candidates: int, budget: float = 2.5) -> tuple[float, list[dict]]:
    """Run the node's ``HeatmapProposer`` on validation frames (full size, from disk) at each
    threshold; pick the lowest threshold whose candidates stay within ``budget`` x the
    labelled cones (the highest recall that does)."""
    from node.evaluate.score import score_proposals
    from node.node_config import ProposerConfig
    from node.propose.heatmap import HeatmapProposer

    rows = []
    for th in sorted(thresholds):
        cfg = ProposerConfig(kind="heatmap", heatmap_model=str(model_path),
                             heatmap_threshold=th, max_candidates=max_candidates)
        rep = score_proposals(HeatmapProposer(cfg), samples)
        rows.append({"threshold": th, "recall_ge12": rep["recall_ge12"],
                     "per_cone": rep["candidates_per_labelled_cone"],
                     "per_frame": rep["candidates_per_frame"]})
    ok = [r for r in rows if (r["per_cone"] or 0) <= budget] or rows[-1:]
    return max(ok, key=lambda r: (r["recall_ge12"] or 0, r["threshold"]))["threshold"], rows


def validation_samples(root: Path, clips: list[str]) -> list:
    """Labelled full-size frames of the validation clips (training clips kept out of
    training for tuning)."""
    from export.data import clip_and_frame
    from node.evaluate.datasets import load_samples

    if not (root / "images").is_dir():
        return []
    return [s for s in load_samples(f"yolo:{root}") if clip_and_frame(s.image_path)[0] in clips]


def cached_frames(cache: Path, root: Path, heldout: list[str], input_size: int,
                  synth_frames: int, synth_seed: int) -> ProposerFrames:
    """The training frames from ``cache``, built and saved there when missing; a cache built
    for other held-out clips, size or synthetic frames is an error naming the file."""
    from export.proposer_data import build_proposer_frames, load_frames, save_frames

    if cache.is_file():
        frames = load_frames(cache)
        built = (frames.info.get("heldout"), frames.images.shape[1],
                 frames.info.get("synth_frames"), frames.info.get("synth_seed"))
        if built != (list(heldout), input_size, synth_frames, synth_seed):
            raise DataError(f"{cache}: built for other held-out clips, input size or synthetic "
                            f"frames (held-out, size, synthetic frames, seed: {built}); delete "
                            f"it or pass another --cache")
    else:
        frames = build_proposer_frames(root, heldout, input_size, synth_frames,
                                       synth_seed)
        save_frames(frames, cache)
    return frames


def trainer_parser(prog: str, doc: str, out_example: str, val_help: str
                   ) -> argparse.ArgumentParser:
    """The options the proposer and refiner trainers share: run folder, schedule, device, the
    real data and its held-out rules, the synthetic frames of the cache, the validation clips
    and where to copy the model."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--out", required=True, help=f"run folder, e.g. {out_example}")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--data", default="../shared/data/bgracing", help="YOLO root")
    parser.add_argument("--train-config", default="configs/train.yaml",
                        help="its data.heldout clips are never trained on")
    parser.add_argument("--synth-frames", type=int, default=300)
    parser.add_argument("--synth-seed", type=int, default=20000)
    parser.add_argument("--val-clips", nargs="*", default=["autox4"], help=val_help)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights' initialisation and of the training draws "
                        "(another seed: another retraining, to see the spread)")
    parser.add_argument("--model", default=None, help="also copy the ONNX here")
    return parser


def run_cli(run_fn, args: argparse.Namespace) -> int:
    """``run_fn(args)``, with data, value and file errors as one line on stderr and exit 2."""
    try:
        return run_fn(args)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def start_run(args: argparse.Namespace) -> tuple[Path, list[str], Path]:
    """Seed torch, set its threads, create the run folder with the resolved options in
    ``config.yaml``; returns that folder, the held-out clips and the data root."""
    import yaml

    from node.node_config import resolve_path

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=True))
    heldout = yaml.safe_load(resolve_path(args.train_config).read_text())["data"]["heldout"]
    return out, heldout, resolve_path(args.data)


def main(argv: list[str] | None = None) -> int:
    parser = trainer_parser("python -m export.proposer_train", __doc__, "runs/proposer",
                            "training clips kept out of training to tune the threshold")
    parser.add_argument("--cache", default=None,
                        help="frame cache (.npz), built when missing; default "
                        "cache/proposer_<input size>.npz")
    parser.add_argument("--stem", default="patch4", choices=STEMS,
                        help="patch4: full-resolution input, one 4x4 stride-4 convolution; "
                        "conv: half-resolution input, two stride-2 convolutions")
    parser.add_argument("--input-size", type=int, default=None,
                        help="square network input in px (default 640 for patch4, 320 for "
                        "conv)")
    parser.add_argument("--crop", type=int, default=None,
                        help="train on augmented windows this big (multiple of 16; 0 = whole "
                        "frames; default half the input size)")
    parser.add_argument("--init", default=None,
                        help="start from this run's best.pt (same stem and channels), or from "
                        "an exported proposer .onnx such as models/cone_proposer.onnx, e.g. "
                        "to train it longer at a lower --lr or on a team's own frames")
    parser.add_argument("--channels", type=int, nargs=4, default=None,
                        metavar=("C4", "C8", "C16", "C32"),
                        help=f"widths at strides 4, 8, 16 and 32 (default: the --init model's, "
                        f"else {' '.join(map(str, CHANNELS))}); wider than the --init model's, "
                        "it is widened first, computing what it computed (export.proposer_train"
                        ".widen), e.g. to give the bundled proposer room for new camera effects")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--camera", default="default", choices=list(FRAME_PROFILES),
                        help="camera randomisation profile of the training windows "
                             "(export.camera_aug.FRAME_PROFILES)")
    parser.add_argument("--scale-range", type=float, nargs=2, default=[0.6, 2.0],
                        metavar=("LO", "HI"),
                        help="zoom of the training windows, drawn log-uniformly (default: "
                             "0.6 2.0)")
    parser.add_argument("--clip-balance", type=float, default=1.0, metavar="POWER",
                        help="each clip's share of the training, as its frame count to this "
                        "power: 1 (default) every frame equally, 0 every clip equally, 0.5 "
                        "between (a camera with many frames then dominates less)")
    parser.add_argument("--max-candidates", type=int, default=None,
                        help="per-frame cap while tuning the threshold (default: the node's "
                        "proposer.max_candidates in configs/node.yaml)")
    return run_cli(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    lo, hi = args.scale_range
    if not 0 < lo <= hi:
        raise DataError(f"--scale-range {lo:g} {hi:g}: need 0 < LO <= HI")
    if not 0 <= args.clip_balance <= 1:
        raise DataError(f"--clip-balance {args.clip_balance:g}: need 0 <= POWER <= 1")
    if args.input_size is None:
        args.input_size = 640 if args.stem.startswith("patch4") else 320
    if args.crop is None:
        args.crop = args.input_size // 2
    if args.cache is None:
        args.cache = f"cache/proposer_{args.input_size}.npz"
    if args.max_candidates is None:
        from node.node_config import load_node_config

        args.max_candidates = load_node_config().proposer.max_candidates
    out, heldout, root = start_run(args)
    frames = cached_frames(Path(args.cache), root, heldout, args.input_size, args.synth_frames,
                           args.synth_seed)
    train_frames = frames.subset(~np.isin(frames.clips, args.val_clips))
    device = pick_device(args.device)
    meta = stem_metadata(args.stem, args.input_size)
    print(f"training on {len(train_frames)} frames ({device}); validation clips "
          f"{args.val_clips}", flush=True)
    channels = tuple(args.channels) if args.channels else None
    stages: list[dict] = []
    imported = False
    if args.init and str(args.init).endswith(".onnx"):
        from node.propose.heatmap import open_session

        net, imported = import_proposer(args.init, args.stem), True
        stages = list(open_session(args.init)[1].extra.get("stages", []))
    elif args.init:
        weights, stages, init_channels = load_init(args.init, args.stem)
        net = ConeHeatmapNet(init_channels, stem=args.stem)
        imported = "stem.0.bias" in weights  # a net that was imported from ONNX before
        if imported:
            net = fold_input_normalisation(net)
        net.load_state_dict(weights)
    else:
        net = ConeHeatmapNet(channels or CHANNELS, stem=args.stem)
    if channels and channels != net_channels(net):
        if any(a > b for a, b in zip(net_channels(net), channels)):
            raise DataError(f"--channels {' '.join(map(str, channels))}: narrower than the "
                            f"--init model's {list(net_channels(net))}")
        net = widen(net, channels)
    channels = net_channels(net)
    # Each run is one stage (warm-up and cosine decay); a model trained further with --init
    # carries the stages before it, so its metadata tells the whole schedule.
    stages.append({"epochs": args.epochs, "lr": args.lr, "synth_frames": args.synth_frames,
                   "init": args.init, "camera": args.camera,
                   "scale_range": list(args.scale_range), "channels": list(channels),
                   "seed": args.seed, "clip_balance": args.clip_balance})
    (out / "history.jsonl").write_text("")
    if args.crop % 16 or args.crop > args.input_size:
        raise DataError(f"--crop {args.crop}: must be a multiple of 16 up to --input-size")
    camera = FRAME_PROFILES[args.camera]
    train(net, train_frames, meta, args.epochs, args.batch_size, args.lr, device,
          seed=args.seed, log=out / "history.jsonl", crop=args.crop or None, freeze_bn=imported,
          augmentation={"camera": camera, "scale_range": tuple(args.scale_range)},
          frame_weights=(None if args.clip_balance == 1
                         else clip_weights(train_frames.clips, args.clip_balance)))
    torch.save({"state_dict": net.cpu().state_dict(), "channels": list(channels),
                "stem": args.stem, "input_size": args.input_size, "stride": STRIDE,
                "stages": stages}, out / "best.pt")
    clips = sorted(set(train_frames.clips.tolist()))
    meta.extra = {"arch": "cone_heatmap_net", "channels": list(channels), "stem": args.stem,
                  "training_clips": clips, "validation_clips": list(args.val_clips),
                  "heldout": list(heldout), "synth_seeds": [args.synth_seed,
                                                            args.synth_seed + args.synth_frames],
                  "epochs": args.epochs, "init": args.init, "stages": stages}
    onnx_path = export_proposer(net, meta, out / "cone_proposer.onnx")
    val = validation_samples(root, list(args.val_clips))
    if val:
        best, rows = tune_threshold(onnx_path, val, [0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5],
                                    args.max_candidates)
        for r in rows:
            print(json.dumps(r))
        meta.extra["threshold"] = best
        meta.extra["threshold_tuning"] = rows
        onnx_path = export_proposer(net, meta, onnx_path)
        print(f"threshold tuned on {args.val_clips}: {best}")
    return finish_export(onnx_path, args.model)


def finish_export(onnx_path: Path, model: str | None) -> int:
    """Copy the exported ONNX to ``model`` (the ``--model`` option) if given, and say so;
    the trainers' exit status."""
    if model:
        shutil.copyfile(onnx_path, model)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e3:.0f} KB)"
          + (f", copied to {model}" if model else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
