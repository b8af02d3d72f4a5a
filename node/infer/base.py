"""The base runner every inference backend follows, and the backend comparator.

Modelled on Polygraphy's runner contract (``polygraphy/backend/base/runner.py``):

- public methods own the invariants (lifetime state, input checks, the in-flight queue,
  timing, error wrapping) and then call the backend's ``_activate_impl``,
  ``_deactivate_impl``, ``_infer_async_impl`` and ``_wait_impl``;
- lifetimes are explicit: ``activate()``/``deactivate()`` or a ``with`` block;
- timing is part of the contract: ``last_timing`` after every ``wait()``;
- ``compare_backends`` checks backends against a reference (ONNX Runtime) on the same crops.

Asynchrony: every backend owns one worker thread. ``infer_async(batch)`` stages the batch
(so the caller may reuse its buffer as soon as the call returns) and queues it; ``wait()``
returns the logits of the oldest queued batch. At most ``QUEUE_DEPTH`` = 2 batches may be in
flight, one per staging slot: the caller can stage frame t+1 while frame t still runs, and a
third ``infer_async`` before a ``wait`` is an error. The public API is meant to be driven from
one thread (the pipeline's).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.classes import BACKGROUND, PUBLISHED_CLASSES
from node.infer.metadata import MetadataError, ModelMetadata

QUEUE_DEPTH = 2
"""Batches that may be in flight per backend: one per staging slot (double buffering)."""
MAX_BATCH = 96
"""Largest batch of crops a backend and its buffers take unless told otherwise: the default
of ``model.max_batch`` and of the engines' batch profile, at least the default candidate cap
(``proposer.max_candidates``)."""

WorkerResult = tuple[np.ndarray, dict[str, float]]
"""What a worker job returns: logits (N, C) and extra timing figures such as ``gpu_ms``."""


class BackendError(ValueError):
    """A backend cannot load a model, was misused, or an inference failed."""


@dataclass
class _Pending:
    future: Future
    submitted: float
    batch_size: int


class Backend:
    """Base class of the inference backends (see the module docstring for the contract).

    Attributes:
        path: the model file.
        meta: the model's metadata (classes, input size, preprocessing, precision).
        name: a short display name, unique per backend kind and file.
        precision: ``fp32``, ``fp16`` or ``int8`` (from the metadata).
        max_batch: the largest batch ``infer_async`` accepts; staging buffers are this big.
    """

    def __init__(self, path: str | Path, meta: ModelMetadata, *, name: str,
                 max_batch: int) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise BackendError(f"{path}: max_batch must be a positive integer, got {max_batch!r}")
        foreign = [c for c in meta.classes if c not in (*PUBLISHED_CLASSES, BACKGROUND)]
        if foreign:
            raise MetadataError(f"{path}: metadata classes {foreign} are not the node's class "
                                f"names {[*PUBLISHED_CLASSES, BACKGROUND]}; re-export the model "
                                f"with `python -m export.onnx`")
        self.path = Path(path)
        self.meta = meta
        self.name = name
        self.precision = meta.precision
        self.max_batch = max_batch
        self.num_classes = len(meta.classes)
        self.input_shape = (3, meta.input_size, meta.input_size)
        self._active = False
        self._executor: ThreadPoolExecutor | None = None
        self._pending: collections.deque[_Pending] = collections.deque()
        self._submitted = 0
        self._last_timing: dict[str, float] = {}

    # ---- lifetime -------------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> Backend:
        """Load the model into the runtime and start the worker thread.

        Raises:
            BackendError: already active, or the runtime cannot load the model.
        """
        if self._active:
            raise BackendError(f"{self.name}: already active; deactivate() it first")
        self._activate_impl()
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"infer-{type(self).__name__}")
        self._pending.clear()
        self._submitted = 0
        self._active = True
        return self

    def deactivate(self) -> None:
        """Finish the batches in flight (their results are dropped), stop the worker and free
        the runtime. A no-op when inactive, so it is safe in ``finally`` blocks."""
        if not self._active:
            return
        try:
            while self._pending:
                self._pending.popleft().future.exception()  # waits; errors are dropped
            assert self._executor is not None
            self._executor.shutdown(wait=True)
        finally:
            self._executor = None
            self._active = False
            self._deactivate_impl()

    def __enter__(self) -> Backend:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.activate()

    def __exit__(self, *exc_info: object) -> None:
        self.deactivate()

    # ---- inference ------------------------------------------------------------------------

    def infer_async(self, batch: np.ndarray) -> None:
        """Start inference of an N×3×S×S float32 batch (S = ``meta.input_size``).

        The batch is staged before this returns, so the caller may overwrite it at once.
        An empty batch (N = 0) never reaches the runtime; its ``wait()`` gives (0, C).

        Raises:
            BackendError: inactive, ``QUEUE_DEPTH`` batches already in flight, or a batch of
                the wrong type, dtype, shape or size.
        """
        self._require_active("infer_async")
        self._check_batch(batch)
        if len(self._pending) >= QUEUE_DEPTH:
            raise BackendError(f"{self.name}: {QUEUE_DEPTH} batches already in flight; "
                               f"call wait() before the next infer_async()")
        submitted = time.perf_counter()
        n = batch.shape[0]
        if n == 0:
            future: Future = Future()
            future.set_result((np.empty((0, self.num_classes), np.float32), {"run_ms": 0.0},
                               submitted))
        else:
            future = self._infer_async_impl(batch, self._submitted % QUEUE_DEPTH)
        self._submitted += 1
        self._pending.append(_Pending(future, submitted, n))

    def wait(self) -> np.ndarray:
        """Logits (N, C) float32 of the oldest batch in flight; sets ``last_timing``.

        Raises:
            BackendError: inactive, nothing in flight, or ``inference failed: …`` when the
                runtime raised for this batch (the backend stays usable for the next one).
        """
        self._require_active("wait")
        if not self._pending:
            raise BackendError(f"{self.name}: wait() without a batch in flight; "
                               f"call infer_async() first")
        pending = self._pending.popleft()
        started = time.perf_counter()
        try:
            logits, timing, done_at = self._wait_impl(pending.future)
        except Exception as exc:
            self._last_timing = {"batch": pending.batch_size,
                                 "wait_ms": (time.perf_counter() - started) * 1e3}
            raise BackendError(f"{self.name}: inference failed: {_first_line(exc)}") from exc
        returned = time.perf_counter()
        self._last_timing = {
            "batch": pending.batch_size,
            "infer_ms": (max(done_at, pending.submitted) - pending.submitted) * 1e3,
            "wait_ms": (returned - started) * 1e3,
            **timing,
        }
        return logits

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Synchronous convenience: ``infer_async(batch)`` then ``wait()``."""
        self._require_active("infer")
        if self._pending:
            raise BackendError(f"{self.name}: infer() while {len(self._pending)} batch(es) are "
                               f"in flight; wait() for them first")
        self.infer_async(batch)
        return self.wait()

    @property
    def last_timing(self) -> dict[str, float]:
        """Timing of the last ``wait()``, in milliseconds.

        Keys: ``infer_ms`` (CPU wall time from ``infer_async`` to the result being available,
        queueing behind an earlier batch included), ``run_ms`` (the worker's time on this
        batch), ``wait_ms`` (how long ``wait()`` blocked), ``batch`` (N); TensorRT adds
        ``gpu_ms`` (CUDA events around ``execute_async_v3``).
        """
        return dict(self._last_timing)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # ---- for subclasses -------------------------------------------------------------------

    def _run_in_worker(self, job: Callable[..., WorkerResult], *args: object) -> Future:
        """Queue ``job(*args)`` on the worker thread; its future yields
        ``(logits, timing, done_at)`` with ``run_ms`` added to the timing."""
        assert self._executor is not None

        def timed() -> tuple[np.ndarray, dict[str, float], float]:
            start = time.perf_counter()
            logits, timing = job(*args)
            done = time.perf_counter()
            return logits, {**timing, "run_ms": (done - start) * 1e3}, done

        return self._executor.submit(timed)

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        raise NotImplementedError

    def _infer_async_impl(self, batch: np.ndarray, slot: int) -> Future:
        """Stage ``batch`` into staging slot ``slot`` (0..QUEUE_DEPTH-1, free by construction)
        and return the future of ``_run_in_worker``."""
        raise NotImplementedError

    def _wait_impl(self, future: Future) -> tuple[np.ndarray, dict[str, float], float]:
        return future.result()

    # ---- checks ---------------------------------------------------------------------------

    def _require_active(self, what: str) -> None:
        if not self._active:
            raise BackendError(f"{self.name}: {what}() on an inactive backend; call activate() "
                               f"or use it in a `with` block")

    def _check_batch(self, batch: np.ndarray) -> None:
        s = self.meta.input_size
        if not isinstance(batch, np.ndarray):
            raise BackendError(f"{self.name}: batch must be a numpy array, got "
                               f"{type(batch).__name__}")
        if batch.dtype != np.float32:
            raise BackendError(f"{self.name}: batch dtype must be float32 (use "
                               f"node.infer.preprocess.Preprocessor), got {batch.dtype}")
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise BackendError(f"{self.name}: batch must be N×3×{s}×{s} (NCHW), got shape "
                               f"{tuple(batch.shape)}")
        if batch.shape[0] > self.max_batch:
            raise BackendError(f"{self.name}: batch of {batch.shape[0]} crops exceeds max_batch "
                               f"{self.max_batch}; lower the per-frame candidate cap or raise "
                               f"max_batch")

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"<{type(self).__name__} {self.name} {self.precision} {state}>"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for comparisons (numerically stable)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def compare_backends(backends: Sequence[Backend], batch: np.ndarray, *,
                     atol: float | None = None,
                     min_top1_agreement: float | None = None) -> dict:
    """Run every backend on the same batch and compare it with the first (the reference,
    normally ONNX Runtime FP32), as Polygraphy's comparator does.

    Inactive backends are activated for the call and deactivated afterwards.

    Args:
        backends: reference first, then the backends under test.
        batch: N×3×S×S float32 crops, N ≥ 1.
        atol: when given, each entry gets ``ok`` = max abs diff of probabilities ≤ atol and
            (when ``min_top1_agreement`` is given) top-1 agreement ≥ that fraction.
        min_top1_agreement: fraction in 0..1 (see ``atol``).

    Returns:
        ``{"reference": name, "num_crops": N, "backends": {name: {"max_abs_diff",
        "mean_abs_diff", "top1_agreement", "infer_ms", ["ok"]}}}``; the reference itself is
        listed too, with zero differences.
    """
    if not backends:
        raise BackendError("compare_backends: no backends given")
    if batch.shape[0] == 0:
        raise BackendError("compare_backends: the batch is empty")
    probs: list[tuple[str, np.ndarray, float]] = []
    for backend in backends:
        activated_here = not backend.is_active
        if activated_here:
            backend.activate()
        try:
            p = softmax(backend.infer(batch))
            probs.append((backend.name, p, backend.last_timing["infer_ms"]))
        finally:
            if activated_here:
                backend.deactivate()
    ref_name, ref, _ = probs[0]
    ref_top1 = ref.argmax(axis=1)
    report: dict = {"reference": ref_name, "num_crops": int(batch.shape[0]), "backends": {}}
    for name, p, infer_ms in probs:
        key, i = name, 2
        while key in report["backends"]:
            key, i = f"{name}#{i}", i + 1
        diff = np.abs(p - ref)
        entry = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                 "top1_agreement": float(np.mean(p.argmax(axis=1) == ref_top1)),
                 "infer_ms": float(infer_ms)}
        if atol is not None or min_top1_agreement is not None:
            entry["ok"] = bool(
                (atol is None or entry["max_abs_diff"] <= atol)
                and (min_top1_agreement is None
                     or entry["top1_agreement"] >= min_top1_agreement))
        report["backends"][key] = entry
    return report


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
