"""Tests of the box refiner's training side: jitter that stays with its cone, training
samples whose offsets lead back to the labels, a flip that mirrors crop and offsets alike, a
loss that falls on tiny data, and ONNX export parity with torch through the node's refiner."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from export.proposer_data import ProposerFrames
from export.refiner_train import (
    BoxRefinerNet,
    epoch_samples,
    export_refiner,
    hflip,
    jitter_boxes,
    refine_loss,
    train,
)
from node.evaluate.score import iou_matrix
from node.propose.refiner import (
    BoxRefiner,
    RefinerMetadata,
    apply_deltas,
    box_targets,
    refiner_crops,
)

SIZE = 96


def tiny_frames(n: int = 6) -> ProposerFrames:
    """Grey frames with two orange 'cones' (rectangles) each, at known places."""
    rng = np.random.default_rng(0)
    images, boxes = [], []
    for _ in range(n):
        img = np.full((SIZE, SIZE, 3), 90, np.uint8)
        frame_boxes = []
        for x0 in (8, 56):
            x, y = x0 + int(rng.integers(0, 24)), int(rng.integers(8, 70))
            w, h = int(rng.integers(6, 12)), int(rng.integers(12, 22))
            img[y:y + h, x:x + w] = (20, 110, 245)
            frame_boxes.append([x, y, x + w, y + h])
        images.append(img)
        boxes.append(np.array(frame_boxes, np.float32))
    starts = np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64)
    return ProposerFrames(np.stack(images), np.concatenate(boxes), starts,
                          np.array(["synth"] * n), np.array([f"f{i}" for i in range(n)]))


def no_pairs(frames: ProposerFrames) -> list:
    return [(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))] * len(frames)


def test_jitter_keeps_the_source_of_every_copy():
    gt = np.array([[10, 10, 20, 30], [100, 50, 140, 130]], np.float32)
    boxes, src = jitter_boxes(gt, np.random.default_rng(0), 200)
    assert boxes.shape == (400, 4) and (src == np.repeat([0, 1], 200)).all()
    iou = iou_matrix(boxes, gt)
    assert (iou.argmax(1) == src).mean() > 0.95
    assert 0.4 < np.median(iou[np.arange(400), src]) < 0.9  # perturbed, not destroyed


def test_epoch_samples_lead_back_to_the_labels():
    frames = tiny_frames()
    meta = RefinerMetadata(input_size=16, context=0.5, min_side=8.0)
    crops, deltas, inputs = epoch_samples(frames, no_pairs(frames), meta,
                                          np.random.default_rng(1), copies=5)
    assert crops.shape == (len(deltas), 16, 16, 3) and len(deltas) > 30
    moved = apply_deltas(inputs, deltas, meta)
    # Every moved box is exactly one labelled box.
    iou = iou_matrix(moved, frames.boxes)
    assert np.allclose(iou.max(1), 1.0, atol=1e-4)


def test_camera_randomisation_changes_the_crops_not_the_targets():
    from export.camera_aug import STRONG

    frames = tiny_frames(1)
    meta = RefinerMetadata(input_size=16, context=0.5, min_side=8.0)
    plain = epoch_samples(frames, no_pairs(frames), meta, np.random.default_rng(1), copies=5)
    other = epoch_samples(frames, no_pairs(frames), meta, np.random.default_rng(1), copies=5,
                          camera=STRONG, camera_prob=1.0)
    # The camera's draws come after the frame's jitter: the same boxes, with the same
    # targets, seen through another camera.
    np.testing.assert_array_equal(plain[2], other[2])
    np.testing.assert_array_equal(plain[1], other[1])
    assert np.abs(plain[0].astype(int) - other[0]).mean() > 3


def test_flip_mirrors_the_crop_and_its_offsets_alike():
    frames = tiny_frames(1)
    meta = RefinerMetadata(input_size=16, context=0.5, min_side=8.0)
    image, gt = frames.images[0], frames.frame_boxes(0)
    boxes = gt + np.array([[2, -1, 1, 3], [-3, 2, -1, -2]], np.float32)

    def mirror(b):
        return np.stack([SIZE - b[:, 2], b[:, 1], SIZE - b[:, 0], b[:, 3]], 1)

    crops = torch.from_numpy(refiner_crops(image, boxes, meta)).permute(0, 3, 1, 2).float()
    flipped, deltas = hflip(crops, torch.from_numpy(box_targets(boxes, gt, meta)))
    mirrored = refiner_crops(np.ascontiguousarray(image[:, ::-1]), mirror(boxes), meta)
    assert (flipped.permute(0, 2, 3, 1).numpy() - mirrored).__abs__().max() <= 2
    np.testing.assert_allclose(deltas.numpy(), box_targets(mirror(boxes), mirror(gt), meta),
                               atol=1e-6)


def test_refiner_starts_as_the_identity_and_its_loss_falls_on_tiny_data():
    frames = tiny_frames()
    meta = RefinerMetadata(input_size=16, context=0.5, min_side=8.0)
    net = BoxRefinerNet(16, (8, 16))
    x = torch.zeros(3, 3, 16, 16)
    assert torch.equal(net(x), torch.zeros(3, 4))
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert float(refine_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    history = train(net, frames, no_pairs(frames), meta, epochs=12, copies=8, batch_size=32,
                    lr=1e-2)
    assert history[-1] < 0.7 * history[0]


@pytest.mark.parametrize("min_aspect", [1.0, 0.5])
def test_export_matches_torch_through_the_node_refiner(tmp_path, min_aspect):
    frames = tiny_frames(2)
    meta = RefinerMetadata(input_size=16, context=0.5, min_side=8.0,
                           extra={"training_clips": ["synth"]}, min_aspect=min_aspect)
    net = BoxRefinerNet(16, (8, 16)).eval()
    torch.nn.init.normal_(net.head[-1].weight, std=0.05)  # not the identity
    path = export_refiner(net, meta, tmp_path / "r.onnx")
    refiner = BoxRefiner(path, max_boxes=2)
    assert refiner.meta.extra["training_clips"] == ["synth"]
    assert refiner.meta.min_aspect == min_aspect  # the window travels with the model
    boxes = frames.frame_boxes(0) + np.array([1, -1, 2, 1], np.float32)
    # More boxes than the preallocated buffer: it grows.
    boxes = np.concatenate([boxes, boxes + 3])
    got = refiner(frames.images[0], boxes)
    crops = refiner_crops(frames.images[0], boxes, meta)
    with torch.no_grad():
        deltas = net(torch.from_numpy(crops).permute(0, 3, 1, 2).float()).numpy()
    np.testing.assert_allclose(got, apply_deltas(boxes, deltas, meta), atol=1e-3)
    assert not np.allclose(got, boxes)


def test_cli_rejects_bad_sizes_and_missing_caches_in_one_line(tmp_path, capsys):
    from export.refiner_train import main

    assert main(["--out", str(tmp_path / "r"), "--input-size", "30"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --input-size 30: must be a multiple of 8 for 3 --channels")
    assert main(["--out", str(tmp_path / "r"), "--min-aspect", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --min-aspect 0.0: must be in (0, 1]"
    missing = tmp_path / "nope"
    code = main(["--out", str(tmp_path / "r"), "--cache", str(tmp_path / "c.npz"),
                 "--data", str(missing), "--synth-frames", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and str(missing) in err
    assert len(err.splitlines()) == 1


def test_candidates_come_from_the_node_config_with_its_overrides(tmp_path, capsys):
    """``--set`` reaches the proposer whose candidates the refiner learns from (as loco's
    ``--set`` does for the node), and a bad key is refused in one line before any work."""
    from export.refiner_train import candidate_proposer, main
    from node.config import ConfigError

    overrides = ["proposer.heatmap_threshold=0.4",
                 "proposer.body_mask=[[0, 0.9], [1, 0.9], [1, 1]]"]
    cfg = candidate_proposer("configs/node.yaml", overrides, None)
    assert cfg.heatmap_threshold == 0.4
    assert cfg.refiner_model is None and cfg.body_mask == []  # raw, unmasked candidates
    assert candidate_proposer("configs/node.yaml", [], "p.onnx").heatmap_model == "p.onnx"
    with pytest.raises(ConfigError, match="proposer.heatmap_thresh"):
        candidate_proposer("configs/node.yaml", ["proposer.heatmap_thresh=0.4"], None)

    out = tmp_path / "r"
    assert main(["--out", str(out), "--set", "proposer.heatmap_threshold=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "proposer.heatmap_threshold" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_a_budget_that_runs_out_while_an_epoch_is_drawn_logs_no_empty_epoch(monkeypatch):
    """The deadline can pass while an epoch's crops are cut (seconds on real frames): that
    epoch has no step, and its mean loss would be NaN in the history and the fine-tune's
    report."""
    import export.refiner_train as rt

    frames = tiny_frames()
    meta = RefinerMetadata(input_size=16, context=0.5, min_side=8.0)
    draw, calls, late = rt.epoch_samples, [], []

    class Deadline(rt.Schedule):
        @property
        def over(self) -> bool:
            return bool(late)

    def slow_draw(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third epoch's draw outlasts the budget
            late.append(1)
        return draw(*args, **kwargs)

    monkeypatch.setattr(rt, "epoch_samples", slow_draw)
    monkeypatch.setattr(rt, "Schedule", Deadline)
    history = rt.train(BoxRefinerNet(16, (8, 16)), frames, no_pairs(frames), meta, epochs=50,
                       copies=2, batch_size=32, budget_s=60.0)
    assert len(calls) == 3 and len(history) == 2
    assert np.isfinite(history).all()
