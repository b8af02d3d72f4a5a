"""``python -m export finetune``: the bundled networks fine-tuned on a team's YOLO folder.

The team's folder is rendered by ``export.synth`` at 800x320 with names that are not
BGRacing's, clips in sub-folders and class ids in another order than the project's (mapped by
the names in its data.yaml); the unlabelled footage is a rendered clip written as a video, its
labels kept aside to check the pseudo-labels against.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from export.data import DataError
from node.cli.demo import SYNTH_BODY_MASK

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
ORDER = ["yellow_cone", "blue_cone", "large_orange_cone", "orange_cone"]
"""The team's class ids: not the project's order."""
SIZE = (800, 320)

needs_models = pytest.mark.skipif(not all((MODELS / f).is_file() for f in (
    "cone_classifier.onnx", "cone_proposer.onnx", "cone_refiner.onnx")),
    reason="bundled models absent")


def write_team_folder(root: Path, clips: dict[str, int], frames: int) -> dict[str, int]:
    """A YOLO folder ``images/<clip>/cam0_<i>.jpg`` of rendered clips; returns the number of
    labelled cones per clip."""
    from export.synth import render_clip

    cones = {}
    for clip, seed in clips.items():
        (root / "images" / clip).mkdir(parents=True)
        (root / "labels" / clip).mkdir(parents=True)
        cones[clip] = 0
        for i, f in enumerate(render_clip(seed, frames, *SIZE)):
            cv2.imwrite(str(root / "images" / clip / f"cam0_{i:04d}.jpg"), f.image)
            w, h = SIZE
            lines = [f"{ORDER.index(lab)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                     f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                     for (x1, y1, x2, y2), lab in zip(f.boxes, f.labels)]
            (root / "labels" / clip / f"cam0_{i:04d}.txt").write_text("\n".join(lines) + "\n")
            cones[clip] += len(lines)
    (root / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n"
                                                         for i, n in enumerate(ORDER)))
    return cones


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One end-to-end run on a tiny budget (each net trains one step or so), with
    pseudo-labels of a rendered video."""
    from export.finetune import main
    from export.synth import render_clip, write_dataset

    tmp = tmp_path_factory.mktemp("finetune")
    cones = write_team_folder(tmp / "team", {"lapA": 7, "lapB": 8}, 6)
    write_dataset(tmp / "truth", render_clip(9, 10, *SIZE), video=tmp / "footage.mp4")
    run = tmp / "run"
    rc = main(["--data", f"yolo:{tmp / 'team'}", "--out", str(run), "--minutes", "0.2",
               "--val-clips", "lapB", "--pseudo-label", str(tmp / "footage.mp4"),
               "--pseudo-stride", "1", "--no-progress",
               "--set", f"proposer.body_mask={json.dumps(SYNTH_BODY_MASK)}"])
    return {"rc": rc, "run": run, "tmp": tmp, "cones": cones}


@needs_models
@pytest.mark.slow
def test_three_models_load_with_the_bundled_metadata(finetuned):
    import onnxruntime as ort

    from node.infer.metadata import read_onnx_metadata
    from node.propose.heatmap import open_session
    from node.propose.refiner import open_refiner

    assert finetuned["rc"] == 0
    out = finetuned["run"] / "models"
    new, old = read_onnx_metadata(out / "cone_classifier.onnx"), read_onnx_metadata(
        MODELS / "cone_classifier.onnx")
    for key in ("classes", "input_size", "channel_order", "mean", "std", "crop", "arch",
                "precision"):
        assert getattr(new, key) == getattr(old, key), key
    assert new.extra["heldout"] == ["lapB"]
    prop, prop_old = open_session(out / "cone_proposer.onnx")[1], open_session(
        MODELS / "cone_proposer.onnx")[1]
    assert (prop.input_size, prop.stride, prop.channel_order, prop.std) == (
        prop_old.input_size, prop_old.stride, prop_old.channel_order, prop_old.std)
    assert prop.extra["validation_clips"] == ["lapB"]
    assert "lapA" in prop.extra["training_clips"] and "lapB" not in prop.extra["training_clips"]
    assert prop.extra["stages"][-1]["finetune"] is True
    assert len(prop.extra["stages"]) == len(prop_old.extra["stages"]) + 1
    ref, ref_old = open_refiner(out / "cone_refiner.onnx")[1], open_refiner(
        MODELS / "cone_refiner.onnx")[1]
    assert (ref.input_size, ref.context, ref.min_side) == (ref_old.input_size, ref_old.context,
                                                           ref_old.min_side)
    assert ref.extra["training_clips"] == prop.extra["training_clips"]
    # Trained: the same input gives other outputs than the bundled file's.
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    got, was = (ort.InferenceSession(str(p)).run(None, {"crops": x})[0]
                for p in (out / "cone_classifier.onnx", MODELS / "cone_classifier.onnx"))
    assert got.shape == was.shape == (4, 5)
    assert not np.allclose(got, was, atol=1e-5)
    # The budget left no time for the INT8 calibration, and the report says so.
    report = json.loads((finetuned["run"] / "report.json").read_text())
    assert "tensorrt: skipped" in report["int8"] and "cpu: skipped" in report["int8"]
    assert not (out / "cone_classifier.int8.onnx").exists()
    assert not (out / "cone_classifier.cpu.int8.onnx").exists()


@needs_models
@pytest.mark.slow
def test_report_scores_the_validation_clip_before_and_after(finetuned):
    report = json.loads((finetuned["run"] / "report.json").read_text())
    assert report["data"]["val_clips"] == ["lapB"] and report["data"]["val_frames"] == 6
    assert report["data"]["train_clips"] == ["lapA"] and report["data"]["train_frames"] == 6
    for when in ("before", "after"):
        node, crops = report[when]["node"], report[when]["crops"]
        # Every labelled cone of the validation clip, read through data.yaml's names.
        assert node["labelled_cones"] == finetuned["cones"]["lapB"]
        assert node["frames"] == 6
        for key in ("recall_ge12", "precision_ge20", "label_accuracy"):
            assert 0.0 <= node[key] <= 1.0
        assert sum(b["cones"] for b in crops["by_size"].values()) == finetuned["cones"]["lapB"]
        assert crops["by_size"]["12-24"]["cones"] > 0
    # The bundled node finds most of the rendered cones (the pipeline test's level).
    assert report["before"]["node"]["recall_ge12"] >= 0.8
    assert report["before"]["node"]["label_accuracy"] >= 0.9
    text = (finetuned["run"] / "report.md").read_text()
    assert "| | before (bundled) | after (fine-tuned) |" in text
    assert "run through the node (bundled models, stride" in text
    from export.finetune import format_report
    assert "| | before (`fold/`) | after (fine-tuned) |" in format_report(
        {**report, "start": "`fold/`"})
    assert f"{100 * report['before']['node']['recall_ge12']:.1f} %" in text
    assert "confirmation bias" in text and "python -m export pseudo_check" in text
    assert "After − before:" in text or "No figure moved by a point or more." in text
    # The camera check read every training, pseudo-labelled and validation frame (under 60).
    check = report["camera_check"]
    frames = 12 + report["pseudo"]["frames_kept"]
    assert check["frames"] == frames
    assert [v["name"] for v in check["verdicts"]] == [
        "clipped", "blur", "noise", "white balance", "brightening", "veil", "colour"]
    assert check["flagged"] == [v["name"] for v in check["verdicts"] if v["flagged"]]
    assert "## The camera (`python -m node check`)" in text
    assert "| blur (px) |" in text and f"{frames} frames of your footage" in text


@needs_models
@pytest.mark.slow
def test_pseudo_labels_match_the_rendered_truth(finetuned):
    from node.evaluate.datasets import load_samples
    from node.infer.postprocess import iou_matrix

    report = json.loads((finetuned["run"] / "report.json").read_text())
    pseudo = report["pseudo"]
    assert pseudo["frames_run"] == 10 and pseudo["frames_kept"] >= 5
    labelled = load_samples(f"yolo:{finetuned['run'] / 'pseudo' / '00_footage'}")
    assert len(labelled) == pseudo["frames_kept"]
    truth = {int(s.image_path.stem): s for s in load_samples(f"yolo:{finetuned['tmp'] / 'truth'}")}
    boxes = matched = same_class = 0
    for s in labelled:
        gt = truth[int(s.image_path.stem)]  # named by the video frame's index
        iou = iou_matrix(s.boxes, gt.boxes)
        for i, j in enumerate(iou.argmax(1)):
            boxes += 1
            if iou[i, j] >= 0.5:
                matched += 1
                same_class += s.labels[i] == gt.labels[j]
    assert boxes == pseudo["cones"] >= 15
    assert matched / boxes >= 0.95
    assert same_class == matched
    # The pseudo-labelled frames were trained on, as a clip of their own.
    from node.propose.heatmap import open_session

    meta = open_session(finetuned["run"] / "models" / "cone_proposer.onnx")[1]
    assert meta.extra["training_clips"] == ["00_footage", "lapA"]
    assert meta.extra["stages"][-1]["frames"] == 6 + pseudo["frames_kept"]


@needs_models
def test_pseudo_mask_candidates_paints_more_and_keeps_the_labels(tmp_path):
    """``--pseudo-mask candidates`` runs the node a second time for the candidates the
    classifier does not call background: the same frames and labels as ``unsure``, more
    boxes painted over, and never a pixel of a confident cone."""
    from export.finetune import box_window, build_parser, pseudo_label
    from export.pseudo_check import painted_pixels
    from export.synth import render_clip, write_dataset

    write_dataset(tmp_path / "truth", render_clip(9, 10, *SIZE))
    runs = {}
    for mask in ("unsure", "candidates"):
        args = build_parser().parse_args([
            "--data", "yolo:unused", "--out", "unused", "--pseudo-mask", mask,
            "--pseudo-label", str(tmp_path / "truth" / "images"), "--pseudo-stride", "1",
            "--set", f"proposer.body_mask={json.dumps(SYNTH_BODY_MASK)}"])
        runs[mask] = pseudo_label(args, MODELS, tmp_path / mask)
    (plain, plain_stats), (more, more_stats) = runs["unsure"], runs["candidates"]
    assert plain_stats["masked_candidates"] == 0 < more_stats["masked_candidates"]
    assert more_stats["masked_uncertain_cones"] == plain_stats["masked_uncertain_cones"]
    assert [s.image_path.name for s in more] == [s.image_path.name for s in plain]
    painted_more = painted_fill = 0
    for a, b in zip(plain, more, strict=True):
        assert a.labels == b.labels and np.array_equal(a.boxes, b.boxes)
        image, other = a.load(), b.load()
        near, _ = painted_pixels(other, cv2.imread(str(
            tmp_path / "truth" / "images" / f"{int(a.image_path.stem):05d}.jpg")))
        changed = np.abs(other.astype(int) - image.astype(int)).max(2) > 24
        for box in np.round(b.boxes).astype(int):
            assert not changed[box_window(box, changed.shape)].any()
        painted_more += int(changed.sum())
        painted_fill += int((changed & near).sum())
    # What differs is the fill, but for a few pixels of JPEG ringing at its edges.
    assert painted_more > 0 and painted_fill >= 0.95 * painted_more


def test_bad_data_is_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    proc = subprocess.run([sys.executable, "-m", "export", "finetune", "--data",
                           f"yolo:{missing}", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "run").exists()


def test_a_folder_without_images_is_named(tmp_path, capsys):
    from export.finetune import main

    (tmp_path / "labels").mkdir()
    assert main(["--data", f"yolo:{tmp_path}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "images/" in err[0]


def test_validation_split_by_fraction_takes_the_last_frames_of_each_clip(tmp_path):
    import argparse

    from export.finetune import split_frames
    from node.evaluate.datasets import load_samples

    write_team_folder(tmp_path, {"lapA": 1, "lapB": 2}, 5)
    samples = load_samples(f"yolo:{tmp_path}")
    args = argparse.Namespace(val=None, val_clips=None, val_fraction=0.2, train_clips=None,
                              data=f"yolo:{tmp_path}")
    train, val = split_frames(samples, args)
    assert sorted(s.image_path.relative_to(tmp_path / "images").as_posix() for s in val) == [
        "lapA/cam0_0004.jpg", "lapB/cam0_0004.jpg"]
    assert len(train) == 8
    args.val_fraction, args.val_clips, args.train_clips = None, ["lapB"], ["lapA"]
    train, val = split_frames(samples, args)
    assert {s.image_path.parent.name for s in val} == {"lapB"} and len(val) == 5
    assert {s.image_path.parent.name for s in train} == {"lapA"} and len(train) == 5
    args.val_clips = ["lapC"]
    with pytest.raises(DataError, match="no validation frames"):
        split_frames(samples, args)


def test_frames_keep_their_aspect_and_windows_keep_their_boxes():
    """A 800x320 frame is trained on at its own scale: windows cut from it move its boxes
    with its pixels."""
    from export.proposer_data import augment_frame, sample_frames
    from node.evaluate.datasets import Sample

    image = np.full((320, 800, 3), 90, np.uint8)
    box = np.array([[500.0, 200.0, 540.0, 260.0]], np.float32)
    image[200:260, 500:540] = (0, 140, 255)
    path = Path("images/lap/frame.png")
    sample = Sample(path, box, ["orange_cone"], (800, 320))
    sample.load = lambda: image  # type: ignore[method-assign]
    frames = sample_frames([sample], ["lap"], None, 2_000_000)
    assert frames.images[0].shape == (320, 800, 3)
    np.testing.assert_array_equal(frames.frame_boxes(0), box)
    small = sample_frames([sample], ["lap"], None, 800 * 320 // 4)  # shrunk to the budget
    assert small.images[0].shape == (160, 400, 3)
    np.testing.assert_allclose(small.frame_boxes(0), box / 2)
    # Enlarged as the node enlarges it (proposer.heatmap_min_pixels), boxes with it.
    big = sample_frames([sample], ["lap"], None, 2_000_000, False, 409_600)
    assert big.images[0].shape == (404, 1011, 3)
    np.testing.assert_allclose(big.frame_boxes(0), box * np.array([1011 / 800, 404 / 320] * 2),
                               rtol=1e-5)
    rng = np.random.default_rng(1)
    kept = 0
    for _ in range(40):
        win, boxes = augment_frame(frames.images[0], frames.frame_boxes(0), rng, out_size=160,
                                   camera=None, flip=False)
        assert win.shape == (160, 160, 3)
        for x1, y1, x2, y2 in boxes:
            kept += 1
            inner = win[int(y1) + 3:int(y2) - 3, int(x1) + 3:int(x2) - 3].reshape(-1, 3)
            assert len(inner) == 0 or np.abs(inner.mean(0) - (0, 140, 255)).max() < 20
    assert kept >= 5  # windows fall all over the wide frame, and some on the cone


def test_uncertain_cones_are_masked_around_confident_ones_and_hidden_ones_drop_the_frame():
    from export.finetune import mask_uncertain

    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 200
    sure = np.array([[10.0, 10.0, 30.0, 50.0]], np.float32)
    unsure = np.array([[150.0, 40.0, 170.0, 80.0]], np.float32)
    out = mask_uncertain(image, unsure, sure)
    fill = image.reshape(-1, 3).mean(0).round()
    assert (out[34:86, 147:173] == fill).all()  # grown by 15 % of the box on every side
    assert (out[:, 173:] == 200).all() and (out[:34] == image[:34]).all()
    assert (out[10:50, 10:30] == 0).all() and out[0, 199, 0] == 200
    assert mask_uncertain(image, np.zeros((0, 4), np.float32), sure) is image
    # A neighbour whose grown box reaches into the confident cone: painted all but the cone.
    out = mask_uncertain(image, np.array([[31.0, 10.0, 51.0, 50.0]], np.float32), sure)
    assert (out[10:50, 30:54] == fill).all() and (out[10:50, 10:30] == 0).all()
    assert (out[4:10, 28:54] == fill).all()  # above the cone, the grown box is painted
    # More than half of the uncertain cone under the confident one: the frame is dropped.
    assert mask_uncertain(image, np.array([[18.0, 20.0, 34.0, 60.0]], np.float32), sure) is None
    assert mask_uncertain(image, np.array([[22.0, 20.0, 42.0, 60.0]], np.float32),
                          sure) is not None  # 8 of 20 columns under it, 30 of 40 rows


def test_candidates_are_masked_and_parts_of_a_confident_cone_are_left_alone():
    """``--pseudo-mask candidates``: a candidate is painted as an uncertain cone is, but one
    mostly inside a confident cone's box (a stripe of it) neither paints nor drops the frame."""
    from export.finetune import mask_uncertain

    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 200
    fill = image.reshape(-1, 3).mean(0).round()
    sure = np.array([[10.0, 10.0, 30.0, 50.0]], np.float32)
    none = np.zeros((0, 4), np.float32)
    part = np.array([[12.0, 20.0, 28.0, 40.0]], np.float32)
    out = mask_uncertain(image, none, sure, part)
    assert out is not None and (out == image).all()
    assert mask_uncertain(image, part, sure) is None  # an uncertain cone there drops it
    apart = np.array([[150.0, 40.0, 170.0, 80.0]], np.float32)
    out = mask_uncertain(image, none, sure, np.concatenate([part, apart]))
    assert (out[34:86, 147:173] == fill).all() and (out[:, 173:] == 200).all()
    assert (out[:, :100] == 0).all()  # the part inside the cone was not painted around
    assert mask_uncertain(image, none, sure, none) is image


@needs_models
def test_the_bundled_classifier_and_refiner_load_back_into_torch():
    """Like the proposer's import: the imported nets compute what ONNX Runtime does."""
    import onnxruntime as ort

    from export.checkpoint import CheckpointError, import_classifier
    from export.refiner_train import import_refiner

    model, meta = import_classifier(MODELS / "cone_classifier.onnx")
    x = torch.randn(16, 3, meta.input_size, meta.input_size)
    with torch.no_grad():
        ours = model(x).numpy()
    theirs = ort.InferenceSession(str(MODELS / "cone_classifier.onnx")).run(
        None, {"crops": x.numpy()})[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    net, rmeta = import_refiner(MODELS / "cone_refiner.onnx")
    x = torch.rand(16, 3, rmeta.input_size, rmeta.input_size) * 255
    with torch.no_grad():
        ours = net(x).numpy()
    theirs = ort.InferenceSession(str(MODELS / "cone_refiner.onnx")).run(
        None, {"crops": x.numpy()})[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(theirs).max() > 1e-3  # not an untrained (identity) refiner
    with pytest.raises(CheckpointError, match="cone_refiner.onnx: cannot load as a classifier"):
        import_classifier(MODELS / "cone_refiner.onnx")
    with pytest.raises(DataError, match="cone_classifier.onnx: cannot load as a box refiner"):
        import_refiner(MODELS / "cone_classifier.onnx")


def test_a_time_budget_stops_training_after_one_step():
    from export.proposer_data import ProposerFrames
    from export.proposer_train import ConeHeatmapNet, stem_metadata, train

    images = np.full((4, 64, 64, 3), 100, np.uint8)
    boxes = np.array([[20, 20, 30, 40]] * 4, np.float32)
    frames = ProposerFrames(images, boxes, np.arange(5, dtype=np.int64), np.array(["a"] * 4),
                            np.array(["f"] * 4))
    net = ConeHeatmapNet(stem="patch4")
    history = train(net, frames, stem_metadata("patch4", 64), 50, batch_size=2, lr=1e-3,
                    crop=32, budget_s=1e-9)
    assert len(history) == 1  # one epoch, cut after its first step
    history = train(net, frames, stem_metadata("patch4", 64), 3, batch_size=2, lr=1e-3,
                    crop=32)
    assert len(history) == 3  # without a budget, every epoch


def test_the_verdict_names_what_moved_by_a_point():
    from export.finetune import verdict

    def scores(recall, precision, top1):
        return {"node": {"recall_ge12": recall, "precision_ge20": precision,
                         "label_accuracy": 0.99},
                "crops": {"cone_accuracy": top1, "background_rejection": None}}

    text = verdict(scores(0.856, 0.783, 0.996), scores(0.852, 0.722, 0.996))
    assert text.startswith("After − before: whole-node precision -6.1 points.")
    assert "recall" not in text and "Keep the bundled models" in text
    text = verdict(scores(0.80, 0.80, 0.90), scores(0.85, 0.80, 0.95))
    assert text == ("After − before: whole-node recall +5.0 points, crop cone top-1 +5.0 "
                    "points.")
    assert verdict(scores(0.8, 0.8, 0.9), scores(0.805, 0.8, 0.9)) == (
        "No figure moved by a point or more.")
    assert "Keep the `fold/` models where" in verdict(scores(0.8, 0.8, 0.9),
                                                      scores(0.8, 0.7, 0.9), "`fold/`")


def test_the_report_names_the_models_it_started_from(tmp_path):
    from export.finetune import start_label

    assert start_label("models") == "bundled"
    fold = tmp_path / "fold_models"
    fold.mkdir()
    assert start_label(str(fold)) == f"`{fold}`"


@needs_models
@pytest.mark.slow
def test_only_the_named_nets_are_retrained_and_install_copies_them(tmp_path, capsys):
    """``--nets classifier`` copies the proposer and refiner unchanged; ``--install`` puts the
    new classifier over the one in ``--models`` (here a copy of the bundled folder)."""
    import shutil

    from export.finetune import main

    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    write_team_folder(tmp_path / "team", {"lapA": 3, "lapB": 4}, 3)
    run = tmp_path / "run"
    assert main(["--data", f"yolo:{tmp_path / 'team'}", "--out", str(run), "--minutes", "0.1",
                 "--val-clips", "lapB", "--nets", "classifier", "--models", str(models),
                 "--install", "--no-progress"]) == 0
    for name in ("cone_proposer.onnx", "cone_refiner.onnx"):
        assert (run / "models" / name).read_bytes() == (MODELS / name).read_bytes()
        assert (models / name).read_bytes() == (MODELS / name).read_bytes()
    new = (run / "models" / "cone_classifier.onnx").read_bytes()
    assert new != (MODELS / "cone_classifier.onnx").read_bytes()
    assert (models / "cone_classifier.onnx").read_bytes() == new
    report = json.loads((run / "report.json").read_text())
    assert report["nets"]["proposer"] == {"retrained": False}
    assert report["nets"]["classifier"]["retrained"] is True and report["installed"] is True
    assert "- proposer: not retrained" in (run / "report.md").read_text()
    from node.infer.metadata import read_onnx_metadata, sha256_file

    # No time was left for the INT8 calibrations. The CPU twin, the node's default model, is
    # calibrated at --install anyway; the stale TensorRT twin in --models is named.
    assert "cpu: calibrated at --install" in report["int8"]
    cpu_twin = read_onnx_metadata(models / "cone_classifier.cpu.int8.onnx")
    assert cpu_twin.source_onnx_sha256 == sha256_file(models / "cone_classifier.onnx")
    assert cpu_twin.extra["quantization"]["target"] == "cpu"
    assert report["install_note"].startswith(f"{models / 'cone_classifier.int8.onnx'} is still")
    assert "--target tensorrt" in report["install_note"] and "cpu.int8" not in report[
        "install_note"]
    assert "recalibrate it" in capsys.readouterr().err
