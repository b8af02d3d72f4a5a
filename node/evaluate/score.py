"""``python -m node evaluate``: score published cones (or bare proposals) against YOLO labels.

Detection scoring in the PASCAL VOC / COCO manner, reduced to what a cone node needs: per
frame, detections are matched to ground-truth boxes greedily, highest score first, one to one,
at IoU >= 0.5. Reported are recall per box-height bucket (< 12, 12-24, 24-48, >= 48 px) and
for cones >= 12 px; precision of detections >= 20 px tall (the real data leaves many smaller
cones unlabelled), with its false detections sorted by their best overlap with a label
(``FALSE_KINDS``; ``--false-sheet`` draws those away from every label, to be looked at); the
missed cones >= 12 px sorted by their best overlap with a detection (``MISS_KINDS``;
``--miss-sheet`` draws them with the nearest detection); label
accuracy of matched pairs; candidates per frame (from an optional ``candidates`` key of the
records, else the replay ``--summary`` JSON); proposer time.

Two modes:

* ``python -m node evaluate RUN.jsonl --data yolo:DIR``: the JSONL that ``replay`` and ``demo``
  write (docs/design.md schema). Records are matched to label files by the stem of their
  ``source`` file name; video records (``source`` null) by frame index to numeric stems. A PNG
  beside the run (``--plot``) shows the precision-recall curve over the score threshold, the
  confusion matrix and recall by cone height (``node.evaluate.plot``, needs matplotlib).
* ``python -m node evaluate --proposals-only --data yolo:DIR``: run the configured proposer
  directly on the images (one OpenCV thread) and score its boxes alone: recall, candidates per
  frame and milliseconds, with no classifier.

``--split heldout|train`` keeps the frames that ``configs/train.yaml``'s ``data.heldout`` holds
out (or all others); ``--clips RULE ...`` names them directly (``accel``, ``skidpad:20-37``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.evaluate.splits import TRAIN_CONFIG, EvaluateError, select_samples
from node.infer.postprocess import iou_matrix

IOU_MATCH = 0.5
IOU_NEAR = 0.3
"""A labelled cone with a detection at this IoU or more is found but misplaced when that IoU
is under ``IOU_MATCH``: ``placement`` in the report tells box placement from missed cones."""
IOU_TOUCH = 0.1
FALSE_KINDS = ("second_box", "misplaced", "overlapping", "away")
"""What a false detection >= ``PRECISION_MIN_PX`` is, by its best IoU with any label: a second
box on a cone another detection already matched (>= ``IOU_MATCH``), a misplaced box (>=
``IOU_NEAR``), one overlapping a label (>= ``IOU_TOUCH``), or one away from every label
(background, or a cone nobody labelled: look at those before trusting the precision)."""
MISS_KINDS = ("misplaced", "overlapping", "none")
"""What became of a labelled cone >= ``RECALL_MIN_PX`` that no detection matched, by its best
IoU with any detection: a box on it at ``IOU_NEAR``-``IOU_MATCH`` (found, but placed too far
from the label to count; a loose or shifted label does this too), one overlapping it (>=
``IOU_TOUCH``), or none (``--miss-sheet`` draws them all, to be looked at)."""
HEIGHT_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<12", 0.0, 12.0), ("12-24", 12.0, 24.0), ("24-48", 24.0, 48.0), (">=48", 48.0, np.inf))
RECALL_MIN_PX = 12.0
PRECISION_MIN_PX = 20.0


def match_greedy(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray,
                 iou: float = IOU_MATCH, overlap: np.ndarray | None = None) -> np.ndarray:
    """One-to-one greedy matching: detections in descending score take the free ground-truth
    box they overlap most, if that IoU is at least ``iou`` (``overlap``: their IoU matrix,
    when the caller has it).

    Returns:
        (len(pred),) index of the matched ground-truth box, or -1.
    """
    out = np.full(len(pred), -1, np.int64)
    if len(pred) == 0 or len(truth) == 0:
        return out
    overlap = iou_matrix(pred, truth) if overlap is None else overlap
    free = np.ones(len(truth), bool)
    for i in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        cand = np.where(free, overlap[i], -1.0)
        j = int(cand.argmax())
        if cand[j] >= iou:
            out[i], free[j] = j, False
    return out


@dataclass
class Tally:
    """Counts accumulated over frames."""

    truth_by_bucket: np.ndarray = field(default_factory=lambda: np.zeros(len(HEIGHT_BUCKETS)))
    hit_by_bucket: np.ndarray = field(default_factory=lambda: np.zeros(len(HEIGHT_BUCKETS)))
    det_tall: int = 0
    tp_tall: int = 0
    matched: int = 0
    label_correct: int = 0
    frames: int = 0
    candidates: list[int] = field(default_factory=list)
    propose_ms: list[float] = field(default_factory=list)
    # Optional extra height cut (``--recall-min-px``): recall and label accuracy of the cones
    # at least this tall (issue 5 scores synthetic clips at 16 px).
    min_px: float | None = None
    truth_min: int = 0
    hit_min: int = 0
    correct_min: int = 0
    # Every detection's score and whether it matched (the precision-recall curve), and the
    # (truth, prediction) label pairs, with "missed" and "none" for the unmatched (confusion).
    det_scores: list[float] = field(default_factory=list)
    det_matched: list[bool] = field(default_factory=list)
    confusion: dict[tuple[str, str], int] = field(default_factory=dict)
    # Per labelled cone >= RECALL_MIN_PX: its height, its best IoU with any detection and,
    # against that detection, the centre offset over the cone's width and height and the log
    # width and height ratios (detection over label).
    near_height: list[float] = field(default_factory=list)
    near_iou: list[float] = field(default_factory=list)
    near_error: list[tuple[float, float, float, float]] = field(default_factory=list)
    false_kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FALSE_KINDS, 0))
    # The "away" false detections as (image path, box), for a contact sheet; filled by
    # ``add`` when given the frame's ``image``.
    away: list[tuple[Path, tuple[float, float, float, float]]] = field(default_factory=list)
    miss_kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MISS_KINDS, 0))
    # The missed cones >= RECALL_MIN_PX as (image path, label box, the detection nearest to
    # it or None), for a contact sheet; filled by ``add`` when given the frame's ``image``.
    missed: list[tuple[Path, tuple[float, ...], tuple[float, ...] | None]] = field(
        default_factory=list)

    def add(self, pred: np.ndarray, scores: np.ndarray, pred_labels: list[str] | None,
            truth: np.ndarray, truth_labels: list[str], label_scale: float = 1.0,
            image: Path | None = None) -> None:
        """Score one frame's detections (``pred_labels`` None: proposals, no labels); with
        ``image`` (the frame's file) its false detections away from every label are listed
        in ``away``, and its missed cones >= ``RECALL_MIN_PX`` in ``missed``.

        ``label_scale``: how many times taller things are in this frame than in the frame
        they were labelled on (a rescaled camera variant). Above 1, heights are divided by it
        before the size cuts: a cone counts only if it reaches them in both frames, since
        labels are complete only above the cuts in the labelled frame's own pixels."""
        pred = np.asarray(pred, np.float64).reshape(-1, 4)
        truth = np.asarray(truth, np.float64).reshape(-1, 4)
        # Every detection against every label, once: matching, placement and false detections.
        overlap = iou_matrix(pred, truth) if len(pred) and len(truth) else \
            np.zeros((len(pred), len(truth)))
        match = match_greedy(pred, scores, truth, overlap=overlap)
        self.frames += 1
        shrink = 1.0 / max(float(label_scale), 1.0)
        th = (truth[:, 3] - truth[:, 1]) * shrink
        hit = np.zeros(len(truth), bool)
        hit[match[match >= 0]] = True
        for k, (_, lo, hi) in enumerate(HEIGHT_BUCKETS):
            in_bucket = (th >= lo) & (th < hi)
            self.truth_by_bucket[k] += in_bucket.sum()
            self.hit_by_bucket[k] += (in_bucket & hit).sum()
        self._add_placement(pred, truth, th, overlap)
        self._add_missed(pred, truth, ~hit & (th >= RECALL_MIN_PX), overlap, image)
        tall = (pred[:, 3] - pred[:, 1]) * shrink >= PRECISION_MIN_PX
        self.det_tall += int(tall.sum())
        self.tp_tall += int((tall & (match >= 0)).sum())
        false = tall & (match < 0)
        self._add_false(pred[false], overlap[false], image)
        # Per matched pair: its ground-truth index and whether the label is right.
        pairs = np.flatnonzero(match >= 0)
        gt = match[pairs]
        right = (np.array([pred_labels[i] == truth_labels[j] for i, j in zip(pairs, gt)], bool)
                 if pred_labels is not None else None)
        if right is not None:
            self.matched += len(pairs)
            self.label_correct += int(right.sum())
            self._count_pairs(pred_labels, truth_labels, match, hit)
        self.det_scores.extend(float(s) for s in np.asarray(scores, np.float64).reshape(-1))
        self.det_matched.extend(bool(m) for m in match >= 0)
        if self.min_px is not None:
            tall_truth = th >= self.min_px
            self.truth_min += int(tall_truth.sum())
            self.hit_min += int((tall_truth & hit).sum())
            if right is not None:
                self.correct_min += int(right[tall_truth[gt]].sum())

    def _add_false(self, false: np.ndarray, overlap: np.ndarray, image: Path | None) -> None:
        """Sort the frame's unmatched tall detections (their boxes, and their IoU with each
        label) into ``FALSE_KINDS``."""
        if not len(false):
            return
        best = overlap.max(axis=1) if overlap.shape[1] else np.zeros(len(false))
        kind = np.searchsorted([IOU_TOUCH, IOU_NEAR, IOU_MATCH], best, side="right")
        for k, name in enumerate(reversed(FALSE_KINDS)):
            self.false_kinds[name] += int((kind == k).sum())
        if image is not None:
            self.away += [(image, tuple(float(v) for v in box)) for box in false[kind == 0]]

    def _add_missed(self, pred: np.ndarray, truth: np.ndarray, missed: np.ndarray,
                    overlap: np.ndarray, image: Path | None) -> None:
        """Sort the frame's missed labelled cones (``missed``: a mask over ``truth``) into
        ``MISS_KINDS`` by their best IoU with any detection."""
        rows = np.flatnonzero(missed)
        if not len(rows):
            return
        of_missed = overlap[:, rows] if len(pred) else np.zeros((1, len(rows)))
        nearest = of_missed.argmax(axis=0)
        best = of_missed[nearest, np.arange(len(rows))]
        kind = np.searchsorted([IOU_TOUCH, IOU_NEAR], best, side="right")
        for k, name in enumerate(reversed(MISS_KINDS)):
            self.miss_kinds[name] += int((kind == k).sum())
        if image is None:
            return
        for r, b, n in zip(rows, best, nearest):
            near = tuple(float(v) for v in pred[n]) if b > 0 else None
            self.missed.append((image, tuple(float(v) for v in truth[r]), near))

    def _add_placement(self, pred: np.ndarray, truth: np.ndarray, heights: np.ndarray,
                       overlap: np.ndarray) -> None:
        """Each labelled cone >= ``RECALL_MIN_PX``'s nearest detection (not one to one;
        ``overlap``: detections' IoU with the labels)."""
        rows = np.flatnonzero(heights >= RECALL_MIN_PX)
        if not len(rows):
            return
        self.near_height.extend(heights[rows].tolist())
        if not len(pred):
            self.near_iou.extend([0.0] * len(rows))
            self.near_error.extend([(np.nan,) * 4] * len(rows))
            return
        overlap = overlap[:, rows].T
        best = overlap.argmax(axis=1)
        t, q = truth[rows], pred[best]
        tw = np.maximum(t[:, 2] - t[:, 0], 1e-6)
        th = np.maximum(t[:, 3] - t[:, 1], 1e-6)
        qw = np.maximum(q[:, 2] - q[:, 0], 1e-6)
        qh = np.maximum(q[:, 3] - q[:, 1], 1e-6)
        dx = ((q[:, 0] + q[:, 2]) - (t[:, 0] + t[:, 2])) / 2 / tw
        dy = ((q[:, 1] + q[:, 3]) - (t[:, 1] + t[:, 3])) / 2 / th
        self.near_iou.extend(overlap[np.arange(len(rows)), best].tolist())
        self.near_error.extend(zip(dx.tolist(), dy.tolist(), np.log(qw / tw).tolist(),
                                   np.log(qh / th).tolist()))

    def placement(self) -> dict:
        """By height bucket (cones >= ``RECALL_MIN_PX``): the share with a detection at IoU >=
        ``IOU_NEAR`` (found, placed well or not), and over those, the median centre offset
        in cone widths and heights (right and down positive) and the median log size ratio
        (detection over label: positive is too big)."""
        heights = np.asarray(self.near_height, np.float64)
        ious = np.asarray(self.near_iou, np.float64)
        errors = np.asarray(self.near_error, np.float64).reshape(-1, 4)
        out = {}
        for name, lo, hi in HEIGHT_BUCKETS:
            if lo < RECALL_MIN_PX:
                continue
            mine = (heights >= lo) & (heights < hi)
            near = mine & (ious >= IOU_NEAR)
            med = (np.median(errors[near], axis=0) if near.any() else [None] * 4)
            out[name] = {"cones": int(mine.sum()),
                         "near": round(float(near.sum() / mine.sum()), 4) if mine.any() else None,
                         **{key: (round(float(v), 4) if v is not None else None)
                            for key, v in zip(("dx", "dy", "log_w", "log_h"), med)}}
        return out

    def _count_pairs(self, pred_labels: list[str], truth_labels: list[str], match: np.ndarray,
                     hit: np.ndarray) -> None:
        pairs = [(truth_labels[j] if j >= 0 else "none", pred_labels[i])
                 for i, j in enumerate(match)]
        pairs += [(truth_labels[j], "missed") for j in np.flatnonzero(~hit)]
        for pair in pairs:
            self.confusion[pair] = self.confusion.get(pair, 0) + 1

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Precision and recall (of all labelled cones) when only detections scoring at least
        each threshold are kept, for the detections' scores in falling order."""
        scores = np.asarray(self.det_scores, np.float64)
        order = np.argsort(-scores, kind="stable")
        tp = np.cumsum(np.asarray(self.det_matched, bool)[order])
        kept = np.arange(1, len(order) + 1)
        labelled = max(float(self.truth_by_bucket.sum()), 1.0)
        return tp / np.maximum(kept, 1), tp / labelled, scores[order]

    def report(self) -> dict:
        """The scores as a JSON-able dict (None where there is nothing to divide by)."""
        def ratio(a: float, b: float) -> float | None:
            return round(float(a) / float(b), 4) if b else None

        big = np.array([lo >= RECALL_MIN_PX for _, lo, _ in HEIGHT_BUCKETS])
        labelled = float(self.truth_by_bucket.sum())
        out = {
            "frames": self.frames,
            "labelled_cones": int(labelled),
            "recall_by_height": {name: {"recall": ratio(self.hit_by_bucket[k],
                                                        self.truth_by_bucket[k]),
                                        "cones": int(self.truth_by_bucket[k])}
                                 for k, (name, _, _) in enumerate(HEIGHT_BUCKETS)},
            "recall_ge12": ratio(self.hit_by_bucket[big].sum(), self.truth_by_bucket[big].sum()),
            "precision_ge20": ratio(self.tp_tall, self.det_tall),
            "detections_ge20": self.det_tall,
            "false_ge20": dict(self.false_kinds),
            "missed_ge12": dict(self.miss_kinds),
            "label_accuracy": ratio(self.label_correct, self.matched),
            "matched": self.matched,
            "placement": self.placement(),
        }
        if self.min_px is not None:
            out["recall_min_px"] = {"min_px": self.min_px,
                                    "recall": ratio(self.hit_min, self.truth_min),
                                    "cones": self.truth_min,
                                    # proposals carry no labels (nothing is matched then)
                                    "label_accuracy": (ratio(self.correct_min, self.hit_min)
                                                       if self.matched else None)}
        if self.candidates:
            per_frame = float(np.mean(self.candidates))
            out["candidates_per_frame"] = round(per_frame, 2)
            out["candidates_per_labelled_cone"] = ratio(per_frame * self.frames, labelled)
        if self.propose_ms:
            ms = np.asarray(self.propose_ms)
            out["propose_ms"] = {"median": round(float(np.median(ms)), 3),
                                 "p90": round(float(np.percentile(ms, 90)), 3)}
        return out


# --------------------------------------------------------------------------- the two modes

def score_run(jsonl: str | Path, samples: list, summary: str | Path | None = None,
              min_px: float | None = None) -> dict:
    """``tally_run``'s report (see there)."""
    return tally_run(jsonl, samples, summary, min_px)[1]


def tally_run(jsonl: str | Path, samples: list, summary: str | Path | None = None,
              min_px: float | None = None) -> tuple[Tally, dict]:
    """Score a replay JSONL against labelled samples; ``min_px`` adds recall and label
    accuracy of the cones at least that tall.

    Records are matched to samples by the stem of their ``source`` file name; a record without
    one (a video, as the demo writes) is matched by its frame index to a numeric stem
    (``00012.jpg`` is frame 12), as ``--proposals yolo:DIR`` matches boxes to video frames.
    """
    by_stem = {s.image_path.stem: s for s in samples}
    by_index = {int(stem): stem for stem in by_stem if stem.isdigit()}
    tally = Tally(min_px=min_px)
    seen: set[str] = set()
    path = Path(jsonl)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise EvaluateError(f"{jsonl}: cannot read ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            stem = (Path(rec["source"]).stem if rec.get("source")
                    else by_index.get(int(rec["frame"])))
            cones = rec["cones"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise EvaluateError(f"{jsonl}:{n}: not a replay record ({exc})") from None
        sample = by_stem.get(stem)
        if sample is None or stem in seen:
            continue
        seen.add(stem)
        boxes = np.array([c["box"] for c in cones], np.float64).reshape(-1, 4)
        tally.add(boxes, np.array([c["score"] for c in cones]), [c["label"] for c in cones],
                  sample.boxes, sample.labels, image=sample.image_path)
        if "candidates" in rec:
            tally.candidates.append(int(rec["candidates"]))
        if "propose" in rec.get("latency_ms", {}):
            tally.propose_ms.append(float(rec["latency_ms"]["propose"]))
    if not seen:
        raise EvaluateError(f"{jsonl}: no record's source (or, for video, frame index) matches "
                            "a labelled image")
    report = tally.report()
    report["unscored_labelled_frames"] = len(by_stem) - len(seen)
    if "candidates_per_frame" not in report and summary is not None:
        try:
            per_frame = json.loads(Path(summary).read_text())["candidates_per_frame"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise EvaluateError(f"{summary}: no candidates_per_frame ({exc})") from None
        report["candidates_per_frame"] = per_frame
        report["candidates_per_labelled_cone"] = round(
            per_frame * tally.frames / max(report["labelled_cones"], 1), 4)
    return tally, report


def score_proposals(proposer, samples: list, min_px: float | None = None) -> dict:
    """Run ``proposer`` on each sample's image (one OpenCV thread) and score its boxes."""
    import cv2

    from node.types import Frame

    cv2.setNumThreads(1)
    tally = Tally(min_px=min_px)
    for i, sample in enumerate(samples):
        image = sample.load()
        t0 = time.perf_counter()
        boxes = proposer.propose(Frame(i, 0.0, image, sample.image_path.name))
        tally.propose_ms.append((time.perf_counter() - t0) * 1e3)
        tally.candidates.append(len(boxes))
        # Proposals come best first: their rank is their score.
        tally.add(boxes, -np.arange(len(boxes), dtype=np.float64), None, sample.boxes,
                  sample.labels)
    return tally.report()


FALSE_TEXT = {"second_box": "a second box on a found cone",
              "misplaced": f"on a label at IoU {IOU_NEAR:g}-{IOU_MATCH:g}",
              "overlapping": f"overlapping a label at IoU {IOU_TOUCH:g}-{IOU_NEAR:g}",
              "away": "away from every label (background or unlabelled cones)"}


MISS_TEXT = {"misplaced": f"with a box at IoU {IOU_NEAR:g}-{IOU_MATCH:g}",
             "overlapping": f"with a box at IoU {IOU_TOUCH:g}-{IOU_NEAR:g}",
             "none": f"with no box (IoU < {IOU_TOUCH:g})"}


def format_table(report: dict, title: str) -> str:
    """A small Markdown table of a report."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    rows = [f"### {title}", "", "| metric | value |", "|---|---|",
            f"| frames / labelled cones | {report['frames']} / {report['labelled_cones']} |"]
    for name, v in report["recall_by_height"].items():
        rows.append(f"| recall {name} px | {pct(v['recall'])} (of {v['cones']}) |")
    rows.append(f"| **recall >= 12 px** | **{pct(report['recall_ge12'])}** |")
    extra = report.get("recall_min_px")
    if extra:
        rows.append(f"| recall >= {extra['min_px']:g} px | {pct(extra['recall'])} "
                    f"(of {extra['cones']}; label accuracy {pct(extra['label_accuracy'])}) |")
    rows += [(f"| precision >= 20 px | {pct(report['precision_ge20'])} "
              f"(of {report['detections_ge20']}) |"),
             f"| label accuracy | {pct(report['label_accuracy'])} (of {report['matched']}) |"]
    false = report.get("false_ge20")
    if false and any(false.values()):
        rows.append("| false detections >= 20 px | " + ", ".join(
            f"{n} {FALSE_TEXT[k]}" for k, n in false.items() if n) + " |")
    missed = report.get("missed_ge12")
    if missed and any(missed.values()):
        rows.append("| missed cones >= 12 px | " + ", ".join(
            f"{n} {MISS_TEXT[k]}" for k, n in missed.items() if n) + " |")
    for name, v in report.get("placement", {}).items():
        if v["near"] is None or v["dx"] is None:
            continue
        rows.append(f"| a box at IoU >= {IOU_NEAR:g}, {name} px | {pct(v['near'])}; median "
                    f"centre {v['dx']:+.3f} w, {v['dy']:+.3f} h; size log w {v['log_w']:+.3f}, "
                    f"log h {v['log_h']:+.3f} |")
    if "candidates_per_frame" in report:
        rows.append(f"| candidates per frame | {report['candidates_per_frame']} "
                    f"({report['candidates_per_labelled_cone']} x labelled cones) |")
    if "propose_ms" in report:
        rows.append(f"| proposer ms median / p90 | {report['propose_ms']['median']} / "
                    f"{report['propose_ms']['p90']} |")
    return "\n".join(rows)


GREEN, RED = (0, 255, 0), (0, 0, 255)


def false_sheet(away: list, path: str | Path, tile: int = 128, columns: int = 8) -> Path:
    """A contact sheet of false detections (``Tally.away``): each box in green, centred in a
    square of three times its longer side (at least 48 px) of its frame, scaled to ``tile``;
    so that unlabelled cones can be told from background by eye before the precision is
    trusted. Frames that cannot be read give grey tiles."""
    return contact_sheet([(image, box, [(box, GREEN)]) for image, box in away], path, tile,
                         columns)


def miss_sheet(missed: list, path: str | Path, tile: int = 128, columns: int = 8) -> Path:
    """A contact sheet of missed cones (``Tally.missed``): each label in green and the
    detection nearest to it, if any, in red, centred as in ``false_sheet``; so that a loose or
    shifted label, a cone hidden behind the car, or a box on the cone that the label does not
    fit can be told from a cone the node did not see."""
    items = [(image, label, [(label, GREEN)] + ([(near, RED)] if near else []))
             for image, label, near in missed]
    return contact_sheet(items, path, tile, columns)


def contact_sheet(items: list, path: str | Path, tile: int = 128, columns: int = 8) -> Path:
    """Tiles of ``(image path, centre box, [(box, BGR colour), ...])``: a square of three
    times the centre box's longer side (at least 48 px) of the frame, scaled to ``tile``, with
    the boxes drawn; in rows of ``columns``. Frames that cannot be read give grey tiles."""
    import cv2

    tiles, last, frame = [], None, None
    for image_path, centre, boxes in items:  # in frame order: each frame is read once
        if image_path != last:
            last, frame = image_path, cv2.imread(str(image_path))
        if frame is None:
            tiles.append(np.full((tile, tile, 3), 128, np.uint8))
            continue
        x1, y1, x2, y2 = centre
        side = max(3.0 * max(x2 - x1, y2 - y1), 48.0)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        scale = tile / side
        shift = np.float32([[scale, 0, tile / 2 - cx * scale], [0, scale, tile / 2 - cy * scale]])
        crop = cv2.warpAffine(frame, shift, (tile, tile), flags=cv2.INTER_AREA,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        for box, colour in boxes:
            corners = np.array([[box[0], box[1], 1.0], [box[2], box[3], 1.0]]) @ shift.T
            (a, b), (c, d) = np.round(corners).astype(int).tolist()
            cv2.rectangle(crop, (a, b), (c, d), colour, 1)
        tiles.append(crop)
    if not tiles:
        tiles.append(np.zeros((tile, tile, 3), np.uint8))
    tiles += [np.zeros((tile, tile, 3), np.uint8)] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    out = Path(path)
    if not cv2.imwrite(str(out), np.vstack(rows)):
        raise EvaluateError(f"{out}: cannot write the contact sheet")
    return out


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN.jsonl", nargs="?",
                        help="a replay's JSONL records (omit with --proposals-only)")
    parser.add_argument("--data", required=True, metavar="yolo:DIR",
                        help="labelled frames (YOLO root with images/ and labels/)")
    parser.add_argument("--split", choices=("all", "heldout", "train"), default="all",
                        help=f"frames held out by {TRAIN_CONFIG} data.heldout, the others, "
                             "or all (default)")
    parser.add_argument("--clips", nargs="+", metavar="RULE",
                        help="score only these BGRacing clips: CLIP or CLIP:FIRST-LAST")
    parser.add_argument("--summary", metavar="FILE",
                        help="the replay's --summary JSON (candidates per frame)")
    parser.add_argument("--proposals-only", action="store_true",
                        help="run the configured proposer on the images and score its boxes")
    parser.add_argument("--config", default="configs/node.yaml", help="node config (proposer)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. proposer.kind=heatmap")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="PNG of the precision-recall curve, confusion matrix and recall by "
                             "height (default: beside RUN.jsonl as RUN.evaluate.png; needs "
                             "matplotlib)")
    parser.add_argument("--false-sheet", metavar="FILE.png",
                        help="also write a contact sheet of the false detections >= 20 px "
                             "away from every label (background, or cones nobody labelled)")
    parser.add_argument("--miss-sheet", metavar="FILE.png",
                        help="also write a contact sheet of the missed cones >= 12 px: each "
                             "label in green, the detection nearest to it in red")
    parser.add_argument("--recall-min-px", type=float, metavar="PX",
                        help="also report recall (and label accuracy) of the cones at least "
                             "PX tall, e.g. 16 for issue 5's synthetic clips")


def main(args: argparse.Namespace) -> int:
    from node.evaluate.datasets import load_samples

    if args.data.partition(":")[0] != "yolo":
        raise EvaluateError(f"--data {args.data}: only yolo:DIR is supported")
    samples = select_samples(load_samples(args.data), args.split, args.clips)
    if not samples:
        raise EvaluateError(f"--data {args.data}: no labelled frames in the chosen split")
    if args.proposals_only:
        from node.node_config import load_node_config
        from node.propose import build_proposer

        config = load_node_config(args.config, args.set)
        proposer = build_proposer(config.proposer)
        try:
            report = score_proposals(proposer, samples, args.recall_min_px)
        finally:
            proposer.close()
        title = f"proposals ({config.proposer.kind}), split {args.split}"
    else:
        if not args.run:
            raise EvaluateError("give RUN.jsonl, or --proposals-only")
        tally, report = tally_run(args.run, samples, args.summary, args.recall_min_px)
        title = f"{Path(args.run).name}, split {args.split}"
    print(format_table(report, title))
    if args.false_sheet and not args.proposals_only:
        print(f"false detections away from every label: {len(tally.away)}, "
              f"sheet {false_sheet(tally.away, args.false_sheet)}")
    if args.miss_sheet and not args.proposals_only:
        print(f"missed cones >= 12 px: {len(tally.missed)}, "
              f"sheet {miss_sheet(tally.missed, args.miss_sheet)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not args.proposals_only:
        from node.evaluate.plot import PlotUnavailable, plot_evaluation

        target = args.plot or Path(args.run).with_suffix(".evaluate.png")
        try:
            print(f"plot: {plot_evaluation(tally, report, target, title)}")
        except PlotUnavailable as exc:
            print(f"plot: {exc}")
    return 0
