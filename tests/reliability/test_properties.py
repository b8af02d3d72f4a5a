"""Property tests (issue 9, hypothesis) on the crop policy, preprocessing and proposers: random
images; boxes at and beyond the frame edges, of zero or one pixel, of extreme aspect ratio.
No exception, every crop has the model's input shape, crops of in-frame regions equal the
pixels, proposals are capped."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from node.infer import load_backend
from node.infer.crop import CropPolicy, crop_batch
from node.infer.metadata import ModelMetadata
from node.infer.preprocess import Preprocessor
from node.node_config import load_node_config
from node.pipeline import Pipeline
from node.propose import Proposer, build_proposer
from node.types import Frame
from tests.node.backend_doubles import META, make_onnx
from tests.reliability.doubles import BLUE, ORANGE, YELLOW, CollectingPublisher

FAST = settings(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def images(draw, max_side: int = 48):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@st.composite
def boxes_for(draw, h: int, w: int, max_boxes: int = 12):
    """Boxes anywhere from far outside the frame to inside it, including degenerate ones."""
    n = draw(st.integers(0, max_boxes))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["any", "zero", "one_pixel", "thin", "flat", "edge"]))
        x = draw(st.floats(-2.0 * w - 5, 3.0 * w + 5, allow_nan=False))
        y = draw(st.floats(-2.0 * h - 5, 3.0 * h + 5, allow_nan=False))
        if kind == "any":
            bw, bh = draw(st.floats(-50, 200)), draw(st.floats(-50, 200))
        elif kind == "zero":
            bw = bh = 0.0
        elif kind == "one_pixel":
            bw = bh = 1.0
        elif kind == "thin":  # extreme aspect ratios
            bw, bh = 1.0, draw(st.floats(100, 5000))
        elif kind == "flat":
            bw, bh = draw(st.floats(100, 5000)), 0.5
        else:  # straddling a frame edge or corner
            x, y = draw(st.sampled_from([0.0, w - 1.0, float(w)])) - 3, \
                draw(st.sampled_from([0.0, h - 1.0, float(h)])) - 3
            bw = bh = 6.0
        out.append((x, y, x + bw, y + bh))
    return np.asarray(out, np.float32).reshape(-1, 4)


@st.composite
def image_and_boxes(draw):
    image = draw(images())
    return image, draw(boxes_for(*image.shape[:2]))


POLICIES = st.builds(CropPolicy, context=st.floats(0.0, 2.0), pad=st.sampled_from(
    ["constant", "replicate"]), pad_value=st.integers(0, 255), min_side=st.floats(0.5, 64))


@FAST
@given(case=image_and_boxes(), size=st.sampled_from([8, 17, 32]), policy=POLICIES)
def test_every_box_gives_one_crop_of_the_input_shape(case, size, policy):
    image, boxes = case
    crops = crop_batch(image, boxes, size, policy)
    assert crops.shape == (len(boxes), size, size, 3) and crops.dtype == np.uint8
    meta = META.replace(input_size=size, crop=policy.to_dict())
    batch = Preprocessor(meta, max_batch=4)(image, boxes)  # capacity grows when needed
    assert batch.shape == (len(boxes), 3, size, size) and batch.dtype == np.float32
    assert np.all(np.isfinite(batch))


@FAST
@given(case=image_and_boxes(), size=st.sampled_from([8, 32]), policy=POLICIES)
def test_a_crop_does_not_depend_on_the_rest_of_the_batch(case, size, policy):
    image, boxes = case
    crops = crop_batch(image, boxes, size, policy)
    for i in range(len(boxes)):
        np.testing.assert_array_equal(crop_batch(image, boxes[i:i + 1], size, policy)[0],
                                      crops[i])


@FAST
@given(data=st.data(), size=st.sampled_from([8, 16, 32]))
def test_a_crop_of_an_in_frame_square_equals_the_pixels(data, size):
    # A square box of exactly the input size, on whole pixels, with no context: sampling at
    # pixel centres reads every pixel unchanged.
    h = data.draw(st.integers(size, 3 * size))
    w = data.draw(st.integers(size, 3 * size))
    image = data.draw(arrays(np.uint8, (h, w, 3)))
    x = data.draw(st.integers(0, w - size))
    y = data.draw(st.integers(0, h - size))
    policy = CropPolicy(context=0.0, min_side=1.0)
    crop = crop_batch(image, np.array([[x, y, x + size, y + size]], np.float32), size, policy)
    np.testing.assert_array_equal(crop[0], image[y:y + size, x:x + size])


@FAST
@given(image=images(), size=st.sampled_from([8, 32]), pad_value=st.integers(0, 255),
       side=st.floats(0.0, 40.0))
def test_a_crop_wholly_outside_the_frame_is_all_padding(image, size, pad_value, side):
    h, w = image.shape[:2]
    policy = CropPolicy(context=0.0, pad="constant", pad_value=pad_value, min_side=1.0)
    far = np.array([[w + 200, -h - 300, w + 200 + side, -h - 300 + side]], np.float32)
    assert np.all(crop_batch(image, far, size, policy) == pad_value)


@st.composite
def cone_scenes(draw):
    """Frames with many painted blobs of cone colours, of any size and aspect ratio, at and
    beyond the frame edges, over noise."""
    h, w = draw(st.integers(1, 120)), draw(st.integers(1, 160))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    for _ in range(draw(st.integers(0, 60))):
        x, y = int(rng.integers(-10, w + 10)), int(rng.integers(-10, h + 10))
        bw = int(rng.choice([1, 2, 5, 12, 40, 200]))
        bh = int(rng.choice([1, 2, 8, 25, 90, 300]))
        image[max(y, 0):max(y + bh, 0), max(x, 0):max(x + bw, 0)] = \
            (BLUE, YELLOW, ORANGE)[int(rng.integers(0, 3))]
    return image


@FAST
@given(image=cone_scenes(), cap=st.sampled_from([1, 3, 32]))
def test_colour_proposals_are_capped_ranked_boxes(image, cap):
    config = load_node_config(None, {"proposer": {"max_candidates": cap}})
    proposer = build_proposer(config.proposer)
    boxes = proposer.propose(Frame(0, 0.0, image))
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) <= cap and np.all(np.isfinite(boxes))
    assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
    wide = build_proposer(load_node_config(None, {"proposer": {"max_candidates": 64}}).proposer)
    np.testing.assert_array_equal(boxes, wide.propose(Frame(0, 0.0, image))[:cap])


@FAST
@given(image=cone_scenes())
def test_colour_proposals_lie_inside_the_frame(image):
    boxes = build_proposer(load_node_config(None, {}).proposer).propose(Frame(0, 0.0, image))
    h, w = image.shape[:2]
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)


class GivenBoxes(Proposer):
    """Whatever boxes the test hands it (the public ``Proposer`` contract ranks and caps)."""

    def __init__(self, max_candidates: int) -> None:
        super().__init__(max_candidates)
        self.boxes = np.zeros((0, 4), np.float32)

    def _propose(self, frame):
        return self.boxes, -np.arange(len(self.boxes), dtype=np.float64)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = tmp_path_factory.mktemp("properties") / "tiny.onnx"
    make_onnx(path)
    with load_backend(path, threads=1) as active:
        yield active


@FAST
@given(case=image_and_boxes(), cap=st.sampled_from([1, 4, 32]))
def test_the_pipeline_publishes_one_clean_record_for_any_frame_and_boxes(backend, case, cap):
    image, boxes = case
    proposer = GivenBoxes(cap)
    proposer.boxes = boxes
    config = load_node_config(None, {"model": {"score_threshold": 0.0},
                                     "proposer": {"max_candidates": cap}})
    publisher = CollectingPublisher()
    summary = Pipeline(config, backend, proposer, [publisher]).run(
        [Frame(0, 0.0, image, "f.png")])
    (record,) = publisher.records
    assert "error" not in record and summary["errors"] == 0
    assert (record["width"], record["height"]) == (image.shape[1], image.shape[0])
    assert len(record["cones"]) <= min(cap, len(boxes))
    h, w = image.shape[:2]
    clipped = np.asarray(boxes, np.float32).reshape(-1, 4).copy()  # proposals are clipped
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, w)             # to the frame
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, h)
    for cone in record["cones"]:  # published boxes are candidates the proposer gave
        assert np.min(np.abs(clipped - np.asarray(cone["box"], np.float32)).max(axis=1)) < 0.01


def test_metadata_of_any_input_size_drives_the_crop_shape():
    # The crop shape comes from the model's metadata, never from a constant in the node.
    for size in (8, 31, 64):
        meta = ModelMetadata(classes=list(META.classes), input_size=size)
        image = np.zeros((10, 10, 3), np.uint8)
        batch = Preprocessor(meta)(image, np.array([[-5, -5, 100, 2]], np.float32))
        assert batch.shape == (1, 3, size, size)
