"""The calibration feed: class balance, background mining, node preprocessing, determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from calib.feed import FeedError, LabelledFrame, balanced_crops, calibration_batches
from node.classes import BACKGROUND, BLUE, CONE_CLASSES, YELLOW
from node.infer.preprocess import Preprocessor
from tests.calib.scenes import make_scene, metadata, scenes, write_yolo

BGRACING = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bgracing"


def test_batches_are_class_balanced_with_a_background_share():
    meta = metadata()
    crops, labels = balanced_crops(scenes(0, 80), meta, 200, seed=3, background_share=0.2,
                                   with_labels=True)
    counts = Counter(labels)
    assert len(crops) == 200 and crops.shape[1:] == (32, 32, 3)
    assert counts[BACKGROUND] == 40
    assert [counts[c] for c in CONE_CLASSES] == [40, 40, 40, 40]


def test_short_class_hands_its_share_to_the_others():
    meta = metadata()
    frames = [LabelledFrame(f.image, f.boxes, [YELLOW if lab == BLUE else lab for lab in f.labels])
              for f in scenes(0, 40)]
    frames[0].labels[0] = BLUE  # one blue cone in the whole set
    _, labels = balanced_crops(frames, meta, 100, seed=0, background_share=0.0,
                               with_labels=True)
    counts = Counter(labels)
    assert counts[BLUE] == 1 and sum(counts.values()) == 100
    assert min(counts[c] for c in CONE_CLASSES if c != BLUE) >= 30


def test_batches_are_the_node_preprocessing_of_the_chosen_boxes():
    meta = metadata()
    frame = make_scene(5, cones=1)
    (batch,) = list(calibration_batches([frame], meta, 1, 8, seed=0, background_share=0.0))
    expected = Preprocessor(meta)(frame.image, frame.boxes)
    assert batch.dtype == np.float32 and batch.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(batch, expected)


def test_a_classifier_trained_on_white_balanced_frames_is_calibrated_on_them():
    """A model whose metadata names the white-balance tolerance of its training frames
    (``data.normalise``) is calibrated on frames through the node's exposure stage at that
    tolerance; a model trained on the frames as stored, on the frames as stored."""
    from dataclasses import replace

    from node.node_config import ExposureConfig
    from node.sources.exposure import Exposure

    frame = make_scene(5, cones=1)
    cast = np.clip(frame.image.astype(np.float32) * [1.0, 0.8, 0.6], 0, 255).astype(np.uint8)
    frame = LabelledFrame(cast, frame.boxes, frame.labels)
    meta = metadata()
    normalised = replace(meta, extra={**meta.extra, "normalise": {"wb_tolerance": 0.0}})
    (raw,) = list(calibration_batches([frame], meta, 1, 8, seed=0, background_share=0.0))
    (balanced,) = list(calibration_batches([frame], normalised, 1, 8, seed=0,
                                           background_share=0.0))
    pre = Preprocessor(meta)
    np.testing.assert_array_equal(raw, pre(cast, frame.boxes))
    corrected = Exposure(ExposureConfig(wb_tolerance=0.0))(cast)
    assert np.abs(corrected.astype(int) - cast).mean() > 5  # the cast is corrected
    np.testing.assert_array_equal(balanced, pre(corrected, frame.boxes))


def test_same_seed_same_batches_and_batch_sizes():
    meta = metadata()
    a = list(calibration_batches(scenes(0, 30), meta, 70, 32, seed=1))
    b = list(calibration_batches(scenes(0, 30), meta, 70, 32, seed=1))
    c = list(calibration_batches(scenes(0, 30), meta, 70, 32, seed=2))
    assert [len(x) for x in a] == [32, 32, 6]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    dropped = list(calibration_batches(scenes(0, 30), meta, 70, 32, seed=1, drop_last=True))
    assert [len(x) for x in dropped] == [32, 32]


def test_background_crops_stay_clear_of_labelled_boxes():
    meta = metadata()
    frames = scenes(0, 40)
    crops, labels = balanced_crops(frames, meta, 100, seed=0, background_share=0.5,
                                   with_labels=True)
    bg = crops[np.array(labels) == BACKGROUND]
    assert len(bg) == 50
    # Cone colours are saturated; the scene background is grey clutter. A mined crop that
    # caught a cone would hold many saturated pixels.
    sat = cv2.cvtColor(bg.reshape(-1, 32, 3), cv2.COLOR_BGR2HSV)[..., 1].reshape(len(bg), -1)
    cone = crops[np.array(labels) != BACKGROUND]
    sat_cone = cv2.cvtColor(cone.reshape(-1, 32, 3), cv2.COLOR_BGR2HSV)[..., 1].reshape(
        len(cone), -1)
    assert np.mean((sat > 150).mean(1) > 0.05) < 0.1
    assert np.mean((sat_cone > 150).mean(1) > 0.05) > 0.9


def test_no_usable_labels_is_a_clear_error():
    meta = metadata()
    empty = [LabelledFrame(np.zeros((50, 50, 3), np.uint8), np.zeros((0, 4), np.float32), [])]
    with pytest.raises(FeedError, match="no boxes of the model's classes"):
        list(calibration_batches(empty, meta, 10, 4))
    with pytest.raises(FeedError, match="expected yolo:DIR or synth"):
        list(calibration_batches("video.mp4", meta, 10, 4))


def test_reads_a_yolo_folder(tmp_path):
    meta = metadata()
    root = write_yolo(scenes(0, 12), tmp_path / "data")
    _, labels = balanced_crops(f"yolo:{root}", meta, 40, seed=0, with_labels=True)
    assert Counter(labels) == {BACKGROUND: 8, **{c: 8 for c in CONE_CLASSES}}


@pytest.mark.shared_data
@pytest.mark.skipif(not BGRACING.is_dir(), reason="shared BGRacing data not present")
def test_real_frames_feed_balances_the_rare_small_orange():
    meta = metadata()
    _, labels = balanced_crops(f"yolo:{BGRACING}", meta, 200, seed=0, with_labels=True)
    counts = Counter(labels)
    assert counts[BACKGROUND] == 40
    assert [counts[c] for c in CONE_CLASSES] == [40, 40, 40, 40]  # 156 small orange exist
