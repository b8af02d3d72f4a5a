"""Tests of node.infer: suffix dispatch, metadata checks, the base runner's state machine,
async overlap, error recovery, TensorRT's sidecar check and double buffering (on fake
tensorrt/pycuda modules), and backend parity against ONNX Runtime.

Models come from ``backend_doubles.make_onnx`` (onnx.helper, no torch, no bundled model), whose
numpy forward pass gives the exact logits; fake tensorrt/pycuda modules come from there too.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import threading
import time

import cv2
import numpy as np
import pytest

pytest.importorskip("onnx")

from node.classes import CLASSIFIER_CLASSES
from node.infer import (
    BACKEND_BY_SUFFIX,
    QUEUE_DEPTH,
    BackendError,
    OnnxRuntimeBackend,
    TensorRTBackend,
    compare_backends,
    load_backend,
    tensorrt_available,
)
from node.infer.metadata import METADATA_KEY, MetadataError, sidecar_path
from node.infer.onnxrt import resolve_providers
from node.infer.preprocess import Preprocessor
from node.infer.tensorrt import batch_profile

from .backend_doubles import META, SIZE, FakeGpu, make_onnx, reference_logits, write_engine


def crops_batch(n=12, seed=1, meta=META):
    """Real crops through the node's crop policy and preprocessing, from a textured frame."""
    rng = np.random.default_rng(seed)
    frame = np.full((240, 320, 3), 90, np.uint8)
    for _ in range(60):  # colourful blobs, so crops differ as cone crops do
        x, y, r = rng.integers(0, 320), rng.integers(0, 240), int(rng.integers(4, 30))
        cv2.circle(frame, (int(x), int(y)), r, tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    xy = rng.uniform(0, 280, (n, 2))
    boxes = np.hstack([xy, xy + rng.uniform(12, 60, (n, 2))]).astype(np.float32)
    return Preprocessor(meta)(frame, boxes).copy()


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "model.onnx"
    weights, fc = make_onnx(path)
    return path, weights, fc


# ---- dispatch and metadata ----------------------------------------------------------------

def test_suffix_dispatch_and_one_line_errors(model, tmp_path):
    path = model[0]
    assert BACKEND_BY_SUFFIX[".onnx"] is OnnxRuntimeBackend
    assert BACKEND_BY_SUFFIX[".engine"] is BACKEND_BY_SUFFIX[".plan"] is TensorRTBackend
    backend = load_backend(path)
    assert isinstance(backend, OnnxRuntimeBackend) and not backend.is_active
    assert backend.meta.classes == list(CLASSIFIER_CLASSES) and backend.precision == "fp32"
    with pytest.raises(BackendError, match=r"missing\.onnx: model file not found") as err:
        load_backend(tmp_path / "missing.onnx")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(BackendError, match=r"model\.pt: unknown model type '\.pt'.*"
                                           r"\.engine, \.onnx, \.plan") as err2:
        load_backend(tmp_path / "model.pt")
    assert "\n" not in str(err.value) + str(err2.value)


def test_missing_or_disagreeing_metadata_is_a_one_line_metadata_error(tmp_path):
    make_onnx(tmp_path / "bare.onnx", meta=None)
    with pytest.raises(MetadataError, match=r"bare\.onnx: no 'cone_node' metadata") as err:
        load_backend(tmp_path / "bare.onnx")
    assert "\n" not in str(err.value)
    make_onnx(tmp_path / "size.onnx", meta=META.replace(input_size=48))
    with pytest.raises(MetadataError, match=r"size\.onnx: model input 'crops' has shape "
                                            r"\['N', 3, 32, 32\].*N×3×48×48"):
        load_backend(tmp_path / "size.onnx")
    make_onnx(tmp_path / "cls.onnx", meta=META.replace(classes=list(CLASSIFIER_CLASSES[:4])))
    with pytest.raises(MetadataError, match=r"cls\.onnx: model output 'logits'.*4 classes"):
        load_backend(tmp_path / "cls.onnx")
    (tmp_path / "m.engine").write_bytes(b"engine")
    with pytest.raises(MetadataError, match=r"m\.engine\.json: engine sidecar not found"):
        load_backend(tmp_path / "m.engine")


# ---- the base runner contract on ONNX Runtime ---------------------------------------------

def test_infer_matches_numpy_forward_async_equals_sync_and_input_is_staged(model):
    path, weights, fc = model
    batch = crops_batch(12)
    expected = reference_logits(batch, weights, fc)
    with load_backend(path, threads=1) as backend:
        sync = backend.infer(batch)
        assert sync.shape == (12, 5) and sync.dtype == np.float32
        np.testing.assert_allclose(sync, expected, atol=1e-4)
        mine = batch.copy()
        backend.infer_async(mine)
        mine[:] = 0  # the caller may reuse its buffer once infer_async returns
        np.testing.assert_array_equal(backend.wait(), sync)
        t = backend.last_timing
        assert t["batch"] == 12 and t["infer_ms"] >= t["run_ms"] > 0 and t["wait_ms"] >= 0


def test_batch_validation_messages(model):
    with load_backend(model[0], max_batch=16) as backend:
        good = crops_batch(4)
        cases = [(good.astype(np.float64), r"dtype must be float32.*got float64"),
                 (good[0], r"must be N×3×32×32 \(NCHW\), got shape \(3, 32, 32\)"),
                 (good[:, :, :16], r"got shape \(4, 3, 16, 32\)"),
                 (good.tolist(), r"must be a numpy array, got list"),
                 (np.zeros((17, 3, SIZE, SIZE), np.float32),
                  r"batch of 17 crops exceeds max_batch 16")]
        for bad, message in cases:
            with pytest.raises(BackendError, match=message):
                backend.infer_async(bad)
        assert backend.in_flight == 0  # rejected batches leave no trace
        np.testing.assert_allclose(backend.infer(good), backend.infer(good.copy()))


def test_empty_batch_never_reaches_the_runtime(model, monkeypatch):
    with load_backend(model[0]) as backend:
        monkeypatch.setattr(backend._session, "run", lambda *a, **k: pytest.fail("ran"))
        out = backend.infer(np.empty((0, 3, SIZE, SIZE), np.float32))
        assert out.shape == (0, 5) and out.dtype == np.float32
        assert backend.last_timing["batch"] == 0


def test_lifetime_and_queue_state_errors(model):
    path = model[0]
    backend = load_backend(path)
    a, b = crops_batch(3, seed=2), crops_batch(5, seed=3)
    with pytest.raises(BackendError, match=r"infer_async\(\) on an inactive backend"):
        backend.infer_async(a)
    backend.deactivate()  # a no-op when inactive
    with backend:
        with pytest.raises(BackendError, match="already active"):
            backend.activate()
        with pytest.raises(BackendError, match=r"wait\(\) without a batch in flight"):
            backend.wait()
        expect_a, expect_b = backend.infer(a), backend.infer(b)
        backend.infer_async(a)
        backend.infer_async(b)  # depth 2: both in flight
        assert backend.in_flight == QUEUE_DEPTH == 2
        with pytest.raises(BackendError, match=r"2 batches already in flight"):
            backend.infer_async(a)
        with pytest.raises(BackendError, match=r"infer\(\) while 2 batch\(es\) are in flight"):
            backend.infer(a)
        np.testing.assert_array_equal(backend.wait(), expect_a)  # FIFO
        np.testing.assert_array_equal(backend.wait(), expect_b)
        backend.infer_async(a)  # left in flight: deactivate drains it
    assert not backend.is_active and backend.in_flight == 0 and backend._session is None


def test_worker_exception_fails_that_batch_only(model, monkeypatch):
    with load_backend(model[0]) as backend:
        batch = crops_batch(6)
        expected = backend.infer(batch)
        real_run, calls = backend._session.run, []

        def flaky_run(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("CUDA error 700: illegal address\nstack...")
            return real_run(*args, **kwargs)

        monkeypatch.setattr(backend._session, "run", flaky_run)
        backend.infer_async(batch)
        backend.infer_async(batch)
        with pytest.raises(BackendError, match=r"inference failed: RuntimeError: CUDA error 700: "
                                               r"illegal address$"):
            backend.wait()
        np.testing.assert_array_equal(backend.wait(), expected)
        np.testing.assert_array_equal(backend.infer(batch), expected)
        assert len(calls) == 3


def test_threads_and_providers_are_honoured(model):
    with load_backend(model[0], threads=2) as two, load_backend(model[0]) as default:
        assert two._session.get_session_options().intra_op_num_threads == 2
        assert default._session.get_session_options().intra_op_num_threads == 0  # ORT decides
        assert default.providers == ["CPUExecutionProvider"] and "cpu" in default.name
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, avail) == ["CPUExecutionProvider"]
    assert resolve_providers("auto", avail[1:]) == avail[1:]
    assert resolve_providers(["auto"], avail) == avail
    with pytest.raises(BackendError, match=r"\['CUDAExecutionProvider'\] not available"):
        resolve_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="threads must be a positive integer"):
        load_backend(model[0], threads=0)
    # The config takes "auto" as configs/node.yaml documents it, or a list.
    from node.node_config import load_node_config

    assert load_node_config(None, ["model.providers=auto"]).model.providers == "auto"
    assert load_node_config(None, ["model.providers=[auto]"]).model.providers == ["auto"]


def test_inference_overlaps_cpu_work_on_the_calling_thread(tmp_path):
    """While the worker runs batch t, the caller's cv2 work proceeds: pipelined/serial < 0.9.

    The two modes are timed in alternating short rounds and each keeps its best round, so a
    neighbour's burst of CPU load hits both alike; rounds continue (up to ~8 s) until three
    rounds are in and the ratio holds. On a machine whose cores other processes hold (load
    average above the core count) a failed ratio is a skip, not a measurement.
    """
    path = tmp_path / "heavy.onnx"
    make_onnx(path, size=64, convs=3, width=24, meta=META.replace(input_size=64))
    batch = np.random.default_rng(0).normal(size=(16, 3, 64, 64)).astype(np.float32)
    image = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8)

    def best_of(fn, k=3):
        times = []
        for _ in range(k):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    threads_before = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core for the caller, one for the worker
    try:
        with load_backend(path, threads=1) as backend:
            infer_s = best_of(lambda: backend.infer(batch))
            reps = max(1, round(infer_s / best_of(lambda: cv2.GaussianBlur(image, (15, 15), 0))))

            def cpu_work():
                for _ in range(reps):
                    cv2.GaussianBlur(image, (15, 15), 0)

            def serial(n=4):
                for _ in range(n):
                    cpu_work()
                    backend.infer(batch)

            def pipelined(n=4):
                backend.infer_async(batch)
                for i in range(n):
                    cpu_work()
                    backend.wait()
                    if i < n - 1:
                        backend.infer_async(batch)

            best = {"serial": float("inf"), "pipelined": float("inf")}
            deadline, rounds = time.perf_counter() + 8.0, 0
            while True:
                for mode in (serial, pipelined):
                    best[mode.__name__] = min(best[mode.__name__], best_of(mode, k=1))
                rounds += 1
                ratio = best["pipelined"] / best["serial"]
                if (rounds >= 3 and ratio < 0.9) or time.perf_counter() > deadline:
                    break
    finally:
        cv2.setNumThreads(threads_before)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if ratio >= 0.9 and load > cores + 0.5:  # other processes hold the cores we need
        pytest.skip(f"machine oversubscribed (load {load:.1f} on {cores} cores): "
                    f"pipelined/serial = {ratio:.2f} is not a measurement of overlap")
    assert ratio < 0.9, f"no overlap: pipelined/serial = {ratio:.2f} ({best}, {rounds} rounds)"


# ---- TensorRT on fake tensorrt / pycuda modules --------------------------------------------

@pytest.mark.parametrize("field, value", [("version", "8.6.1"), ("name", "Xavier"),
                                          ("cc", (7, 2))])
def test_engine_for_other_tensorrt_or_gpu_is_refused_before_deserialising(
        model, tmp_path, monkeypatch, field, value):
    gpu = FakeGpu(**{field: value}).install(monkeypatch)
    backend = load_backend(write_engine(model[0], tmp_path / "m.engine"))
    with pytest.raises(BackendError, match=r"m\.engine: engine was built with TensorRT 10\.3\.0 "
                                           r"for Orin \(compute 8\.7\).*rebuild it with "
                                           r"`python -m export\.engine model\.onnx --precision "
                                           r"fp16` on this device") as err:
        backend.activate()
    assert "\n" not in str(err.value) and gpu.deserialised == 0 and gpu.retained == 0
    assert not backend.is_active


def test_engine_buffers_are_sized_once_and_alternate_between_two_sets(model, tmp_path,
                                                                      monkeypatch):
    gpu = FakeGpu().install(monkeypatch)
    backend = load_backend(write_engine(model[0], tmp_path / "m.engine"), max_batch=64)
    assert backend.max_batch == 16 and backend.name == "tensorrt-fp16:m.engine"
    batch = crops_batch(16)
    with backend:
        assert gpu.retained == 1 and gpu.deserialised == 1 and not gpu.stack()
        sizes = sorted(len(buf) for buf in gpu.memory.values())
        assert sizes == [16 * 5 * 4] * 2 + [16 * 3 * SIZE * SIZE * 4] * 2  # 2 sets, max batch
        allocated = dict(gpu.memory)
        for n in (16, 3, 9, 1):
            backend.infer_async(batch[:n])
            backend.infer_async(batch[:n])
            backend.wait(), backend.wait()
            assert backend.last_timing["gpu_ms"] >= 0 and backend.last_timing["batch"] == n
        assert gpu.memory.keys() == allocated.keys()  # nothing reallocated per batch
        runs = gpu.executions
        assert [r["n"] for r in runs] == [16, 16, 3, 3, 9, 9, 1, 1]
        assert len({r["stream"] for r in runs}) == 2 and len({r["crops"] for r in runs}) == 2
        for prev, cur in itertools.pairwise(runs):  # slot k, k+1, k, ...: each with its own stream
            assert cur["stream"] != prev["stream"] and cur["crops"] != prev["crops"]
            assert cur["logits"] != prev["logits"]
        assert {r["thread"] for r in runs} != {threading.get_ident()}  # ran in the worker
        with pytest.raises(BackendError, match="batch of 17 crops exceeds max_batch 16"):
            backend.infer_async(np.zeros((17, 3, SIZE, SIZE), np.float32))
    assert gpu.memory == {} and gpu.retained == 0 and not gpu.stack()


def test_engine_matches_onnxruntime_and_recovers_from_a_failed_execute(model, tmp_path,
                                                                       monkeypatch):
    gpu = FakeGpu().install(monkeypatch)
    path, weights, fc = model
    engine = load_backend(write_engine(path, tmp_path / "m.plan"))
    batch = crops_batch(10)
    report = compare_backends([load_backend(path), engine], batch, atol=1e-5,
                              min_top1_agreement=1.0)
    assert report["reference"].startswith("onnxruntime-cpu") and report["num_crops"] == 10
    assert report["backends"][engine.name]["ok"] and not engine.is_active
    assert report["backends"][engine.name]["top1_agreement"] == 1.0
    with engine:
        gpu.fail_next = True
        with pytest.raises(BackendError, match=r"inference failed: RuntimeError: "
                                               r"execute_async_v3 failed"):
            engine.infer(batch)
        assert not gpu.stack()  # popped despite the failure
        np.testing.assert_allclose(engine.infer(batch), reference_logits(batch, weights, fc),
                                   atol=1e-4)


def test_engine_disagreeing_with_its_sidecar_is_released_cleanly(model, tmp_path,
                                                               monkeypatch):
    gpu = FakeGpu(profile_max=32).install(monkeypatch)  # the engine allows 32, sidecar says 16
    engine = load_backend(write_engine(model[0], tmp_path / "m.engine", cc=[8, 7]))
    with pytest.raises(MetadataError, match=r"m\.engine: engine profile allows batch 32, the "
                                            r"sidecar says 16"):
        engine.activate()
    assert gpu.memory == {} and gpu.retained == 0 and not gpu.stack() and not engine.is_active
    as_dict = META.replace(extra={**engine.meta.extra, "batch_profile": {"min": 1, "opt": 4,
                                                                         "max": 8}})
    assert batch_profile(as_dict, "m.engine.json") == {"min": 1, "opt": 4, "max": 8}
    with pytest.raises(MetadataError, match=r"1 <= min <= opt <= max, got \{'min': 4"):
        batch_profile(as_dict.replace(extra={**as_dict.extra, "batch_profile": [4, 2, 8]}), "x")


def test_engine_without_tensorrt_or_sidecar_keys_fails_in_one_line(model, tmp_path,
                                                                   monkeypatch):
    assert tensorrt_available() is (importlib.util.find_spec("tensorrt") is not None
                                    and importlib.util.find_spec("pycuda") is not None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ImportError
    backend = load_backend(write_engine(model[0], tmp_path / "m.engine"))
    with pytest.raises(BackendError, match=r"m\.engine: TensorRT is not installed here"):
        backend.activate()
    side = sidecar_path(tmp_path / "m.engine")
    side.write_text(META.replace(extra={"tensorrt_version": "10.3.0"}).to_json())
    with pytest.raises(MetadataError, match=r"m\.engine\.json: engine sidecar lacks "
                                            r"\['gpu_name', 'compute_capability'"):
        load_backend(tmp_path / "m.engine")


# ---- parity of every backend available here ------------------------------------------------

def _qdq_twin(fp32_path, out_path, batch):
    """An INT8 Q/DQ copy of the test net (symmetric, per-channel), metadata carried over."""
    import onnx
    from onnx import helper
    from onnxruntime import quantization as q

    class Feed(q.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"crops": batch[i:i + 4]} for i in range(0, len(batch), 4)])

        def get_next(self):
            return next(self.items, None)

    q.quantize_static(str(fp32_path), str(out_path), Feed(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, activation_type=q.QuantType.QInt8,
                      weight_type=q.QuantType.QInt8,
                      extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    model = onnx.load(str(out_path))
    helper.set_model_props(model, {METADATA_KEY: META.replace(precision="int8").to_json()})
    onnx.save(model, str(out_path))
    return out_path


def test_every_available_backend_agrees_with_onnxruntime(model, tmp_path):
    path = model[0]
    batch = crops_batch(24, seed=5)
    int8 = _qdq_twin(path, tmp_path / "model.int8.onnx", batch)
    backends = [load_backend(path), load_backend(path, threads=1),
                load_backend(path, providers="auto"), load_backend(int8)]
    report = compare_backends(backends, batch)
    entries = list(report["backends"].values())
    assert len(entries) == 4 and entries[0]["max_abs_diff"] == 0.0
    for entry in entries[1:3]:  # FP32 on every provider set present here
        assert entry["max_abs_diff"] < 1e-5 and entry["top1_agreement"] == 1.0
    # INT8 Q/DQ of an untrained net: the decisions hold, probabilities move a little. (The
    # accuracy bound of the trained INT8 model is the calibration tests' business.)
    assert entries[3]["top1_agreement"] >= 0.9 and entries[3]["mean_abs_diff"] < 0.03
    assert 0 < entries[3]["max_abs_diff"] < 0.35
    assert [b.precision for b in backends] == ["fp32"] * 3 + ["int8"]


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None
                    or importlib.util.find_spec("pycuda") is None,
                    reason="needs TensorRT and pycuda with a CUDA GPU")
def test_real_tensorrt_engine_agrees_with_onnxruntime(model, tmp_path):  # pragma: no cover
    import tensorrt as trt

    from node.infer import cuda_mem

    path = model[0]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = 0 if int(trt.__version__.split(".")[0]) >= 10 else (
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(path.read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("crops", (1, 3, SIZE, SIZE), (8, 3, SIZE, SIZE), (32, 3, SIZE, SIZE))
    config.add_optimization_profile(profile)
    name, cc = cuda_mem.device_info(0)
    write_engine(path, tmp_path / "m.engine", version=trt.__version__, gpu=name, cc=cc,
                 profile=(1, 8, 32),
                 engine_bytes=bytes(builder.build_serialized_network(network, config)))
    report = compare_backends([load_backend(path), load_backend(tmp_path / "m.engine")],
                              crops_batch(32), atol=1e-3, min_top1_agreement=1.0)
    assert all(entry["ok"] for entry in report["backends"].values()), report
