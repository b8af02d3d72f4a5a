"""Tests of the cone-heatmap proposer's training side: CenterNet targets, augmentation that
moves boxes with the image, a loss that falls on tiny data, and ONNX export parity with torch
(and with the node's decoder reading the metadata)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from export.proposer_data import (
    ProposerFrames,
    augment_frame,
    centre_targets,
    load_frames,
    save_frames,
)
from export.proposer_train import (
    ConeHeatmapNet,
    ExportWrapper,
    export_proposer,
    normalise_batch,
    train,
)
from node.heatmap_proposer import (
    ProposerMetadata,
    decode_heatmap,
    open_session,
    to_input_tensor,
)

SIZE = 64


def tiny_frames(n: int = 4) -> ProposerFrames:
    """Grey frames with one bright orange 'cone' rectangle each, at known places."""
    rng = np.random.default_rng(0)
    images, boxes = [], []
    for _ in range(n):
        img = np.full((SIZE, SIZE, 3), 90, np.uint8)
        x, y = rng.integers(8, 48, 2)
        img[y:y + 10, x:x + 6] = (20, 110, 245)
        images.append(img)
        boxes.append(np.array([[x, y, x + 6, y + 10]], np.float32))
    starts = np.arange(n + 1, dtype=np.int64)
    return ProposerFrames(np.stack(images), np.concatenate(boxes), starts,
                          np.array(["autox"] * n), np.array([f"f{i}" for i in range(n)]))


def test_targets_peak_at_the_centre_with_size_and_offset():
    t = centre_targets(np.array([[10, 20, 18, 36]], np.float32), SIZE, 4)
    # Centre (14, 28) px = cell (3.5, 7.0): peak at column 3, row 7, offset (0.5, 0.0).
    assert t["heat"].shape == (1, 16, 16) and t["heat"][0, 7, 3] == 1.0
    assert t["heat"].max() == 1.0 and (t["heat"] == 1.0).sum() == 1
    assert t["mask"][0, 7, 3] == 1.0 and t["mask"].sum() == 1
    np.testing.assert_allclose(t["size"][:, 7, 3], [np.log(16), np.log(8)], rtol=1e-6)
    np.testing.assert_allclose(t["offset"][:, 7, 3], [0.5, 0.0], atol=1e-6)
    boxes, _ = decode_heatmap(t["heat"][0], t["size"], t["offset"], 4, 0.99, 5)
    np.testing.assert_allclose(boxes, [[10, 20, 18, 36]], atol=1e-4)


def test_augmentation_moves_boxes_with_the_image():
    frames = tiny_frames(1)
    img, box = frames.images[0], frames.frame_boxes(0)
    for seed in range(8):
        out, nb = augment_frame(img, box, np.random.default_rng(seed), flip=True)
        if not len(nb):
            continue
        x1, y1, x2, y2 = np.round(nb[0]).astype(int)
        inside = out[y1 + 2:y2 - 2, x1 + 1:x2 - 1].astype(int)
        # The orange patch (red channel well above blue) lies under the moved box.
        assert inside.size and (inside[..., 2] - inside[..., 0]).mean() > 60


def test_cache_round_trip(tmp_path):
    frames = tiny_frames(3)
    save_frames(frames, tmp_path / "p.npz")
    back = load_frames(tmp_path / "p.npz")
    np.testing.assert_array_equal(back.images, frames.images)
    np.testing.assert_array_equal(back.frame_boxes(2), frames.frame_boxes(2))
    assert back.subset(np.array([False, True, True])).names.tolist() == ["f1", "f2"]


def test_loss_falls_in_a_few_steps_on_tiny_data():
    torch.manual_seed(0)
    net = ConeHeatmapNet()
    losses = train(net, tiny_frames(4), ProposerMetadata(input_size=SIZE), 1, batch_size=4,
                   lr=1e-2, max_steps=20)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_onnx_export_matches_torch_and_carries_metadata(tmp_path):
    torch.manual_seed(0)
    net = ConeHeatmapNet().eval()
    meta = ProposerMetadata(input_size=SIZE, extra={"training_clips": ["autox", "synth"]})
    path = export_proposer(net, meta, tmp_path / "p.onnx")
    session, read = open_session(path)
    assert read.input_size == SIZE and read.stride == 4
    assert read.extra["training_clips"] == ["autox", "synth"]
    image = np.random.default_rng(1).integers(0, 255, (128, 96, 3), np.uint8)
    x = to_input_tensor(image, read)
    got = session.run(None, {session.get_inputs()[0].name: x})
    with torch.inference_mode():
        ref = ExportWrapper(net)(torch.from_numpy(x))
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4)
    # Training normalises exactly as the node does.
    small = __import__("cv2").resize(image, (SIZE, SIZE), interpolation=3)  # INTER_AREA
    np.testing.assert_allclose(normalise_batch(small[None], read).numpy(), x, atol=1e-5)
