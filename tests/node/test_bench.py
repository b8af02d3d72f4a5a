"""Tests of ``python -m node bench``: the table, logs, plot, peer column and environment.

A tiny colour classifier (1×1 conv → global average pool → nearest colour prototype) and a
tiny YOLO-layout detector are built with the onnx helper API, so the benchmark runs end to end
in seconds and its accuracy column can be checked against known labels.
"""

from __future__ import annotations

import csv
import json
import math
import socket
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from node.__main__ import main as node_main
from node.bench.env import ENV_KEYS, busy_warning, clocks_locked, collect_environment, cpu_model
from node.bench.measure import latency_stats, spread_warning
from node.bench.peer import decode_yolo, letterbox
from node.bench.report import (
    CSV_COLUMNS,
    TABLE_COLUMNS,
    ReportError,
    append_csv,
    parse_markdown_table,
)
from node.infer.metadata import METADATA_KEY, ModelMetadata

CLASSES = ["blue_cone", "yellow_cone", "orange_cone", "large_orange_cone", "background"]
CONE_BGR = {"blue_cone": (220, 60, 20), "yellow_cone": (20, 220, 245),
            "orange_cone": (10, 110, 245), "large_orange_cone": (200, 40, 160)}
GREY = 115
# A crop of a w×h box holds the cone on ~w·h/(1.3·h)² of its pixels and grey around it, so
# each class's prototype is that mix of the cone's colour and the grey; background is grey.
_CONE_FRACTION = 18 * 30 / (1.3 * 30) ** 2
PROTOTYPES = np.array(
    [[(_CONE_FRACTION * c + (1 - _CONE_FRACTION) * GREY) / 255 for c in CONE_BGR[name][::-1]]
     for name in CLASSES[:4]] + [[GREY / 255] * 3], np.float32)


def _save(graph, path: Path, meta: ModelMetadata | None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        helper.set_model_props(model, {METADATA_KEY: meta.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_colour_classifier(path: Path, size: int = 32) -> Path:
    """N×3×S×S RGB (0..1) → logits N×5 = −squared distance of the mean colour to each
    class prototype (up to a per-crop constant): 2·P·rgb − |P|²."""
    identity = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    nodes = [
        helper.make_node("Conv", ["crops", "w_id"], ["rgb_map"]),
        helper.make_node("GlobalAveragePool", ["rgb_map"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["rgb"]),
        helper.make_node("Gemm", ["rgb", "w_cls", "b_cls"], ["logits"], transB=1),
    ]
    inits = [numpy_helper.from_array(identity, "w_id"),
             numpy_helper.from_array(2 * PROTOTYPES, "w_cls"),
             numpy_helper.from_array(-(PROTOTYPES ** 2).sum(1), "b_cls")]
    graph = helper.make_graph(
        nodes, "tiny_colour_classifier",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(CLASSES)])],
        inits)
    meta = ModelMetadata(classes=CLASSES, input_size=size, mean=[0.0] * 3, std=[1.0] * 3,
                         arch="tiny_colour", precision="fp32")
    return _save(graph, path, meta)


def build_yolo_detector(path: Path, size: int = 64, nc: int = 3) -> Path:
    """1×3×S×S → 1×(4+nc)×(S/8)² in the YOLO layout: boxes in input pixels, sigmoid scores."""
    rng = np.random.default_rng(0)
    channels = 4 + nc
    scale = np.array([size] * 4 + [1] * nc, np.float32).reshape(1, channels, 1, 1)
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], strides=[8, 8], kernel_shape=[8, 8]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["output0"]),
    ]
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (channels, 3, 8, 8)).astype(np.float32),
                                     "w"),
             numpy_helper.from_array(scale, "scale"),
             numpy_helper.from_array(np.array([1, channels, -1], np.int64), "shape")]
    graph = helper.make_graph(
        nodes, "tiny_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                       [1, channels, (size // 8) ** 2])], inits)
    return _save(graph, path, None)


def build_dataset(root: Path, frames: int = 4) -> tuple[Path, int, int]:
    """A YOLO dataset of grey frames with coloured boxes; the last box's label is wrong on
    purpose. Returns the root, the number of boxes and how many are labelled correctly."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names: [blue_cone, yellow_cone, orange_cone]\n")
    names = ["blue_cone", "yellow_cone", "orange_cone"]
    total = 0
    for i in range(frames):
        image = np.full((120, 160, 3), GREY, np.uint8)
        lines = []
        for j, name in enumerate(names):
            x, y, w, h = 15 + 48 * j, 30 + 8 * i, 18, 30
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), CONE_BGR[name], -1)
            label = names.index(name)
            if i == frames - 1 and j == 2:
                label = 0  # an orange cone labelled blue: the classifier must "miss" it
            lines.append(f"{label} {(x + w / 2) / 160} {(y + h / 2) / 120} {w / 160} {h / 120}")
            total += 1
        cv2.imwrite(str(root / "images" / f"frame{i:02d}.png"), image)
        (root / "labels" / f"frame{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root, total, total - 1


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    data, total, correct = build_dataset(tmp / "data")
    return {"model": build_colour_classifier(tmp / "tiny.onnx"),
            "peer": build_yolo_detector(tmp / "tiny_yolo.onnx"),
            "data": data, "total": total, "correct": correct}


def _bench_args(files: dict, out: Path) -> list[str]:
    return ["bench", "--models", str(files["model"]), "--batches", "1", "8", "--iters", "60",
            "--warmup", "5", "--seconds", "0.5", "--data", f"yolo:{files['data']}",
            "--source", str(files["data"] / "images"), "--peer", str(files["peer"]),
            "--threads", "1", "--rounds", "2", "--out-dir", str(out),
            # Flat colour rectangles, not cones: the HSV windows find them, the learned
            # heatmap proposer (rightly) does not; boxes as proposed.
            "--set", "proposer.kind=hsv", "--set", "proposer.refiner_model=null"]


@pytest.mark.parametrize(("extra", "want"), [((), 1), (("--threads", "2"), 2),
                                             (("--set", "model.threads=null"), None)])
def test_the_classifier_is_timed_with_the_node_configs_threads(bench_files, tmp_path,
                                                               monkeypatch, extra, want):
    """Without --threads the node's backend gets configs/node.yaml's model.threads (1), as
    the node itself does, not ONNX Runtime's all-cores default."""
    import node.infer

    real, used = node.infer.load_backend, []

    def recording(path, **kwargs):
        used.append(kwargs["threads"])
        return real(path, **kwargs)

    monkeypatch.setattr(node.infer, "load_backend", recording)
    out = tmp_path / "bench"
    assert node_main(["bench", "--models", str(bench_files["model"]), "--batches", "1",
                      "--iters", "5", "--warmup", "1", "--seconds", "0.1", "--source", "none",
                      "--out-dir", str(out), *extra]) == 0
    assert used == [want]
    assert json.loads((out / "bench.jsonl").read_text())["threads"] == want


def test_bench_table_logs_plot_and_peer(bench_files, tmp_path, capsys):
    out = tmp_path / "bench"
    assert node_main(_bench_args(bench_files, out)) == 0
    captured = capsys.readouterr()
    rows = parse_markdown_table(captured.out)
    assert [r["batch"] for r in rows] == ["1", "8"]
    for row in rows:
        assert set(row) == {header for header, _, _ in TABLE_COLUMNS}
        numbers = {h: float(row[h]) for h in ("size MB", "crops/s", "mean ms", "p50 ms",
                                               "p90 ms", "p99 ms", "accuracy %",
                                               "e2e FPS pipelined", "e2e FPS sync", "peer FPS",
                                               "node/peer")}
        assert all(math.isfinite(v) and v > 0 for v in numbers.values()), row
        assert numbers["p50 ms"] <= numbers["p90 ms"] <= numbers["p99 ms"]
        assert (row["model"], row["backend"], row["precision"], row["input"]) == \
            ("tiny.onnx", "onnxruntime-cpu", "fp32", "32")
        # One mislabelled box out of 12: the accuracy column is exactly 11/12.
        assert numbers["accuracy %"] == pytest.approx(
            100 * bench_files["correct"] / bench_files["total"], abs=0.05)
        assert numbers["node/peer"] == pytest.approx(
            numbers["e2e FPS pipelined"] / numbers["peer FPS"], rel=0.02, abs=0.006)

    logged = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    b1, b8 = logged
    # Batching amortises the per-call overhead (thread hand-off, session.run), which dominates
    # a model this small: a ratio measured in the same run, never an absolute time.
    assert b8["crops_per_s"] > b1["crops_per_s"]
    for row in logged:
        assert set(ENV_KEYS) <= set(row) and row["cpu"] and row["onnxruntime"] != "n/a"
        assert row["accuracy_crops"] == bench_files["total"]
        # 5 boxes labelled blue, one of them an orange cone; every other label is right.
        assert row["accuracy_per_class"] == {"blue_cone": pytest.approx(4 / 5),
                                             "yellow_cone": 1.0, "orange_cone": 1.0}
        assert row["e2e_frames"] == 4 and row["candidates_per_frame"] > 0
        assert row["peer"] == "tiny_yolo.onnx" and row["peer_input"] == 64
        # Two interleaved rounds of each; the table shows the median run.
        runs = row["e2e_fps_runs"]
        assert {k: len(v) for k, v in runs.items()} == {"pipelined": 2, "sync": 2, "peer": 2}
        assert row["e2e_fps_pipelined"] in runs["pipelined"] and row["peer_fps"] in runs["peer"]
        assert isinstance(row["spread_warning"], str)
        assert row["ratio"] == pytest.approx(row["e2e_fps_pipelined"] / row["peer_fps"])
    host = socket.gethostname()
    if len(host) >= 4:
        assert host not in (out / "bench.jsonl").read_text()

    plot = cv2.imread(str(out / "bench.png"))
    assert plot is not None and plot.shape[0] > 200 and plot.std() > 1.0
    assert "| model |" in (out / "bench.md").read_text()

    # A second run appends: twice the rows, one header.
    assert node_main(_bench_args(bench_files, out)) == 0
    capsys.readouterr()
    with open(out / "bench.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 4 and len((out / "bench.jsonl").read_text().splitlines()) == 4
    assert tuple(csv_rows[0]) == CSV_COLUMNS
    assert len({r["run_id"] for r in csv_rows}) >= 1 and all(r["date"] for r in csv_rows)


def test_bench_errors_are_one_line(bench_files, tmp_path, capsys):
    assert node_main(["bench", "--models", str(tmp_path / "missing.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.onnx" in err[0] and "not found" in err[0]
    assert node_main(["bench", "--models", str(bench_files["model"]), "--peer",
                      str(bench_files["peer"]), "--source", "none"]) == 1
    assert "--peer needs a source" in capsys.readouterr().err
    assert node_main(["bench", "--models", str(bench_files["model"]), "--batches", "0"]) == 1
    assert "--batches" in capsys.readouterr().err


def test_fps_by_frame_size(bench_files, tmp_path, capsys):
    """--sizes replays the source's frames resized to each size and reports each: one table
    line per size, the same in the JSON log, the resized frames kept in OUT_DIR/sizes."""
    out = tmp_path / "bench"
    argv = ["bench", "--models", str(bench_files["model"]), "--batches", "1", "--iters", "5",
            "--warmup", "1", "--seconds", "0.1", "--source",
            str(bench_files["data"] / "images"), "--frames", "3", "--sizes", "80x60",
            "320X240", "--rounds", "2", "--threads", "1", "--out-dir", str(out),
            "--set", "proposer.kind=hsv", "--set", "proposer.refiner_model=null"]
    assert node_main(argv) == 0
    text = capsys.readouterr().out
    table = parse_markdown_table(text.split("Frames per second by frame size")[1])
    assert [(r["frame size"], r["frames"], r["proposer input"]) for r in table] == \
        [("80x60", "3", "–"), ("320x240", "3", "–")]  # colour windows have no network input
    assert all(float(r["e2e FPS pipelined"]) > 0 for r in table)
    (row,) = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [p["size"] for p in row["e2e_by_size"]] == ["80x60", "320x240"]
    for point, (w, h) in zip(row["e2e_by_size"], [(80, 60), (320, 240)]):
        assert len(point["fps_runs"]) == 2 and point["fps"] in point["fps_runs"]
        assert point["candidates_per_frame"] > 0
        files = sorted((out / "sizes" / f"{w}x{h}").glob("*.jpg"))
        assert len(files) == 3 and cv2.imread(str(files[0])).shape == (h, w, 3)
    assert "frame size" in (out / "bench.md").read_text()


def test_against_times_a_setting_in_the_same_rounds(bench_files, tmp_path, capsys):
    """--against times the pipelined node again with the setting changed, in every round; the
    ratio is the median of the rounds' own ratios, and the line lands in the printed table.
    Here the other setting caps the candidates at 1 of the frames' 3: fewer crops to classify,
    and the count says the setting was applied."""
    out = tmp_path / "bench"
    argv = ["bench", "--models", str(bench_files["model"]), "--batches", "1", "--iters", "5",
            "--warmup", "1", "--seconds", "0.1", "--source",
            str(bench_files["data"] / "images"), "--rounds", "3", "--threads", "1",
            "--out-dir", str(out), "--set", "proposer.kind=hsv",
            "--set", "proposer.refiner_model=null", "--against", "proposer.max_candidates=1"]
    assert node_main(argv) == 0
    captured = capsys.readouterr()
    (row,) = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    against = row["against"]
    assert against["set"] == ["proposer.max_candidates=1"]
    pipelined = row["e2e_fps_runs"]["pipelined"]
    assert len(pipelined) == len(against["fps_runs"]) == len(against["ratio_runs"]) == 3
    assert against["ratio_runs"] == pytest.approx(
        [b / a for a, b in zip(pipelined, against["fps_runs"])])
    assert against["ratio"] == pytest.approx(sorted(against["ratio_runs"])[1])
    assert against["fps"] in against["fps_runs"]
    assert (row["candidates_per_frame"], against["candidates_per_frame"]) == (3.0, 1.0)
    assert "pipelined with proposer.max_candidates=1" in captured.out
    assert "pipelined with proposer.max_candidates=1" in (out / "bench.md").read_text()
    assert node_main(argv[:-2] + ["--against", "proposer.max_candidates=0"]) == 2  # config
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_candidates" in err[0]
    assert node_main(argv[:-2] + ["--against", "proposer.max_candidates=1", "--source",
                                  "none"]) == 1
    assert "--against needs a source" in capsys.readouterr().err


def test_frame_sizes_are_checked_and_the_proposer_input_reported(bench_files, capsys):
    from node.bench.measure import proposer_inputs
    from node.node_config import load_node_config

    for bad, says in (("80by60", "WIDTHxHEIGHT"), ("16x16", "32..8192")):
        assert node_main(["bench", "--models", str(bench_files["model"]), "--sizes", bad]) == 1
        err = capsys.readouterr().err
        assert bad in err and says in err
    assert node_main(["bench", "--models", str(bench_files["model"]), "--source", "none",
                      "--sizes", "800x320"]) == 1
    assert "--sizes needs a source" in capsys.readouterr().err
    proposer = load_node_config(None, []).proposer  # the default learned heatmap
    inputs = proposer_inputs(proposer, [(800, 320), (640, 640), (2592, 640)])
    assert inputs[(800, 320)] == "1011x404"  # enlarged (heatmap_min_pixels)
    assert inputs[(640, 640)] == "640x640"
    assert inputs[(2592, 640)] == "2592x640"


def test_csv_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="old.csv"):
        append_csv(path, [{"model": "x"}])


def test_latency_stats_and_spread_warning():
    steady = latency_stats([10.0, 10.1, 9.9, 10.0, 10.05] * 20)
    assert steady["p50_ms"] <= steady["p90_ms"] <= steady["p99_ms"]
    assert spread_warning(steady) == ""
    spiky = latency_stats([10.0] * 95 + [40.0] * 5)
    assert spiky["p99_ms"] == pytest.approx(40.0) and "p99/p50 4.0" in spread_warning(spiky)
    noisy = latency_stats([5.0, 15.0] * 50)
    assert "cv 50%" in spread_warning(noisy)


def test_letterbox_and_yolo_decode():
    image = np.zeros((50, 100, 3), np.uint8)
    square, scale, (left, top) = letterbox(image, 64)
    assert square.shape == (64, 64, 3) and scale == pytest.approx(0.64)
    assert (left, top) == (0, 16) and square[0, 0, 0] == 114
    # Two overlapping boxes of class 0 (NMS keeps the better), one of class 1 on top of them
    # (class-aware NMS keeps it), one below the threshold.
    boxes = np.array([[30, 30, 20, 20], [31, 31, 20, 20], [30, 30, 20, 20], [5, 5, 4, 4]],
                     np.float32)
    scores = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.1, 0.1]], np.float32)
    output = np.concatenate([boxes, scores], axis=1).T[None]  # 1 × (4+2) × 4
    kept, kept_scores, classes = decode_yolo(output, conf=0.25, iou=0.45)
    assert sorted(classes.tolist()) == [0, 1]
    assert kept_scores.max() == pytest.approx(0.9)
    np.testing.assert_allclose(kept[np.argmax(kept_scores)], [20, 20, 40, 40])


def test_environment_probes(tmp_path):
    assert cpu_model("processor\t: 0\nmodel name\t: Test CPU @ 2GHz\n") == "Test CPU @ 2GHz"
    assert cpu_model("Hardware\t: NVIDIA Tegra\n") == "NVIDIA Tegra"
    (tmp_path / "scaling_min_freq").write_text("2201600\n")
    (tmp_path / "scaling_max_freq").write_text("2201600\n")
    assert clocks_locked(tmp_path) in ("yes", "no")  # jetson_clocks wins where installed
    (tmp_path / "scaling_min_freq").write_text("729600\n")
    if clocks_locked(tmp_path / "nowhere") == "n/a":  # no jetson_clocks on this machine
        assert clocks_locked(tmp_path) == "no"
    env = collect_environment()
    assert tuple(env) == ENV_KEYS and all(isinstance(v, str) and v for v in env.values())
    assert int(env["cpu_cores"]) >= 1


def test_default_models_folder_skips_non_classifiers(bench_files, tmp_path, monkeypatch,
                                                     capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.onnx").write_bytes(bench_files["model"].read_bytes())
    (models / "detector.onnx").write_bytes(bench_files["peer"].read_bytes())  # no metadata
    (models / "README.md").write_text("not a model\n")
    monkeypatch.chdir(tmp_path)
    assert node_main(["bench", "--batches", "1", "2", "--iters", "5", "--warmup", "1",
                      "--seconds", "0.1", "--out-dir", "out"]) == 0
    captured = capsys.readouterr()
    rows = parse_markdown_table(captured.out)
    assert [(r["model"], r["batch"]) for r in rows] == [("tiny.onnx", "1"), ("tiny.onnx", "2")]
    assert all(r["accuracy %"] == "–" and r["peer FPS"] == "–" for r in rows)
    # by default the proposer and the whole pipeline are timed on a rendered synthetic clip
    assert (tmp_path / "out" / "synth_clip.mp4").is_file()
    assert all(float(r["proposer p50 ms"]) > 0 and float(r["e2e FPS pipelined"]) > 0
               for r in rows)
    assert "skipping detector.onnx" in captured.err and "cone_node" in captured.err
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0


def test_bad_source_or_peer_fails_before_timing(bench_files, tmp_path, capsys):
    base = ["bench", "--models", str(bench_files["model"]), "--out-dir", str(tmp_path)]
    assert node_main(base + ["--source", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err
    assert node_main(base + ["--source", str(bench_files["data"] / "images"),
                             "--peer", str(tmp_path / "yolo.onnx")]) == 1
    err = capsys.readouterr().err
    assert "yolo.onnx: peer detector not found" in err and "crops/s" not in err
    assert not (tmp_path / "bench.csv").exists()


def test_busy_machine_is_flagged():
    assert busy_warning({"load_avg": "0.40", "cpu_cores": "2"}) is None
    line = busy_warning({"load_avg": "5.00", "cpu_cores": "2"})
    assert line.startswith("[W]") and "5.0 on 2 cores" in line
    assert busy_warning({"load_avg": "n/a", "cpu_cores": "2"}) is None
