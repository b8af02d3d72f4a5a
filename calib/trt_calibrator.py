"""Legacy TensorRT implicit-INT8 calibration: an ``IInt8EntropyCalibrator2`` over the feed.

**Legacy and isolated.** ``IInt8EntropyCalibrator2`` is deprecated since TensorRT 10.1 and
removed in 11; the project's INT8 path is the Q/DQ ONNX from ``calib.quantize``. This calibrator
remains for TensorRT 8.5–10.0 builds of an FP32 ONNX with the ``INT8`` flag (see
``export.trt_flags``). It follows the TensorRT Python API (``tensorrt.IInt8EntropyCalibrator2``:
``get_batch_size``, ``get_batch``, ``read_calibration_cache``, ``write_calibration_cache``).

TensorRT is imported only inside ``make_entropy_calibrator``, and the class is created there,
so this module imports on machines without TensorRT. Device memory comes from
``node.infer.cuda_mem`` (the project's one pycuda module); the caller makes the CUDA
context current around the build.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np


class CalibratorUnavailable(RuntimeError):
    """The legacy calibrator cannot be used with this TensorRT."""


def legacy_calibrator_status(trt_version: str) -> str:
    """``"supported"`` (< 10.1), ``"deprecated"`` (10.1–10.x) or ``"removed"`` (>= 11)."""
    match = re.match(r"^\s*(\d+)\.(\d+)", str(trt_version))
    if not match:
        raise CalibratorUnavailable(f"cannot read TensorRT version {trt_version!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    if major >= 11:
        return "removed"
    if (major, minor) >= (10, 1):
        return "deprecated"
    return "supported"


def make_entropy_calibrator(batches: Iterable[np.ndarray], batch_size: int,
                            input_shape: tuple[int, int, int], cache_path: str | Path,
                            trt: Any = None, buffer_factory: Callable | None = None):
    """Build an ``IInt8EntropyCalibrator2`` that feeds ``batches`` to the TensorRT builder.

    Args:
        batches: N×3×S×S float32 batches (e.g. ``calib.feed.calibration_batches(...,
            drop_last=True)``); a short batch ends calibration.
        batch_size: crops per batch (TensorRT's calibration batch).
        input_shape: (3, S, S).
        cache_path: calibration cache file, read when present and written after calibration.
        trt: the ``tensorrt`` module (imported when ``None``).
        buffer_factory: ``f(shape, dtype)`` → object with ``host``, ``device_ptr`` and
            ``copy_to_device(rows, stream)``; defaults to ``cuda_mem.HostDeviceBuffer``.

    Raises:
        CalibratorUnavailable: TensorRT 11 or newer, where the class no longer exists.
    """
    if trt is None:
        import tensorrt as trt
    status = legacy_calibrator_status(trt.__version__)
    if status == "removed" or not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise CalibratorUnavailable(
            f"TensorRT {trt.__version__} has no IInt8EntropyCalibrator2 (removed in 11); build "
            f"a Q/DQ ONNX with `python -m calib.quantize` instead")
    if status == "deprecated":
        warnings.warn(f"IInt8EntropyCalibrator2 is deprecated since TensorRT 10.1 (this is "
                      f"{trt.__version__}); prefer a Q/DQ ONNX from `python -m calib.quantize`",
                      DeprecationWarning, stacklevel=2)
    stream = None
    if buffer_factory is None:
        from node.infer import cuda_mem

        buffer_factory = cuda_mem.HostDeviceBuffer
        stream = cuda_mem.Stream()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Entropy calibration (KL divergence, TensorRT's calibrator v2) over the feed."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batch_size = batch_size
            self.cache_path = Path(cache_path)
            self.batches_fed = 0
            self._batches = iter(batches)
            self._buffer = buffer_factory((batch_size, *input_shape), np.float32)

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names, p_str=None):  # TensorRT's signature; p_str unused
            batch = next(self._batches, None)
            if batch is None or len(batch) != self.batch_size:
                return None  # tells TensorRT that calibration data is exhausted
            self._buffer.host[...] = batch
            self._buffer.copy_to_device(self.batch_size, stream)
            if stream is not None:
                stream.synchronize()
            self.batches_fed += 1
            return [int(self._buffer.device_ptr)] * len(names)

        def read_calibration_cache(self):
            if self.cache_path.is_file():
                return self.cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache) -> None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self.cache_path.write_bytes(bytes(cache))

        def free(self) -> None:
            if hasattr(self._buffer, "free"):
                self._buffer.free()

    return EntropyCalibrator()
