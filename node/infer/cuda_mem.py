"""CUDA memory, streams, events and context handling for the TensorRT backend, over pycuda.

This is the only module in the project that imports pycuda (as the TensorRT samples keep all
of it in ``samples/python/common_runtime.py``), and it imports it lazily, inside functions.

Context choice: ``CudaContext`` retains the device's *primary* context
(``Device.retain_primary_context()``) rather than creating a private one with
``make_context()``. TensorRT allocates and launches through the CUDA runtime API, which always
works in the primary context; sharing it means one context per GPU (no second copy of the
context's memory on a Jetson whose RAM is shared with the CPU) and device pointers that
TensorRT and pycuda both see. A retained primary context is not current anywhere: every thread
that touches CUDA wraps that work in ``with ctx.scope():`` (push on entry, pop on exit).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def driver():
    """``pycuda.driver``, initialised. Raises ImportError where pycuda is missing."""
    import pycuda.driver as cuda

    cuda.init()
    return cuda


def device_info(index: int = 0) -> tuple[str, tuple[int, int]]:
    """Name and compute capability (major, minor) of a GPU, without creating a context."""
    dev = driver().Device(index)
    major, minor = dev.compute_capability()
    return str(dev.name()), (int(major), int(minor))


class CudaContext:
    """The primary context of one GPU, retained once and pushed per thread scope.

    Args:
        index: CUDA device ordinal.
    """

    def __init__(self, index: int = 0) -> None:
        self._cuda = driver()
        self._context = self._cuda.Device(index).retain_primary_context()

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Make the context current in the calling thread for the ``with`` body."""
        self._context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def release(self) -> None:
        """Drop this retain; the runtime frees the primary context with its last user."""
        if self._context is not None:
            self._context.detach()
            self._context = None


class Stream:
    """A CUDA stream; ``handle`` is what ``execute_async_v3`` takes."""

    def __init__(self) -> None:
        self.raw = driver().Stream()

    @property
    def handle(self) -> int:
        return int(self.raw.handle)

    def synchronize(self) -> None:
        self.raw.synchronize()


class Event:
    """A CUDA event for timing work on a stream."""

    def __init__(self) -> None:
        self.raw = driver().Event()

    def record(self, stream: Stream) -> None:
        self.raw.record(stream.raw)

    def elapsed_ms_since(self, start: Event) -> float:
        """GPU milliseconds from ``start`` to this event (both recorded and completed)."""
        return float(self.raw.time_since(start.raw))


class HostDeviceBuffer:
    """A page-locked host array and a device allocation of the same size, freed explicitly.

    Args:
        shape: full (maximum) shape; copies move the first ``rows`` along axis 0.
        dtype: numpy dtype of the tensor.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        cuda = driver()
        self._cuda = cuda
        self.host: np.ndarray = cuda.pagelocked_empty(tuple(shape), np.dtype(dtype))
        self._device = cuda.mem_alloc(self.host.nbytes)

    @property
    def device_ptr(self) -> int:
        return int(self._device)

    @property
    def nbytes(self) -> int:
        return int(self.host.nbytes)

    def copy_to_device(self, rows: int, stream: Stream) -> None:
        """Queue host[:rows] → device on ``stream``."""
        self._cuda.memcpy_htod_async(self.device_ptr, self.host[:rows], stream.raw)

    def copy_to_host(self, rows: int, stream: Stream) -> None:
        """Queue device → host[:rows] on ``stream``."""
        self._cuda.memcpy_dtoh_async(self.host[:rows], self.device_ptr, stream.raw)

    def free(self) -> None:
        """Free both sides now (call with the context current)."""
        if self._device is not None:
            self._device.free()
            self._device = None
        pinned = getattr(self.host, "base", None)
        if pinned is not None and hasattr(pinned, "free"):
            pinned.free()
        self.host = None  # the pinned memory is gone; fail loudly on reuse
