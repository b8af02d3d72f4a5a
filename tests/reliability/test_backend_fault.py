"""Backend faults (issue 9): an exception in inference for one frame is reported on that
frame's record and the node carries on with the next, in both loop modes and for both
backends (ONNX Runtime, and TensorRT through the fake ``tensorrt``/``pycuda`` modules)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.infer import load_backend
from node.node_config import load_node_config
from node.pipeline import Pipeline
from node.propose import ExternalBoxProposer
from node.publish.publishers import JsonlPublisher
from node.types import Frame
from tests.node.backend_doubles import FakeGpu, write_engine
from tests.reliability.doubles import BLUE, YELLOW, FaultyBackend, cone_image

FRAMES = 10


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[list[Frame], Path]:
    """Ten frames with two cones each, and their YOLO label files."""
    labels = tmp_path_factory.mktemp("labels")
    image = cone_image(60, 80, [(10, 10, 25, 50, BLUE), (50, 15, 62, 50, YELLOW)])
    frames = [Frame(i, 1000.0 + i, image, f"f{i}.png") for i in range(FRAMES)]
    for f in frames:
        (labels / f"f{f.index}.txt").write_text("0 0.22 0.5 0.19 0.67\n0 0.7 0.54 0.15 0.58\n")
    return frames, labels


def run(backend, frames, labels, tmp_path, sync: bool) -> tuple[list[dict], dict]:
    config = load_node_config(None, {"pipeline": {"sync": sync},
                                     "model": {"score_threshold": 0.0}})
    jsonl = tmp_path / f"out-{sync}.jsonl"
    pipeline = Pipeline(config, backend, ExternalBoxProposer(labels), [JsonlPublisher(jsonl)])
    summary = pipeline.run(list(frames))
    return [json.loads(line) for line in jsonl.read_text().splitlines()], summary


def reference(model, labelled, tmp_path) -> list[dict]:
    with load_backend(model, threads=1) as backend:
        records, _ = run(backend, *labelled, tmp_path, sync=True)
    return records


@pytest.mark.parametrize("sync", [False, True])
def test_a_runtime_exception_fails_its_frame_only(model, labelled, tmp_path, sync):
    clean = reference(model, labelled, tmp_path)
    with load_backend(model, threads=1) as backend:
        run_batch, calls = backend._run, []

        def flaky(staged):  # the ONNX Runtime worker raises on the 4th batch
            calls.append(len(staged))
            if len(calls) == 4:
                raise RuntimeError("CUDA failure 700: illegal memory access")
            return run_batch(staged)
        backend._run = flaky
        records, summary = run(backend, *labelled, tmp_path, sync)
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert records[3]["cones"] == []
    assert records[3]["error"].endswith("inference failed: RuntimeError: CUDA failure 700: "
                                        "illegal memory access")
    for i in set(range(FRAMES)) - {3}:  # every other frame is exactly what a clean run gives
        assert "error" not in records[i] and records[i]["cones"] == clean[i]["cones"]
        assert len(records[i]["cones"]) == 2
    assert summary["frames"] == FRAMES and summary["errors"] == 1


@pytest.mark.parametrize("sync", [False, True])
def test_faults_at_submit_in_wait_and_garbage_scores_are_each_one_frames_error(
        model, labelled, tmp_path, sync):
    clean = reference(model, labelled, tmp_path)
    with load_backend(model, threads=1) as inner:
        backend = FaultyBackend(
            inner, raise_in_submit={1}, raise_in_wait={3, 4, 5},
            logits={7: lambda x: x[:, :3],                       # wrong class count
                    8: lambda x: np.full_like(x, np.nan)},       # a broken engine's NaNs
            exc=MemoryError("out of pinned memory"))
        records, summary = run(backend, *labelled, tmp_path, sync)
    errors = {r["frame"]: r.get("error") for r in records}
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert errors[1] == errors[3] == errors[5] == "inference failed: MemoryError: out of " \
                                                  "pinned memory"
    assert errors[7] == "inference failed: backend returned scores of shape (2, 3), expected " \
                        "(2, 5)"
    assert errors[8] == "inference failed: backend returned non-finite scores"
    failed = {1, 3, 4, 5, 7, 8}
    for i in range(FRAMES):
        if i in failed:
            assert records[i]["cones"] == [] and errors[i]
        else:
            assert errors[i] is None and records[i]["cones"] == clean[i]["cones"]
    assert summary["errors"] == len(failed) and summary["frames"] == FRAMES


def test_a_failed_tensorrt_execution_fails_its_frame_only(model, labelled, tmp_path,
                                                          monkeypatch):
    gpu = FakeGpu().install(monkeypatch)
    engine = load_backend(write_engine(model, tmp_path / "m.engine"), max_batch=16)
    config_cap = 16
    frames, labels = labelled
    with engine:
        execute, calls = engine._execute, []

        def execute_with_fault(slot, n):
            calls.append(n)
            gpu.fail_next = len(calls) == 3  # execute_async_v3 returns False for frame 2
            return execute(slot, n)
        engine._execute = execute_with_fault
        config = load_node_config(None, {"model": {"score_threshold": 0.0, "max_batch": 16},
                                         "proposer": {"max_candidates": config_cap}})
        jsonl = tmp_path / "trt.jsonl"
        Pipeline(config, engine, ExternalBoxProposer(labels, config_cap),
                 [JsonlPublisher(jsonl)]).run(list(frames))
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    clean = reference(model, labelled, tmp_path)
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert records[2]["error"].endswith("inference failed: RuntimeError: execute_async_v3 "
                                        "failed (see the TensorRT log)")
    for i in set(range(FRAMES)) - {2}:
        assert "error" not in records[i]
        got = [(c["label"], c["box"]) for c in records[i]["cones"]]
        assert got == [(c["label"], c["box"]) for c in clean[i]["cones"]]
    assert gpu.retained == 0  # the context was released after the run
