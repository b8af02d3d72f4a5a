"""Test doubles for node.infer: a tiny ONNX classifier with metadata, its numpy forward
pass, and fake ``tensorrt``/``pycuda.driver`` modules that drive ``TensorRTBackend``.

The ONNX model is built with onnx.helper (Conv+ReLU → GlobalAveragePool → Flatten → Gemm,
dynamic batch, ``crops`` → ``logits``), so tests need neither torch nor a bundled model. Other
node tests may use ``make_onnx`` for a fast model with metadata.
"""

from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from node.classes import CLASSIFIER_CLASSES
from node.infer.metadata import METADATA_KEY, ModelMetadata, sidecar_path

SIZE = 32
META = ModelMetadata(classes=list(CLASSIFIER_CLASSES), input_size=SIZE, arch="test-convnet")


def make_onnx(path, *, size=SIZE, classes=5, convs=1, width=8, meta=META, seed=0):
    """Write an N×3×S×S → N×C conv net with ``meta`` in metadata_props; return its weights."""
    rng = np.random.default_rng(seed)
    inits, nodes, weights, x, cin = [], [], [], "crops", 3
    for i in range(convs):
        w = rng.normal(0, (2 / (cin * 9)) ** 0.5, (width, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.1, width).astype(np.float32)
        weights.append((w, b))
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, cin = f"r{i}", width
    wfc = rng.normal(0, 1.0, (classes, cin)).astype(np.float32)
    bfc = rng.normal(0, 0.1, classes).astype(np.float32)
    inits += [numpy_helper.from_array(wfc, "wfc"), numpy_helper.from_array(bfc, "bfc")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "cone_classifier",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        helper.set_model_props(model, {METADATA_KEY: meta.to_json()})
    onnx.save(model, str(path))
    return weights, (wfc, bfc)


def reference_logits(batch, weights, fc):
    """The test net's forward pass in numpy."""
    x = batch.astype(np.float64)
    for w, b in weights:
        win = np.lib.stride_tricks.sliding_window_view(
            np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
        x = np.maximum(np.einsum("ncxyij,ocij->noxy", win, w) + b[None, :, None, None], 0)
    return x.mean(axis=(2, 3)) @ fc[0].T.astype(np.float64) + fc[1]


class FakeGpu:
    """Just enough of pycuda.driver and tensorrt to drive TensorRTBackend; the "engine" file
    holds ONNX bytes that an ONNX Runtime session executes at ``execute_async_v3``."""

    def __init__(self, version="10.3.0", name="Orin", cc=(8, 7), profile_max=16):
        self.version, self.name, self.cc, self.profile_max = version, name, cc, profile_max
        self.memory: dict[int, np.ndarray] = {}
        self.next_ptr = 1 << 20
        self.local = threading.local()
        self.retained = self.deserialised = 0
        self.executions: list[dict] = []
        self.fail_next = False

    def stack(self) -> list:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def require_context(self) -> None:
        assert self.stack(), "CUDA call without a current context in this thread"

    def install(self, monkeypatch) -> FakeGpu:
        gpu, driver, trt = self, types.ModuleType("pycuda.driver"), types.ModuleType("tensorrt")

        class Context:
            def push(self):
                gpu.stack().append(self)

            @staticmethod
            def pop():
                gpu.stack().pop()

            def detach(self):
                gpu.retained -= 1

        class Device:
            def __init__(self, index):
                self.index = index

            def name(self):
                return gpu.name

            def compute_capability(self):
                return gpu.cc

            def retain_primary_context(self):
                gpu.retained += 1
                return Context()

        class Allocation:
            def __init__(self, nbytes):
                gpu.require_context()
                self.ptr = gpu.next_ptr
                gpu.next_ptr += nbytes + 256
                gpu.memory[self.ptr] = np.zeros(nbytes, np.uint8)

            def __int__(self):
                return self.ptr

            def free(self):
                gpu.require_context()
                del gpu.memory[self.ptr]

        class Stream:
            count = 0

            def __init__(self):
                Stream.count += 1
                self.handle = 1000 + Stream.count

            def synchronize(self):
                gpu.require_context()

        class Event:
            def record(self, stream):
                self.t = time.perf_counter()

            def time_since(self, start):
                return (self.t - start.t) * 1e3

        def htod(dst, src, stream):
            gpu.require_context()
            gpu.memory[int(dst)][: src.nbytes] = np.frombuffer(src.tobytes(), np.uint8)

        def dtoh(dst, src, stream):
            gpu.require_context()
            dst[...] = gpu.memory[int(src)][: dst.nbytes].view(dst.dtype).reshape(dst.shape)

        driver.__dict__.update(
            init=lambda: None, Device=Device, Context=Context, Stream=Stream, Event=Event,
            mem_alloc=Allocation, memcpy_htod_async=htod, memcpy_dtoh_async=dtoh,
            pagelocked_empty=lambda shape, dtype: np.empty(shape, dtype))

        class ExecutionContext:
            def __init__(self, engine):
                self.engine, self.shapes, self.addresses = engine, {}, {}

            def set_input_shape(self, name, shape):
                self.shapes[name] = tuple(shape)
                return True

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr

            def execute_async_v3(self, stream_handle):
                gpu.require_context()
                if gpu.fail_next:
                    gpu.fail_next = False
                    return False
                shape = self.shapes["crops"]
                nbytes = int(np.prod(shape)) * 4
                x = gpu.memory[self.addresses["crops"]][:nbytes].view(np.float32).reshape(shape)
                (y,) = self.engine.session.run(None, {"crops": x})
                gpu.memory[self.addresses["logits"]][: y.nbytes] = y.view(np.uint8).ravel()
                gpu.executions.append({"stream": stream_handle, "n": shape[0],
                                       "thread": threading.get_ident(), **self.addresses})
                return True

        class Engine:
            def __init__(self, data):
                import onnxruntime as ort

                self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
                self.num_io_tensors = 2
                self.shapes = {"crops": (-1, *self.session.get_inputs()[0].shape[1:]),
                               "logits": (-1, *self.session.get_outputs()[0].shape[1:])}

            def get_tensor_name(self, i):
                return ["crops", "logits"][i]

            def get_tensor_mode(self, name):
                return "INPUT" if name == "crops" else "OUTPUT"

            def get_tensor_dtype(self, name):
                return "FLOAT"

            def get_tensor_shape(self, name):
                return self.shapes[name]

            def get_tensor_profile_shape(self, name, profile):
                rest = self.shapes[name][1:]
                return [(1, *rest), (8, *rest), (gpu.profile_max, *rest)]

            def create_execution_context(self):
                return ExecutionContext(self)

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                gpu.require_context()
                gpu.deserialised += 1
                return Engine(data)

        class Logger:
            WARNING = 2

            def __init__(self, severity):
                self.severity = severity

        trt.__dict__.update(
            __version__=self.version, Runtime=Runtime, Logger=Logger,
            nptype=lambda dtype: np.float32,
            TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"))
        pycuda = types.ModuleType("pycuda")
        pycuda.driver = driver
        monkeypatch.setitem(sys.modules, "pycuda", pycuda)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return self


def write_engine(onnx_path, engine_path, *, version="10.3.0", gpu="Orin", cc="8.7",
                 profile=(1, 8, 16), engine_bytes=None, meta=META):
    """An engine file (by default the ONNX bytes, which FakeGpu executes) and its sidecar."""
    engine_path.write_bytes(engine_bytes or onnx_path.read_bytes())
    extra = {"tensorrt_version": version, "gpu_name": gpu, "compute_capability": cc,
             "batch_profile": list(profile),  # as export.engine writes it
             "source_onnx": onnx_path.name}
    sidecar_path(engine_path).write_text(meta.replace(precision="fp16", extra=extra).to_json())
    return engine_path
