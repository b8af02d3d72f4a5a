"""Knowledge distillation (``export.distill``, ``distill:`` in configs/train.yaml): the loss's
arithmetic, the teacher's checks, and a student that learns what its teacher says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.distill import DistillLoss, load_teacher
from export.train_config import load_train_config
from node.classes import CLASSIFIER_CLASSES

from . import cone_patches

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "train.yaml"
BUNDLED = ROOT / "models" / "cone_classifier.onnx"
CLASSES = list(CLASSIFIER_CLASSES)


def _stats():
    from export.train import MEAN, STD

    return MEAN, STD


def test_loss_blends_the_targets_and_the_teacher_as_written():
    base = torch.nn.CrossEntropyLoss()
    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teacher = torch.tensor([[1.0, 1.5, -0.5], [0.3, -0.2, 0.9]])
    target = torch.tensor([0, 2])
    t, w = 2.0, 0.7
    p_t = torch.softmax(teacher / t, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / t, 1))).sum(1).mean()
    expected = (1 - w) * base(student, target) + w * t * t * kl
    got = DistillLoss(base, w, t)(student, target, teacher)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(DistillLoss(base, 0.0, t)(student, target, teacher)) == \
        pytest.approx(float(base(student, target)))
    # A student that already says what the teacher says owes it nothing.
    assert float(DistillLoss(base, 1.0, t)(teacher, target, teacher)) == pytest.approx(0, abs=1e-7)


def test_bundled_classifier_loads_as_a_frozen_teacher():
    mean, std = _stats()
    teacher = load_teacher(BUNDLED, CLASSES, 32, mean, std, torch.device("cpu"))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert tuple(teacher(torch.zeros(3, 3, 32, 32)).shape) == (3, len(CLASSES))


@pytest.mark.parametrize("change, words", [
    ({"input_size": 64}, "input size 32 differs"),
    ({"classes": CLASSES[::-1]}, "classes"),
    ({"mean": [0.5, 0.5, 0.5]}, "mean"),
])
def test_a_teacher_for_other_crops_is_refused(change, words):
    mean, std = _stats()
    args = {"classes": CLASSES, "input_size": 32, "mean": mean, "std": std} | change
    with pytest.raises(ValueError) as err:
        load_teacher(BUNDLED, args["classes"], args["input_size"], args["mean"], args["std"],
                     torch.device("cpu"))
    message = str(err.value)
    assert message.startswith("distill.teacher: ") and str(BUNDLED) in message
    assert words in message and "\n" not in message


def test_a_missing_teacher_is_a_one_line_error_before_any_data_is_read(tmp_path, capsys):
    from export.train import main

    missing = tmp_path / "teacher.onnx"
    assert main(["--config", str(CONFIG), f"distill.teacher={missing}",
                 "data.root=/nonexistent", f"run.out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "distill.teacher" in err and str(missing) in err and "\n" not in err


def _swapped_teacher(tmp_path: Path) -> Path:
    """A teacher that calls blue cones yellow and yellow cones blue: the bundled classifier
    with the two rows of its last layer exchanged, saved as a checkpoint."""
    from export.checkpoint import import_classifier

    model, meta = import_classifier(BUNDLED)
    blue, yellow = CLASSES.index("blue_cone"), CLASSES.index("yellow_cone")
    with torch.no_grad():
        for p in (model.fc.weight, model.fc.bias):
            p[[blue, yellow]] = p[[yellow, blue]].clone()
    path = tmp_path / "swapped.pt"
    torch.save({"model": model.state_dict(), "arch": meta.arch, "classes": CLASSES,
                "input_size": 32, "mean": list(meta.mean), "std": list(meta.std),
                "channel_order": "RGB", "crop": dict(meta.crop)}, path)
    return path


def test_student_learns_what_its_teacher_says(tiny_cache, tmp_path):
    """Trained on the teacher's word alone (weight 1), a student learns the teacher's swap of
    blue and yellow against every label of the training crops; without a teacher, the same
    run learns the labels."""
    from export.train import load_checkpoint, make_predict_fn

    vx, vnames = cone_patches(300, seed=2)
    truth = np.array([CLASSES.index(n) for n in vnames])
    blue, yellow = CLASSES.index("blue_cone"), CLASSES.index("yellow_cone")
    calls = {}
    for name, extra in (("labels", []),
                        ("teacher", [f"distill.teacher={_swapped_teacher(tmp_path)}",
                                     "distill.weight=1.0"])):
        from export.train import train

        cfg = load_train_config(CONFIG, [
            f"data.cache={tiny_cache}", f"run.out={tmp_path / name}", "run.progress=false",
            "run.device=cpu", "run.threads=1", "optim.epochs=3",
            "optim.samples_per_epoch=640", "optim.batch_size=32", "optim.warmup_epochs=0.3",
            *extra])
        train(cfg)
        model, _ = load_checkpoint(tmp_path / name / "last.pt")
        calls[name] = make_predict_fn(model, torch.device("cpu"))(vx).argmax(1)
    for name, said_blue_for in (("labels", blue), ("teacher", yellow)):
        on_blue = calls[name][truth == blue]
        assert np.mean(on_blue == said_blue_for) >= 0.6, (name, np.bincount(on_blue))
