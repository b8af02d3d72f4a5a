"""Tests of ``node.evaluate.score``: greedy one-to-one matching, recall by height bucket, precision
of detections >= 20 px, label accuracy, clip selection and the ``evaluate`` command."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from node.__main__ import main as node_main
from node.evaluate.datasets import Sample
from node.evaluate.score import Tally, false_sheet, format_table, match_greedy, miss_sheet
from node.evaluate.splits import in_clips, parse_clip_rules, select_samples

# Ground truth: one cone per height bucket (10, 18, 30, 60 px tall).
TRUTH = np.array([[10, 100, 14, 110], [40, 100, 47, 118], [80, 100, 92, 130],
                  [200, 100, 224, 160]], np.float64)
TRUTH_LABELS = ["blue_cone", "yellow_cone", "blue_cone", "orange_cone"]


def test_greedy_matching_is_one_to_one_and_best_score_first():
    truth = np.array([[0, 0, 10, 20]], np.float64)
    pred = np.array([[0, 0, 10, 20], [0, 1, 10, 21]], np.float64)
    assert match_greedy(pred, np.array([0.2, 0.9]), truth).tolist() == [-1, 0]
    assert match_greedy(pred, np.array([0.9, 0.2]), truth).tolist() == [0, -1]
    # IoU 0.45 is not a match
    assert match_greedy(np.array([[0, 11, 10, 31.0]]), np.ones(1), truth).tolist() == [-1]


def test_recall_by_bucket_precision_over_20_px_and_label_accuracy():
    pred = np.array([TRUTH[1], TRUTH[2] + [1, 1, 1, 1], TRUTH[3],   # three hits
                     [300, 100, 310, 125],                            # FP, 25 px tall
                     [400, 100, 405, 115]], np.float64)               # FP, 15 px: not counted
    labels = ["yellow_cone", "yellow_cone", "orange_cone", "blue_cone", "blue_cone"]
    tally = Tally()
    tally.add(pred, np.linspace(1, 0.5, 5), labels, TRUTH, TRUTH_LABELS)
    report = tally.report()
    recall = {k: v["recall"] for k, v in report["recall_by_height"].items()}
    assert recall == {"<12": 0.0, "12-24": 1.0, "24-48": 1.0, ">=48": 1.0}
    assert report["recall_ge12"] == 1.0
    # >= 20 px detections: the 30 px and 60 px hits and the 25 px false positive
    assert report["detections_ge20"] == 3 and report["precision_ge20"] == pytest.approx(2 / 3,
                                                                                         abs=1e-4)
    assert report["matched"] == 3 and report["label_accuracy"] == pytest.approx(2 / 3, abs=1e-4)


def test_false_detections_are_sorted_by_their_best_overlap_with_a_label(tmp_path):
    """A 40 and a 100 px cone. Besides a hit on the first: a lower-scored second box on it, a
    box on the second at IoU 0.4 (misplaced), one at IoU 0.2, one away from both, and a 15 px
    one (under the precision's 20 px: not counted)."""
    truth = np.array([[0, 0, 20, 40], [100, 0, 120, 100]], np.float64)
    pred = np.array([[0, 0, 20, 40], [0, 2, 20, 42],       # hit, second box (IoU 0.90)
                     [100, 0, 120, 40],                    # IoU 0.40 with the second cone
                     [100, 0, 120, 20],                    # IoU 0.20
                     [300, 0, 320, 40],                    # away
                     [400, 0, 410, 15]], np.float64)       # too short to count
    tally = Tally()
    frame = tmp_path / "f.png"
    cv2.imwrite(str(frame), np.full((120, 500, 3), 90, np.uint8))
    tally.add(pred, np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]), ["blue_cone"] * 6, truth,
              ["blue_cone"] * 2, image=frame)
    report = tally.report()
    assert report["false_ge20"] == {"second_box": 1, "misplaced": 1, "overlapping": 1,
                                    "away": 1}
    assert report["detections_ge20"] == 5 and report["precision_ge20"] == 0.2
    assert ("| false detections >= 20 px | 1 a second box on a found cone, 1 on a label at "
            "IoU 0.3-0.5, 1 overlapping a label at IoU 0.1-0.3, 1 away from every label") in \
        format_table(report, "t")
    assert tally.away == [(frame, (300.0, 0.0, 320.0, 40.0))]
    sheet = cv2.imread(str(false_sheet(tally.away, tmp_path / "sheet.png", tile=64, columns=4)))
    assert sheet.shape == (64, 256, 3)
    green = (sheet[..., 1] == 255) & (sheet[..., 0] == 0) & (sheet[..., 2] == 0)
    assert green[:, :64].sum() > 20 and not green[:, 64:].any()  # the box, in the first tile
    # The frame's grey around it, scaled: a 40 px box in a 120 px square of a 64 px tile.
    assert sheet[32, 5].tolist() == [90, 90, 90]
    nothing = Tally()
    nothing.add(pred[:1], np.ones(1), ["blue_cone"], truth, ["blue_cone"] * 2)
    assert not any(nothing.report()["false_ge20"].values())
    assert "false detections" not in format_table(nothing.report(), "t")


def test_placement_tells_misplaced_boxes_from_missed_cones():
    """Three 20 px cones, 10 px wide: one found in place, one by a box 4 px to the right and
    20 % too wide (IoU under 0.5, over 0.3: found, misplaced), one missed."""
    truth = np.array([[0, 0, 10, 20], [50, 0, 60, 20], [100, 0, 110, 20]], np.float64)
    pred = np.array([[0, 0, 10, 20], [53, 0, 65, 20], [300, 0, 310, 20]], np.float64)
    tally = Tally()
    tally.add(pred, np.array([0.9, 0.8, 0.7]), ["blue_cone"] * 3, truth, ["blue_cone"] * 3)
    report = tally.report()
    assert report["recall_by_height"]["12-24"]["recall"] == pytest.approx(1 / 3, abs=1e-4)
    small = report["placement"]["12-24"]
    assert small["cones"] == 3 and small["near"] == pytest.approx(2 / 3, abs=1e-4)
    # medians of the two near pairs: offsets 0 and 0.4 widths, sizes log 1 and log 1.2
    assert small["dx"] == pytest.approx(0.2, abs=1e-4) and small["dy"] == 0.0
    assert small["log_w"] == pytest.approx(np.log(1.2) / 2, abs=1e-4)
    assert small["log_h"] == 0.0
    assert report["placement"]["24-48"] == {"cones": 0, "near": None, "dx": None, "dy": None,
                                            "log_w": None, "log_h": None}
    assert "<12" not in report["placement"]
    assert "a box at IoU >= 0.3, 12-24 px | 66.7%; median centre +0.200 w" in \
        format_table(report, "t")
    nothing = Tally()
    nothing.add(np.zeros((0, 4)), np.zeros(0), [], truth, ["blue_cone"] * 3)
    assert nothing.report()["placement"]["12-24"]["near"] == 0.0


def test_missed_cones_are_sorted_by_the_nearest_box_and_drawn_with_it(tmp_path):
    """Four 20 px cones: one found; one under a box 4 px to the right and 20 % too wide (IoU
    0.3-0.5: misplaced); one touched by a box at IoU 0.1-0.3; one with no box near it; and a
    10 px cone, too small to count, missed too. The sheet draws each missed label in green
    and the box nearest it in red."""
    truth = np.array([[0, 0, 10, 20], [50, 0, 60, 20], [100, 0, 110, 20], [200, 0, 210, 20],
                      [300, 0, 305, 10]], np.float64)
    pred = np.array([[0, 0, 10, 20], [53, 0, 65, 20], [106, 0, 116, 20]], np.float64)
    frame = tmp_path / "f.png"
    cv2.imwrite(str(frame), np.full((120, 500, 3), 90, np.uint8))
    tally = Tally()
    tally.add(pred, np.array([0.9, 0.8, 0.7]), ["blue_cone"] * 3, truth, ["blue_cone"] * 5,
              image=frame)
    report = tally.report()
    assert report["missed_ge12"] == {"misplaced": 1, "overlapping": 1, "none": 1}
    assert ("| missed cones >= 12 px | 1 with a box at IoU 0.3-0.5, 1 with a box at IoU "
            "0.1-0.3, 1 with no box (IoU < 0.1) |") in format_table(report, "t")
    assert tally.missed == [(frame, (50.0, 0.0, 60.0, 20.0), (53.0, 0.0, 65.0, 20.0)),
                            (frame, (100.0, 0.0, 110.0, 20.0), (106.0, 0.0, 116.0, 20.0)),
                            (frame, (200.0, 0.0, 210.0, 20.0), None)]
    sheet = cv2.imread(str(miss_sheet(tally.missed, tmp_path / "miss.png", tile=64,
                                      columns=4)))
    assert sheet.shape == (64, 256, 3)

    def colour(bgr):
        return np.all(sheet == bgr, axis=2)

    green, red = colour((0, 255, 0)), colour((0, 0, 255))
    for t in range(3):
        assert green[:, 64 * t:64 * (t + 1)].sum() > 20  # every missed label
    assert red[:, :64].sum() > 20 and red[:, 64:128].sum() > 20  # the boxes near the first two
    assert not red[:, 128:].any() and not green[:, 192:].any()  # none near the third; padding
    found = Tally()
    found.add(truth[:4], np.ones(4), ["blue_cone"] * 4, truth[:4], ["blue_cone"] * 4,
              image=frame)
    assert found.missed == [] and not any(found.report()["missed_ge12"].values())
    assert "missed cones" not in format_table(found.report(), "t")


def test_an_enlarged_frame_is_scored_by_the_sizes_its_cones_had_where_they_were_labelled():
    """A frame shown twice as tall (label_scale 2): a 30 px box was 15 px in the labelled frame,
    so it is no longer a >= 20 px detection; a 20 px cone was 10 px, below the recall cut. A
    shrunk frame (label_scale 0.5) is scored in its own pixels."""
    truth = np.array([[0, 0, 10, 20], [50, 0, 60, 60]], np.float64)  # 20 and 60 px tall
    pred = np.array([[50, 0, 60, 60], [100, 0, 110, 30], [200, 0, 210, 50]], np.float64)
    labels = ["blue_cone"] * 3
    enlarged, same, shrunk = Tally(), Tally(), Tally()
    for tally, scale in ((enlarged, 2.0), (same, 1.0), (shrunk, 0.5)):
        tally.add(pred, np.array([0.9, 0.8, 0.7]), labels, truth, ["blue_cone"] * 2, scale)
    big, one, small = enlarged.report(), same.report(), shrunk.report()
    assert one["recall_ge12"] == 0.5 and one["detections_ge20"] == 3
    assert big["recall_ge12"] == 1.0  # the 20 px cone counted as the 10 px it was
    assert big["recall_by_height"]["<12"]["cones"] == 1
    # the 30 px false positive was 15 px: only the 60 and 50 px detections count
    assert big["detections_ge20"] == 2 and big["precision_ge20"] == 0.5
    assert small == one


def test_an_extra_height_cut_scores_recall_and_labels_of_the_taller_cones():
    # Truth heights 10, 18, 30, 60 px; found: the 18 px (wrong label) and 60 px (right) ones.
    pred = np.array([TRUTH[1], TRUTH[3], [300, 100, 310, 125]], np.float64)
    labels = ["blue_cone", "orange_cone", "blue_cone"]
    tally = Tally(min_px=16)
    tally.add(pred, np.array([0.9, 0.8, 0.7]), labels, TRUTH, TRUTH_LABELS)
    extra = tally.report()["recall_min_px"]
    # cones >= 16 px: 18, 30 and 60 px; two of them found, one of those two labelled right
    assert extra == {"min_px": 16, "recall": pytest.approx(2 / 3, abs=1e-4), "cones": 3,
                     "label_accuracy": 0.5}
    proposals = Tally(min_px=16)
    proposals.add(pred, np.array([0.9, 0.8, 0.7]), None, TRUTH, TRUTH_LABELS)
    assert proposals.report()["recall_min_px"]["label_accuracy"] is None  # no labels to score
    assert "recall_min_px" not in Tally().report()


def test_clip_rules_select_whole_clips_and_video_frame_spans():
    assert parse_clip_rules(["accel", "skidpad:20-37"]) == [("accel", None, None),
                                                            ("skidpad", 20, 37)]
    rules = parse_clip_rules(["accel", "skidpad:20-37"])
    assert in_clips("accel_mp4-3_jpg.rf.ab.jpg", rules)
    assert in_clips("skidpad_mp4-20_jpg.rf.ab.jpg", rules)
    assert not in_clips("skidpad_mp4-19_jpg.rf.ab.jpg", rules)
    assert not in_clips("skidpad_21_jpg.rf.ab.jpg", rules)  # a single frame, not the video
    samples = [Sample(Path(f"{n}.jpg"), np.zeros((0, 4)), [], (640, 640))
               for n in ("accel_mp4-1_jpg.rf.a", "autox_mp4-5_jpg.rf.b", "autox2_mp4-2_jpg.rf.c")]
    held = select_samples(samples, "heldout")
    train = select_samples(samples, "train")
    assert [s.image_path.stem for s in held] == ["accel_mp4-1_jpg.rf.a", "autox2_mp4-2_jpg.rf.c"]
    assert [s.image_path.stem for s in train] == ["autox_mp4-5_jpg.rf.b"]
    with pytest.raises(ValueError, match="CLIP:FIRST-LAST"):
        parse_clip_rules(["skidpad:9-1"])


def _yolo_root(tmp_path):
    """Two 256x256 frames with BGRacing ids (0 blue, 3 yellow)."""
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    rows = {"a": ["0 0.5 0.5 0.1 0.2", "3 0.2 0.5 0.05 0.1"], "b": ["0 0.7 0.7 0.1 0.2"]}
    for stem, lines in rows.items():
        cv2.imwrite(str(tmp_path / "images" / f"{stem}.png"), np.zeros((256, 256, 3), np.uint8))
        (tmp_path / "labels" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_the_evaluate_command_scores_a_replay_jsonl(tmp_path, capsys):
    root = _yolo_root(tmp_path / "data")
    records = [
        {"frame": 0, "source": "a.png", "cones": [
            {"box": [115.2, 102.4, 140.8, 153.6], "label": "blue_cone", "score": 0.9},
            {"box": [10, 10, 40, 60], "label": "yellow_cone", "score": 0.8}],
         "latency_ms": {"propose": 2.0}, "candidates": 5},
        {"frame": 1, "source": "b.png", "cones": [
            {"box": [166.4, 153.6, 192.0, 204.8], "label": "yellow_cone", "score": 0.7}],
         "latency_ms": {"propose": 4.0}, "candidates": 3}]
    run = tmp_path / "run.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report.json"
    assert node_main(["evaluate", str(run), "--data", f"yolo:{root}", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    # 51 px blue and 51 px blue found; the 25.6 px yellow missed
    assert report["recall_ge12"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["precision_ge20"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["label_accuracy"] == 0.5
    assert report["candidates_per_frame"] == 4.0
    assert report["propose_ms"]["median"] == 3.0
    assert "recall >= 12 px" in capsys.readouterr().out
    assert node_main(["evaluate", str(run), "--data", f"yolo:{root}", "--json", str(out),
                      "--recall-min-px", "30"]) == 0
    # >= 30 px: the two 51 px blue cones, both found, one labelled blue
    assert json.loads(out.read_text())["recall_min_px"] == {
        "min_px": 30.0, "recall": 1.0, "cones": 2, "label_accuracy": 0.5}
    assert "| recall >= 30 px | 100.0% (of 2; label accuracy 50.0%) |" in capsys.readouterr().out
    sheet = tmp_path / "false.png"
    assert node_main(["evaluate", str(run), "--data", f"yolo:{root}", "--false-sheet",
                      str(sheet)]) == 0
    # The 50 px yellow detection on frame a lies away from both of its labels.
    assert "false detections away from every label: 1" in capsys.readouterr().out
    assert cv2.imread(str(sheet)).shape == (128, 1024, 3)
    misses = tmp_path / "miss.png"
    assert node_main(["evaluate", str(run), "--data", f"yolo:{root}", "--miss-sheet",
                      str(misses)]) == 0
    # The 25.6 px yellow cone is the one missed.
    assert "missed cones >= 12 px: 1" in capsys.readouterr().out
    assert cv2.imread(str(misses)).shape == (128, 1024, 3)


def test_a_video_run_is_matched_by_frame_index_and_plotted(tmp_path, capsys):
    """The demo and a video replay write ``source: null``: frame i is the image stem i."""
    root = _yolo_root(tmp_path / "data")
    for stem, new in (("a", "00000"), ("b", "00001")):
        (root / "images" / f"{stem}.png").rename(root / "images" / f"{new}.png")
        (root / "labels" / f"{stem}.txt").rename(root / "labels" / f"{new}.txt")
    records = [
        {"frame": 0, "source": None, "cones": [
            {"box": [115.2, 102.4, 140.8, 153.6], "label": "blue_cone", "score": 0.9},
            {"box": [10, 10, 40, 60], "label": "yellow_cone", "score": 0.8}]},
        {"frame": 1, "source": None, "cones": [
            {"box": [166.4, 153.6, 192.0, 204.8], "label": "yellow_cone", "score": 0.7}]}]
    run = tmp_path / "video.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report.json"
    assert node_main(["evaluate", str(run), "--data", f"yolo:{root}", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["recall_ge12"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["label_accuracy"] == 0.5
    printed = capsys.readouterr().out
    pytest.importorskip("matplotlib")
    png = tmp_path / "video.evaluate.png"
    assert f"plot: {png}" in printed
    image = cv2.imread(str(png))
    assert image is not None and image.shape[1] > 2 * image.shape[0]  # three panels


def test_precision_recall_curve_and_confusion_counts():
    from node.evaluate.plot import confusion_table

    pred = np.array([TRUTH[1], [300, 100, 310, 125], TRUTH[3]], np.float64)
    tally = Tally()
    tally.add(pred, np.array([0.9, 0.8, 0.6]), ["blue_cone", "blue_cone", "orange_cone"], TRUTH,
              TRUTH_LABELS)
    precision, recall, thresholds = tally.precision_recall()
    assert thresholds.tolist() == [0.9, 0.8, 0.6]
    assert precision.tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    assert recall.tolist() == pytest.approx([0.25, 0.25, 0.5])  # of the 4 labelled cones
    rows, cols, counts = confusion_table(tally)
    table = {(r, c): int(counts[i, j]) for i, r in enumerate(rows) for j, c in enumerate(cols)}
    assert table[("yellow_cone", "blue_cone")] == 1  # found, labelled wrong
    assert table[("orange_cone", "orange_cone")] == 1
    assert table[("none", "blue_cone")] == 1  # a detection of no labelled cone
    assert table[("blue_cone", "missed")] == 2  # the 10 px and 30 px blue cones
    assert counts.sum() == 5


def test_proposals_only_scores_the_configured_proposer(tmp_path):
    root = _yolo_root(tmp_path / "data")
    out = tmp_path / "report.json"
    assert node_main(["evaluate", "--proposals-only", "--data", f"yolo:{root}",
                      "--set", "proposer.kind=external",
                      "--set", f"proposer.external_dir={root}", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["recall_ge12"] == 1.0 and report["precision_ge20"] == 1.0
    assert report["candidates_per_frame"] == 1.5 and report["label_accuracy"] is None


def test_an_unreadable_run_is_a_one_line_error(tmp_path, capsys):
    root = _yolo_root(tmp_path / "data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert node_main(["evaluate", str(bad), "--data", f"yolo:{root}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.jsonl:1" in err and "\n" not in err
