"""Typed training configuration (``configs/train.yaml``), loaded with ``node.config``.

YAML defaults first, then ``key.path=value`` overrides from the command line, into these
dataclasses; every value is checked against its type and bounds and an error names the file
and the dotted key. The YAML documents every key in place; the defaults here match it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from node.classes import CONE_CLASSES
from node.config import ConfigError, load_config, spec
from node.infer.crop import CropPolicy

__all__ = ["ConfigError", "TrainConfig", "load_train_config"]

_CROP = CropPolicy()


@dataclass
class ModelConfig:
    arch: str = "se_resnet_slim32"
    input_size: int | None = spec(None, min=8, max=1024)


@dataclass
class CropConfig:
    context: float = spec(_CROP.context, min=0.0, max=2.0)
    pad: str = spec(_CROP.pad, choices=("constant", "replicate"))
    pad_value: int = spec(_CROP.pad_value, min=0, max=255)
    min_side: float = spec(_CROP.min_side, min=1.0)
    min_aspect: float = spec(_CROP.min_aspect, min=0.05, max=1.0)

    def policy(self) -> CropPolicy:
        return CropPolicy(self.context, self.pad, self.pad_value, self.min_side, self.min_aspect)


@dataclass
class JitterConfig:
    shift: float = spec(0.15, min=0.0, max=1.0)
    scale_min: float = spec(0.8, min=0.1, max=1.0)
    scale_max: float = spec(1.25, min=1.0, max=10.0)
    aspect: float = spec(0.15, min=0.0, max=1.0)


@dataclass
class BackgroundConfig:
    per_frame: int = spec(8, min=0)
    nose_per_frame: int = spec(3, min=0)
    colour_blobs_per_frame: int = spec(3, min=0)
    proposals_per_frame: int = spec(0, min=0)
    proposer_model: str = "models/cone_proposer.onnx"
    proposal_copies: int = spec(1, min=1)
    gap: float = spec(2.0, min=1.0)
    margin_px: float = spec(12.0, min=0.0)
    horizon_band: list[float] = field(default_factory=lambda: [0.25, 0.42])
    nose_region: list[float] = field(default_factory=lambda: [0.15, 0.6, 0.85, 1.0])
    max_tries: int = spec(200, min=1)


@dataclass
class SynthConfig:
    enabled: bool = True
    frames: int = spec(200, min=0)
    width: int = spec(640, min=64)
    height: int = spec(640, min=64)
    seed: int = 1000
    copies_per_box: int = spec(2, min=1)
    per_class: dict = field(default_factory=lambda: {
        "orange_cone": 2000, "large_orange_cone": 600, "blue_cone": 300, "yellow_cone": 300})


@dataclass
class DataConfig:
    cache: str | None = None
    root: str = "../shared/data/bgracing"
    heldout: list[str] = field(default_factory=lambda: ["accel", "autox2", "skidpad:20-37"])
    duplicate_threshold: float = spec(5.0, min=0.0)
    copies_per_class: dict = field(default_factory=lambda: {
        "blue_cone": 2, "yellow_cone": 2, "orange_cone": 6, "large_orange_cone": 3})
    crowd_copies: int = spec(0, min=0, max=8)
    normalise: float | None = spec(None, min=0.0, max=1.0)
    seed: int = 0
    crop: CropConfig = field(default_factory=CropConfig)
    jitter: JitterConfig = field(default_factory=JitterConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class RandAugmentConfig:
    enabled: bool = True
    num_ops: int = spec(2, min=0, max=6)
    magnitude: int = spec(7, min=0)
    num_magnitude_bins: int = spec(31, min=2)
    sub_batch: int = spec(16, min=1)
    ops: list[str] = field(default_factory=lambda: [
        "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
        "Color", "Contrast", "Sharpness", "Posterize"])


@dataclass
class MixConfig:
    enabled: bool = True
    alpha: float = spec(0.2, min=0.0)


@dataclass
class CameraAugConfig:
    """Camera domain randomisation of every crop (``export.camera_aug``)."""

    enabled: bool = True
    prob: float = spec(0.8, min=0.0, max=1.0)
    aspect: list[float] = field(default_factory=lambda: [1.0, 1.0])
    profile: str = "crop"

    def __post_init__(self) -> None:
        from export.camera_aug import PROFILES

        names = [n for n, p in PROFILES.items() if p is not None]
        if self.profile not in names:
            raise ValueError(f"profile {self.profile!r} must be one of {names}")
        a = self.aspect
        if len(a) != 2 or not 0.2 <= a[0] <= a[1] <= 5.0:
            raise ValueError(f"aspect {a} must be [low, high] with 0.2 <= low <= high <= 5")


@dataclass
class AugmentConfig:
    hflip: bool = True
    camera: CameraAugConfig = field(default_factory=CameraAugConfig)
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    mixup: MixConfig = field(default_factory=MixConfig)
    cutmix: MixConfig = field(default_factory=lambda: MixConfig(True, 1.0))
    mix_prob: float = spec(0.5, min=0.0, max=1.0)


@dataclass
class OptimConfig:
    name: str = spec("adamw", choices=("adamw", "sgd"))
    lr: float = spec(3e-3, min=0.0)
    weight_decay: float = spec(0.05, min=0.0)
    momentum: float = spec(0.9, min=0.0, max=1.0)
    epochs: int = spec(12, min=1)
    samples_per_epoch: int = spec(16384, min=1)
    batch_size: int = spec(128, min=1)
    warmup_epochs: float = spec(1.0, min=0.0)
    label_smoothing: float = spec(0.05, min=0.0, max=0.5)
    balance: str = spec("sampler", choices=("sampler", "weights", "none"))
    balance_power: float = spec(0.5, min=0.0, max=1.0)


@dataclass
class DistillConfig:
    teacher: str | None = None
    weight: float = spec(0.7, min=0.0, max=1.0)
    temperature: float = spec(2.0, min=0.1, max=20.0)


@dataclass
class RunConfig:
    out: str = "runs/train"
    seed: int = 0
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))
    threads: int = spec(2, min=0)
    amp: bool = True
    progress: bool = True
    eval_every: int = spec(1, min=1)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.optim.balance == "sampler" and self.optim.balance_power == 0.0:
            raise ValueError("optim.balance_power 0 with balance=sampler samples uniformly; "
                             "use balance=none instead")
        if self.data.jitter.scale_min > self.data.jitter.scale_max:
            raise ValueError("data.jitter.scale_min must not exceed scale_max")
        band = self.data.background.horizon_band
        if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
            raise ValueError(f"data.background.horizon_band must be [top, bottom] fractions of "
                             f"the frame height, got {band}")
        for key, table in (("data.synth.per_class", self.data.synth.per_class),
                           ("data.copies_per_class", self.data.copies_per_class)):
            for name, count in table.items():
                if name not in CONE_CLASSES or isinstance(count, bool) or \
                        not isinstance(count, int) or count < 0:
                    raise ValueError(f"{key}: {name}: {count!r}; keys must be cone classes "
                                     f"{list(CONE_CLASSES)} and values integers >= 0")
        region = self.data.background.nose_region
        if len(region) != 4 or not (0 <= region[0] < region[2] <= 1 and
                                    0 <= region[1] < region[3] <= 1):
            raise ValueError(f"data.background.nose_region must be [x1, y1, x2, y2] fractions, "
                             f"got {region}")


def load_train_config(path: str | Path | None, overrides: list[str] | None = None
                      ) -> TrainConfig:
    """``TrainConfig`` from YAML plus ``key.path=value`` overrides; raises ``ConfigError``."""
    cfg = load_config(TrainConfig, path, overrides)
    from export.model import REGISTRY  # local: torch is only needed once a config is built

    if cfg.model.arch not in REGISTRY:
        raise ConfigError(f"{path or '<defaults>'}: model.arch: unknown model "
                          f"{cfg.model.arch!r}; registered: {', '.join(sorted(REGISTRY))}")
    if cfg.model.input_size is None:
        cfg.model.input_size = REGISTRY[cfg.model.arch].input_size
    from export.augment import (  # validates the RandAugment op list against SAFE_OPS
        MAX_STRENGTH,
        check_ops,
    )

    try:
        check_ops(cfg.augment.randaugment.ops)
    except ValueError as exc:
        raise ConfigError(f"{path or '<defaults>'}: augment.randaugment.ops: {exc}") from None
    ra = cfg.augment.randaugment
    if ra.magnitude > MAX_STRENGTH * (ra.num_magnitude_bins - 1):
        raise ConfigError(f"{path or '<defaults>'}: augment.randaugment.magnitude: {ra.magnitude}"
                          f" exceeds {int(MAX_STRENGTH * (ra.num_magnitude_bins - 1))} (stronger "
                          f"Brightness turns orange cones yellow)")
    return cfg
