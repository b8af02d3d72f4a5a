"""TensorRT backend: serialised ``.engine`` files, run with the tensor-name API and pycuda.

Follows the base runner contract of ``node.infer.base`` and the TensorRT Python API that
exists from TensorRT 8.5 (JetPack 5) through 10.x (JetPack 6) to 11 (JetPack 7):
``num_io_tensors``/``get_tensor_name``/``get_tensor_mode``/``get_tensor_dtype``/
``get_tensor_shape`` to discover I/O, then per batch ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3``. No binding-index API.

``tensorrt`` is imported in ``activate()``; all pycuda work goes through
``node.infer.cuda_mem``. Before deserialising, the engine's JSON sidecar is checked against
the running TensorRT version and GPU (an engine is only valid where it was built); a mismatch
says how to rebuild.

Memory: two buffer sets (one per staging slot of the base class), each a page-locked host
input, a device input, a device output and a page-locked host output sized for ``max_batch``,
with its own CUDA stream and a pair of CUDA events around ``execute_async_v3`` for GPU time.
``infer_async`` copies the batch into the free set's pinned input in the caller's thread while
the other set may still be running. The worker thread pushes the primary context, queues
H2D → execute → D2H on that set's stream, synchronises it and pops. GPU work is serialised by
the one worker, so one execution context serves both sets.

Sidecar keys read from ``ModelMetadata.extra`` (written by ``export.engine``):
``tensorrt_version`` (``trt.__version__``), ``gpu_name``, ``compute_capability`` (``"8.7"``),
``batch_profile`` (``{"min": 1, "opt": 16, "max": 64}``), optionally ``source_onnx`` (the
ONNX file name, for the rebuild hint).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.infer.base import (
    MAX_BATCH,
    QUEUE_DEPTH,
    Backend,
    BackendError,
    WorkerResult,
    _first_line,
)
from node.infer.metadata import MetadataError, ModelMetadata, read_sidecar, sidecar_path

SIDECAR_KEYS = ("tensorrt_version", "gpu_name", "compute_capability", "batch_profile")


def batch_profile(meta: ModelMetadata, origin: str) -> dict[str, int]:
    """The engine's dynamic-batch profile ``{"min", "opt", "max"}`` from its sidecar.

    Raises:
        MetadataError: a sidecar key is missing or the profile is malformed.
    """
    missing = [k for k in SIDECAR_KEYS if k not in meta.extra]
    if missing:
        raise MetadataError(f"{origin}: engine sidecar lacks {missing}; rebuild the engine with "
                            f"`python -m export.engine MODEL.onnx`")
    raw = meta.extra["batch_profile"]
    if isinstance(raw, (list, tuple)) and len(raw) == 3:
        raw = dict(zip(("min", "opt", "max"), raw))
    try:
        profile = {k: int(raw[k]) for k in ("min", "opt", "max")}
    except (TypeError, KeyError, ValueError):
        raise MetadataError(f"{origin}: 'batch_profile' must be {{min, opt, max}}, got "
                            f"{raw!r}") from None
    if not 1 <= profile["min"] <= profile["opt"] <= profile["max"]:
        raise MetadataError(f"{origin}: 'batch_profile' must have 1 <= min <= opt <= max, got "
                            f"{profile}")
    return profile


def format_compute_capability(cc: object) -> str:
    """``(8, 7)``, ``[8, 7]`` or ``"8.7"`` → ``"8.7"``."""
    if isinstance(cc, (list, tuple)) and len(cc) == 2:
        return f"{int(cc[0])}.{int(cc[1])}"
    return str(cc)


def rebuild_hint(meta: ModelMetadata) -> str:
    source = meta.extra.get("source_onnx", "MODEL.onnx")
    return f"`python -m export.engine {source} --precision {meta.precision}` on this device"


def check_engine_compatibility(meta: ModelMetadata, engine_path: str | Path,
                               tensorrt_version: str, gpu_name: str,
                               compute_capability: object) -> None:
    """Refuse an engine built for another TensorRT version or GPU.

    Raises:
        BackendError: the sidecar's ``tensorrt_version``, ``gpu_name`` or
            ``compute_capability`` differs from the running ones; the message says how to
            rebuild.
    """
    built = (str(meta.extra.get("tensorrt_version")), str(meta.extra.get("gpu_name")),
             format_compute_capability(meta.extra.get("compute_capability")))
    here = (str(tensorrt_version), str(gpu_name), format_compute_capability(compute_capability))
    if built != here:
        raise BackendError(
            f"{engine_path}: engine was built with TensorRT {built[0]} for {built[1]} (compute "
            f"{built[2]}), but this device runs TensorRT {here[0]} on {here[1]} (compute "
            f"{here[2]}); rebuild it with {rebuild_hint(meta)}")


@dataclass
class _BufferSet:
    input: object  # cuda_mem.HostDeviceBuffer
    output: object
    stream: object  # cuda_mem.Stream
    start: object  # cuda_mem.Event
    end: object


class TensorRTBackend(Backend):
    """A TensorRT engine on one GPU.

    Args:
        path: ``.engine`` (or ``.plan``) file with its ``.json`` sidecar next to it.
        max_batch: requested capacity; buffers hold min(max_batch, sidecar profile max).
        device: CUDA device ordinal.

    Raises:
        MetadataError: the sidecar is missing or incomplete.
    """

    def __init__(self, path: str | Path, *, max_batch: int = MAX_BATCH, device: int = 0) -> None:
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"{path}: engine file not found")
        meta = read_sidecar(path)
        self.profile = batch_profile(meta, str(sidecar_path(path)))
        if not isinstance(max_batch, int) or max_batch < 1:
            raise BackendError(f"{path}: max_batch must be a positive integer, got {max_batch!r}")
        super().__init__(path, meta, name=f"tensorrt-{meta.precision}:{path.name}",
                         max_batch=min(max_batch, self.profile["max"]))
        self.device = device
        self._cuda = None
        self._runtime = self._engine = self._context = None
        self._slots: list[_BufferSet] = []

    # ---- activation -----------------------------------------------------------------------

    def _activate_impl(self) -> None:
        trt = _import_tensorrt(self.path)
        from node.infer import cuda_mem

        try:
            gpu_name, cc = cuda_mem.device_info(self.device)
        except ImportError:
            raise BackendError(f"{self.path}: pycuda is not installed; install it on the device "
                               f"(launch/jetson_setup.sh) or run the .onnx model") from None
        except Exception as exc:  # noqa: BLE001 (pycuda.driver.Error: no driver/device)
            raise BackendError(f"{self.path}: no usable CUDA device {self.device} "
                               f"({_first_line(exc)})") from None
        check_engine_compatibility(self.meta, self.path, trt.__version__, gpu_name, cc)
        self._cuda = cuda_mem.CudaContext(self.device)
        try:
            with self._cuda.scope():
                self._load_engine(trt)
                self._allocate(trt, cuda_mem)
        except BaseException:
            self._release()
            raise

    def _load_engine(self, trt) -> None:
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise BackendError(f"{self.path}: TensorRT {trt.__version__} cannot deserialise this "
                               f"engine; rebuild it with {rebuild_hint(self.meta)}")
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise MetadataError(f"{self.path}: expected one input and one output tensor, found "
                                f"{inputs} and {outputs}")
        self._input_name, self._output_name = inputs[0], outputs[0]
        s = self.meta.input_size
        in_shape = tuple(int(d) for d in engine.get_tensor_shape(self._input_name))
        out_shape = tuple(int(d) for d in engine.get_tensor_shape(self._output_name))
        if len(in_shape) != 4 or in_shape[1:] != (3, s, s):
            raise MetadataError(f"{self.path}: engine input '{self._input_name}' has shape "
                                f"{in_shape}, but its sidecar says N×3×{s}×{s}")
        if len(out_shape) != 2 or out_shape[1] != self.num_classes:
            raise MetadataError(f"{self.path}: engine output has shape {out_shape}, but its "
                                f"sidecar lists {self.num_classes} classes")
        profile_shape = getattr(engine, "get_tensor_profile_shape", None)  # TRT >= 8.5
        if in_shape[0] == -1:
            engine_max = (int(profile_shape(self._input_name, 0)[2][0]) if profile_shape
                          else self.profile["max"])
            if engine_max != self.profile["max"]:
                raise MetadataError(f"{self.path}: engine profile allows batch {engine_max}, "
                                    f"the sidecar says {self.profile['max']}; rebuild it")
        elif in_shape[0] < self.max_batch:
            self.max_batch = in_shape[0]  # fixed-batch engine: smaller batches are padded
        self._fixed_batch = in_shape[0] if in_shape[0] > 0 else None
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{self.path}: TensorRT could not create an execution context "
                               f"(out of GPU memory?)")

    def _allocate(self, trt, cuda_mem) -> None:
        engine, rows = self._engine, self._fixed_batch or self.max_batch
        in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input_name)))
        out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._output_name)))
        for _ in range(QUEUE_DEPTH):
            self._slots.append(_BufferSet(
                input=cuda_mem.HostDeviceBuffer((rows, *self.input_shape), in_dtype),
                output=cuda_mem.HostDeviceBuffer((rows, self.num_classes), out_dtype),
                stream=cuda_mem.Stream(), start=cuda_mem.Event(), end=cuda_mem.Event()))

    def _deactivate_impl(self) -> None:
        self._release()

    def _release(self) -> None:
        """Free buffers and TensorRT objects with the context current, then drop it."""
        if self._cuda is None:
            return
        try:
            with self._cuda.scope():
                for slot in self._slots:
                    slot.input.free()
                    slot.output.free()
                self._slots = []
                self._context = None  # destroy in dependency order: context, engine, runtime
                self._engine = None
                self._runtime = None
        finally:
            self._cuda.release()
            self._cuda = None

    # ---- inference ------------------------------------------------------------------------

    def _infer_async_impl(self, batch: np.ndarray, slot: int) -> Future:
        n = batch.shape[0]
        np.copyto(self._slots[slot].input.host[:n], batch, casting="same_kind")
        return self._run_in_worker(self._execute, slot, n)

    def _execute(self, slot: int, n: int) -> WorkerResult:
        bufs = self._slots[slot]
        rows = self._fixed_batch or n
        with self._cuda.scope():
            context = self._context
            if not context.set_input_shape(self._input_name, (rows, *self.input_shape)):
                raise RuntimeError(f"set_input_shape rejected batch {rows}")
            context.set_tensor_address(self._input_name, bufs.input.device_ptr)
            context.set_tensor_address(self._output_name, bufs.output.device_ptr)
            bufs.input.copy_to_device(rows, bufs.stream)
            bufs.start.record(bufs.stream)
            if not context.execute_async_v3(bufs.stream.handle):
                raise RuntimeError("execute_async_v3 failed (see the TensorRT log)")
            bufs.end.record(bufs.stream)
            bufs.output.copy_to_host(rows, bufs.stream)
            bufs.stream.synchronize()
            gpu_ms = bufs.end.elapsed_ms_since(bufs.start)
        logits = np.array(bufs.output.host[:n], dtype=np.float32)  # a copy: the set is reused
        return logits, {"gpu_ms": gpu_ms}


def tensorrt_available() -> bool:
    """Whether ``tensorrt`` and ``pycuda`` are importable here (without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda"))


def _import_tensorrt(path: Path):
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(f"{path}: TensorRT is not installed here; run the .onnx model with "
                           f"ONNX Runtime, or use JetPack's TensorRT on the device") from None
    return trt
