"""The node's loop: capture → (exposure) → propose → preprocess → infer → post-process → publish.

Pipelined mode overlaps the CPU and the backend as docs/design.md describes: while the backend's
worker (an ONNX Runtime thread, or a CUDA stream for TensorRT) infers frame t, the main thread
captures, proposes and preprocesses frame t+1 into the *other* of two preallocated batch
buffers, hands frame t to the finisher and submits t+1. The finisher, one thread of the loop's
own, waits for frame t's scores, post-processes, ranges, tracks and publishes it, one frame at a
time and in input order; the main thread waits for it only before handing it the next frame.
With a live source, frame t is handed over as soon as no frame t+1 is ready, so a slow camera
never holds a result back. ``sync`` runs the same stages one after another on the main thread,
for comparison.

Replay never drops a frame: every frame the source yields gets exactly one ``FrameResult``, in
input order, including unreadable frames (``error`` set, no cones) and frames whose inference
failed. SIGINT/SIGTERM set a flag checked once per frame; the frame in flight is finished and
the publishers are flushed and closed before ``run`` returns its summary. An output that fails
(a full disk) stops the loop; the summary's ``output_error`` names it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from node.config import ConfigError
from node.infer.postprocess import cones_from_logits
from node.infer.preprocess import Preprocessor
from node.node_config import NodeConfig
from node.propose import Proposer
from node.publish.publishers import PublisherError, publish_all
from node.sources.exposure import Exposure, training_mismatch
from node.sources.frame_check import CameraWatch
from node.track import TrackingStage
from node.types import Cone, Frame, FrameResult

_EMPTY = np.zeros((0, 4), np.float32)
CAMERA_POLL_S = 0.25
"""How long a live read waits before the loop checks for a stop and publishes health."""
MAX_FRAME_AGE_S = 2.0
"""A live frame older than this (or stamped in the future) carries a stamp from another clock;
its capture latency is then the time since it reached the source (``arrived``)."""


@dataclass
class _InFlight:
    """A frame between capture and publish."""

    frame: Frame
    started: float  # perf_counter() when its capture began
    latency_ms: dict[str, float]
    boxes: np.ndarray = field(default_factory=lambda: _EMPTY)
    batch: np.ndarray | None = None
    submitted: bool = False
    error: str | None = None


class Pipeline:
    """One camera's worth of perception.

    Args:
        config: the node config (score threshold, NMS, sync/pipelined, batch capacity).
        backend: an activated backend (``node.infer``): ``meta``, ``infer_async``, ``wait``
            and ``last_timing``.
        proposer: where candidates come from.
        publishers: ``node.publish.publishers`` objects (``publish(result, image)``, ``wants_image``,
            ``close()``); the annotated frame is drawn once for all that want it. ``run``
            closes them when it ends.
        tracker: a ``node.publish.metrics.LatencyTracker`` (``record``, ``maybe_report``,
            ``summary``), or None.
        progress: an object with ``update(n)`` (a tqdm bar), or None.
        report: called with each periodic report line of the tracker (live runs), or None.
    """

    def __init__(self, config: NodeConfig, backend: Any, proposer: Proposer,
                 publishers: Sequence[Any] = (), tracker: Any = None, progress: Any = None,
                 report: Any = None) -> None:
        self.config = config
        self.backend = backend
        self.proposer = proposer
        self.publishers = list(publishers)
        self.tracker = tracker
        self.progress = progress
        self.report = report
        meta = backend.meta
        check_batch_capacity(proposer, backend)
        self.classes: list[str] = list(meta.classes)
        capacity = max(config.model.max_batch, proposer.max_candidates)
        self.preprocessor = Preprocessor(meta, capacity)
        shape = (capacity, 3, meta.input_size, meta.input_size)
        self._buffers = (np.empty(shape, np.float32), np.empty(shape, np.float32))
        self._stop = threading.Event()
        self._source: Any = None
        self._last_publish: float | None = None
        self._last_health: float | None = None
        self._rate: float | None = None
        self.counts = {"frames": 0, "errors": 0, "cones": 0, "candidates": 0,
                       "source_errors": 0, "inferred": 0, "inference_failed": 0}
        self.first_inference_error: str | None = None
        self.stop_signal: int | None = None
        self.output_error: str | None = None
        self._finishing: Future | None = None  # the finisher's frame (pipelined loop)
        stage_config = config.tracking_stage_config()
        self.tracking = TrackingStage.from_config(stage_config) if stage_config else None
        self.exposure = Exposure.from_config(config.exposure)
        self.exposure_warning = training_mismatch(meta.extra, config.exposure)
        self.camera_watch: CameraWatch | None = None  # one per run (``run``)
        self._camera_said: str | None = None  # the camera warning last logged

    # -- control -------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None, *_: Any) -> None:
        """Finish the frame in flight, then stop (signal handler and API); a signal's number
        is kept (``stop_signal``: SIGINT exits 130, SIGTERM is a clean stop)."""
        if signum is not None and self.stop_signal is None:
            self.stop_signal = signum
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- stages --------------------------------------------------------------------------
    def _capture(self, frames: Any, idle: Any = None) -> _InFlight | None:
        """The next frame, or None at the end of the source or when stopped.

        Replay: the time the loop waits for the source (reading, decoding; an image folder
        decodes ahead on its own thread, so this is mostly less than decoding takes). Live
        sources: the frame's age when the node takes it (its wall-clock stamp is the capture instant), so that
        ``total`` is the true capture-to-publish latency; while a camera is away the loop
        polls, so that health is published and a stop request is honoured. ``idle`` is
        called when a live source has no frame ready (the pipelined loop publishes the frame
        in flight then, instead of holding it until the next frame arrives).
        """
        started = time.perf_counter()
        read = getattr(self._source, "read", None)
        if not (getattr(self._source, "is_live", False) and callable(read)):
            try:
                frame = next(frames)
            except StopIteration:
                return None
            return _InFlight(frame, started, {"capture": (time.perf_counter() - started) * 1e3})
        timeout = 0.0 if idle is not None else CAMERA_POLL_S
        while True:
            if self.stopped:
                return None
            try:
                frame = read(timeout=timeout)
            except StopIteration:
                return None
            if frame is not None:
                break
            if timeout == 0.0:
                idle()
                timeout = CAMERA_POLL_S
                continue
            self._camera_waiting()
        taken = time.perf_counter()
        age_s = time.time() - frame.stamp
        if not 0.0 <= age_s <= MAX_FRAME_AGE_S:  # a stamp from another clock (bag playback)
            arrived = getattr(self._source, "arrived", None)  # not the time spent waiting
            age_s = taken - arrived if arrived is not None and arrived <= taken else 0.0
        return _InFlight(frame, taken - age_s, {"capture": age_s * 1e3})

    def _report_camera(self) -> None:
        """Log the camera watch's warning when it appears, changes or clears."""
        warning = self.camera_watch.warning() if self.camera_watch is not None else None
        if warning != self._camera_said:
            self._camera_said = warning
            self.report(f"warning: {warning}" if warning else
                        "camera: the frames read lie within the validated range again")

    def _camera_waiting(self) -> None:
        """Publish the source's health (and a log line) while no frame arrives."""
        now = time.monotonic()
        if self._last_health is not None and \
                now - self._last_health < self.config.metrics.print_interval_s:
            return
        self._last_health = now
        self._drain()  # the publishers are the finisher's while it publishes a frame
        health = dict(getattr(self._source, "health", {}) or {})
        for publisher in self.publishers:
            publish_health = getattr(publisher, "publish_health", None)
            if publish_health is not None:
                publish_health(health, time.time())
        if self.report is not None:
            details = ", ".join(f"{k} {v}" for k, v in health.items() if k != "state")
            self.report(f"camera {health.get('state', 'waiting')}: no frame ({details})")

    def _prepare(self, item: _InFlight, buffer: np.ndarray) -> None:
        """Propose and preprocess into ``buffer`` (errors end up on the item)."""
        frame, lat = item.frame, item.latency_ms
        lat["propose"] = lat["preprocess"] = 0.0
        if frame.image is None:
            item.error = frame.error or "frame could not be read"
            return
        image = frame.image
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
                and image.dtype == np.uint8 and image.shape[0] > 0 and image.shape[1] > 0):
            item.error = (f"frame has shape {getattr(image, 'shape', None)} dtype "
                          f"{getattr(image, 'dtype', type(image).__name__)}; "
                          f"expected H×W×3 uint8")
            # Publishers read and draw the frame's image: they get none rather than one they
            # cannot handle (the error names its shape).
            item.frame = replace(frame, image=None)
            return
        if self.camera_watch is not None:  # a frame now and then, read in its own thread
            self.camera_watch.offer(image, frame.stamp)
        t0 = time.perf_counter()
        try:
            if self.exposure is not None:  # the networks see a normalised copy
                image = self.exposure(image)
                if image is not frame.image:
                    frame = replace(frame, image=image)
            item.boxes = self.proposer.propose(frame)
        except (ValueError, cv2.error) as exc:
            item.error = f"proposer failed: {_one_line(exc)}"
            return
        t1 = time.perf_counter()
        lat["propose"] = (t1 - t0) * 1e3
        if len(item.boxes):
            try:
                item.batch = self.preprocessor(image, item.boxes, out=buffer)
            except (ValueError, cv2.error) as exc:
                item.error = f"preprocessing failed: {_one_line(exc)}"
        lat["preprocess"] = (time.perf_counter() - t1) * 1e3

    def _submit(self, item: _InFlight) -> None:
        item.latency_ms["infer"] = 0.0
        if item.batch is None or item.error:
            return
        t0 = time.perf_counter()
        try:
            self.backend.infer_async(item.batch)
            item.submitted = True
        except Exception as exc:  # noqa: BLE001 - any backend fault is this frame's, not the node's
            item.error = _inference_error(exc)
        item.latency_ms["infer"] = (time.perf_counter() - t0) * 1e3

    def _finish(self, item: _InFlight) -> FrameResult:
        """Wait for the backend, post-process and publish one frame."""
        lat = item.latency_ms
        cones: list[Cone] = []
        if item.submitted:
            t0 = time.perf_counter()
            try:
                logits = self.backend.wait()
            except Exception as exc:  # noqa: BLE001 - reported on this frame; the loop goes on
                logits, item.error = None, _inference_error(exc)
            lat["infer"] += (time.perf_counter() - t0) * 1e3
            gpu_ms = (getattr(self.backend, "last_timing", None) or {}).get("gpu_ms")
            if gpu_ms is not None and logits is not None:
                lat["infer_gpu"] = float(gpu_ms)
            t1 = time.perf_counter()
            if logits is not None and not np.all(np.isfinite(logits)):
                # NaN/inf (an FP16 overflow, a broken engine) would silently yield no cones.
                logits, item.error = None, "inference failed: backend returned non-finite scores"
            if logits is not None:
                try:
                    post, merge = self.config.post, self.proposer.suppress_overlaps
                    cones = cones_from_logits(
                        logits, item.boxes, self.classes, self.config.model.score_threshold,
                        post.nms_iou if merge else None, post.unknown_colour,
                        post.nested_inside if merge else None)
                except ValueError as exc:
                    item.error = f"inference failed: {_one_line(exc)}"
            lat["post"] = (time.perf_counter() - t1) * 1e3
        else:
            lat["post"] = 0.0
        t2 = time.perf_counter()
        cones = self._track(item, cones)
        lat["post"] += (time.perf_counter() - t2) * 1e3  # range and tracking count as post
        if (item.error or "").startswith("inference failed"):
            self.counts["inference_failed"] += 1
            self.first_inference_error = self.first_inference_error or item.error
        elif item.submitted and not item.error:
            self.counts["inferred"] += 1
        t_pub = time.perf_counter()
        lat["total"] = (t_pub - item.started) * 1e3
        result = FrameResult(item.frame, cones, dict(lat), len(item.boxes), item.error)
        if self.publishers:
            publish_all(self.publishers, result, fps=self._publish_rate(t_pub))
        publish_ms = (time.perf_counter() - t_pub) * 1e3
        # A fresh dict, so a publisher holding the result keeps what it published.
        result.latency_ms = {**result.latency_ms, "publish": publish_ms}
        self._account(result)
        return result

    def _track(self, item: _InFlight, cones: list[Cone]) -> list[Cone]:
        """Range and track id for every cone (``node.track``). Frames are finished in input
        order in both loops, so the tracker sees them in order; a frame without an image or
        whose inference failed is skipped (its tracks neither match nor age)."""
        image = item.frame.image
        if self.tracking is None or image is None or item.error:
            return cones
        return self.tracking.update(cones, image.shape[1], image.shape[0], item.frame.stamp)

    def _publish_rate(self, now: float) -> float | None:
        """Frames per second at the publisher, smoothed (for the video overlay)."""
        last, self._last_publish = self._last_publish, now
        if last is not None and now > last:
            inst = 1.0 / (now - last)
            self._rate = inst if self._rate is None else 0.9 * self._rate + 0.1 * inst
        return self._rate

    def _account(self, result: FrameResult) -> None:
        self.counts["frames"] += 1
        self.counts["errors"] += bool(result.error or result.frame.error)
        self.counts["source_errors"] += bool(result.frame.error)
        self.counts["cones"] += len(result.cones)
        self.counts["candidates"] += result.num_candidates
        if self.tracker is not None:
            self.tracker.record(result.latency_ms, error=bool(result.error or result.frame.error))
            if self.report is not None:
                self.tracker.set_dropped(int(getattr(self._source, "dropped", 0) or 0))
                line = self.tracker.maybe_report(time.monotonic())
                if line:
                    self.report(line)
                    self._report_camera()
        if self.progress is not None:
            self.progress.update(1)

    # -- loops ---------------------------------------------------------------------------
    def run(self, source: Iterable[Frame]) -> dict:
        """Process every frame of ``source`` (or until stopped); returns the summary.

        The source and the publishers are closed when the loop ends, whatever ends it.
        """
        restore = self._install_signal_handlers()
        if self.config.pipeline.cv_threads is not None:
            cv2.setNumThreads(self.config.pipeline.cv_threads)
        self._source = source
        if self.tracking is not None:
            self.tracking.reset()  # a new source: no track carries over
        if self.tracker is not None:
            self.tracker.start()
        self.camera_watch = CameraWatch.from_config(self.config)
        self._camera_said = None
        t0 = time.perf_counter()
        self.output_error = None
        try:
            frames = iter(source)
            if self.config.pipeline.sync:
                self._run_sync(frames)
            else:
                self._run_pipelined(frames)
        except PublisherError as exc:  # a full disk: stop, keep what was written, report it
            self.output_error = str(exc)
        finally:
            wall = time.perf_counter() - t0
            restore()
            try:
                _close_all([source, *self.publishers])
            except PublisherError as exc:  # a video or bag that could not be finished
                self.output_error = self.output_error or str(exc)
        try:
            summary = self.summary(wall, source)
        finally:
            if self.camera_watch is not None:
                self.camera_watch.close()
        if self.output_error:
            summary["output_error"] = self.output_error
        return summary

    def _run_sync(self, frames: Any) -> None:
        while not self.stopped:
            item = self._capture(frames)
            if item is None:
                return
            self._prepare(item, self._buffers[0])
            self._submit(item)
            self._finish(item)

    def _run_pipelined(self, frames: Any) -> None:
        pending: _InFlight | None = None  # submitted to the backend, not yet handed over
        slot = 0
        with ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher:

            def hand_over(item: _InFlight) -> None:
                # One frame at a time, in input order: the previous one is published (and its
                # error, a full disk, raised here) before the next is handed over.
                self._drain()
                self._finishing = finisher.submit(self._finish, item)

            def publish_pending() -> None:  # a live source has no frame ready: don't hold this one
                nonlocal pending
                if pending is not None:
                    hand_over(pending)
                    pending = None

            try:
                while not self.stopped:
                    item = self._capture(frames, idle=publish_pending)
                    if item is None:
                        break
                    # The backend may still read the other buffer (frame t): write this one.
                    self._prepare(item, self._buffers[slot])
                    if pending is not None:
                        hand_over(pending)
                        pending = None
                    self._submit(item)  # at most frames t and t+1 in flight (QUEUE_DEPTH)
                    pending, slot = item, 1 - slot
                if pending is not None:
                    hand_over(pending)
            finally:
                # After a failed output nothing more is published; either way the finisher's
                # frame is done before the loop returns and the publishers are closed.
                self._drain()

    def _drain(self) -> None:
        """Wait until the finisher has published its frame; re-raise what ``_finish`` raised."""
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            finishing.result()

    def summary(self, wall_s: float, source: Any = None) -> dict:
        """Counts, FPS, latency percentiles (from the tracker) and drops.

        ``unread`` counts frames a source announced but never delivered (a video truncated
        mid-file), which therefore have no record; ``source_warnings`` says why.
        """
        frames = self.counts["frames"]
        source_errors = int(getattr(source, "errors", 0) or 0)
        out = {
            "mode": "sync" if self.config.pipeline.sync else "pipelined",
            "frames": frames,
            "errors": self.counts["errors"],
            "unread": max(0, source_errors - self.counts["source_errors"]),
            "source_warnings": list(getattr(source, "warnings", None) or []),
            "dropped": int(getattr(source, "dropped", 0) or 0),
            "cones": self.counts["cones"],
            "candidates_per_frame": round(self.counts["candidates"] / max(frames, 1), 2),
            "wall_s": round(wall_s, 3),
            "fps": round(frames / wall_s, 2) if wall_s > 0 else 0.0,
            "interrupted": self.stopped,
            "inferred": self.counts["inferred"],
            "inference_failed": self.counts["inference_failed"],
        }
        if self.tracking is not None:
            out["range"] = self.tracking.note  # says when no intrinsics are configured
        if self.exposure is not None:
            out["exposure"] = self.exposure.report()
        if self.exposure_warning:
            out["exposure_warning"] = self.exposure_warning
        if self.camera_watch is not None:
            self.camera_watch.wait_idle(1.0)  # the last frame handed over
            out["camera_watch"] = self.camera_watch.report()
            warning = self.camera_watch.warning()
            if warning:
                out["camera_warning"] = warning
        if self.first_inference_error:
            out["first_inference_error"] = self.first_inference_error
        if self.stop_signal is not None:
            out["signal"] = signal.Signals(self.stop_signal).name
        if self.tracker is not None:
            self.tracker.set_dropped(out["dropped"])
            out["latency_ms"] = self.tracker.summary()["latency_ms"]
        return out

    def _install_signal_handlers(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.signal(sig, self.request_stop)
                    for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return restore


def check_batch_capacity(proposer: Proposer, backend: Any) -> None:
    """Refuse a candidate cap the model cannot take in one batch (an engine's batch profile
    may be smaller than the config's ``max_candidates``): every busy frame would fail.

    Raises:
        ConfigError: names ``proposer.max_candidates``, the model and its batch limit.
    """
    accepted = getattr(backend, "max_batch", None)
    if isinstance(accepted, int) and proposer.max_candidates > accepted:
        raise ConfigError(
            f"proposer.max_candidates ({proposer.max_candidates}) exceeds the largest batch "
            f"{getattr(backend, 'path', 'the model')} accepts ({accepted}); lower it or "
            f"rebuild the engine with a larger batch profile")


def _close_all(things: Sequence[Any]) -> None:
    """Close everything even if one close fails; re-raise the first failure."""
    first: BaseException | None = None
    for thing in things:
        close = getattr(thing, "close", None)
        if close is None:
            continue
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - keep closing the rest so files are flushed
            first = first or exc
    if first is not None:
        raise first


def _inference_error(exc: BaseException) -> str:
    text = _one_line(exc)
    return text if "inference failed" in text else f"inference failed: {text}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if isinstance(exc, ValueError) and text:  # the project's errors already say what failed
        return text[0]
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
