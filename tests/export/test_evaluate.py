"""Evaluation: the scoring core on known predictions, and the CLI end to end on a small YOLO
folder for a checkpoint and its ONNX export (same numbers through both)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from export.evaluate import evaluate_crops, format_report
from node.classes import CLASSIFIER_CLASSES

from . import cone_patches

CLASSES = list(CLASSIFIER_CLASSES)


def _oracle(labels: list[str], wrong: dict[int, str]):
    """A predict_fn that answers the true label except at the given positions."""
    def predict(crops: np.ndarray) -> np.ndarray:
        out = np.zeros((len(crops), len(CLASSES)), np.float32)
        for i, name in enumerate(labels):
            out[i, CLASSES.index(wrong.get(i, name))] = 1.0
        return out
    return predict


def test_scores_match_known_predictions() -> None:
    crops, labels = cone_patches(20)  # 4 of each class, in turn
    wrong = {0: "yellow_cone", 2: "large_orange_cone", 4: "blue_cone", 9: "yellow_cone"}
    m = evaluate_crops(_oracle(labels, wrong), crops, labels, CLASSES)
    cm = np.array(m["confusion"])
    assert cm.sum() == m["count"] == 20
    assert m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum()) == pytest.approx(16 / 20)
    assert m["recall"]["blue_cone"] == pytest.approx(3 / 4)
    assert m["recall"]["orange_cone"] == pytest.approx(3 / 4)
    assert m["background_rejection"] == pytest.approx(2 / 4)  # 4 and 9 are background
    assert m["cone_accuracy"] == pytest.approx(14 / 16)
    assert m["min_cone_recall"] == pytest.approx(3 / 4)
    assert cm[CLASSES.index("background"), CLASSES.index("blue_cone")] == 1
    assert "confusion" in format_report(m)


def test_label_indices_and_names_agree() -> None:
    crops, labels = cone_patches(10)
    idx = [CLASSES.index(n) for n in labels]
    a = evaluate_crops(_oracle(labels, {1: "background"}), crops, labels, CLASSES)
    b = evaluate_crops(_oracle(labels, {1: "background"}), crops, idx, CLASSES)
    assert a == b


def _yolo_folder(root, n_frames: int = 3) -> int:
    """Frames of drawn cones on grey ground with BGRacing-style class ids; returns the box
    count."""
    ids = {"blue_cone": 0, "large_orange_cone": 1, "orange_cone": 2, "yellow_cone": 3}
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    total = 0
    for f in range(n_frames):
        img = np.full((320, 320, 3), 100, np.uint8)
        crops, names = cone_patches(8, size=40, seed=f)
        lines = []
        for k, (crop, name) in enumerate(zip(crops, names)):
            if name == "background":
                continue
            x, y = 20 + 70 * (k % 4), 220 + 50 * (k // 4) - int(rng.integers(0, 10))
            img[y:y + 40, x:x + 40] = crop
            lines.append(f"{ids[name]} {(x + 20) / 320} {(y + 20) / 320} {24 / 320} {34 / 320}")
            total += 1
        cv2.imwrite(str(root / "images" / f"autox_mp4-{f}_jpg.rf.ab{f}.jpg"), img)
        (root / "labels" / f"autox_mp4-{f}_jpg.rf.ab{f}.txt").write_text("\n".join(lines))
    return total


def test_cli_on_checkpoint_and_onnx(tmp_path, capsys) -> None:
    torch = pytest.importorskip("torch")
    from export.evaluate import main
    from export.model import create_model
    from export.train import metadata_from_checkpoint
    from node.infer.crop import CropPolicy
    from node.infer.metadata import METADATA_KEY

    n_boxes = _yolo_folder(tmp_path / "data")
    torch.manual_seed(0)
    model = create_model("resnet_slim32", len(CLASSES)).eval()
    ckpt = {"model": model.state_dict(), "arch": "resnet_slim32", "classes": CLASSES,
            "input_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "channel_order": "RGB", "crop": CropPolicy().to_dict(), "epoch": 0, "metrics": {},
            "config": {}}
    torch.save(ckpt, tmp_path / "m.pt")
    assert main(["--model", str(tmp_path / "m.pt"), "--data", f"yolo:{tmp_path / 'data'}",
                 "--out", str(tmp_path / "pt")]) == 0
    m = json.loads((tmp_path / "pt" / "metrics.json").read_text())
    cm = np.array(m["confusion"])
    n_cones = cm[:4].sum()  # rows of the four cone classes
    assert n_cones == n_boxes and cm.sum() == m["count"]
    assert m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert (tmp_path / "pt" / "confusion.png").stat().st_size > 1000
    assert "top-1 accuracy" in capsys.readouterr().out

    import onnx

    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(onnx_path), opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    proto = onnx.load(str(onnx_path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata_from_checkpoint(ckpt).to_json()
    onnx.save(proto, str(onnx_path))
    assert main(["--model", str(onnx_path), "--data", f"yolo:{tmp_path / 'data'}",
                 "--out", str(tmp_path / "onnx")]) == 0
    m2 = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    assert m2["confusion"] == m["confusion"]


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    from export.evaluate import main

    assert main(["--model", str(tmp_path / "missing.pt"), "--data", "yolo:nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.pt" in err and "\n" not in err


def test_accuracy_by_size_buckets_cones_by_box_height() -> None:
    from export.evaluate import accuracy_by_size

    classes = list(CLASSIFIER_CLASSES)
    labels = ["blue_cone", "blue_cone", "yellow_cone", "yellow_cone", "background"]
    heights = [10.0, 15.0, 30.0, 60.0, 30.0]
    # Predictions: right, called background, right, wrong colour, background (not a cone).
    said = ["blue_cone", "background", "yellow_cone", "blue_cone", "background"]
    logits = np.eye(len(classes))[[classes.index(c) for c in said]]
    out = accuracy_by_size(lambda crops: logits, np.zeros((5, 8, 8, 3), np.uint8), labels,
                           heights, classes)
    assert out["<12"] == {"cones": 1, "accuracy": 1.0, "called_background": 0}
    assert out["12-24"] == {"cones": 1, "accuracy": 0.0, "called_background": 1}
    assert out["24-48"] == {"cones": 1, "accuracy": 1.0, "called_background": 0}
    assert out[">=48"] == {"cones": 1, "accuracy": 0.0, "called_background": 0}


@pytest.mark.shared_data
def test_variants_of_held_out_crops_keep_their_cones():
    """On the real held-out frames, the crop scorer moves the boxes with each variant: a
    horizon shift only loses cones pushed out of view, a corruption loses none, and the
    bundled classifier labels the base crops."""
    from pathlib import Path

    from export.evaluate import accuracy_on_variants, load_predictor

    root = Path(__file__).resolve().parents[3] / "shared" / "data" / "bgracing"
    model = Path(__file__).resolve().parents[2] / "models" / "cone_classifier.onnx"
    if not root.is_dir():
        pytest.skip("shared data absent")
    predict, meta, close = load_predictor(model)
    try:
        out = accuracy_on_variants(predict, meta, f"yolo:{root}", ["autox2"],
                                   ["horizon_40", "low_light_3"])
    finally:
        close()
    base, shifted, dark = out["base"], out["horizon_40"], out["low_light_3"]
    assert base["24-48"]["cones"] > 10
    for bucket in ("12-24", "24-48", ">=48"):
        assert shifted[bucket]["cones"] <= base[bucket]["cones"]
    assert base["24-48"]["accuracy"] >= 0.9
    assert all(dark[b]["cones"] == base[b]["cones"] for b in base)


def test_crops_are_taken_from_the_frames_as_the_node_prepares_them(tmp_path) -> None:
    """``frame_filter`` (the node's exposure stage in ``python -m export.evaluate``) turns each
    frame into the one the crops come from; the boxes stay those of the labels."""
    from types import SimpleNamespace

    from export.evaluate import crops_for_evaluation
    from node.infer.crop import CropPolicy

    _yolo_folder(tmp_path / "data")
    meta = SimpleNamespace(crop_policy=CropPolicy(), input_size=32, classes=CLASSES)
    spec = f"yolo:{tmp_path / 'data'}"
    raw, labels = crops_for_evaluation(spec, meta, None, seed=0)
    inverted, labels2 = crops_for_evaluation(spec, meta, None, seed=0,
                                             frame_filter=cv2.bitwise_not)
    assert labels2 == labels
    cones = np.array([name != "background" for name in labels])
    assert cones.sum() >= 8
    # The labelled cones lie inside the frames: their crops are the inverted ones (within the
    # rounding of the resampling).
    np.testing.assert_allclose(inverted[cones].astype(int), 255 - raw[cones].astype(int), atol=1)
    assert np.abs(inverted[cones].astype(int) - raw[cones].astype(int)).mean() > 20
