"""Colour-safe batch augmentation with torchvision.transforms.v2: RandAugment, MixUp, CutMix.

The label of a crop is its cone's colour, so no augmentation may turn one colour into another.
torchvision's ``RandAugment`` (Cubuk et al., 2019) draws from 14 ops. Three of them act on
colour in a way that can change the class and are left out:

* ``Solarize`` inverts every pixel above a threshold: a yellow cone becomes blue.
* ``Equalize`` and ``AutoContrast`` rescale R, G and B *independently*, so the ratio between
  channels (the hue) of a cone on grey asphalt shifts.

The kept ops are geometric, or change brightness/contrast/saturation/sharpness/bit depth
equally on all channels (``Color`` scales saturation around the grey value, hue unchanged).
Their strength is capped at ``MAX_STRENGTH`` of the full range: ``Brightness`` beyond about
+36 % clips the red channel of a bright orange cone while green keeps rising, which turns it
yellow (measured on orange patches: the first failing magnitude is 12 of 30).
``tests/export/test_train.py`` proves on coloured patches that each kept op preserves the
dominant hue class. MixUp (Zhang et al., 2018) and CutMix (Yun et al., 2019) mix whole batches
and return soft targets, so they stay label-consistent by construction.
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

SAFE_OPS: tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize")
UNSAFE_OPS: dict[str, str] = {
    "Solarize": "inverts bright pixels (yellow turns blue)",
    "Equalize": "equalises R, G and B separately, which shifts hue",
    "AutoContrast": "stretches R, G and B separately, which shifts hue",
}


MAX_STRENGTH = 0.3
"""Largest ``magnitude / (num_magnitude_bins - 1)``: 9 of 30 (Brightness ±27 %)."""


def check_ops(ops: Sequence[str]) -> list[str]:
    """Validate a RandAugment op list: every op must be one of ``SAFE_OPS``.

    Raises:
        ValueError: an unknown op, a colour-changing op, or an empty list.
    """
    ops = list(ops)
    if not ops:
        raise ValueError("empty op list; use randaugment.enabled=false to switch it off")
    for op in ops:
        if op in UNSAFE_OPS:
            raise ValueError(f"{op} is not allowed: it {UNSAFE_OPS[op]}")
        if op not in SAFE_OPS:
            raise ValueError(f"unknown op {op!r}; choose from {list(SAFE_OPS)}")
    return ops


class ColourSafeRandAugment(v2.RandAugment):
    """torchvision's ``RandAugment`` restricted to colour-preserving ops.

    Args:
        ops: the op names to draw from (a subset of ``SAFE_OPS``).
        num_ops, magnitude, num_magnitude_bins: as in ``v2.RandAugment``.
        fill: grey used where geometric ops uncover the border (the crop policy's pad value).
    """

    def __init__(self, ops: Sequence[str] = SAFE_OPS, num_ops: int = 2, magnitude: int = 7,
                 num_magnitude_bins: int = 31, fill: int = 114) -> None:
        top = int(MAX_STRENGTH * (num_magnitude_bins - 1))
        if not 0 <= magnitude <= top:
            raise ValueError(f"magnitude must be in [0, {top}] for {num_magnitude_bins} bins "
                             f"(stronger Brightness turns orange cones yellow), got {magnitude}")
        super().__init__(num_ops=num_ops, magnitude=magnitude,
                         num_magnitude_bins=num_magnitude_bins, fill=fill)
        kept = check_ops(ops)
        # The parent draws from ``self._AUGMENTATION_SPACE``; an instance attribute narrows it.
        self._AUGMENTATION_SPACE = {k: v for k, v in v2.RandAugment._AUGMENTATION_SPACE.items()
                                    if k in kept}


class BatchAugmenter:
    """Augments one training batch: flip, RandAugment, normalise, then MixUp or CutMix.

    Works on uint8 RGB N×3×H×W tensors on any device; RandAugment draws one op per sub-batch
    of ``sub_batch`` crops (v2 transforms apply the same op to a whole tensor batch), so a
    batch still sees many different ops.

    Args:
        cfg: the ``augment`` section of the training config.
        num_classes: width of the soft targets.
        mean, std: normalisation in RGB order on a 0..1 scale (from the model metadata).
        pad_value: grey for pixels uncovered by geometric ops.
        blur_x_scale: horizontal stretch of the camera blur, ``1 / min_aspect`` of the crop
            policy (a narrower window stretches a frame's blur across a thin cone's crop).
    """

    def __init__(self, cfg, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 pad_value: int = 114, blur_x_scale: float = 1.0) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.pad_value = pad_value
        self.blur_x_scale = blur_x_scale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        ra = cfg.randaugment
        self.randaugment = (ColourSafeRandAugment(ra.ops, ra.num_ops, ra.magnitude,
                                                  ra.num_magnitude_bins, fill=pad_value)
                            if ra.enabled else None)
        mixers = []
        if cfg.mixup.enabled:
            mixers.append(v2.MixUp(alpha=cfg.mixup.alpha, num_classes=num_classes))
        if cfg.cutmix.enabled:
            mixers.append(v2.CutMix(alpha=cfg.cutmix.alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 RGB images and int labels → normalised float images and soft targets."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 N×3×H×W images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        camera = getattr(self.cfg, "camera", None)
        if camera is not None and camera.enabled:
            images = other_cameras(images, camera.prob, tuple(camera.aspect), self.pad_value,
                                   getattr(camera, "profile", "crop"), self.blur_x_scale)
        if self.cfg.hflip:  # cones are left-right symmetric
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
        if self.randaugment is not None:
            step = self.cfg.randaugment.sub_batch
            images = torch.cat([self.randaugment(images[i:i + step])
                                for i in range(0, images.shape[0], step)])
        x = normalize_tensor(images, self.mean, self.std)
        targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        if self.mix is not None and images.shape[0] > 1 and \
                torch.rand(()).item() < self.cfg.mix_prob:
            x, targets = self.mix(x, labels)
        return x, targets


def other_cameras(images: torch.Tensor, prob: float, aspect: tuple[float, float],
                  pad_value: int = 114, profile: str = "crop",
                  blur_x_scale: float = 1.0) -> torch.Tensor:
    """Each uint8 RGB crop, with probability ``prob``, as another camera would have seen it:
    a horizontal stretch drawn from ``aspect`` (centre-cropped, or padded with ``pad_value``
    where it narrows) and ``export.camera_aug.random_camera`` (exposure, white balance, blur,
    noise, lens drops, JPEG) with the named ``export.camera_aug.PROFILES`` entry: ``crop``
    sizes blur and drops to the crop, ``default`` as on a whole frame (so a 32 px crop gets at
    most half the frame's blur); ``blur_x_scale`` stretches the blur horizontally (crops
    from windows narrower than the square). The random draws come from torch's generator, so a
    seeded run repeats."""
    import cv2
    import numpy as np

    from .camera_aug import PROFILES, random_aspect, random_camera

    look = PROFILES[profile]

    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    rng = np.random.default_rng(seed)
    arr = images.permute(0, 2, 3, 1).cpu().numpy().copy()
    n, h, w = arr.shape[:3]
    for i in np.flatnonzero(rng.random(n) < prob):
        crop = arr[i]
        a = random_aspect(rng, *aspect)
        new_w = max(1, round(w * a))
        if new_w != w:
            wide = cv2.resize(crop, (new_w, h), interpolation=cv2.INTER_LINEAR)
            if new_w > w:
                x0 = (new_w - w) // 2
                crop = wide[:, x0:x0 + w]
            else:
                crop = np.full_like(crop, pad_value)
                x0 = (w - new_w) // 2
                crop[:, x0:x0 + new_w] = wide
        arr[i] = random_camera(np.ascontiguousarray(crop), rng, look, blur_x_scale)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(images.device)


def normalize_tensor(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                     ) -> torch.Tensor:
    """uint8 RGB N×3×H×W → float32 ``(x / 255 - mean) / std``.

    The torch twin of ``node.infer.preprocess.normalize`` (which runs on numpy BGR crops at runtime);
    a test checks that both give the same numbers.
    """
    mean = mean.to(images.device).view(1, 3, 1, 1)
    std = std.to(images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std
