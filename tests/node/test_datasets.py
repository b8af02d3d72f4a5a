"""Dataset readers: YOLO, FSOCO Supervisely, crop folders, data specs and BGRacing names.

Every format is built here in ``tmp_path`` from a few drawn images, so the expected boxes are
known exactly.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from node.evaluate.datasets import (
    DatasetError,
    Sample,
    bgracing_clip,
    frame_index,
    image_size,
    load_samples,
    natural_key,
    parse_data_spec,
    read_crop_folders,
    read_fsoco,
    read_yolo,
    read_yolo_labels,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bgracing"


def _image(path: Path, w: int, h: int, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), value, np.uint8)
    img[h // 3: h // 2, w // 4: w // 2] = (200, 90, 20)
    assert cv2.imwrite(str(path), img)


def _yolo_root(tmp_path: Path) -> Path:
    root = tmp_path / "yolo"
    _image(root / "images" / "frame10.jpg", 320, 240)
    _image(root / "images" / "frame2.png", 200, 100)
    _image(root / "images" / "frame3.jpg", 64, 64)
    (root / "labels").mkdir()
    # In this data.yaml, id 0 is yellow and id 2 is blue: mapping must go by name.
    (root / "data.yaml").write_text("names: [Yellow Cone, large-orange, blue]\n")
    (root / "labels" / "frame10.txt").write_text("2 0.5 0.5 0.25 0.5\n0 0.1 0.2 0.1 0.1\n")
    (root / "labels" / "frame2.txt").write_text("1 0.25 0.5 0.5 1.0\n")
    (root / "labels" / "frame3.txt").write_text("")  # an image with no cones
    return root


def test_yolo_boxes_in_pixels_and_names_mapped_by_name(tmp_path: Path) -> None:
    samples = read_yolo(_yolo_root(tmp_path))
    assert [s.image_path.name for s in samples] == ["frame2.png", "frame3.jpg", "frame10.jpg"]
    first, empty, last = samples
    assert first.size == (200, 100) and first.labels == ["large_orange_cone"]
    np.testing.assert_allclose(first.boxes, [[0, 0, 100, 100]])
    assert empty.boxes.shape == (0, 4) and empty.labels == []
    assert last.size == (320, 240) and last.labels == ["blue_cone", "yellow_cone"]
    np.testing.assert_allclose(last.boxes, [[120, 60, 200, 180], [16, 36, 48, 60]], atol=1e-4)
    assert last.boxes.dtype == np.float32
    assert last.load().shape == (240, 320, 3)


def test_yolo_names_argument_overrides_and_defaults_to_bgracing(tmp_path: Path) -> None:
    root = _yolo_root(tmp_path)
    by_key = read_yolo(root, names="fsoco")[2]  # FSOCO: 0 yellow, 2 orange
    assert by_key.labels == ["orange_cone", "yellow_cone"]
    by_dict = read_yolo(root, names={0: "blue", 1: "orange", 2: "yellow"})[2]
    assert by_dict.labels == ["yellow_cone", "blue_cone"]
    (root / "data.yaml").unlink()
    default = read_yolo(root)  # BGRacing ids: 0 blue, 1 large orange, 2 small orange, 3 yellow
    assert default[2].labels == ["orange_cone", "blue_cone"]
    assert default[0].labels == ["large_orange_cone"]


def test_yolo_split_folders_and_label_only_reader(tmp_path: Path) -> None:
    root = tmp_path / "split"
    _image(root / "images" / "train" / "a.jpg", 100, 50)
    _image(root / "images" / "val" / "b.jpg", 100, 50)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("3 0.5 0.5 0.2 0.4\n")
    (root / "labels" / "val" / "b.txt").write_text("0 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.1 0.1\n")
    both = read_yolo(root)
    assert [s.labels for s in both] == [["yellow_cone"], ["blue_cone", "blue_cone"]]
    val = read_yolo(root, split="val")
    assert len(val) == 1 and val[0].image_path.name == "b.jpg"
    np.testing.assert_allclose(val[0].boxes[0], [40, 15, 60, 35])
    rows = read_yolo_labels(root)
    assert set(rows) == {"a", "b"} and rows["b"].shape == (2, 5)
    np.testing.assert_allclose(rows["a"], [[3, 0.5, 0.5, 0.2, 0.4]])
    assert read_yolo_labels(root / "labels" / "val").keys() == {"b"}


def test_yolo_errors_name_the_file(tmp_path: Path) -> None:
    root = _yolo_root(tmp_path)
    (root / "labels" / "frame2.txt").write_text("1 0.5 0.5 0.5\n")
    with pytest.raises(DatasetError, match=r"frame2\.txt:1: expected 'class xc yc w h'"):
        read_yolo(root)
    (root / "labels" / "frame2.txt").write_text("7 0.5 0.5 0.5 0.5\n")
    with pytest.raises(DatasetError, match=r"frame2\.txt: class id 7"):
        read_yolo(root)
    (root / "labels" / "frame2.txt").write_text("")
    (root / "data.yaml").write_text("names: [blue, purple]\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: names: unknown class name 'purple'"):
        read_yolo(root)
    with pytest.raises(DatasetError, match="no images/ folder"):
        read_yolo(root / "labels")


def test_unreadable_or_missing_image_names_the_file(tmp_path: Path) -> None:
    root = _yolo_root(tmp_path)
    (root / "data.yaml").unlink()
    broken = root / "images" / "frame7.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"frame7\.jpg: image missing or unreadable"):
        read_yolo(root)
    broken.unlink()
    sample = read_yolo(root)[0]
    sample.image_path.unlink()
    with pytest.raises(DatasetError, match=r"frame2\.png: image missing or unreadable"):
        sample.load()


def test_image_size_header_parse_matches_decoder(tmp_path: Path) -> None:
    for name, (w, h) in {"a.jpg": (641, 479), "b.png": (33, 17), "c.bmp": (20, 10)}.items():
        _image(tmp_path / name, w, h)
        assert image_size(tmp_path / name) == (w, h)
    progressive = tmp_path / "p.jpg"
    cv2.imwrite(str(progressive), np.zeros((30, 50, 3), np.uint8),
                [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert image_size(progressive) == (50, 30)
    restart = tmp_path / "r.jpg"  # a DRI segment, whose length field is only 4
    cv2.imwrite(str(restart), np.zeros((31, 47, 3), np.uint8), [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    assert image_size(restart) == (47, 31)


def _fsoco_root(tmp_path: Path, border: int = 140) -> Path:
    root = tmp_path / "fsoco" / "team_a"
    w, h = 600, 400
    img = np.zeros((h, w, 3), np.uint8)
    img[:border] = img[-border:] = img[:, :border] = img[:, -border:] = 255  # watermark frame
    img[200:260, 150:170] = (200, 90, 20)  # a blue cone at x 150..169, y 200..259 inclusive
    (root / "img").mkdir(parents=True)
    cv2.imwrite(str(root / "img" / "f1.png"), img)
    rect = {"geometryType": "rectangle", "tags": []}
    ann = {"size": {"height": h, "width": w}, "objects": [
        {**rect, "classTitle": "blue_cone", "points": {"exterior": [[150, 200], [169, 259]]}},
        {**rect, "classTitle": "yellow_cone", "points": {"exterior": [[10, 10], [100, 100]]}},
        {**rect, "classTitle": "large_orange_cone",
         "points": {"exterior": [[450, 240], [500, 300]]}},  # crosses the right border
        {"geometryType": "polygon", "classTitle": "orange_cone",
         "points": {"exterior": [[200, 200], [210, 200], [205, 220]]}},
    ]}
    (root / "ann").mkdir()
    (root / "ann" / "f1.png.json").write_text(json.dumps(ann))
    return root.parent


def test_fsoco_watermark_is_cut_and_boxes_shifted(tmp_path: Path) -> None:
    (sample,) = read_fsoco(_fsoco_root(tmp_path))
    assert sample.crop_border == 140 and sample.size == (320, 120)
    # The yellow box lay inside the watermark and is dropped; the polygon is skipped.
    assert sample.labels == ["blue_cone", "large_orange_cone"]
    np.testing.assert_allclose(sample.boxes, [[10, 60, 30, 120], [310, 100, 320, 120]])
    image = sample.load()
    assert image.shape == (120, 320, 3)
    x1, y1, x2, y2 = sample.boxes[0].astype(int)
    assert (image[y1:y2, x1:x2] == (200, 90, 20)).all()  # the box sits exactly on the cone
    assert image[y1 - 1, x1, 0] == 0 and image[y1, x2, 0] == 0
    assert not (image == 255).all(axis=2).any()  # no watermark pixel is left


def test_fsoco_without_stripping_keeps_everything(tmp_path: Path) -> None:
    (sample,) = read_fsoco(_fsoco_root(tmp_path), strip_watermark=False)
    assert sample.size == (600, 400) and sample.crop_border == 0
    assert sample.labels == ["blue_cone", "yellow_cone", "large_orange_cone"]
    np.testing.assert_allclose(sample.boxes[0], [150, 200, 170, 260])
    assert sample.load().shape == (400, 600, 3)


def test_fsoco_missing_image_and_bad_json_name_the_file(tmp_path: Path) -> None:
    root = _fsoco_root(tmp_path)
    (root / "team_a" / "img" / "f1.png").unlink()
    with pytest.raises(DatasetError, match=r"f1\.png: image missing for annotation"):
        read_fsoco(root)
    (root / "team_a" / "ann" / "f1.png.json").write_text("{}")
    with pytest.raises(DatasetError, match=r"f1\.png\.json: not a Supervisely annotation"):
        read_fsoco(root)


def test_crop_folders_map_aliases(tmp_path: Path) -> None:
    for folder, n in {"blue": 2, "Yellow Cone": 1, "background": 3, ".cache": 1}.items():
        for i in range(n):
            _image(tmp_path / "crops" / folder / f"c{i}.png", 16, 16)
    items = read_crop_folders(tmp_path / "crops")
    assert Counter(label for _, label in items) == {"blue_cone": 2, "yellow_cone": 1,
                                                    "background": 3}
    _image(tmp_path / "crops" / "purple" / "x.png", 8, 8)
    with pytest.raises(DatasetError, match="purple: folder name is not a class"):
        read_crop_folders(tmp_path / "crops")


def test_data_specs_dispatch_and_reject_bad_specs(tmp_path: Path) -> None:
    root = _yolo_root(tmp_path)
    assert parse_data_spec(f"yolo:{root}") == ("yolo", root)
    samples = load_samples(f"yolo:{root}")
    assert len(samples) == 3 and isinstance(samples[0], Sample)
    assert len(load_samples(f"fsoco:{_fsoco_root(tmp_path)}")) == 1
    for bad, message in ((str(root), "expected KIND:DIR"), (f"coco:{root}", "unknown kind"),
                         (f"yolo:{tmp_path / 'nope'}", "folder .*nope not found")):
        with pytest.raises(DatasetError, match=message):
            parse_data_spec(bad)


def test_bgracing_names_and_natural_sort() -> None:
    assert bgracing_clip("autox6_mp4-12_jpg.rf.0123abcd.jpg") == "autox6"
    assert frame_index("images/autox6_mp4-12_jpg.rf.0123abcd.jpg") == 12
    assert bgracing_clip("skidpad_2_jpg.rf.25a54881c3ce.jpg") == "skidpad"
    with pytest.raises(DatasetError, match="frame.jpg: not a BGRacing frame name"):
        bgracing_clip("frame.jpg")
    names = ["f10.jpg", "f2.jpg", "F1.jpg", "f2b.jpg"]
    assert sorted(names, key=natural_key) == ["F1.jpg", "f2.jpg", "f2b.jpg", "f10.jpg"]


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "images").is_dir(), reason="needs ../shared/data/bgracing")
def test_real_bgracing_data_reads_with_the_documented_clips() -> None:
    samples = read_yolo(SHARED)
    assert len(samples) == 595
    assert all(s.size == (640, 640) for s in samples)
    clips = Counter(bgracing_clip(s.image_path) for s in samples)
    assert clips == {"accel": 10, "autox": 222, "autox2": 16, "autox4": 45, "autox5": 3,
                     "autox6": 259, "skidpad": 40}
    counts = Counter(label for s in samples for label in s.labels)
    # The label files hold these counts; the README's (3104/4125/417/156) are ~7% lower.
    assert counts == {"blue_cone": 3409, "yellow_cone": 4363, "large_orange_cone": 455,
                      "orange_cone": 169}
    heights = np.concatenate([s.boxes[:, 3] - s.boxes[:, 1] for s in samples])
    assert 20 <= np.median(heights) <= 30  # README: median height about 25 px
