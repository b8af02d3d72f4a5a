"""Knowledge distillation for the classifier (``distill:`` in configs/train.yaml).

A trained classifier, the teacher (an exported FP32 ONNX such as
``models/cone_classifier.onnx``, or an ``export.train`` checkpoint), labels every augmented
training batch as the student sees it; the student learns from a blend of the batch's own
targets and the teacher's softened class probabilities (Hinton, Vinyals and Dean,
"Distilling the Knowledge in a Neural Network", 2015)::

    loss = (1 - weight) * CE(student, target) + weight * T² * KL(p_teacher^T ‖ p_student^T)

where ``p^T = softmax(logits / T)``. It was built to teach a cheaper student architecture,
for a 2-core CPU, the teacher's accuracy (``docs/experiments.md`` has how far that went). The
teacher must take the student's crops: the
same classes in the same order, the same input size, normalisation and channel order. It
must not have been trained on the student's held-out clips (the bundled models hold out the
same clips as ``configs/train.yaml``).
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from export.checkpoint import CheckpointError, import_classifier, load_checkpoint


def load_teacher(path: str | Path, classes: list[str], input_size: int, mean: list[float],
                 std: list[float], device: torch.device) -> nn.Module:
    """The teacher classifier on ``device``, in eval mode, with no gradients.

    Raises:
        ValueError: the file is missing or not a classifier, or its classes, input size,
            normalisation or channel order differ from the student's; names the file and
            ``distill.teacher``.
    """
    path = Path(path)
    try:
        if path.suffix == ".onnx":
            model, meta = import_classifier(path)
            facts = (list(meta.classes), int(meta.input_size), list(meta.mean),
                     list(meta.std), meta.channel_order)
        else:
            model, ckpt = load_checkpoint(path)
            facts = (list(ckpt["classes"]), int(ckpt["input_size"]), list(ckpt["mean"]),
                     list(ckpt["std"]), ckpt.get("channel_order", "RGB"))
    except CheckpointError as exc:
        raise ValueError(f"distill.teacher: {exc}") from None
    want = (list(classes), int(input_size), list(mean), list(std), "RGB")
    names = ("classes", "input size", "mean", "std", "channel order")
    for name, got, expected in zip(names, facts, want, strict=True):
        if got != expected:
            raise ValueError(f"distill.teacher: {path}: {name} {got} differs from the "
                             f"student's {expected}")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class DistillLoss(nn.Module):
    """``(1 - weight) * base(student, target) + weight * T² * KL(teacher ‖ student)``, the KL
    between the two softmaxes at temperature ``T``, averaged over the batch."""

    def __init__(self, base: nn.Module, weight: float, temperature: float) -> None:
        super().__init__()
        self.base, self.weight, self.temperature = base, float(weight), float(temperature)

    def forward(self, student: torch.Tensor, target: torch.Tensor,
                teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student.float() / t, dim=1),
                        F.log_softmax(teacher.float() / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)
        return (1.0 - self.weight) * self.base(student, target) + self.weight * soft
