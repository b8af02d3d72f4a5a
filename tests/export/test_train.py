"""Training side: config, split by clip, crop cache, colour-safe augmentation, a tiny training
run that must learn, and the checkpoint round trip."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.augment import (
    MAX_STRENGTH,
    SAFE_OPS,
    ColourSafeRandAugment,
    check_ops,
    normalize_tensor,
)
from export.background import HeightByRow, far_from_all, grown, mine_background
from export.data import (
    CLASS_INDEX,
    CropSet,
    cone_mask,
    crops_to_tensor,
    crowd_crops,
    crowd_frame,
    is_heldout,
    jitter_boxes,
    load_cache,
    real_crops,
    save_cache,
)
from export.train_config import BackgroundConfig, ConfigError, load_train_config
from node.classes import CLASSIFIER_CLASSES
from node.evaluate.datasets import Sample
from node.infer.crop import crop_batch
from node.infer.preprocess import normalize
from node.sources.exposure import frame_normaliser

from . import cone_patches

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "train.yaml"
SHARED = ROOT.parent / "shared" / "data" / "bgracing"


# --------------------------------------------------------------------------- config

def test_yaml_matches_dataclass_defaults() -> None:
    assert load_train_config(CONFIG) == load_train_config(None)


@pytest.mark.parametrize("override, key", [
    (["optim.lrr=0.1"], "optim.lrr"),
    (["optim.epochs=zero"], "optim.epochs"),
    (["optim.lr=-1"], "optim.lr"),
    (["augment.randaugment.ops=[Solarize]"], "augment.randaugment.ops"),
    (["model.arch=resnet50"], "model.arch"),
    (["augment.randaugment.magnitude=12"], "augment.randaugment.magnitude"),
    (["data.synth.per_class={purple_cone: 3}"], "data.synth.per_class"),
    (["augment.camera.profile=fisheye"], "augment.camera"),
])
def test_config_errors_name_the_key_and_file(override, key) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(CONFIG, override)
    assert key in str(err.value)
    assert str(CONFIG) in str(err.value) or "command line" in str(err.value)


def test_cli_reports_config_error_in_one_line(capsys) -> None:
    from export.train import main

    assert main(["--config", str(CONFIG), "optim.batch_size=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.batch_size" in err and "\n" not in err


# --------------------------------------------------------------------------- data

def test_split_by_clip_rules() -> None:
    rules = ["accel", "autox2", "skidpad:20-37"]
    assert is_heldout("accel", 3, rules) and is_heldout("accel", None, rules)
    assert is_heldout("autox2", 0, rules)
    assert is_heldout("skidpad", 20, rules) and is_heldout("skidpad", 37, rules)
    assert not is_heldout("skidpad", 19, rules) and not is_heldout("skidpad", 38, rules)
    assert not is_heldout("skidpad", None, rules)  # the two single frames train
    assert not is_heldout("autox", 25, rules)
    with pytest.raises(ValueError, match="CLIP:FIRST-LAST"):
        is_heldout("skidpad", 1, ["skidpad:30-20"])


def test_jitter_stays_within_configured_error() -> None:
    boxes = np.array([[100, 100, 120, 140]] * 2000, np.float32)
    j = jitter_boxes(boxes, np.random.default_rng(0), 0.15, 0.8, 1.25, 0.15)
    shift_x = ((j[:, 0] + j[:, 2]) / 2 - 110) / 20
    assert np.abs(shift_x).max() <= 0.15 + 1e-5 and np.abs(shift_x).max() > 0.12
    area_ratio = (j[:, 2] - j[:, 0]) * (j[:, 3] - j[:, 1]) / 800
    assert 0.8**2 - 1e-3 <= area_ratio.min() and area_ratio.max() <= 1.25**2 + 1e-3


def test_a_crowd_crop_pastes_a_cone_of_the_frame_beside_the_box() -> None:
    """A blue cone (silhouette on grey) and a yellow one far from it: the yellow one is pasted
    beside the blue one, its base near the blue one's; the changed pixels are mostly yellow,
    and the labels stay those of the boxes cropped."""
    image = np.full((200, 300, 3), 110, np.uint8)
    blue, yellow = np.array([100, 60, 120, 110]), np.array([240, 80, 260, 130])
    for (x1, y1, x2, y2), colour in ((blue, (200, 70, 20)), (yellow, (20, 210, 230))):
        image[y1:y2, x1:x2][cone_mask(y2 - y1, x2 - x1)] = colour
    changed_any = False
    for seed in range(20):
        out = crowd_frame(image, blue.astype(np.float32), yellow.astype(np.float32),
                          np.random.default_rng(seed))
        changed = (out != image).any(axis=2)
        assert not changed[:, 230:].any()  # the donor's own place is untouched
        ys, xs = np.nonzero(changed)
        if len(xs):
            changed_any = True
            # beside the box: the pasted cone's middle is off the blue cone's middle column
            assert abs(xs.mean() - 110) >= 5
            assert (out[ys, xs] == (20, 210, 230)).all(axis=1).mean() > 0.5
            assert ys.max() <= 110 + 0.15 * 50 + 1 and ys.min() >= 110 - 1.33 * 50 - 0.15 * 50 - 1
    assert changed_any
    data = load_train_config(None, []).data
    policy, rng = data.crop.policy(), np.random.default_rng(0)
    x, y = crowd_crops(image, np.array([blue, yellow], np.float32), ["blue_cone", "yellow_cone"],
                       32, policy, 2, data.jitter, rng)
    assert x.shape == (4, 32, 32, 3)
    assert y.tolist() == [CLASS_INDEX["blue_cone"]] * 2 + [CLASS_INDEX["yellow_cone"]] * 2
    x, y = crowd_crops(image, blue[None].astype(np.float32), ["blue_cone"], 32, policy, 2,
                       data.jitter, rng)
    assert len(x) == len(y) == 0  # no other cone in the frame


def test_normalise_crops_the_frame_as_the_node_white_balances_it(tmp_path) -> None:
    """``data.normalise``: a frame with a blue cast (grey asphalt recorded as B 150, G 120,
    R 95) is cropped after the node's exposure stage at that tolerance: at 0 the asphalt
    around a cone comes out grey and the crop is the stage's frame cropped; null crops the
    frame as stored."""
    from node.node_config import ExposureConfig
    from node.sources.exposure import Exposure

    image = np.empty((240, 320, 3), np.uint8)
    image[:] = (150, 120, 95)
    image[100:160, 140:170][cone_mask(60, 30)] = (40, 190, 230)  # a yellow cone
    path = tmp_path / "autox_mp4-0_jpg.rf.0.jpg"
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    box = np.array([[140, 100, 170, 160]], np.float32)
    sample = Sample(path, box, ["yellow_cone"], (320, 240))
    data = load_train_config(None, ["data.background.per_frame=0",
                                    "data.background.nose_per_frame=0",
                                    "data.background.colour_blobs_per_frame=0"]).data
    assert data.normalise is None
    policy = data.crop.policy()
    heights = HeightByRow.fit([sample])
    raw, y, _, _ = real_crops([sample], 32, policy, data, True, np.random.default_rng(0), heights)
    assert y.tolist() == [CLASS_INDEX["yellow_cone"]]
    assert np.array_equal(raw, crop_batch(sample.load(), box, 32, policy))
    data.normalise = 0.0
    flat, _, _, _ = real_crops([sample], 32, policy, data, True, np.random.default_rng(0), heights)
    staged = Exposure(ExposureConfig(wb_tolerance=0.0))(sample.load())
    assert np.array_equal(flat, crop_batch(staged, box, 32, policy))
    raw_asphalt, flat_asphalt = (c[0, :3, :3].reshape(-1, 3).mean(axis=0) for c in (raw, flat))
    assert np.ptp(raw_asphalt) > 50 and np.ptp(flat_asphalt) < 4
    assert frame_normaliser(None)(image) is image


def test_torch_normalisation_equals_the_runtime_one() -> None:
    crops, _ = cone_patches(10)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    want = normalize(crops, np.array(mean), np.array(std), to_rgb=True)
    got = normalize_tensor(crops_to_tensor(crops), torch.tensor(mean), torch.tensor(std))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_background_mining_keeps_away_from_cones_and_horizon() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (640, 640, 3), dtype=np.uint8)
    boxes = np.array([[300, 300, 320, 340], [100, 400, 130, 460]], np.float32)
    cfg = BackgroundConfig()
    got = mine_background(image, boxes, rng, cfg, HeightByRow())
    allb = np.concatenate(list(got.values()))
    assert len(got["random"]) == cfg.per_frame and len(got["nose"]) == cfg.nose_per_frame
    assert far_from_all(allb, grown(boxes, cfg.gap, cfg.margin_px)).all()
    top, bottom = (np.array(cfg.horizon_band) * 640)
    assert not np.any((allb[:, 3] >= top) & (allb[:, 1] <= bottom))


def test_proposer_candidates_are_mined_best_first_only_where_safe() -> None:
    """``proposals_per_frame``: the proposer's candidates become background in their order
    (best first), only wholly above the horizon band and away from every label (below the
    band, unlabelled cones are too common)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (640, 640, 3), dtype=np.uint8)
    boxes = np.array([[300, 60, 320, 100]], np.float32)
    cfg = BackgroundConfig(proposals_per_frame=2)  # band: rows 160..269 of 640
    near, in_band, below = [305, 90, 318, 110], [40, 140, 60, 180], [500, 500, 520, 540]
    safe = [[40, 100, 60, 140], [400, 20, 420, 60], [500, 10, 520, 50]]
    got = mine_background(image, boxes, rng, cfg, HeightByRow(),
                          np.array([near, in_band, below, *safe], np.float32))
    assert got["proposal"].tolist() == safe[:2]
    assert "proposal" not in mine_background(image, boxes, rng, cfg, HeightByRow())


def test_proposer_negatives_are_cropped_as_background(tmp_path) -> None:
    """``real_crops`` with a proposer adds its accepted candidates as background crops, cut
    from the frame as every other crop; without one nothing changes. A missing proposer model
    is refused naming the key."""
    from types import SimpleNamespace

    from export.data import DataError, background_proposer

    image = np.full((640, 640, 3), 90, np.uint8)
    path = tmp_path / "autox_mp4-0_jpg.rf.0.jpg"
    cv2.imwrite(str(path), image)
    box = np.array([[300, 60, 320, 100]], np.float32)
    sample = Sample(path, box, ["yellow_cone"], (640, 640))
    data = load_train_config(None, ["data.background.per_frame=0",
                                    "data.background.nose_per_frame=0",
                                    "data.background.proposals_per_frame=4"]).data
    policy, heights = data.crop.policy(), HeightByRow.fit([sample])
    candidates = np.array([[305, 90, 318, 110], [500, 20, 520, 60]], np.float32)
    proposer = SimpleNamespace(propose=lambda frame: candidates)
    args = ([sample], 32, policy, data, True, np.random.default_rng(0), heights)
    x, y, _, sheets = real_crops(*args, proposer)
    assert y.tolist() == [CLASS_INDEX["yellow_cone"], CLASS_INDEX["background"]]
    assert np.array_equal(x[1:], crop_batch(sample.load(), candidates[1:], 32, policy))
    assert np.array_equal(sheets[3], x[1:])  # the contact sheet's proposer group
    assert real_crops(*args)[1].tolist() == [CLASS_INDEX["yellow_cone"]]
    data.background.proposal_copies = 3  # training frames: the crop and two jittered copies
    x, y, _, _ = real_crops([sample], 32, policy, data, False, np.random.default_rng(0),
                            heights, proposer)
    assert (y == CLASS_INDEX["background"]).sum() == 3
    assert np.array_equal(x[y == CLASS_INDEX["background"]][0],
                          crop_batch(sample.load(), candidates[1:], 32, policy)[0])

    assert background_proposer(BackgroundConfig()) is None  # off by default
    with pytest.raises(DataError, match="data.background.proposer_model"):
        background_proposer(BackgroundConfig(proposals_per_frame=1,
                                             proposer_model=str(tmp_path / "none.onnx")))


def test_cache_round_trip_is_lossless(tmp_path) -> None:
    x, names = cone_patches(40)
    y = np.array([CLASS_INDEX[n] for n in names])
    crops = CropSet(x, y, x[:10], y[:10], x[:5], y[:5], np.array(["a"] * 40),
                    np.array(["b"] * 10), input_size=32, info={"heldout": ["b"]})
    save_cache(crops, tmp_path / "c.npz")
    back = load_cache(tmp_path / "c.npz")
    assert np.array_equal(back.train_x, x) and np.array_equal(back.synth_y, y[:5])
    assert back.val_clip.tolist() == ["b"] * 10 and back.info == {"heldout": ["b"]}


# --------------------------------------------------------------------------- augmentation

def _hue_class(bgr: np.ndarray) -> str:
    """Dominant cone colour among saturated pixels (OpenCV hue, 0..180)."""
    hsv = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2HSV).reshape(-1, 3)
    hue = hsv[(hsv[:, 1] > 60) & (hsv[:, 2] > 40), 0].astype(int)
    counts = {"orange": np.sum(hue <= 16) + np.sum(hue >= 170),
              "yellow": np.sum((hue >= 18) & (hue <= 40)),
              "blue": np.sum((hue >= 90) & (hue <= 135))}
    return max(counts, key=counts.get)


def _patches() -> tuple[np.ndarray, list[str]]:
    """Solid colour patches and cones on grey ground: blue, yellow, orange."""
    crops, names = [], []
    for name, bgr in (("blue", (200, 90, 20)), ("yellow", (20, 210, 235)),
                      ("orange", (0, 110, 245))):
        crops.append(np.full((32, 32, 3), bgr, np.uint8))
        cone = np.full((32, 32, 3), 110, np.uint8)
        cv2.fillPoly(cone, [np.array([[16, 4], [6, 28], [26, 28]], np.int32)], bgr)
        crops.append(cone)
        names += [name, name]
    return np.stack(crops), names


def test_unsafe_ops_are_refused() -> None:
    for op in ("Solarize", "Equalize", "AutoContrast"):
        with pytest.raises(ValueError, match=op):
            check_ops([op])


@pytest.mark.parametrize("op", SAFE_OPS)
def test_kept_ops_preserve_the_cone_colour(op) -> None:
    crops, names = _patches()
    images = crops_to_tensor(crops)
    torch.manual_seed(0)
    # The strongest magnitude the config accepts, both signs drawn over 12 tries.
    aug = ColourSafeRandAugment([op], num_ops=1, magnitude=int(MAX_STRENGTH * 30))
    for _ in range(12):
        out = aug(images).numpy().transpose(0, 2, 3, 1)[..., ::-1]
        assert [_hue_class(c) for c in out] == names


def test_solarize_would_flip_colours() -> None:
    """Negative control: the hue check does catch a colour-changing op."""
    from torchvision.transforms.v2 import functional as F

    crops, names = _patches()
    out = F.solarize(crops_to_tensor(crops), 100).numpy().transpose(0, 2, 3, 1)[..., ::-1]
    assert [_hue_class(c) for c in out] != names


# --------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory):
    """60 steps of batch 32 on drawn cone patches through the real ``train()``."""
    from export.train import train

    out = tmp_path_factory.mktemp("train") / "run"
    cfg = load_train_config(CONFIG, [
        f"data.cache={tiny_cache}", f"run.out={out}", "run.progress=false",
        "run.device=cpu", "run.threads=1", "optim.epochs=3", "optim.samples_per_epoch=640",
        "optim.batch_size=32", "optim.warmup_epochs=0.3"])
    metrics = train(cfg)
    return out, metrics


def test_a_cache_built_with_other_frame_normalisation_is_refused(tiny_cache, tmp_path) -> None:
    """The metadata tells the node how the training frames were white-balanced
    (``data.normalise``): a crop cache built otherwise than the config says is refused, and a
    checkpoint of a normalised run carries the tolerance into the model's metadata."""
    from export.checkpoint import metadata_from_checkpoint
    from export.data import DataError
    from export.train import build_crops

    cfg = load_train_config(CONFIG, [f"data.cache={tiny_cache}", "data.normalise=0"])
    with pytest.raises(DataError, match=r"data\.normalise=None but the config has 0\.0"):
        build_crops(cfg)
    cfg.data.normalise = None
    assert len(build_crops(cfg).train_y)
    ckpt = {"classes": list(CLASSIFIER_CLASSES), "input_size": 32, "mean": [0.5] * 3,
            "std": [0.25] * 3, "crop": {}, "arch": "se_resnet_slim32",
            "config": {"data": {"heldout": ["accel"], "normalise": 0.0}}}
    assert metadata_from_checkpoint(ckpt).extra["normalise"] == {"wb_tolerance": 0.0}
    ckpt["config"]["data"]["normalise"] = None
    assert "normalise" not in metadata_from_checkpoint(ckpt).extra


def test_tiny_model_learns_far_above_chance(tiny_run) -> None:
    run, metrics = tiny_run
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["accuracy"] >= 0.6  # chance is 1/5
    assert metrics["count"] == 300 and sum(map(sum, metrics["confusion"])) == 300


def test_checkpoint_round_trip(tiny_run) -> None:
    from export.evaluate import evaluate_crops
    from export.train import load_checkpoint, make_predict_fn, metadata_from_checkpoint

    run, _ = tiny_run
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["arch"] == "se_resnet_slim32" and ckpt["classes"] == list(CLASSIFIER_CLASSES)
    assert ckpt["epoch"] == 3 and ckpt["config"]["optim"]["epochs"] == 3
    model, ckpt2 = load_checkpoint(run / "last.pt")
    vx, vnames = cone_patches(300, seed=2)
    again = evaluate_crops(make_predict_fn(model, torch.device("cpu")), vx, vnames,
                           ckpt2["classes"])
    assert again["accuracy"] == pytest.approx(ckpt["metrics"]["accuracy"])
    meta = metadata_from_checkpoint(ckpt2)
    assert meta.input_size == 32 and meta.crop == ckpt["crop"] and meta.arch == ckpt["arch"]
    assert (run / "config.yaml").is_file() and (run / "best.pt").is_file()


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "images").is_dir(), reason="needs ../shared/data/bgracing")
def test_heldout_clips_hold_small_orange_cones_and_never_train() -> None:
    from export.data import clip_and_frame
    from node.evaluate.datasets import load_samples

    rules = load_train_config(CONFIG).data.heldout
    samples = load_samples(f"yolo:{SHARED}")
    held = [s for s in samples if is_heldout(*clip_and_frame(s.image_path), rules)]
    train = [s for s in samples if not is_heldout(*clip_and_frame(s.image_path), rules)]
    assert {clip_and_frame(s.image_path)[0] for s in held} == {"accel", "autox2", "skidpad"}
    assert len(held) == 10 + 16 + 18 and len(held) + len(train) == len(samples)
    small_orange = sum(s.labels.count("orange_cone") for s in held)
    assert small_orange >= 40
    held_names = {s.image_path.name for s in held}
    assert not held_names & {s.image_path.name for s in train}


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "images").is_dir(), reason="needs ../shared/data/bgracing")
def test_training_frames_that_repeat_heldout_frames_are_dropped() -> None:
    from export.data import clip_and_frame, near_duplicates
    from node.evaluate.datasets import load_samples

    cfg = load_train_config(CONFIG).data
    samples = [s for s in load_samples(f"yolo:{SHARED}")
               if clip_and_frame(s.image_path)[0] == "skidpad"]
    held = [s for s in samples if is_heldout(*clip_and_frame(s.image_path), cfg.heldout)]
    train = [s for s in samples if not is_heldout(*clip_and_frame(s.image_path), cfg.heldout)]
    dups = near_duplicates(train, held, cfg.duplicate_threshold)
    assert [(a.split("_jpg")[0], b.split("_jpg")[0]) for a, b, _ in dups] == [
        ("skidpad_2", "skidpad_mp4-21")]


def test_ablation_runs_every_variant_per_seed(tiny_cache, tmp_path) -> None:
    from export.ablation import main

    assert main(["--config", str(CONFIG), "--seeds", "0", "1", "--out", str(tmp_path),
                 "--variants", "baseline,no_se", f"data.cache={tiny_cache}",
                 "run.progress=false", "run.threads=1", "optim.epochs=1",
                 "optim.samples_per_epoch=64", "optim.batch_size=32"]) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    runs = {(r["variant"], r["seed"], r["arch"]) for r in result["runs"]}
    assert runs == {("baseline", 0, "se_resnet_slim32"), ("baseline", 1, "se_resnet_slim32"),
                    ("no_se", 0, "resnet_slim32"), ("no_se", 1, "resnet_slim32")}
    mean, spread = result["summary"]["baseline"]["cone_accuracy"]
    accs = [r["metrics"]["cone_accuracy"] for r in result["runs"] if r["variant"] == "baseline"]
    assert mean == pytest.approx(np.mean(accs)) and spread == pytest.approx(np.std(accs))
    table = (tmp_path / "ablation.md").read_text()
    assert "| baseline |" in table and "| no_se |" in table
