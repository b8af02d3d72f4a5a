"""Leave-one-clip-out (``python -m export.validate loco``) on rendered clips, with fold models
supplied (``--reuse``) so that no training runs here."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from node.node_config import REPO_ROOT

MODEL = REPO_ROOT / "models" / "cone_classifier.onnx"


def two_clip_folder(root: Path) -> Path:
    """Six rendered frames as two clips, ``images/a`` and ``images/b`` (YOLO layout)."""
    from export.synth import main as synth_main

    data = root / "data"
    assert synth_main(["--out", str(data), "--frames", "6", "--seed", "31"]) == 0
    images = sorted((data / "images").glob("*.jpg"))
    for i, image in enumerate(images):
        clip = "a" if i < 3 else "b"
        for sub, path in (("images", image), ("labels", data / "labels" / f"{image.stem}.txt")):
            (data / sub / clip).mkdir(exist_ok=True)
            path.rename(data / sub / clip / path.name)
    return data


def fold_classifiers(out: Path) -> Path:
    """``out`` with the bundled classifier as the fold model of clips ``a`` and ``b``, for
    ``--reuse``: no classifier trains here."""
    for clip in ("a", "b"):
        (out / clip).mkdir(parents=True)
        shutil.copy(MODEL, out / clip / "cone_classifier.onnx")
    return out


@pytest.mark.slow
def test_loco_scores_each_clip_with_its_fold_model_and_calibrates(tmp_path):
    pytest.importorskip("onnx")
    from export.validate import main

    data, out = two_clip_folder(tmp_path), fold_classifiers(tmp_path / "loco")
    rc = main(["loco", "--data", f"yolo:{data}", "--out", str(out), "--reuse",
               "--thresholds", "0.3", "0.9", "--no-progress"])
    assert rc == 0
    result = json.loads((out / "loco.json").read_text())
    assert list(result["folds"]) == ["a", "b"]
    for fold in result["folds"].values():
        node = fold["node"]
        assert set(node) == {"0.3", "0.5", "0.9"}  # the config's threshold is always scored
        assert node["0.5"]["frames"] == 3 and node["0.5"]["labelled_cones"] > 20
        assert node["0.5"]["recall_ge12"] >= 0.6  # the bundled node on rendered cones
        # a higher threshold keeps a subset: recall cannot rise
        assert node["0.9"]["recall_ge12"] <= node["0.3"]["recall_ge12"]
        assert fold["crops"]["cone_accuracy"] >= 0.8
        assert fold["crops"]["by_size"]["12-24"]["cones"] > 0
    assert result["calibration"]["threshold"] in (0.3, 0.5, 0.9)
    best = result["calibration"]["by_threshold"][f"{result['calibration']['threshold']:g}"]
    assert best["worst_f1"] == max(r["worst_f1"]
                                   for r in result["calibration"]["by_threshold"].values())
    table = (out / "loco.md").read_text()
    assert "| a | 3 |" in table and "Worst clip: recall" in table


def test_filtering_after_the_run_equals_running_with_the_threshold(tmp_path):
    """The sweep's shortcut: cones kept by filtering a low-threshold run are exactly the cones
    a run at the higher threshold publishes (suppression keeps the higher score)."""
    from export.loco import filter_results
    from export.node_run import run_node
    from export.synth import main as synth_main
    from node.infer import load_backend
    from node.node_config import load_node_config
    from node.propose import build_proposer
    from node.types import Frame

    data = tmp_path / "d"
    assert synth_main(["--out", str(data), "--frames", "3", "--seed", "7"]) == 0
    import cv2

    images = [cv2.imread(str(p)) for p in sorted((data / "images").glob("*.jpg"))]

    def run(threshold: float) -> list:
        config = load_node_config(None, [f"model.score_threshold={threshold}",
                                         "pipeline.sync=true", "tracking.enabled=false"])
        frames = [Frame(i, float(i), im, f"{i}.jpg") for i, im in enumerate(images)]
        proposer = build_proposer(config.proposer)
        try:
            with load_backend(MODEL, max_batch=config.model.max_batch) as backend:
                return run_node(config, backend, proposer, frames)[0]
        finally:
            proposer.close()

    low, high = run(0.2), run(0.8)
    kept = filter_results(low, 0.8)
    assert sum(len(r.cones) for r in low) > sum(len(r.cones) for r in high) > 5
    for a, b in zip(kept, high, strict=True):
        assert [(c.label, tuple(np.round(c.box, 3))) for c in a.cones] == \
               [(c.label, tuple(np.round(c.box, 3))) for c in b.cones]


def test_unknown_clip_is_named(tmp_path):
    from export.validate import main

    data = two_clip_folder(tmp_path)
    rc = main(["loco", "--data", f"yolo:{data}", "--out", str(tmp_path / "o"),
               "--clips", "zzz", "--no-progress"])
    assert rc == 1


def test_negative_proposer_epochs_are_refused_before_any_training(tmp_path, capsys):
    from export.validate import main

    data = two_clip_folder(tmp_path)
    rc = main(["loco", "--data", f"yolo:{data}", "--out", str(tmp_path / "o"),
               "--proposer-epochs", "-1", "--no-progress"])
    assert rc == 1
    assert "--proposer-epochs -1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_loco_trains_each_folds_proposer_and_refiner_without_the_clip(tmp_path):
    """``--proposer-epochs``: every fold trains a proposer and a refiner with the clip held
    out, the node scores the fold with them, and the table says the proposer never saw it."""
    pytest.importorskip("torch")
    from export.validate import main
    from node.propose.heatmap import open_session

    data, out = two_clip_folder(tmp_path), fold_classifiers(tmp_path / "loco")
    tiny = ["--synth-frames=0", "--threads=1", "--device=cpu", "--batch-size=2"]
    rc = main(["loco", "--data", f"yolo:{data}", "--out", str(out), "--reuse",
               "--proposer-epochs", "1", "--refiner-epochs", "1", "--proposer-val-clips", "zz",
               *[f"--trainer-arg={a}" for a in tiny], "--proposer-arg=--camera=strong",
               "--set", "proposer.heatmap_threshold=0.3", "--thresholds", "0.5",
               "--no-progress"])
    assert rc == 0
    result = json.loads((out / "loco.json").read_text())
    assert result["proposer_epochs"] == 1
    for clip, other in (("a", "b"), ("b", "a")):
        fold = result["folds"][clip]
        proposer = out / clip / "proposer" / "cone_proposer.onnx"
        refiner = out / clip / "refiner" / "cone_refiner.onnx"
        assert fold["node_set"] == [f"proposer.heatmap_model={proposer}",
                                    f"proposer.refiner_model={refiner}"]
        assert fold["proposer_saw_clip"] is False
        meta = open_session(proposer)[1].extra
        assert meta["heldout"] == [clip] and meta["training_clips"] == [other]
        assert fold["node"]["0.5"]["frames"] == 3
        assert not (out / clip / "frames.npz").exists()  # the training cache is removed
        # --proposer-arg reaches the proposer's trainer only, --trainer-arg both
        proposer_run = yaml.safe_load((proposer.parent / "config.yaml").read_text())
        refiner_run = yaml.safe_load((refiner.parent / "config.yaml").read_text())
        assert proposer_run["camera"] == "strong" and refiner_run["camera"] != "strong"
        assert proposer_run["synth_frames"] == refiner_run["synth_frames"] == 0
        # the node's --set reaches the refiner's candidates as well as the node
        assert refiner_run["set"] == ["proposer.heatmap_threshold=0.3"]
    assert "own proposer from scratch (`--proposer-epochs 1`)" in (out / "loco.md").read_text()
    assert "| no |" in (out / "loco.md").read_text()


def test_fold_validation_clip_is_never_the_left_out_clip():
    from export.loco import fold_val_clips

    assert fold_val_clips("skidpad", ["autox4", "autox5"]) == ["autox4"]
    assert fold_val_clips("autox4", ["autox4", "autox5"]) == ["autox5"]
    assert fold_val_clips("autox4", ["autox4"]) == []


def test_a_folds_classifier_mines_the_folds_own_proposer(tmp_path, monkeypatch):
    """With ``--proposer-epochs`` the fold's proposer is trained first and its candidates are
    the classifier's proposer background (never the bundled proposer, which saw the clip);
    a ``--train-set`` of the same key still wins, being later on the command line."""
    import argparse

    from export import loco

    ran = []
    monkeypatch.setattr(loco, "run_logged", lambda commands, log, clip: ran.extend(commands))
    args = argparse.Namespace(reuse=False, train_config="configs/train.yaml", epochs=1,
                              train_set=["data.background.proposals_per_frame=8"])
    proposer = tmp_path / "a" / "proposer" / "cone_proposer.onnx"
    loco.train_fold("a", tmp_path, tmp_path / "a", args, proposer)
    train = ran[0]
    assert train[:3] == [sys.executable, "-m", "export.train"]
    mine = train.index(f"data.background.proposer_model={proposer}")
    assert mine < train.index("data.background.proposals_per_frame=8")
    ran.clear()
    loco.train_fold("a", tmp_path, tmp_path / "a", args)
    assert not any(a.startswith("data.background.proposer_model") for a in ran[0])
