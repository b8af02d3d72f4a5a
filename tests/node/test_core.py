"""Tests of the node's single sources of truth: class names, crop policy, preprocessing,
metadata and the config loader."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from node.classes import BACKGROUND, CLASSIFIER_CLASSES, DATASET_IDS, canonical_name, names_from_ids
from node.config import ConfigError, load_config, spec
from node.infer.crop import CropPolicy, crop_batch
from node.infer.metadata import MetadataError, ModelMetadata
from node.infer.preprocess import Preprocessor, normalize


def test_foreign_ids_map_by_name():
    fsoco = DATASET_IDS["fsoco"]
    bgr = DATASET_IDS["bgracing"]
    assert fsoco[0] == bgr[3] == "yellow_cone"
    assert fsoco[1] == bgr[0] == "blue_cone"
    assert fsoco[3] == bgr[1] == "large_orange_cone"
    assert names_from_ids(["Big Orange", "blue", "Yellow-Cone"]) == {
        0: "large_orange_cone", 1: "blue_cone", 2: "yellow_cone"}
    assert BACKGROUND in CLASSIFIER_CLASSES and "unknown_cone" not in CLASSIFIER_CLASSES
    with pytest.raises(KeyError, match="traffic_light"):
        canonical_name("traffic_light")


def _gradient_frame(h=60, w=80):
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 3 % 256, ys * 4 % 256, (xs + ys) % 256], -1).astype(np.uint8)


def test_crop_inside_frame_is_exact_resample():
    frame = _gradient_frame()
    policy = CropPolicy(context=0.0)
    # A 16x16 box cropped at 16 px is an identity copy of the pixels.
    crops = crop_batch(frame, np.array([[10, 20, 26, 36]]), 16, policy)
    np.testing.assert_array_equal(crops[0], frame[20:36, 10:26])


def test_crop_square_uses_longer_side_with_context():
    policy = CropPolicy(context=0.25)
    sq = policy.square_boxes(np.array([[10, 10, 20, 50]], np.float32))[0]
    side = 40 * 1.5
    np.testing.assert_allclose(sq, [15 - side / 2, 30 - side / 2, 15 + side / 2, 30 + side / 2])


def test_crop_min_aspect_narrows_a_thin_box_window_and_stretches_it():
    policy = CropPolicy(context=0.25, min_aspect=0.5)
    box = np.array([[10, 10, 20, 50]], np.float32)  # 10 x 40: window 20 x 40, times 1.5
    np.testing.assert_allclose(policy.windows(box)[0], [0, 0, 30, 60])
    np.testing.assert_allclose(policy.windows(np.array([[0, 0, 40, 30]]))[0],
                               [-10, -7.5, 50, 37.5])  # a wide box: each side its own
    square = CropPolicy(context=0.25)
    np.testing.assert_array_equal(square.windows(box), square.square_boxes(box))
    # Vertical stripes 2 px wide: the 10 x 20 box's window is the box itself, its 10
    # columns stretched over the crop's 16 (a square window would take 20).
    frame = np.zeros((80, 80, 3), np.uint8)
    frame[:, (np.arange(80) // 2) % 2 == 1] = 255
    crop = crop_batch(frame, np.array([[30, 20, 40, 40]]), 16,
                      CropPolicy(context=0.0, min_aspect=0.5))[0, :, :, 0]
    np.testing.assert_array_equal(crop, crop[:1].repeat(16, 0))  # rows unchanged down
    cols = (np.arange(16) + 0.5) * 10 / 16 + 30 - 0.5  # source pixel centres sampled
    lo = np.floor(cols).astype(int)
    ref = frame[0, lo, 0] * (1 - (cols - lo)) + frame[0, lo + 1, 0] * (cols - lo)
    np.testing.assert_allclose(crop[0], ref, atol=1)
    assert CropPolicy(min_aspect=0.5).to_dict()["min_aspect"] == 0.5
    assert "min_aspect" not in CropPolicy().to_dict()  # square policies read as before
    with pytest.raises(ValueError, match="min_aspect"):
        CropPolicy(min_aspect=0.0)


@pytest.mark.parametrize("box", [[-30, -30, -5, -5], [70, 50, 100, 90], [-8, 10, 8, 26]])
def test_crop_pads_at_frame_edges(box):
    frame = np.full((60, 80, 3), 200, np.uint8)
    policy = CropPolicy(context=0.0, pad="constant", pad_value=7)
    crop = crop_batch(frame, np.array([box]), 16, policy)[0]
    x1, y1, x2, y2 = box
    inside_x = (np.arange(16) + 0.5) * (x2 - x1) / 16 + x1
    inside_y = (np.arange(16) + 0.5) * (y2 - y1) / 16 + y1
    in_x = (inside_x >= 0.5) & (inside_x <= 79.5)
    in_y = (inside_y >= 0.5) & (inside_y <= 59.5)
    inside = in_y[:, None] & in_x[None, :]
    outside = (~((inside_y >= -0.5) & (inside_y <= 60.5)))[:, None] | \
              (~((inside_x >= -0.5) & (inside_x <= 80.5)))[None, :]
    assert np.all(crop[inside] == 200)
    assert np.all(crop[outside] == 7)
    replicate = crop_batch(frame, np.array([box]), 16, CropPolicy(context=0.0, pad="replicate"))
    assert np.all(replicate == 200)


def test_crop_is_independent_of_batch_company():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    small = np.array([[50, 50, 70, 80]], np.float32)
    big = np.array([[0, 0, 300, 230]], np.float32)
    alone = crop_batch(frame, small, 32)
    together = crop_batch(frame, np.concatenate([big, small]), 32)
    np.testing.assert_array_equal(alone[0], together[1])


@pytest.mark.parametrize("pad", ["constant", "replicate"])
def test_crop_shrinks_only_the_region_it_samples_exactly(pad):
    # Large boxes sample a pyramid level; only the region around them is shrunk. The crops
    # must equal, bit for bit, crops sampled from the whole frame's pyramid, for boxes inside
    # the frame, across its edges and wholly outside it, on a frame of odd size.
    from node.infer.crop import sampling_grid

    rng = np.random.default_rng(7)
    frame = rng.integers(0, 256, (479, 601, 3), dtype=np.uint8)
    frame = cv2.GaussianBlur(frame, (0, 0), 2.0)  # structure at every scale, not only noise
    centres = rng.uniform(-60, 660, (40, 2))
    sides = np.exp(rng.uniform(np.log(6), np.log(420), (40, 1)))
    boxes = np.hstack([centres - sides / 2, centres + sides / 2]).astype(np.float32)
    boxes = np.vstack([boxes, [[-900, -900, -700, -700], [560, 430, 700, 560]]]).astype(np.float32)
    policy = CropPolicy(pad=pad)
    crops = crop_batch(frame, boxes, 32, policy)

    squares = policy.square_boxes(boxes)
    levels = np.clip(np.floor(np.log2(np.maximum((squares[:, 2] - squares[:, 0]) / 32, 1))),
                     0, 4).astype(int)
    assert set(levels.tolist()) >= {0, 1, 2, 3}
    pyramid = [frame]
    for _ in range(4):
        pyramid.append(cv2.pyrDown(pyramid[-1]))
    border = cv2.BORDER_CONSTANT if pad == "constant" else cv2.BORDER_REPLICATE
    for i, level in enumerate(levels):
        map_x, map_y = sampling_grid(squares[i:i + 1] / float(2**level), 32)
        want = cv2.remap(pyramid[level], map_x, map_y, cv2.INTER_LINEAR, borderMode=border,
                         borderValue=(114, 114, 114))
        np.testing.assert_array_equal(crops[i], want, err_msg=f"box {i}, level {level}")


@pytest.mark.parametrize("pad", ["constant", "replicate"])
@pytest.mark.parametrize("height", [20, 28, 36, 44])
def test_a_square_beyond_a_small_frame_is_cropped_as_from_the_whole_pyramid(pad, height):
    """A square wholly below a small frame samples the frame's bottom rows (or the padding
    next to them): the region shrunk for it must keep its margin above the frame's edge, not
    above the square, or the bottom rows differ from the whole frame's pyramid by a level."""
    from node.infer.crop import sampling_grid

    frame = np.random.default_rng(height).integers(0, 256, (height, 4, 3), dtype=np.uint8)
    policy = CropPolicy(context=0.0, pad=pad, min_side=32.0)  # 32 px squares at size 8: level 2
    boxes = np.array([[0, 60, 0, 60], [0, 0, 0, 0]], np.float32)
    alone = crop_batch(frame, boxes[:1], 8, policy)[0]
    np.testing.assert_array_equal(alone, crop_batch(frame, boxes, 8, policy)[0])
    level2 = cv2.pyrDown(cv2.pyrDown(frame))
    map_x, map_y = sampling_grid(policy.square_boxes(boxes[:1]) / 4.0, 8)
    border = cv2.BORDER_CONSTANT if pad == "constant" else cv2.BORDER_REPLICATE
    want = cv2.remap(level2, map_x, map_y, cv2.INTER_LINEAR, borderMode=border,
                     borderValue=(114, 114, 114))
    np.testing.assert_array_equal(alone, want)


def test_crop_rejects_bad_frames_and_handles_degenerate_boxes():
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        crop_batch(np.zeros((10, 10), np.uint8), np.zeros((1, 4)), 8)
    frame = _gradient_frame()
    out = crop_batch(frame, np.array([[5, 5, 5, 5], [0, 0, 1, 80]]), 8)  # zero and 1-px wide
    assert out.shape == (2, 8, 8, 3)
    assert crop_batch(frame, np.zeros((0, 4)), 8).shape == (0, 8, 8, 3)
    with pytest.raises(ValueError, match="finite"):
        crop_batch(frame, np.array([[0, 0, np.nan, 4]]), 8)


def test_normalize_matches_reference():
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    ref = ((crops[..., ::-1] / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(normalize(crops, mean, std, to_rgb=True), ref, atol=1e-5)
    ref_bgr = ((crops / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(normalize(crops, mean, std, to_rgb=False), ref_bgr, atol=1e-5)


def test_preprocessor_grows_and_matches_parts():
    meta = ModelMetadata(classes=list(CLASSIFIER_CLASSES), input_size=16)
    pre = Preprocessor(meta, max_batch=2)
    frame = _gradient_frame()
    boxes = np.array([[0, 0, 10, 10], [5, 5, 30, 40], [60, 40, 90, 70]], np.float32)
    batch = pre(frame, boxes)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
    crops = crop_batch(frame, boxes, 16, meta.crop_policy)
    np.testing.assert_allclose(batch, normalize(crops, meta.mean, meta.std), atol=1e-6)


def test_metadata_roundtrip_and_errors():
    meta = ModelMetadata(classes=list(CLASSIFIER_CLASSES), input_size=32, arch="x")
    again = ModelMetadata.from_json(meta.to_json())
    assert again == meta
    with pytest.raises(MetadataError, match="m.onnx: unknown metadata keys"):
        ModelMetadata.from_json('{"classes": ["a"], "input_size": 32, "bogus": 1}', "m.onnx")
    with pytest.raises(MetadataError, match="input_size"):
        ModelMetadata(classes=["a"], input_size=3)
    with pytest.raises(MetadataError, match="not valid JSON"):
        ModelMetadata.from_json("{", "m.onnx")


@dataclasses.dataclass
class _Inner:
    threshold: float = spec(0.5, min=0.0, max=1.0)
    mode: str = spec("a", choices=("a", "b"))


@dataclasses.dataclass
class _Cfg:
    inner: _Inner = spec(factory=_Inner)  # noqa: RUF009 - spec() builds a dataclass field
    batch: int = spec(8, min=1)
    name: str | None = None
    sizes: list[int] = spec(factory=lambda: [1, 2])  # noqa: RUF009 - a dataclass field


def test_config_defaults_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch: 4\ninner:\n  threshold: 0.25\n")
    cfg = load_config(_Cfg, path, ["inner.mode=b", "batch=16"])
    assert cfg.batch == 16 and cfg.inner.threshold == 0.25 and cfg.inner.mode == "b"
    assert cfg.sizes == [1, 2] and cfg.name is None


@pytest.mark.parametrize("text, key, what", [
    ("inner:\n  treshold: 0.3\n", "inner.treshold", "unknown key"),
    ("batch: two\n", "batch", "expected an integer"),
    ("batch: 0\n", "batch", "below the minimum"),
    ("inner:\n  threshold: 1.5\n", "inner.threshold", "above the maximum"),
    ("inner:\n  mode: c\n", "inner.mode", "is not one of"),
    ("sizes: [1, x]\n", "sizes[1]", "expected an integer"),
    ("inner: 3\n", "inner", "expected a mapping"),
])
def test_config_errors_name_file_and_key(tmp_path, text, key, what):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(_Cfg, path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {key}:") and what in msg


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(_Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("a: [1\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(_Cfg, bad)
    with pytest.raises(ConfigError, match="command line"):
        load_config(_Cfg, None, ["batch"])
