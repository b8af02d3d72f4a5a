"""Dataset readers: YOLO folders, FSOCO Supervisely JSON and folders of class-named crops.

Every reader yields the same thing: an image path, boxes in pixels of the image as ``load()``
returns it, and the project's class names (``node.classes``). Foreign class ids are mapped *by
name* (docs/design.md, "Class names"), never by number.

Formats: YOLO (Ultralytics/Roboflow: ``images/``, ``labels/`` with normalised ``class xc yc w
h`` lines, ``data.yaml`` names); FSOCO's Supervisely JSON (``ann/<image>.json`` next to
``img/<image>``, with the plugin's 140 px watermark border handled); folders of class-named
crops. Only numpy, cv2 and yaml are used, so the node (``--proposals yolo:DIR``) reads labels.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from node.classes import DATASET_IDS, canonical_name, names_from_ids

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DATA_SPEC_KINDS = ("yolo", "fsoco", "crops")
FSOCO_WATERMARK_PX = 140


class DatasetError(ValueError):
    """A dataset file is missing or malformed. The message names the file."""


@dataclass
class Sample:
    """One labelled image.

    Attributes:
        image_path: the image file.
        boxes: (N, 4) float32 ``x1, y1, x2, y2`` in pixels of the image returned by ``load()``.
        labels: project class names (``node.classes``), one per box.
        size: ``(width, height)`` of the image returned by ``load()``.
        crop_border: pixels cut from every side by ``load()`` (FSOCO watermark), else 0.
    """

    image_path: Path
    boxes: np.ndarray
    labels: list[str]
    size: tuple[int, int]
    crop_border: int = 0

    def load(self) -> np.ndarray:
        """The image as BGR uint8, with ``crop_border`` pixels cut off every side.

        Raises:
            DatasetError: the file is missing, unreadable, or not the size the labels assume.
        """
        image = cv2.imread(str(self.image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"{self.image_path}: image missing or unreadable")
        b = self.crop_border
        if b:
            image = image[b:image.shape[0] - b, b:image.shape[1] - b]
        if (image.shape[1], image.shape[0]) != tuple(self.size):
            raise DatasetError(
                f"{self.image_path}: image is {image.shape[1]}x{image.shape[0]} after cropping "
                f"{b} px, but its labels assume {self.size[0]}x{self.size[1]}")
        return image


def natural_key(text: str | Path) -> list:
    """Sort key that orders ``frame2`` before ``frame10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(text))]


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image, read from the PNG/JPEG header when possible.

    Raises:
        DatasetError: the file is missing or not a readable image.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                w, h = struct.unpack(">II", head[16:24])
                return int(w), int(h)
            if head[:2] == b"\xff\xd8":
                fh.seek(2)
                size = _jpeg_size(fh)
                if size is not None:
                    return size
    except OSError:
        raise DatasetError(f"{path}: image missing or unreadable") from None
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f"{path}: image missing or unreadable")
    return int(image.shape[1]), int(image.shape[0])


def _jpeg_size(fh) -> tuple[int, int] | None:
    """Walk JPEG markers up to the first start-of-frame; None if the stream looks odd."""
    while True:
        byte = fh.read(1)
        while byte == b"\xff":
            byte = fh.read(1)
        if not byte:
            return None
        if byte[0] in (0xD8, 0x01) or 0xD0 <= byte[0] <= 0xD7:
            continue  # markers without a length field
        raw = fh.read(7)
        if len(raw) < 7:
            return None
        if 0xC0 <= byte[0] <= 0xCF and byte[0] not in (0xC4, 0xC8, 0xCC):  # start of frame
            h, w = struct.unpack(">HH", raw[3:7])
            return (int(w), int(h)) if w and h else None
        fh.seek(struct.unpack(">H", raw[:2])[0] - 7, 1)


def _list_images(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def _resolve_names(root: Path, names: str | list | dict | None) -> dict[int, str]:
    """id → project name from ``names`` (dataset key, list or dict), data.yaml, or BGRacing."""
    if names is None:
        for candidate in ("data.yaml", "data.yml", "dataset.yaml"):
            yaml_path = root / candidate
            if yaml_path.is_file():
                try:
                    data = yaml.safe_load(yaml_path.read_text()) or {}
                except yaml.YAMLError:
                    raise DatasetError(f"{yaml_path}: not valid YAML") from None
                if not isinstance(data, dict) or not isinstance(data.get("names"), (list, dict)):
                    raise DatasetError(f"{yaml_path}: 'names' must be a list or an id->name map")
                try:
                    return names_from_ids(data["names"])
                except (KeyError, ValueError) as exc:
                    raise DatasetError(f"{yaml_path}: names: {_msg(exc)}") from None
        # No data.yaml: the real data this project targets is BGRacing's Roboflow export.
        return dict(DATASET_IDS["bgracing"])
    if isinstance(names, str):
        if names not in DATASET_IDS:
            raise DatasetError(f"unknown dataset key {names!r}; expected one of "
                               f"{sorted(DATASET_IDS)} or a list/dict of class names")
        return dict(DATASET_IDS[names])
    try:
        return names_from_ids(names)
    except (KeyError, ValueError) as exc:
        raise DatasetError(f"class names {names!r}: {_msg(exc)}") from None


def _msg(exc: Exception) -> str:  # KeyError's str() adds quotes
    return exc.args[0] if exc.args else str(exc)


def _parse_label_file(path: Path) -> np.ndarray:
    """Rows ``(cls, xc, yc, w, h)`` of a YOLO label file; polygon rows become their bbox."""
    rows = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        raise DatasetError(f"{path}: unreadable label file") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: expected numbers, got {line.strip()!r}") from None
        if len(values) == 5:
            rows.append(values)
        elif len(values) >= 7 and len(values) % 2 == 1:  # segmentation polygon
            xs, ys = np.array(values[1::2]), np.array(values[2::2])
            rows.append([values[0], (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2,
                         xs.max() - xs.min(), ys.max() - ys.min()])
        else:
            raise DatasetError(f"{path}:{lineno}: expected 'class xc yc w h', got {len(values)} "
                               "values")
        if values[0] != int(values[0]) or values[0] < 0:
            raise DatasetError(f"{path}:{lineno}: class id must be a non-negative integer")
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


def _label_dir(root: Path) -> Path:
    if (root / "labels").is_dir():
        return root / "labels"
    return root


def read_yolo_labels(label_dir_or_root: str | Path) -> dict[str, np.ndarray]:
    """Image stem → (N, 5) float32 normalised ``(cls, xc, yc, w, h)`` rows.

    Args:
        label_dir_or_root: a folder of ``.txt`` label files (searched recursively), or a YOLO
            dataset root holding ``labels/``.

    Raises:
        DatasetError: the folder is missing, or a label file is malformed.
    """
    root = Path(label_dir_or_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: label folder not found")
    out: dict[str, np.ndarray] = {}
    for path in sorted(_label_dir(root).rglob("*.txt"), key=lambda p: natural_key(p.name)):
        if path.name == "classes.txt":  # labelImg's class list, not a label file
            continue
        out[path.stem] = _parse_label_file(path)
    return out


def read_yolo(root: str | Path, names: str | list | dict | None = None,
              split: str | None = None) -> list[Sample]:
    """Read a YOLO dataset root holding ``images/`` and ``labels/``.

    Labels are found at the same relative path under ``labels/`` (so ``images/train/a.jpg``
    pairs with ``labels/train/a.txt``). An image without a label file has zero boxes.

    Args:
        root: the dataset root.
        names: the dataset's class names: a key of ``node.classes.DATASET_IDS`` (``"bgracing"``,
            ``"fsoco"``), a list, or an id→name dict. Default: ``data.yaml``'s ``names``; without
            a data.yaml, the BGRacing ids (the real data this project targets).
        split: only read ``images/<split>/``.

    Returns:
        Samples in natural sort order of the image paths.

    Raises:
        DatasetError: missing folders, malformed label files, unknown class ids or names.
    """
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: not a YOLO dataset root (no images/ folder)")
    if split is not None:
        images_dir = images_dir / split
        if not images_dir.is_dir():
            raise DatasetError(f"{images_dir}: split folder not found")
    id_to_name = _resolve_names(root, names)
    samples = []
    for image_path in _list_images(images_dir):
        rel = image_path.relative_to(root / "images").with_suffix(".txt")
        label_path = root / "labels" / rel
        rows = _parse_label_file(label_path) if label_path.is_file() else np.zeros((0, 5))
        w, h = image_size(image_path)
        labels = []
        for cls in rows[:, 0].astype(int):
            if cls not in id_to_name:
                raise DatasetError(f"{label_path}: class id {cls} not in the class names "
                                   f"{id_to_name}")
            labels.append(id_to_name[cls])
        xc, yc, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        boxes = np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], axis=1)
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32).reshape(-1, 4)
        samples.append(Sample(image_path, boxes, labels, (w, h)))
    return samples


def _fsoco_dirs(root: Path) -> list[Path]:
    """Folders holding ``ann/`` + ``img/``: the root itself or its team subfolders."""
    if (root / "ann").is_dir():
        return [root]
    teams = [d for d in root.iterdir() if d.is_dir() and (d / "ann").is_dir()]
    if not teams:
        raise DatasetError(f"{root}: not an FSOCO folder (no ann/ in it or its subfolders)")
    return sorted(teams, key=lambda d: natural_key(d.name))


def _read_fsoco_annotation(ann_path: Path, border: int) -> Sample:
    try:
        ann = json.loads(ann_path.read_text())
        height, width = int(ann["size"]["height"]), int(ann["size"]["width"])
        objects = ann.get("objects", [])
    except (OSError, ValueError, KeyError, TypeError):
        raise DatasetError(f"{ann_path}: not a Supervisely annotation (need size.height, "
                           "size.width, objects)") from None
    image_path = ann_path.parent.parent / "img" / ann_path.name[: -len(".json")]
    if not image_path.is_file():
        raise DatasetError(f"{image_path}: image missing for annotation {ann_path.name}")
    out_w, out_h = width - 2 * border, height - 2 * border
    if out_w <= 0 or out_h <= 0:
        raise DatasetError(f"{ann_path}: image {width}x{height} is too small for a {border} px "
                           "watermark border")
    boxes, labels = [], []
    for obj in objects:
        if obj.get("geometryType") != "rectangle":
            continue
        try:
            (x_a, y_a), (x_b, y_b) = obj["points"]["exterior"][:2]
            label = canonical_name(str(obj["classTitle"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise DatasetError(f"{ann_path}: bad rectangle object: {_msg(exc)}") from None
        # Supervisely corners are inclusive pixel indices: the right edge is right + 1.
        x1, x2 = min(x_a, x_b) - border, max(x_a, x_b) + 1 - border
        y1, y2 = min(y_a, y_b) - border, max(y_a, y_b) + 1 - border
        x1, x2 = np.clip([x1, x2], 0, out_w)
        y1, y2 = np.clip([y1, y2], 0, out_h)
        if x2 <= x1 or y2 <= y1:
            continue  # the box lay entirely inside the watermark border
        boxes.append([x1, y1, x2, y2])
        labels.append(label)
    boxes_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return Sample(image_path, boxes_arr, labels, (out_w, out_h), crop_border=border)


def read_fsoco(root: str | Path, strip_watermark: bool = True,
               border: int = FSOCO_WATERMARK_PX) -> list[Sample]:
    """Read FSOCO's Supervisely export (``ann/<image>.json`` next to ``img/<image>``).

    Args:
        root: a folder holding ``ann/`` and ``img/``, or FSOCO's top folder of team folders.
        strip_watermark: cut ``border`` pixels off every side on ``load()`` and shift the
            boxes by ``-border``; boxes left empty are dropped, the rest are clipped.
        border: width of the watermark border in pixels.

    Raises:
        DatasetError: a malformed annotation, or an annotation whose image is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: FSOCO folder not found")
    crop = border if strip_watermark else 0
    samples = []
    for folder in _fsoco_dirs(root):
        anns = sorted((folder / "ann").glob("*.json"), key=lambda p: natural_key(p.name))
        samples.extend(_read_fsoco_annotation(a, crop) for a in anns)
    return samples


def read_crop_folders(root: str | Path) -> list[tuple[Path, str]]:
    """``(image path, class name)`` for every image in ``root/<class>/``.

    Folder names may be any alias ``node.classes.canonical_name`` knows (``blue``,
    ``background``, ...). Hidden folders are ignored.

    Raises:
        DatasetError: the root is missing or a folder name is not a known class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: crop folder not found")
    out = []
    for folder in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            label = canonical_name(folder.name)
        except KeyError as exc:
            raise DatasetError(f"{folder}: folder name is not a class: {_msg(exc)}") from None
        out.extend((p, label) for p in _list_images(folder))
    return out


def parse_data_spec(spec: str) -> tuple[str, Path]:
    """Split ``yolo:DIR`` / ``fsoco:DIR`` / ``crops:DIR`` into kind and existing folder.

    Raises:
        DatasetError: malformed spec, unknown kind, or a folder that does not exist.
    """
    kind, sep, rest = str(spec).partition(":")
    if not sep or not rest:
        raise DatasetError(f"data spec {spec!r}: expected KIND:DIR with KIND one of "
                           f"{', '.join(DATA_SPEC_KINDS)}")
    if kind not in DATA_SPEC_KINDS:
        raise DatasetError(f"data spec {spec!r}: unknown kind {kind!r}; expected one of "
                           f"{', '.join(DATA_SPEC_KINDS)}")
    path = Path(rest).expanduser()
    if not path.is_dir():
        raise DatasetError(f"data spec {spec!r}: folder {path} not found")
    return kind, path


def load_samples(spec: str, **kwargs) -> list[Sample] | list[tuple[Path, str]]:
    """Read the dataset named by a data spec.

    ``yolo:`` and ``fsoco:`` give ``Sample`` lists (``kwargs`` go to ``read_yolo`` /
    ``read_fsoco``); ``crops:`` gives ``(path, class name)`` pairs.
    """
    kind, path = parse_data_spec(spec)
    if kind == "yolo":
        return read_yolo(path, **kwargs)
    if kind == "fsoco":
        return read_fsoco(path, **kwargs)
    return read_crop_folders(path, **kwargs)


_BGRACING_NAME = re.compile(r"^(?P<clip>.+?)(?:_mp4-|_)(?P<frame>\d+)_jpg\.rf\.[0-9a-zA-Z]+$")


def _bgracing_match(path: str | Path) -> re.Match:
    match = _BGRACING_NAME.match(Path(path).stem)
    if match is None:
        raise DatasetError(f"{Path(path).name}: not a BGRacing frame name "
                           "(<clip>_mp4-<frame>_jpg.rf.<hash>.jpg)")
    return match


def bgracing_clip(path: str | Path) -> str:
    """The clip a BGRacing frame belongs to: ``autox6`` for ``autox6_mp4-12_jpg.rf.ab.jpg``.

    A few single frames are named ``<clip>_<n>_jpg.rf.<hash>.jpg``; they belong to ``<clip>``.
    """
    return _bgracing_match(path)["clip"]


def frame_index(path: str | Path) -> int:
    """The frame number encoded in a BGRacing file name."""
    return int(_bgracing_match(path)["frame"])


def frame_clip(path: str | Path) -> str:
    """The clip a labelled frame belongs to, for any YOLO folder: the BGRacing clip when the
    file is named like one (``bgracing_clip``), else the folder the image lies in
    (``images/run3/0001.jpg`` is clip ``run3``), or the dataset folder's name for images
    directly under ``images/``."""
    path = Path(path)
    if _BGRACING_NAME.match(path.stem):
        return bgracing_clip(path)
    parent = path.parent
    return parent.parent.name if parent.name == "images" else parent.name
