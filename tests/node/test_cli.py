"""Tests of ``python -m node``: one-line errors with the right exit codes, and replay end to
end on an image folder (one record per frame, the summary file, config flags)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from node.__main__ import COMMANDS, main
from tests.node.test_pipeline import BLUE, ORANGE, YELLOW, make_colour_classifier

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_colour_classifier(tmp_path_factory.mktemp("cli_model") / "tiny.onnx")


@pytest.fixture()
def clip(tmp_path) -> Path:
    """Six frames with painted cones, one zero-byte file, and YOLO labels for the boxes."""
    images, labels = tmp_path / "clip" / "images", tmp_path / "clip" / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(6):
        img = np.full((120, 160, 3), 100, np.uint8)
        img[20:60, 10:30] = BLUE
        img[50:100, 100:125] = [YELLOW, ORANGE][i % 2]
        cv2.imwrite(str(images / f"f{i}.png"), img)
        (labels / f"f{i}.txt").write_text(
            f"0 {20 / 160} {40 / 120} {20 / 160} {40 / 120}\n"
            f"0 {112.5 / 160} {75 / 120} {25 / 160} {50 / 120}\n")
    (images / "f10.png").write_bytes(b"")  # unreadable, sorts after f6 (natural order)
    return tmp_path / "clip"


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_source_is_one_line_and_exit_1(tiny_model, tmp_path, capsys):
    code, _, err = run_main(["replay", tmp_path / "nope.mp4", "--model", tiny_model], capsys)
    assert code == 1
    assert_one_line_error(err, "nope.mp4")


def test_bad_config_key_and_value_exit_2(tiny_model, clip, tmp_path, capsys):
    code, _, err = run_main(["replay", clip / "images", "--model", tiny_model,
                             "--set", "proposer.max_candidatez=3"], capsys)
    assert code == 2
    assert_one_line_error(err, "proposer.max_candidatez", "unknown key")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  score_threshold: 1.5\n")
    code, _, err = run_main(["replay", clip / "images", "--config", bad], capsys)
    assert code == 2
    assert_one_line_error(err, "bad.yaml", "model.score_threshold", "maximum")
    code, _, err = run_main(["replay", clip / "images", "--config", tmp_path / "none.yaml"],
                            capsys)
    assert code == 2
    assert_one_line_error(err, "none.yaml", "not found")


def test_missing_or_wrong_model_exit_1(clip, tmp_path, capsys):
    code, _, err = run_main(["replay", clip / "images", "--model", tmp_path / "m.onnx"], capsys)
    assert code == 1
    assert_one_line_error(err, "m.onnx", "not found")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, _, err = run_main(["replay", clip / "images", "--model", junk], capsys)
    assert code == 1
    assert_one_line_error(err, "junk.onnx")


def test_bad_proposals_and_usage_errors(tiny_model, clip, tmp_path, capsys):
    code, _, err = run_main(["replay", clip / "images", "--model", tiny_model, "--proposals",
                             f"yolo:{tmp_path / 'nolabels'}"], capsys)
    assert code == 1
    assert_one_line_error(err, "nolabels", "not found")
    code, _, err = run_main(["replay", clip / "images", "--model", tiny_model, "--proposals",
                             str(clip)], capsys)
    assert code == 1
    assert_one_line_error(err, "yolo:DIR")
    code, _, err = run_main(["replay"], capsys)
    assert code == 2
    assert_one_line_error(err, "SOURCE")
    code, _, err = run_main(["fly"], capsys)
    assert code == 2
    assert_one_line_error(err, "invalid choice")
    assert {"replay", "run", "demo"} <= set(COMMANDS)


def test_replay_writes_one_record_per_frame_and_the_summary(tiny_model, clip, tmp_path, capsys):
    jsonl, summary = tmp_path / "out" / "cones.jsonl", tmp_path / "out" / "summary.json"
    code, out, err = run_main(["replay", clip / "images", "--model", tiny_model,
                               "--proposals", f"yolo:{clip}", "--jsonl", jsonl,
                               "--summary", summary, "--set", "model.score_threshold=0.0",
                               "--sync", "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["source"] for r in records] == [f"f{i}.png" for i in range(6)] + ["f10.png"]
    assert [r["frame"] for r in records] == list(range(7))
    for i, rec in enumerate(records[:6]):
        assert "error" not in rec and (rec["width"], rec["height"]) == (160, 120)
        got = {c["label"]: c["box"] for c in rec["cones"]}
        assert got == {"blue_cone": [10.0, 20.0, 30.0, 60.0],
                       ["yellow_cone", "orange_cone"][i % 2]: [100.0, 50.0, 125.0, 100.0]}
    assert records[6]["cones"] == [] and "f10.png" in records[6]["error"]
    data = json.loads(summary.read_text())
    assert data["frames"] == 7 and data["errors"] == 1 and data["dropped"] == 0
    assert data["mode"] == "sync" and data["proposer"] == "external"
    assert data["refiner"] is None  # external boxes are taken as they are
    assert {"capture", "propose", "preprocess", "infer", "post", "publish", "total"} <= \
        set(data["latency_ms"])
    assert all({"p50", "p90", "p99"} <= set(q) for q in data["latency_ms"].values())
    assert "p50" in out and "fps" in out.lower()


def test_replay_to_stdout_keeps_stdout_pure_jsonl(tiny_model, clip, capsys):
    code, out, err = run_main(["replay", clip / "images", "--model", tiny_model, "--jsonl",
                               "-", "--no-progress"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 7 and "p50" in err


def test_expected_failure_in_a_subprocess_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "node", "replay", str(tmp_path / "x.mp4")],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")


def test_run_needs_a_camera_uri_and_reads_live(tiny_model, tmp_path, capsys):
    code, _, err = run_main(["run", "--model", tiny_model], capsys)
    assert code == 1
    assert_one_line_error(err, "camera URI")
    code, _, err = run_main(["run", "ftp://cam", "--model", tiny_model], capsys)
    assert code == 1
    assert_one_line_error(err, "ftp://")
    video = tmp_path / "cam.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30, (160, 120))
    for _ in range(40):
        writer.write(np.full((120, 160, 3), 100, np.uint8))
    writer.release()
    summary = tmp_path / "s.json"
    code, _, err = run_main(["run", video, "--model", tiny_model, "--summary", summary],
                              capsys)
    assert code == 0, err
    data = json.loads(summary.read_text())
    assert data["frames"] + data["dropped"] == 40 and data["frames"] >= 1


def test_the_shipped_config_is_the_documented_defaults():
    import dataclasses

    from node.node_config import DEFAULT_CONFIG, NodeConfig, load_node_config

    shipped = load_node_config(REPO / DEFAULT_CONFIG)
    assert dataclasses.asdict(shipped) == dataclasses.asdict(NodeConfig())
    text = (REPO / DEFAULT_CONFIG).read_text()
    for section, values in dataclasses.asdict(shipped).items():
        assert f"\n{section}:\n" in text
        for key in values:
            assert f"  {key}:" in text, f"{section}.{key} is not in {DEFAULT_CONFIG}"


def test_demo_writes_every_output(tiny_model, tmp_path, capsys):
    pytest.importorskip("export.synth")
    out = tmp_path / "demo"
    code, stdout, err = run_main(["demo", "--out", out, "--frames", 6, "--model", tiny_model],
                                 capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "cones.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(6))
    assert len(list((out / "clip" / "labels").glob("*.txt"))) == 6
    video = cv2.VideoCapture(str(out / "annotated.webm"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    video.release()
    assert (out / "bag" / "metadata.yaml").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 6
    assert summary["proposer"] == "heatmap" and summary["refiner"].endswith("cone_refiner.onnx")
    assert "p50" in stdout and "proposer heatmap + refiner" in stdout
    # the demo scores itself against the clip's exact labels
    assert "demo score against the synthetic ground truth: recall" in stdout
    assert "precision" in stdout.split("demo score against")[1]
    report = json.loads((out / "evaluate.json").read_text())
    assert report["frames"] == 6 and report["labelled_cones"] > 0
