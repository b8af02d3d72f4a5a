"""Inference: a batch of crops in, class scores out (stage 3 of a frame's way).

- ``node.infer.crop`` and ``node.infer.preprocess``: boxes to square crops to one normalised
  N x 3 x H x W batch, exactly as the model's metadata (``node.infer.metadata``) says;
- the backends (``node.infer.onnxrt``, ``node.infer.tensorrt`` over ``node.infer.base``; all
  CUDA memory handling in ``node.infer.cuda_mem``);
- ``node.infer.postprocess``: scores to labelled cones, and overlap suppression.

Backends share one base class and are chosen by model file suffix.

As Ultralytics' ``nn/backends`` maps suffixes to runtimes and Polygraphy's runners share one
contract (see ``node.infer.base``): ``.onnx`` runs on ONNX Runtime, ``.engine``/``.plan``
on TensorRT. Importing this package imports neither tensorrt nor pycuda.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from node.infer.base import (
    MAX_BATCH,
    QUEUE_DEPTH,
    Backend,
    BackendError,
    compare_backends,
    softmax,
)
from node.infer.onnxrt import OnnxRuntimeBackend
from node.infer.tensorrt import TensorRTBackend, tensorrt_available

BACKEND_BY_SUFFIX: dict[str, type[Backend]] = {
    ".onnx": OnnxRuntimeBackend,
    ".engine": TensorRTBackend,
    ".plan": TensorRTBackend,
}


def load_backend(path: str | Path, *, providers: str | Sequence[str] | None = None,
                 threads: int | None = None, max_batch: int = MAX_BATCH) -> Backend:
    """The backend for a model file, chosen by its suffix (not yet activated).

    Args:
        path: ``.onnx`` (FP32 or INT8 Q/DQ) or ``.engine``/``.plan`` with its JSON sidecar.
        providers: ONNX Runtime only: ``None`` = CPU, ``"auto"`` = TensorRT/CUDA/CPU execution
            providers that are present, or an explicit list. Ignored for engines.
        threads: ONNX Runtime only: intra-op threads (``None``: its default). Ignored for
            engines.
        max_batch: the largest batch the backend accepts (engines: at most their profile max).

    Raises:
        BackendError: missing file or unknown suffix (one line, naming the file).
        MetadataError: the model's metadata is missing or disagrees with the model.
    """
    path = Path(path)
    cls = BACKEND_BY_SUFFIX.get(path.suffix.lower())
    if cls is None:
        raise BackendError(f"{path}: unknown model type {path.suffix!r}; accepted suffixes: "
                           f"{', '.join(sorted(BACKEND_BY_SUFFIX))}")
    if not path.is_file():
        raise BackendError(f"{path}: model file not found")
    if cls is OnnxRuntimeBackend:
        return OnnxRuntimeBackend(path, providers=providers, threads=threads,
                                  max_batch=max_batch)
    return cls(path, max_batch=max_batch)


__all__ = ["BACKEND_BY_SUFFIX", "QUEUE_DEPTH", "Backend", "BackendError", "OnnxRuntimeBackend",
           "TensorRTBackend", "compare_backends", "load_backend", "softmax",
           "tensorrt_available"]
