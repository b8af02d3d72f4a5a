"""ONNX Runtime backend: FP32 or INT8 Q/DQ ``.onnx`` models, CPU by default.

Follows the base runner contract of ``node.infer.base`` (Polygraphy style) over
``onnxruntime.InferenceSession``. Asynchrony is the base class's single worker thread:
``InferenceSession.run`` releases the GIL, so the caller captures and proposes the next frame
while a batch runs.

Execution providers:
- ``providers=None`` (the default): ``CPUExecutionProvider`` only, the embedded default;
- ``providers="auto"`` (or ``["auto"]``): TensorRT, then CUDA, then CPU, keeping those that
  ``onnxruntime.get_available_providers()`` lists;
- an explicit list: used as given; a provider this ONNX Runtime build lacks is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
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
from node.infer.metadata import MetadataError, read_onnx_metadata

AUTO_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_SHORT = {"TensorrtExecutionProvider": "trt", "CUDAExecutionProvider": "cuda",
          "CPUExecutionProvider": "cpu"}


def resolve_providers(providers: str | Sequence[str] | None,
                      available: Sequence[str]) -> list[str]:
    """The execution providers to request (see the module docstring).

    Raises:
        BackendError: a requested provider is not in ``available``.
    """
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    providers = list(providers)
    if providers == ["auto"]:
        return [p for p in AUTO_PROVIDERS if p in available]
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise BackendError(f"execution provider(s) {missing or providers} not available in this "
                           f"onnxruntime (available: {', '.join(available)}); use 'auto' or "
                           f"leave providers unset for CPU")
    return providers


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on CPU (default) or on its CUDA/TensorRT execution providers.

    Args:
        path: ``.onnx`` file carrying ``cone_node`` metadata.
        providers: ``None`` (CPU), ``"auto"`` or a list of provider names.
        threads: ``intra_op_num_threads``; ``None`` lets ONNX Runtime choose.
        max_batch: the largest batch accepted; the two staging buffers are this big.

    Raises:
        MetadataError: missing metadata, or the model's input size or class count disagrees
            with it.
        BackendError: bad ``threads``, ``max_batch`` or provider request.
    """

    def __init__(self, path: str | Path, *, providers: str | Sequence[str] | None = None,
                 threads: int | None = None, max_batch: int = MAX_BATCH) -> None:
        import onnxruntime as ort

        path = Path(path)
        meta = read_onnx_metadata(path)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise BackendError(f"{path}: threads must be a positive integer, got {threads!r}")
        self.threads = threads
        self.requested_providers = resolve_providers(providers, ort.get_available_providers())
        tag = "+".join(_SHORT.get(p, p) for p in self.requested_providers)
        super().__init__(path, meta, name=f"onnxruntime-{tag}:{path.name}", max_batch=max_batch)
        # Check the I/O against the metadata now, so a wrong model fails at load time.
        self._check_io(self._make_session(["CPUExecutionProvider"], light=True))
        self.providers: list[str] = []
        self._session = None
        self._staging: list[np.ndarray] = []

    def _make_session(self, providers: list[str], light: bool = False):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if light:  # the load-time I/O check needs no optimisation
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.intra_op_num_threads = 1
        elif self.threads is not None:
            opts.intra_op_num_threads = self.threads
        try:
            return ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises private exception types)
            raise BackendError(f"{self.path}: ONNX Runtime cannot create a session with "
                               f"{providers} ({_first_line(exc)})") from None

    def _check_io(self, session) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise MetadataError(f"{self.path}: expected one input and one output, found "
                                f"{[i.name for i in inputs]} and {[o.name for o in outputs]}")
        s = self.meta.input_size
        in_shape, out_shape = list(inputs[0].shape), list(outputs[0].shape)
        if len(in_shape) != 4 or not _dims_match(in_shape[1:], [3, s, s]):
            raise MetadataError(f"{self.path}: model input '{inputs[0].name}' has shape "
                                f"{in_shape}, but its metadata says N×3×{s}×{s}")
        if len(out_shape) != 2 or not _dims_match(out_shape[1:], [self.num_classes]):
            raise MetadataError(f"{self.path}: model output '{outputs[0].name}' has shape "
                                f"{out_shape}, but its metadata lists {self.num_classes} "
                                f"classes")
        if isinstance(in_shape[0], int) and in_shape[0] > 0:
            raise MetadataError(f"{self.path}: model input has a fixed batch of {in_shape[0]}; "
                                f"export it with a dynamic batch (`python -m export.onnx`)")
        self._input_name, self._output_name = inputs[0].name, outputs[0].name

    # ---- base class hooks -----------------------------------------------------------------

    def _activate_impl(self) -> None:
        self._session = self._make_session(self.requested_providers)
        self.providers = list(self._session.get_providers())
        shape = (self.max_batch, *self.input_shape)
        self._staging = [np.empty(shape, np.float32) for _ in range(QUEUE_DEPTH)]

    def _deactivate_impl(self) -> None:
        self._session = None
        self._staging = []

    def _infer_async_impl(self, batch: np.ndarray, slot: int) -> Future:
        staged = self._staging[slot][: batch.shape[0]]
        np.copyto(staged, batch)
        return self._run_in_worker(self._run, staged)

    def _run(self, staged: np.ndarray) -> WorkerResult:
        (logits,) = self._session.run([self._output_name], {self._input_name: staged})
        return np.asarray(logits, np.float32), {}


def _dims_match(actual: list, expected: list[int]) -> bool:
    """Symbolic (string/None) dims match anything; integer dims must be equal."""
    return len(actual) == len(expected) and all(
        not isinstance(a, int) or a == e for a, e in zip(actual, expected))


def ort_session(path: Path, threads: int, key: str, error: type[ValueError], missing: str,
                trainer: str, providers: str | list[str] | None = None):
    """An ONNX Runtime session of a model that carries JSON metadata under ``key``, and that
    JSON. Every failure raises ``error`` naming the file.

    Args:
        missing: what the model is, for the not-found message (e.g. ``proposer model``).
        trainer: the ``export`` module that trains and exports such a model.
        providers: ``None`` (CPU), ``"auto"`` (TensorRT, CUDA, CPU where present) or a list
            of execution providers, as ``model.providers`` for the classifier.
    """
    import onnxruntime as ort

    if not path.is_file():
        raise error(f"{path}: {missing} not found (train it with "
                    f"`python -m export.{trainer} --out runs/...`)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        chosen = resolve_providers(providers, ort.get_available_providers())
    except ValueError as exc:
        raise error(f"{path}: {exc}") from None
    try:
        session = ort.InferenceSession(str(path), opts, providers=chosen)
    except Exception as exc:  # noqa: BLE001 (onnxruntime raises private exception types)
        raise error(f"{path}: not a loadable ONNX model "
                    f"({str(exc).splitlines()[0]})") from None
    props = session.get_modelmeta().custom_metadata_map
    if key not in props:
        raise error(f"{path}: no {key!r} metadata; not a {missing} (export it with "
                    f"export.{trainer})")
    return session, props[key]
