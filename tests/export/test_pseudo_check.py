"""``python -m export pseudo_check``: pseudo-labels scored against hand labels of the same frames.

The frames are drawn here: a textured road with four cones (coloured boxes) of known size. The
pseudo-label folder is written as ``export.finetune`` writes it (JPEG frames named by index,
an uncertain cone painted by ``mask_uncertain``), so each count is known in advance.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")  # export.finetune, for mask_uncertain

from export.finetune import mask_uncertain
from export.pseudo_check import check_pseudo_labels, main
from export.synth import write_dataset

COLOURS = {"blue_cone": (200, 60, 20), "yellow_cone": (20, 210, 230),
           "orange_cone": (20, 120, 250)}
CONES = [("blue_cone", (20, 60, 44, 110)), ("yellow_cone", (120, 70, 140, 110)),
         ("orange_cone", (220, 80, 236, 112)), ("blue_cone", (320, 90, 330, 100))]
"""Three cones 30-50 px tall and one 10 px tall (under --min-height 12)."""


def road(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 140, (160, 400, 3)).astype(np.uint8)
    for label, (x1, y1, x2, y2) in CONES:
        image[y1:y2, x1:x2] = COLOURS[label]
    return image


@pytest.fixture()
def folders(tmp_path: Path) -> SimpleNamespace:
    """Hand labels of frames 0 and 1, and pseudo-labels of frame 1 only: cone 0 labelled right,
    cone 1 painted over as uncertain, cone 2 missed (no box), one false box on the road."""
    boxes = np.array([b for _, b in CONES], np.float32)
    frames = [SimpleNamespace(image=road(i), boxes=boxes, labels=[lb for lb, _ in CONES])
              for i in range(2)]
    write_dataset(tmp_path / "hand", frames)
    image = mask_uncertain(frames[1].image, boxes[1:2], boxes[:1])
    pseudo = SimpleNamespace(image=image, boxes=np.array([boxes[0], [260, 20, 280, 60]],
                                                         np.float32),
                             labels=["blue_cone", "yellow_cone"], name="000001")
    write_dataset(tmp_path / "pseudo", [pseudo])
    return SimpleNamespace(root=tmp_path, hand=f"yolo:{tmp_path / 'hand'}",
                           source=tmp_path / "hand" / "images", pseudo=tmp_path / "pseudo")


def test_pseudo_labels_are_counted_against_the_hand_labels(folders):
    n = check_pseudo_labels(folders.pseudo, folders.source, folders.hand)
    assert n["frames"] == 1 and n["pseudo_boxes"] == 2 and n["pseudo_matched"] == 1
    assert n["pseudo_class_right"] == 1
    assert n["pseudo_boxes_tall"] == 2 and n["pseudo_matched_tall"] == 1
    assert n["labelled"] == 3  # the 10 px cone is under --min-height
    assert (n["covered"], n["masked"], n["left_as_background"]) == (1, 1, 1)
    assert n["rates"]["pseudo_precision"] == 0.5
    assert n["rates"]["covered"] == pytest.approx(1 / 3, abs=1e-4)
    n = check_pseudo_labels(folders.pseudo, folders.source, folders.hand, min_height=5)
    assert n["labelled"] == 4 and n["left_as_background"] == 2


def test_the_command_prints_and_writes_the_counts(folders, capsys):
    out = folders.root / "check.json"
    assert main([str(folders.pseudo), "--source", str(folders.source), "--data", folders.hand,
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 pseudo-labelled frames, 2 pseudo boxes" in text
    assert "masked: 1 (33.3 %)" in text and "trained as background: 1 (33.3 %)" in text
    assert json.loads(out.read_text())["covered"] == 1


def test_a_frame_index_outside_the_source_is_a_one_line_error(folders, capsys):
    (folders.pseudo / "images" / "000001.jpg").rename(folders.pseudo / "images" / "000007.jpg")
    (folders.pseudo / "labels" / "000001.txt").rename(folders.pseudo / "labels" / "000007.txt")
    assert main([str(folders.pseudo), "--source", str(folders.source),
                 "--data", folders.hand]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "000007.jpg" in err and "2 files" in err
    assert "\n" not in err


def test_data_that_is_not_a_yolo_folder_is_refused(folders, capsys):
    assert main([str(folders.pseudo), "--source", str(folders.source),
                 "--data", f"crops:{folders.root}"]) == 2
    assert "expected yolo:DIR" in capsys.readouterr().err
