"""Score ``export finetune --pseudo-label``'s labels against hand labels of the same frames.

    python -m export pseudo_check RUN/pseudo/00_NAME --source FOLDER --data yolo:DIR
        [--min-height 12] [--json OUT]

For a team that has hand-labelled some of its footage: pseudo-label an image folder of those
frames (``--pseudo-label FOLDER``), then compare. ``RUN/pseudo/00_NAME`` names each frame by
its index in ``FOLDER`` (natural order of the file names, as the node reads a folder); the hand
labels are found by file name in the YOLO folder ``--data``.

Two sides are counted:

- the pseudo boxes: how many match a hand-labelled cone at IoU >= 0.5 (all, and those at
  least 20 px tall, where the hand labels are nearly complete), and how many of those carry
  the hand label's class;
- the hand-labelled cones at least ``--min-height`` px tall in the kept frames: covered by a
  pseudo box (IoU >= 0.5), masked (more than half of the box's pixels that painting would
  change now hold the pseudo-labeller's ignore fill), or left as they are with no label, which trains them as
  background: the confirmation-bias risk.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from export.data import DataError

MATCH_IOU = 0.5
TALL = 20.0
"""Pseudo boxes at least this tall (px) are counted apart: distant cones often lack hand labels."""


FILL_TOLERANCE = 8
"""Grey levels (largest channel) within which a pixel of a pseudo-labelled frame, a JPEG, is
taken for the ignore fill."""


def painted_pixels(pseudo: np.ndarray, original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where ``export.finetune.mask_uncertain`` painted the frame: pixels near the fill colour
    (the original frame's mean), and the pixels where that tells anything (the original is
    not itself near the fill colour, so painting would have changed it)."""
    if pseudo.shape != original.shape:
        raise DataError(f"pseudo-labelled frame of shape {pseudo.shape} against the source's "
                        f"{original.shape}: not the same frame")
    from export.finetune import ignore_fill

    fill = ignore_fill(original).astype(np.float32)
    near = np.abs(pseudo.astype(np.float32) - fill).max(2) <= FILL_TOLERANCE
    differs = np.abs(original.astype(np.float32) - fill).max(2) > 1.5 * FILL_TOLERANCE
    return near, differs


def check_pseudo_labels(pseudo_dir: Path, source: Path, data: str, min_height: float = 12.0
                        ) -> dict:
    """The counts described in the module docstring, and their rates."""
    import cv2

    from export.finetune import box_window
    from node.evaluate.datasets import load_samples
    from node.infer.postprocess import iou_matrix
    from node.sources.files import image_folder

    if not data.startswith("yolo:"):
        raise DataError(f"--data {data}: expected yolo:DIR, a YOLO folder of the hand labels")
    if not source.is_dir():
        raise DataError(f"{source}: --source must be the image folder that was pseudo-labelled")
    folder = image_folder(source)  # the node's order: frame i of the pseudo-labeller is file i
    files = folder.paths
    folder.close()
    hand = {s.image_path.name: s for s in load_samples(data)}
    pseudo = load_samples(f"yolo:{pseudo_dir}")
    n = {"frames": len(pseudo), "pseudo_boxes": 0, "pseudo_matched": 0,
         "pseudo_class_right": 0, "pseudo_boxes_tall": 0, "pseudo_matched_tall": 0,
         "labelled": 0, "covered": 0, "masked": 0, "left_as_background": 0}
    for ps in pseudo:
        try:
            original = files[int(ps.image_path.stem)]
        except (ValueError, IndexError):
            raise DataError(f"{ps.image_path}: not a frame index of {source} "
                            f"({len(files)} files)") from None
        if original.name not in hand:
            raise DataError(f"{original.name}: no hand labels for it in {data}")
        truth = hand[original.name]
        heights = truth.boxes[:, 3] - truth.boxes[:, 1]
        boxes, tall = ps.boxes, (ps.boxes[:, 3] - ps.boxes[:, 1]) >= TALL
        n["pseudo_boxes"] += len(boxes)
        n["pseudo_boxes_tall"] += int(tall.sum())
        iou = iou_matrix(boxes, truth.boxes)
        if iou.size:
            best, hit = iou.argmax(1), iou.max(1) >= MATCH_IOU
            n["pseudo_matched"] += int(hit.sum())
            n["pseudo_matched_tall"] += int((hit & tall).sum())
            n["pseudo_class_right"] += sum(ps.labels[i] == truth.labels[best[i]]
                                           for i in np.flatnonzero(hit))
        original_image = cv2.imread(str(original))
        if original_image is None:
            raise DataError(f"{original}: image missing or unreadable")
        painted, differs = painted_pixels(ps.load(), original_image)
        covered = (iou >= MATCH_IOU).any(0)
        for j in np.flatnonzero(heights >= min_height):
            n["labelled"] += 1
            if covered[j]:
                n["covered"] += 1
                continue
            window = box_window(np.round(truth.boxes[j]).astype(int), painted.shape)
            seen = differs[window]
            masked = seen.any() and painted[window][seen].mean() > 0.5
            n["masked" if masked else "left_as_background"] += 1

    def rate(a: str, b: str) -> float | None:
        return round(n[a] / n[b], 4) if n[b] else None

    n["rates"] = {"pseudo_precision": rate("pseudo_matched", "pseudo_boxes"),
                  "pseudo_precision_tall": rate("pseudo_matched_tall", "pseudo_boxes_tall"),
                  "class_accuracy": rate("pseudo_class_right", "pseudo_matched"),
                  "covered": rate("covered", "labelled"), "masked": rate("masked", "labelled"),
                  "left_as_background": rate("left_as_background", "labelled")}
    return n


def format_check(n: dict, min_height: float) -> str:
    r = {k: ("–" if v is None else f"{100 * v:.1f}") for k, v in n["rates"].items()}
    lines = [
        f"{n['frames']} pseudo-labelled frames, {n['pseudo_boxes']} pseudo boxes",
        (f"  matching a hand-labelled cone (IoU >= {MATCH_IOU}): {n['pseudo_matched']} "
         f"({r['pseudo_precision']} %); of the {n['pseudo_boxes_tall']} >= {TALL:g} px: "
         f"{n['pseudo_matched_tall']} ({r['pseudo_precision_tall']} %)"),
        (f"  with the hand label's class: {n['pseudo_class_right']} of {n['pseudo_matched']} "
         f"({r['class_accuracy']} %)"),
        f"{n['labelled']} hand-labelled cones >= {min_height:g} px in those frames",
        f"  covered by a pseudo box: {n['covered']} ({r['covered']} %)",
        f"  masked: {n['masked']} ({r['masked']} %)",
        (f"  left unlabelled, trained as background: {n['left_as_background']} "
         f"({r['left_as_background']} %)")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export pseudo_check",
        description="Score pseudo-labels (export finetune --pseudo-label) against hand labels.")
    parser.add_argument("pseudo", type=Path, help="RUN/pseudo/NN_NAME, a pseudo-label folder")
    parser.add_argument("--source", type=Path, required=True,
                        help="the image folder that was pseudo-labelled")
    parser.add_argument("--data", required=True, help="yolo:DIR holding those frames' labels")
    parser.add_argument("--min-height", type=float, default=12.0,
                        help="hand-labelled cones at least this tall are counted (default 12)")
    parser.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = parser.parse_args(argv)
    try:
        counts = check_pseudo_labels(args.pseudo, args.source, args.data, args.min_height)
    except (ValueError, OSError) as exc:  # DataError, DatasetError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_check(counts, args.min_height))
    if args.json:
        args.json.write_text(json.dumps(counts, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
