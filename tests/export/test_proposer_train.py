"""Tests of the cone-heatmap proposer's training side: CenterNet targets, augmentation that
moves boxes with the image, a loss that falls on tiny data, and ONNX export parity with torch
(and with the node's decoder reading the metadata)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from export.data import DataError
from export.proposer_data import (
    ProposerFrames,
    augment_frame,
    centre_targets,
    load_frames,
    save_frames,
)
from export.proposer_train import (
    STEMS,
    ConeHeatmapNet,
    ExportWrapper,
    detection_loss,
    export_proposer,
    fold_input_normalisation,
    load_init,
    net_channels,
    normalise_batch,
    stem_metadata,
    train,
    widen,
)
from node.propose.heatmap import (
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
        out, nb = augment_frame(img, box, np.random.default_rng(seed), flip=True, camera=None)
        if not len(nb):
            continue
        x1, y1, x2, y2 = np.round(nb[0]).astype(int)
        inside = out[y1 + 2:y2 - 2, x1 + 1:x2 - 1].astype(int)
        # The orange patch (red channel well above blue) lies under the moved box.
        assert inside.size and (inside[..., 2] - inside[..., 0]).mean() > 60


def test_augmented_boxes_stay_centred_on_their_cones():
    """A bright 4x4 block and its box through zoom, stretch and mirroring: the block's centre
    of mass (pixel u spans [u, u + 1)) and the box's centre agree in the window to 0.2 px
    (bilinear sampling), mirrored or not. Boxes moved as pixel indices once sat (1 - sx) / 2
    pixels off their cones, (1 + zoom * stretch) / 2 to the left in a mirrored window."""
    img = np.zeros((96, 96, 3), np.uint8)
    img[40:44, 46:50] = 255
    box = np.array([[46, 40, 50, 44]], np.float32)
    for flip in (False, True):
        offsets = []
        for seed in range(100):
            out, nb = augment_frame(img, box, np.random.default_rng(seed), flip=flip,
                                    camera=None, scale_range=(0.7, 1.8),
                                    aspect_range=(0.8, 2.0))
            if len(nb) != 1:
                continue
            # The block's neighbourhood only: a window wider than the frame shows reflections.
            x1, y1 = (int(np.floor(v)) - 3 for v in nb[0, :2])
            x2, y2 = (int(np.ceil(v)) + 3 for v in nb[0, 2:])
            if x1 < 0 or y1 < 0 or x2 > out.shape[1] or y2 > out.shape[0]:
                continue  # cut by the window
            lum = out[y1:y2, x1:x2, 0].astype(np.float64)
            com_x = (lum.sum(0) * (np.arange(x1, x2) + 0.5)).sum() / lum.sum()
            com_y = (lum.sum(1) * (np.arange(y1, y2) + 0.5)).sum() / lum.sum()
            offsets.append((com_x - (nb[0, 0] + nb[0, 2]) / 2,
                            com_y - (nb[0, 1] + nb[0, 3]) / 2))
        assert len(offsets) >= 40, flip
        np.testing.assert_allclose(offsets, 0.0, atol=0.2, err_msg=f"flip={flip}")


def test_augmentation_stretches_cones_as_another_camera_would():
    """The horizontal stretch reaches a camera whose frames were not squashed to a square
    (cones about 16/9 as wide relative to their height) and stays within its range."""
    frames = tiny_frames(1)
    img, box = frames.images[0], frames.frame_boxes(0)
    ratios = []
    for seed in range(60):
        _, nb = augment_frame(img, box, np.random.default_rng(seed), flip=False, camera=None,
                              scale_range=(1.0, 1.0))
        if len(nb) and nb[0, 0] > 0 and nb[0, 2] < img.shape[1]:  # not cut by the window
            ratios.append(((nb[0, 2] - nb[0, 0]) / (nb[0, 3] - nb[0, 1]))
                          / ((box[0, 2] - box[0, 0]) / (box[0, 3] - box[0, 1])))
    assert len(ratios) >= 20
    assert 0.8 - 1e-3 <= min(ratios) and max(ratios) <= 2.0 + 1e-3
    assert max(ratios) > 1.7 and min(ratios) < 1.0


def test_cache_round_trip(tmp_path):
    frames = tiny_frames(3)
    save_frames(frames, tmp_path / "p.npz")
    back = load_frames(tmp_path / "p.npz")
    np.testing.assert_array_equal(back.images, frames.images)
    np.testing.assert_array_equal(back.frame_boxes(2), frames.frame_boxes(2))
    assert back.subset(np.array([False, True, True])).names.tolist() == ["f1", "f2"]


def test_regression_targets_are_dense_about_the_centre():
    """Size and offset are set on the cells about the centre (TTFNet), each decoding to the
    same box; the weights of one cone sum to 1 and peak at the centre cell."""
    t = centre_targets(np.array([[10, 20, 18, 36]], np.float32), SIZE, 4)
    w = t["weight"][0]
    assert w.sum() == pytest.approx(1.0) and w.argmax() == 7 * 16 + 3
    cells = np.argwhere(w > 0)
    assert len(cells) >= 9
    for y, x in cells:
        cx, cy = (x + t["offset"][0, y, x]) * 4, (y + t["offset"][1, y, x]) * 4
        assert (cx, cy) == pytest.approx((14.0, 28.0))
        np.testing.assert_allclose(np.exp(t["size"][:, y, x]), [16, 8], rtol=1e-5)
    # Of two overlapping cones, a shared cell belongs to the smaller one.
    two = centre_targets(np.array([[0, 0, 40, 40], [16, 16, 24, 28]], np.float32), SIZE, 4)
    assert two["weight"][0].sum() == pytest.approx(2.0)
    np.testing.assert_allclose(np.exp(two["size"][:, 5, 5]), [12, 8], rtol=1e-5)


def test_touching_cones_keep_their_own_boxes_at_their_centre_cells():
    """A gate: a large cone with a smaller one in front of it, one cell apart. Each centre
    cell regresses its own cone's box (a smaller cone's region used to take the larger
    cone's centre cell, so its heat peak decoded to the wrong box)."""
    boxes = np.array([[20, 8, 36, 48], [26, 22, 38, 46]], np.float32)
    t = centre_targets(boxes, SIZE, 4)
    for x1, y1, x2, y2 in boxes:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        x, y = int(cx // 4), int(cy // 4)
        assert t["heat"][0, y, x] == 1.0
        np.testing.assert_allclose(np.exp(t["size"][:, y, x]), [y2 - y1, x2 - x1], rtol=1e-5)
        assert ((x + t["offset"][0, y, x]) * 4, (y + t["offset"][1, y, x]) * 4) == \
            pytest.approx((cx, cy))
    assert t["weight"][0].sum() == pytest.approx(2.0)


def test_loss_is_zero_where_the_prediction_is_the_target():
    t = centre_targets(np.array([[10, 20, 18, 36], [30, 30, 40, 50]], np.float32), SIZE, 4)
    tt = {k: torch.from_numpy(v[None]) for k, v in t.items()}
    logits = torch.where(tt["heat"] == 1.0, torch.tensor(20.0), torch.tensor(-20.0))
    perfect = detection_loss((logits, tt["size"], tt["offset"]), tt)
    worse = detection_loss((logits, tt["size"] + 0.3, tt["offset"]), tt)
    assert float(perfect) < 1e-3 < float(worse)


@pytest.mark.parametrize("stem", STEMS)
def test_loss_falls_in_a_few_steps_on_tiny_data(stem):
    torch.manual_seed(0)
    net = ConeHeatmapNet(stem=stem)
    # Geometry jitter only: the camera randomisation makes 20 steps too noisy to compare.
    losses = train(net, tiny_frames(4), stem_metadata(stem, SIZE), 1, batch_size=4,
                   lr=1e-2, max_steps=20, augmentation={"camera": None, "aspect_range": None,
                                                        "scale_range": (0.8, 1.3)})
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_folding_the_normalisation_into_the_stem_is_exact():
    torch.manual_seed(0)
    net = ConeHeatmapNet(stem="patch4").eval()
    for m in net.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randint(0, 256, (2, 3, SIZE, SIZE)).float()
    folded = fold_input_normalisation(net)
    assert not folded.normalise_input and net.normalise_input
    with torch.inference_mode():
        for a, b in zip(net(x), folded(x), strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


@pytest.mark.parametrize("stem", STEMS)
def test_onnx_export_matches_torch_and_carries_metadata(tmp_path, stem):
    torch.manual_seed(0)
    net = ConeHeatmapNet(stem=stem).eval()
    meta = stem_metadata(stem, SIZE)
    meta.extra = {"training_clips": ["autox", "synth"]}
    path = export_proposer(net, meta, tmp_path / "p.onnx")
    session, read = open_session(path)
    assert read.input_size == SIZE and read.stride == 4
    assert read.extra["training_clips"] == ["autox", "synth"]
    image = np.random.default_rng(1).integers(0, 255, (128, 96, 3), np.uint8)
    x = to_input_tensor(image, read)
    got = session.run(None, {session.get_inputs()[0].name: x})
    assert got[0].shape == (1, 1, SIZE // 4, SIZE // 4)
    with torch.inference_mode():
        ref = ExportWrapper(net)(torch.from_numpy(x))
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4)
    # Training normalises exactly as the node does.
    small = __import__("cv2").resize(image, (SIZE, SIZE), interpolation=3)  # INTER_AREA
    np.testing.assert_allclose(normalise_batch(small[None], read).numpy(), x, atol=1e-5)
    if stem.startswith("patch4"):  # raw BGR pixels: the node only transposes a frame of the input size
        frame = image[:SIZE, :SIZE]
        np.testing.assert_array_equal(to_input_tensor(frame, read)[0],
                                      frame.transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize("scale", [("0", "1.5"), ("1.5", "1.0")])
def test_a_bad_scale_range_is_refused_before_any_work(tmp_path, scale, capsys):
    from export.proposer_train import main as proposer_main

    assert proposer_main(["--out", str(tmp_path / "run"), "--scale-range", *scale]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scale-range" in err[0] and not (tmp_path / "run").exists()


def test_init_checkpoint_must_match_the_stem(tmp_path):
    net = ConeHeatmapNet(stem="patch4")
    path = tmp_path / "best.pt"
    torch.save({"state_dict": net.state_dict(), "channels": [16, 24, 32, 48], "stem": "patch4"},
               path)
    fresh = ConeHeatmapNet(stem="patch4")
    weights, stages, channels = load_init(path, "patch4")
    assert channels == (16, 24, 32, 48)
    fresh.load_state_dict(weights)
    assert stages == []  # a checkpoint from before stages were recorded
    stage = {"epochs": 3, "lr": 1e-3, "synth_frames": 0, "init": None}
    torch.save({"state_dict": net.state_dict(), "channels": [16, 24, 32, 48], "stem": "patch4",
                "stages": [stage]}, path)
    assert load_init(path, "patch4")[1] == [stage]
    for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(DataError, match="best.pt: a patch4 net .* not --stem conv"):
        load_init(path, "conv")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.pt: not a proposer checkpoint"):
        load_init(tmp_path / "junk.pt", "patch4")


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "models" /
                         "cone_proposer.onnx").is_file(), reason="bundled proposer absent")
def test_the_bundled_onnx_loads_back_into_torch_and_trains_from_there():
    """Importing models/cone_proposer.onnx gives a net that computes what ONNX Runtime does,
    and a training step with frozen BatchNorms changes the weights but not the folded
    statistics."""
    import onnxruntime as ort

    from export.proposer_train import ExportWrapper, import_proposer

    model = Path(__file__).resolve().parents[2] / "models" / "cone_proposer.onnx"
    net = import_proposer(model)
    x = torch.rand(1, 3, 192, 256) * 255
    with torch.no_grad():
        ours = ExportWrapper(net).eval()(x)
    theirs = ort.InferenceSession(str(model)).run(None, {"image": x.numpy()})
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-4)
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    var = bn.running_var.clone()
    before = net.heat.weight.clone()
    train(net, tiny_frames(4), stem_metadata("patch4", SIZE), 1, batch_size=4, lr=1e-3,
          max_steps=2, freeze_bn=True)
    assert torch.equal(bn.running_var, var)
    assert not torch.equal(net.heat.weight, before)


def test_a_file_that_is_not_a_proposer_is_named(tmp_path):
    from export.proposer_train import import_proposer

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"nope")
    with pytest.raises(DataError, match="junk.onnx: cannot load into a patch4 proposer"):
        import_proposer(junk)
    refiner = Path(__file__).resolve().parents[2] / "models" / "cone_refiner.onnx"
    if refiner.is_file():
        with pytest.raises(DataError, match="cone_refiner.onnx: cannot load"):
            import_proposer(refiner)


@pytest.mark.parametrize("stem", STEMS)
def test_a_widened_net_computes_what_it_did_and_its_new_channels_learn(stem):
    """``widen`` (Net2Net, zero-weight form): every output is unchanged to float rounding,
    the widths are the new ones, the old weights are copied, and one training step moves the
    weights that read the new channels off zero (they are not dead)."""
    torch.manual_seed(3)
    net = ConeHeatmapNet(stem=stem).eval()
    with torch.no_grad():  # statistics that are not the identity, so copying them matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    wide = widen(net, (24, 32, 64, 96)).eval()
    assert net_channels(net) == (16, 24, 32, 48) and net_channels(wide) == (24, 32, 64, 96)
    x = torch.rand(2, 3, 64, 96) * (255 if stem.startswith("patch4") else 1)
    with torch.no_grad():
        for a, b in zip(net(x), wide(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    old = net.heat.in_channels  # the heads read the stride-4 features
    assert torch.count_nonzero(wide.heat.weight[:, old:]) == 0
    assert torch.equal(wide.heat.weight[:, :old], net.heat.weight)
    train(wide, tiny_frames(4), stem_metadata(stem, SIZE), 1, batch_size=4, lr=1e-2,
          max_steps=2)
    assert torch.count_nonzero(wide.heat.weight[:, old:]) > 0
    with pytest.raises(ValueError, match="narrower"):
        widen(net, (8, 24, 32, 48))


def _tiny_cli_args(tmp_path: Path, out: Path) -> list[str]:
    """``python -m export.proposer_train`` options for one epoch on six drawn frames, from an
    ``--init`` checkpoint of the default widths."""
    import yaml

    frames = tiny_frames(6)
    root = Path(__file__).resolve().parents[2]
    heldout = yaml.safe_load((root / "configs" / "train.yaml").read_text())["data"]["heldout"]
    frames.info = {"heldout": heldout, "synth_frames": 0, "synth_seed": 0}
    cache = tmp_path / "frames.npz"
    save_frames(frames, cache)
    init = tmp_path / "init.pt"
    torch.manual_seed(0)
    torch.save({"state_dict": ConeHeatmapNet(stem="patch4").state_dict(),
                "channels": [16, 24, 32, 48], "stem": "patch4"}, init)
    return ["--out", str(out), "--cache", str(cache), "--input-size", str(SIZE), "--crop", "0",
            "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--threads", "1",
            "--val-clips", "--init", str(init), "--max-candidates", "8", "--synth-frames", "0",
            "--synth-seed", "0"]


def test_proposer_cli_widens_the_init_model_and_exports_its_widths(tmp_path):
    """``--channels`` wider than the ``--init`` model's widens it before training, and the
    checkpoint and the ONNX metadata carry the new widths, which ``import_proposer`` reads
    back; narrower ones are refused in one line."""
    from export.proposer_train import import_proposer
    from export.proposer_train import main as proposer_main

    out = tmp_path / "run"
    args = _tiny_cli_args(tmp_path, out)
    assert proposer_main([*args, "--channels", "16", "32", "48", "64"]) == 0
    assert torch.load(out / "best.pt", weights_only=True)["channels"] == [16, 32, 48, 64]
    meta = open_session(out / "cone_proposer.onnx")[1]
    assert meta.extra["channels"] == [16, 32, 48, 64]
    assert meta.extra["stages"][-1]["channels"] == [16, 32, 48, 64]
    assert net_channels(import_proposer(out / "cone_proposer.onnx")) == (16, 32, 48, 64)
    assert proposer_main([*args, "--channels", "8", "24", "32", "48"]) == 2


def test_proposer_cli_seed_repeats_a_run_and_another_seed_changes_it(tmp_path):
    """The same ``--seed`` trains the same weights; another seed other ones (its draws of
    windows and batches), and the stage records it."""
    from export.proposer_train import main as proposer_main

    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        assert proposer_main([*_tiny_cli_args(tmp_path, out), "--seed", str(seed)]) == 0
        weights[name] = torch.load(out / "best.pt", weights_only=True)["state_dict"]
        assert open_session(out / "cone_proposer.onnx")[1].extra["stages"][-1]["seed"] == seed
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


def test_clip_balance_sets_each_clips_share_of_the_training():
    """Power 1 keeps every frame equal, 0 every clip (rendered frames as one), 0.5 gives each
    clip a share proportional to the square root of its frame count."""
    from export.proposer_train import clip_weights

    clips = np.array(["autox6"] * 64 + ["accel"] * 4 + ["synth"] * 16)
    for power, expected in ((1.0, (64, 4, 16)), (0.0, (1, 1, 1)), (0.5, (8, 2, 4))):
        w = clip_weights(clips, power)
        shares = np.array([w[clips == c].sum() for c in ("autox6", "accel", "synth")])
        assert shares == pytest.approx(np.array(expected) / sum(expected))
        assert np.ptp(w[clips == "accel"]) == 0  # frames of one clip stay equal


def test_training_draws_frames_in_the_given_proportions(monkeypatch):
    """With ``frame_weights`` each epoch's batches draw frames with replacement in those
    proportions; without, every frame once per epoch."""
    import export.proposer_train as pt

    seen: list[int] = []
    real_make_batch = pt.make_batch

    def recording(frames, idx, *args, **kwargs):
        seen.extend(int(i) for i in idx)
        return real_make_batch(frames, idx, *args, **kwargs)

    monkeypatch.setattr(pt, "make_batch", recording)
    frames, meta = tiny_frames(8), stem_metadata("conv", SIZE)
    aug = {"camera": None, "aspect_range": None, "scale_range": (1.0, 1.0)}
    train(ConeHeatmapNet(stem="conv"), frames, meta, 2, batch_size=4, augmentation=aug)
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:]) == list(range(8))
    seen.clear()
    weights = np.array([0.5, 0.5, 0, 0, 0, 0, 0, 0])
    train(ConeHeatmapNet(stem="conv"), frames, meta, 3, batch_size=4, augmentation=aug,
          frame_weights=weights)
    assert len(seen) == 24 and set(seen) == {0, 1}


@pytest.mark.parametrize("power", ["-0.5", "1.5"])
def test_a_bad_clip_balance_is_refused_before_any_work(tmp_path, power, capsys):
    from export.proposer_train import main as proposer_main

    assert proposer_main(["--out", str(tmp_path / "run"), "--clip-balance", power]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clip-balance" in err[0] and not (tmp_path / "run").exists()


def test_proposer_cli_records_the_clip_balance(tmp_path):
    from export.proposer_train import main as proposer_main

    out = tmp_path / "run"
    assert proposer_main([*_tiny_cli_args(tmp_path, out), "--clip-balance", "0.5"]) == 0
    assert open_session(out / "cone_proposer.onnx")[1].extra["stages"][-1]["clip_balance"] == 0.5
