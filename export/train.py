"""Train the cone classifier: ``python -m export.train --config configs/train.yaml [k=v ...]``.

Runs on the CPU by default; on CUDA it uses automatic mixed precision (``torch.autocast`` +
``GradScaler``), and under ``torchrun --nproc_per_node=N`` it trains data-parallel (DDP; each
rank takes its share of every epoch's draw through ``DistributedSampler``; only rank 0 logs and
saves). All crops live in memory as uint8 tensors (on the GPU when there is one) and are
augmented batch-wise (``export.augment``), so there is no data-loader worker.

Writes ``<out>/best.pt`` (best held-out balanced accuracy), ``<out>/last.pt``,
``<out>/config.yaml`` (resolved config) and ``<out>/history.jsonl`` (one record per epoch).
Checkpoints hold only tensors and primitives, so ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.augment import BatchAugmenter, normalize_tensor
from export.checkpoint import (  # noqa: F401 (load_checkpoint and metadata_from_checkpoint: re-exported)
    CheckpointError,
    load_checkpoint,
    metadata_from_checkpoint,
)
from export.data import CropSet, DataError, build_cropset, crops_to_tensor, load_cache
from export.evaluate import evaluate_crops, format_metrics
from export.model import create_model
from export.train_config import TrainConfig, load_train_config
from node.classes import CLASSIFIER_CLASSES
from node.config import ConfigError, dump_yaml, to_dict
from node.infer.metadata import ModelMetadata

_DEFAULT_META = ModelMetadata(classes=list(CLASSIFIER_CLASSES), input_size=32)
MEAN, STD = list(_DEFAULT_META.mean), list(_DEFAULT_META.std)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun process group when ``LOCAL_RANK`` is set, else single process."""
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    want = cfg.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device: cuda requested but no CUDA device is available")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", dist.local_rank)


def build_crops(cfg: TrainConfig) -> CropSet:
    """The crop cache when ``data.cache`` is set, else crops built from the real data."""
    if cfg.data.cache:
        crops = load_cache(cfg.data.cache)
        built = crops.info.get("normalise")  # caches from before the key: frames as stored
        if built != cfg.data.normalise:
            raise DataError(f"{cfg.data.cache}: crops were built with data.normalise={built} "
                            f"but the config has {cfg.data.normalise}; set it or rebuild the "
                            f"cache")
    else:
        crops = build_cropset(cfg.data, cfg.model.input_size)
    if crops.input_size != cfg.model.input_size:
        raise DataError(f"{cfg.data.cache}: crops are {crops.input_size} px but model.input_size "
                        f"is {cfg.model.input_size}; rebuild the cache at that size")
    return crops


def build_tensors(crops: CropSet, cfg: TrainConfig, device: torch.device) -> dict:
    """Training and held-out crops as uint8 RGB tensors on ``device`` (synthetic crops join the
    training set when ``data.synth.enabled``)."""
    train_x, train_y = crops.train_x, crops.train_y
    if cfg.data.synth.enabled and len(crops.synth_x):
        train_x = np.concatenate([train_x, crops.synth_x])
        train_y = np.concatenate([train_y, crops.synth_y])
    if len(train_y) == 0:
        raise DataError("no training crops; check data.root, data.heldout or data.cache")
    return {"x": crops_to_tensor(train_x, device), "y": torch.from_numpy(train_y).to(device),
            "val_x": crops.val_x, "val_y": crops.val_y}


def build_model(cfg: TrainConfig, classes: list[str], device: torch.device, dist: Dist
                ) -> nn.Module:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.arch, len(classes)).to(device)
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    return model


def class_weights(labels: torch.Tensor, num_classes: int, power: float) -> torch.Tensor:
    """``count^-power`` per class, scaled to mean 1 over the classes present."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.clamp(min=1) ** -power, torch.zeros_like(counts))
    return w * (counts > 0).sum() / w.sum()


def epoch_indices(labels: torch.Tensor, cfg: TrainConfig, epoch: int, dist: Dist
                  ) -> torch.Tensor:
    """This rank's sample indices for one epoch. Every rank draws the same global list from
    (seed, epoch); ``DistributedSampler`` then hands each rank its share."""
    from torch.utils.data import DistributedSampler

    g = torch.Generator().manual_seed(cfg.run.seed * 100003 + epoch)
    n = cfg.optim.samples_per_epoch
    y = labels.cpu()
    if cfg.optim.balance == "sampler":
        w = class_weights(y, int(y.max()) + 1, cfg.optim.balance_power)[y]
        idx = torch.multinomial(w, n, replacement=True, generator=g)
    else:
        idx = torch.randperm(len(y), generator=g).repeat(math.ceil(n / len(y)))[:n]
    sampler = DistributedSampler(range(n), num_replicas=dist.world, rank=dist.rank,
                                 shuffle=False, drop_last=True)
    return idx[list(sampler)]


class Schedule:
    """Linear warm-up over ``warm`` steps, then cosine decay to zero over ``total`` steps or,
    with ``budget_s``, over whichever ends first: the steps or that many wall-clock seconds
    from now. ``sched`` is the ``LambdaLR`` to step; a deadline-aware loop stops when
    ``over`` turns true. Shared by the three trainers and ``export.finetune``."""

    def __init__(self, opt, total: int, warm: int, budget_s: float | None = None) -> None:
        self.t0, self.total, self.warm, self.budget_s = time.perf_counter(), total, warm, budget_s
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, self.factor)

    def progress(self, step: int) -> float:
        done = step / max(1, self.total)
        if self.budget_s is not None:
            done = max(done, (time.perf_counter() - self.t0) / max(self.budget_s, 1e-9))
        return min(1.0, done)

    def factor(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.warm)) * 0.5 * (
            1 + math.cos(math.pi * self.progress(step)))

    @property
    def over(self) -> bool:
        return self.progress(self.sched.last_epoch) >= 1.0


def build_optimizer(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int,
                    budget_s: float | None = None):
    """AdamW or SGD (no weight decay on BatchNorms and biases) and its schedule: warm-up then
    cosine to zero over the configured epochs or, with ``budget_s``, over that many seconds
    (``Schedule``)."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BN and biases
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=o.lr)
    else:
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    total = max(1, o.epochs * steps_per_epoch)
    warm = int(o.warmup_epochs * steps_per_epoch)
    if budget_s is not None:
        return opt, Schedule(opt, total, warm, budget_s).sched

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def build_loss(cfg: TrainConfig, labels: torch.Tensor, num_classes: int) -> nn.Module:
    weight = (class_weights(labels, num_classes, cfg.optim.balance_power)
              if cfg.optim.balance == "weights" else None)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.optim.label_smoothing)


def make_predict_fn(model: nn.Module, device: torch.device, batch: int = 512):
    """``predict(crops_bgr_uint8) -> logits`` (numpy) for ``evaluate_crops``."""
    mean, std = torch.tensor(MEAN), torch.tensor(STD)

    @torch.no_grad()
    def predict(crops: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(crops), batch):
            x = normalize_tensor(crops_to_tensor(crops[i:i + batch], device), mean, std)
            out.append(model(x).float().cpu().numpy())
        model.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return predict


def checkpoint_dict(model: nn.Module, cfg: TrainConfig, crops: CropSet, epoch: int,
                    metrics: dict) -> dict:
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "arch": cfg.model.arch, "classes": list(crops.classes),
            "input_size": int(crops.input_size), "mean": MEAN, "std": STD,
            "channel_order": "RGB", "crop": dict(crops.crop), "epoch": epoch,
            "metrics": metrics, "config": to_dict(cfg)}


def optimizer_step(loss: torch.Tensor, opt, scaler, sched) -> None:
    """One update: backward through the AMP grad scaler (disabled on the CPU), optimiser step,
    scheduler step. Shared with ``export.proposer_train``."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()


def train_one_epoch(model, data, augmenter, loss_fn, opt, sched, scaler, cfg, epoch, dist,
                    device, freeze_bn: bool = False, stop=None, teacher=None) -> float:
    """One epoch's draw of crops; ``freeze_bn`` keeps the BatchNorms in eval mode (a model
    imported from ONNX, ``export.checkpoint.import_classifier``); ``stop()`` true ends the
    epoch early (after one step at least: a deadline); with a ``teacher``, ``loss_fn`` is an
    ``export.distill.DistillLoss`` and gets the teacher's logits of the same batch."""
    from tqdm import tqdm

    model.train()
    if freeze_bn:
        from export.onnx_import import freeze_batchnorm

        freeze_batchnorm(model)
    idx = epoch_indices(data["y"], cfg, epoch, dist).to(device)
    bs = cfg.optim.batch_size
    steps = range(0, len(idx) - bs + 1, bs) if len(idx) >= bs else range(1)
    amp = cfg.run.amp and device.type == "cuda"
    total, count = 0.0, 0
    bar = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", leave=False,
               disable=not (cfg.run.progress and dist.main), file=sys.stderr)
    for start in bar:
        b = idx[start:start + bs]
        x, target = augmenter(data["x"][b], data["y"][b])
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            if teacher is None:
                loss = loss_fn(model(x), target)
            else:
                with torch.no_grad():
                    soft = teacher(x)
                loss = loss_fn(model(x), target, soft)
        optimizer_step(loss, opt, scaler, sched)
        total += loss.item()
        count += 1
        bar.set_postfix(loss=f"{total / count:.3f}")
        if stop is not None and stop():
            break
    return total / max(count, 1)


def train(cfg: TrainConfig) -> dict:
    """Run one training; returns the last epoch's held-out metrics plus run facts."""
    dist = setup_distributed()
    device = build_device(cfg, dist)
    teacher = None
    if cfg.distill.teacher:  # checked before the crops are built (minutes)
        from export.distill import load_teacher
        from node.node_config import resolve_path

        teacher = load_teacher(resolve_path(cfg.distill.teacher), list(CLASSIFIER_CLASSES),
                               cfg.model.input_size, MEAN, STD, device)
    crops = build_crops(cfg)
    data = build_tensors(crops, cfg, device)
    num_classes = len(crops.classes)
    model = build_model(cfg, crops.classes, device, dist)
    seed_everything(cfg.run.seed * 1000 + dist.rank)  # augmentation differs per rank
    augmenter = BatchAugmenter(cfg.augment, num_classes, MEAN, STD, crops.crop["pad_value"],
                               1.0 / float(crops.crop.get("min_aspect", 1.0)))
    steps = max(1, cfg.optim.samples_per_epoch // (cfg.optim.batch_size * dist.world))
    opt, sched = build_optimizer(cfg, model, steps)
    loss_fn = build_loss(cfg, data["y"], num_classes).to(device)
    if teacher is not None:
        from export.distill import DistillLoss

        if list(crops.classes) != list(CLASSIFIER_CLASSES):
            raise ValueError(f"distill.teacher: the crops' classes {list(crops.classes)} "
                             f"differ from the teacher's {list(CLASSIFIER_CLASSES)}")
        loss_fn = DistillLoss(loss_fn, cfg.distill.weight, cfg.distill.temperature)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.amp and device.type == "cuda")
    out = Path(cfg.run.out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
        (out / "history.jsonl").write_text("")
        print(f"train {len(data['y'])} crops {crops.counts('train')} + synthetic "
              f"{crops.counts('synth') if cfg.data.synth.enabled else 'off'}; held-out "
              f"{len(crops.val_y)} crops; {cfg.model.arch} on {device} x{dist.world}")
    predict = make_predict_fn(model.module if dist.world > 1 else model, device)
    best, metrics, t0 = -1.0, {}, time.perf_counter()
    for epoch in range(cfg.optim.epochs):
        loss = train_one_epoch(model, data, augmenter, loss_fn, opt, sched, scaler, cfg, epoch,
                               dist, device, teacher=teacher)
        last = epoch + 1 == cfg.optim.epochs
        if not dist.main or not (last or (epoch + 1) % cfg.run.eval_every == 0):
            continue
        metrics = evaluate_crops(predict, crops.val_x, crops.val_y, crops.classes)
        metrics.update(train_loss=loss, epoch=epoch + 1, wall_s=time.perf_counter() - t0)
        print(f"epoch {epoch + 1}/{cfg.optim.epochs} loss {loss:.4f} "
              f"{format_metrics(metrics)} ({metrics['wall_s']:.0f} s)", flush=True)
        with open(out / "history.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        ckpt = checkpoint_dict(model, cfg, crops, epoch + 1, metrics)
        torch.save(ckpt, out / "last.pt")
        if metrics["balanced_accuracy"] > best:
            best = metrics["balanced_accuracy"]
            torch.save(ckpt, out / "best.pt")
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.train",
                                     description="Train the cone classifier.")
    parser.add_argument("--config", default="configs/train.yaml")
    parser.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, DataError, CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
