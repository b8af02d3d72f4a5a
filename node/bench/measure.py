"""Measurements behind ``python -m node bench``: model-only throughput, accuracy on labelled
crops, end-to-end pipeline FPS and the peer detector's FPS.

Model-only timing follows trtexec's report: warm-up runs first, then repeated synchronous
inferences of one batch, summarised as throughput (crops/s), mean and p50/p90/p99 latency, with
a warning when the run-to-run spread is high (coefficient of variation above 10 % or p99 more
than twice p50). Every timed point is bounded by an iteration count *and* a time budget, so a
slow model on a small CPU still finishes quickly. Accuracy uses the node's own crop policy and
normalisation (``node.infer.preprocess``) on ground-truth boxes, with numpy only (no torch in node).
End-to-end runs assemble the real ``node.pipeline.Pipeline`` over a replay source.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from node.infer.preprocess import normalize

SPREAD_CV = 0.10
SPREAD_TAIL = 2.0


def latency_stats(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    """Mean, p50, p90, p99 and coefficient of variation of latencies in milliseconds."""
    lat = np.asarray(samples_ms, np.float64)
    if lat.size == 0:
        raise ValueError("latency_stats: no samples")
    mean = float(lat.mean())
    p50, p90, p99 = (float(v) for v in np.percentile(lat, [50, 90, 99]))
    return {"mean_ms": mean, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "cv": float(lat.std() / mean) if mean > 0 else 0.0}


def spread_warning(stats: dict[str, float]) -> str:
    """Empty when the spread is acceptable, else why it is not (like trtexec's warning)."""
    reasons = []
    if stats["cv"] > SPREAD_CV:
        reasons.append(f"cv {100 * stats['cv']:.0f}%")
    if stats["p50_ms"] > 0 and stats["p99_ms"] / stats["p50_ms"] > SPREAD_TAIL:
        reasons.append(f"p99/p50 {stats['p99_ms'] / stats['p50_ms']:.1f}")
    return ", ".join(reasons)


def time_model(backend: Any, batch_size: int, iters: int = 200, warmup: int = 10,
               seconds: float = 2.0, min_iters: int = 5, seed: int = 0) -> dict[str, Any]:
    """Time synchronous ``backend.infer`` on one N×3×S×S batch (an active backend).

    Args:
        backend: an activated ``node.infer`` backend.
        batch_size: crops per call.
        iters: at most this many timed calls...
        warmup: ...after this many untimed ones...
        seconds: ...and stop early once this much time is spent (after ``min_iters`` calls).
        min_iters: the fewest timed calls, whatever the budget.
        seed: of the random input (timing does not depend on the values).

    Returns:
        ``latency_stats`` plus ``batch``, ``iterations``, ``crops_per_s``, ``spread_warning``
        and ``gpu_ms`` (mean CUDA-event time, TensorRT only; NaN elsewhere).
    """
    size = backend.meta.input_size
    batch = np.random.default_rng(seed).standard_normal((batch_size, 3, size, size),
                                                        dtype=np.float32)
    for _ in range(max(warmup, 0)):
        backend.infer(batch)
    latencies, gpu = [], []
    budget_end = time.perf_counter() + seconds
    while len(latencies) < max(iters, min_iters):
        t0 = time.perf_counter()
        backend.infer(batch)
        t1 = time.perf_counter()
        latencies.append((t1 - t0) * 1e3)
        gpu_ms = backend.last_timing.get("gpu_ms")
        if gpu_ms is not None:
            gpu.append(gpu_ms)
        if t1 > budget_end and len(latencies) >= min_iters:
            break
    stats = latency_stats(latencies)
    total_s = float(np.sum(latencies)) / 1e3
    return {**stats, "batch": batch_size, "iterations": len(latencies),
            "crops_per_s": batch_size * len(latencies) / total_s if total_s > 0 else math.nan,
            "spread_warning": spread_warning(stats),
            "gpu_ms": float(np.mean(gpu)) if gpu else math.nan}


# --------------------------------------------------------------------------- accuracy

@dataclass
class LabelledCrops:
    """Ground-truth boxes of a labelled dataset, cropped per model input on demand.

    Args:
        spec: ``yolo:DIR`` or ``fsoco:DIR`` (boxes in frames) or ``crops:DIR`` (crop images).
        max_crops: evenly spaced subset of at most this many boxes (0: all).
    """

    spec: str
    max_crops: int = 2000
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from node.evaluate.datasets import load_samples, parse_data_spec

        self.kind, _ = parse_data_spec(self.spec)
        items = load_samples(self.spec)
        if self.kind == "crops":
            picks = list(range(len(items)))
            self.labels = [label for _, label in items]
        else:
            picks = [(i, j) for i, s in enumerate(items) for j in range(len(s.labels))]
            self.labels = [items[i].labels[j] for i, j in picks]
        if not picks:
            raise ValueError(f"--data {self.spec}: no labelled boxes or crops found")
        if self.max_crops and len(picks) > self.max_crops:
            keep = np.linspace(0, len(picks) - 1, self.max_crops).round().astype(int)
            picks = [picks[k] for k in keep]
            self.labels = [self.labels[k] for k in keep]
        self.items, self.picks = items, picks

    def __len__(self) -> int:
        return len(self.picks)

    def crops(self, meta: Any) -> np.ndarray:
        """uint8 N×S×S×3 BGR crops for a model's input size and crop policy (cached)."""
        key = (meta.input_size, tuple(sorted(meta.crop.items())))
        if key not in self._cache:
            self._cache[key] = self._make_crops(meta)
        return self._cache[key]

    def _make_crops(self, meta: Any) -> np.ndarray:
        from node.evaluate.datasets import DatasetError
        from node.infer.crop import crop_batch

        size = meta.input_size
        out = np.empty((len(self.picks), size, size, 3), np.uint8)
        if self.kind == "crops":
            for k, idx in enumerate(self.picks):
                image = cv2.imread(str(self.items[idx][0]), cv2.IMREAD_COLOR)
                if image is None:
                    raise DatasetError(f"{self.items[idx][0]}: image missing or unreadable")
                out[k] = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            return out
        by_sample: dict[int, list[tuple[int, int]]] = {}
        for k, (i, j) in enumerate(self.picks):
            by_sample.setdefault(i, []).append((k, j))
        policy = meta.crop_policy
        for i, members in by_sample.items():
            frame = self.items[i].load()
            ks, js = zip(*members)
            out[list(ks)] = crop_batch(frame, self.items[i].boxes[list(js)], size, policy)
        return out


def evaluate_accuracy(backend: Any, data: LabelledCrops, chunk: int = 32) -> dict[str, Any]:
    """Top-1 accuracy of an active backend on the crops whose label the model knows.

    Returns:
        ``{"accuracy", "crops", "per_class": {name: recall}}``.
    """
    meta = backend.meta
    classes = list(meta.classes)
    known = np.array([label in classes for label in data.labels])
    if not known.any():
        raise ValueError(f"--data {data.spec}: none of its labels are classes of "
                         f"{backend.path.name} ({classes})")
    crops = data.crops(meta)[known]
    truth = np.array([classes.index(label) for label in itertools.compress(data.labels, known)])
    chunk = max(1, min(chunk, backend.max_batch))
    buffer = np.empty((chunk, 3, meta.input_size, meta.input_size), np.float32)
    preds = np.empty(len(crops), np.int64)
    mean, std = np.asarray(meta.mean, np.float32), np.asarray(meta.std, np.float32)
    for start in range(0, len(crops), chunk):
        part = crops[start:start + chunk]
        batch = normalize(part, mean, std, meta.channel_order == "RGB", out=buffer)
        preds[start:start + len(part)] = backend.infer(batch).argmax(axis=1)
    correct = preds == truth
    per_class = {classes[c]: float(correct[truth == c].mean())
                 for c in np.unique(truth).tolist()}
    return {"accuracy": float(correct.mean()), "crops": len(crops), "per_class": per_class}


# --------------------------------------------------------------------------- end to end

class LimitedSource:
    """A replay source cut to its first ``limit`` frames (0: all); closes the source."""

    def __init__(self, source: Any, limit: int = 0) -> None:
        self.source, self.limit = source, limit

    def __iter__(self) -> Iterator:
        frames = iter(self.source)
        return itertools.islice(frames, self.limit) if self.limit else frames

    @property
    def dropped(self) -> int:
        return int(getattr(self.source, "dropped", 0) or 0)

    def close(self) -> None:
        self.source.close()


def latency_collector() -> Any:
    """A pipeline publisher (``node.publish.publishers.Publisher``) that only keeps each frame's
    end-to-end latency, proposer latency and candidate count."""
    from node.publish.publishers import Publisher

    class LatencyCollector(Publisher):
        name = "bench latency collector"

        def __init__(self) -> None:
            super().__init__()
            self.total_ms: list[float] = []
            self.propose_ms: list[float] = []
            self.candidates: list[int] = []

        def _publish(self, result: Any, image: Any) -> None:
            self.total_ms.append(float(result.latency_ms.get("total", math.nan)))
            self.propose_ms.append(float(result.latency_ms.get("propose", math.nan)))
            self.candidates.append(int(result.num_candidates))

    return LatencyCollector()


def open_replay(uri: str, limit: int) -> LimitedSource:
    """A fresh replay source (never live: every frame, in order) of at most ``limit`` frames."""
    from node.sources import open_source

    return LimitedSource(open_source(uri, live=False), limit)


def run_pipeline(config: Any, backend: Any, uri: str, frames: int, sync: bool,
                 warmup_frames: int = 3) -> dict[str, Any]:
    """End-to-end FPS of the node over a replay source, pipelined or sync.

    The backend must be active. A short untimed run over the first ``warmup_frames`` frames
    comes first, so both modes start warm.

    Returns:
        ``{"fps", "frames", "wall_s", "candidates_per_frame", "latency_ms": latency_stats of
        the end-to-end latency, "propose_ms": latency_stats of the proposer's time}``.
    """
    import copy

    from node.pipeline import Pipeline
    from node.propose import build_proposer

    config = copy.deepcopy(config)
    config.pipeline.sync = sync
    proposer = build_proposer(config.proposer)
    try:
        if warmup_frames:
            Pipeline(config, backend, proposer).run(open_replay(uri, warmup_frames))
        collector = latency_collector()
        summary = Pipeline(config, backend, proposer, [collector]).run(open_replay(uri, frames))
    finally:
        proposer.close()
    if summary["frames"] == 0:
        raise ValueError(f"--source {uri}: no frames")
    return {"fps": float(summary["fps"]), "frames": summary["frames"],
            "wall_s": summary["wall_s"], "errors": summary["errors"],
            "candidates_per_frame": float(np.mean(collector.candidates)),
            "latency_ms": latency_stats(collector.total_ms),
            "propose_ms": latency_stats(collector.propose_ms)}


def parse_frame_size(text: str) -> tuple[int, int]:
    """``"800x320"`` → (800, 320); ValueError naming the text otherwise (32..8192 a side)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"frame size {text!r}: expected WIDTHxHEIGHT, e.g. 800x320")
    w, h = int(parts[0]), int(parts[1])
    if not (32 <= w <= 8192 and 32 <= h <= 8192):
        raise ValueError(f"frame size {text!r}: each side must be 32..8192 px")
    return w, h


def write_sized_frames(uri: str, size: tuple[int, int], limit: int, folder: Any) -> int:
    """The first ``limit`` (0: all) frames of a replay source resized to ``size`` (stretched
    to it: the timing counts pixels, not cones) and written to ``folder`` as JPEG (quality
    95), replacing what the folder held; returns the number written."""
    import shutil
    from pathlib import Path

    from node.propose.heatmap import resize_image

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    source = open_replay(uri, limit)
    written = 0
    try:
        for frame in source:
            if frame.image is None:
                continue
            image = resize_image(frame.image, size)
            if not cv2.imwrite(str(folder / f"frame{written:05d}.jpg"), image,
                               [cv2.IMWRITE_JPEG_QUALITY, 95]):
                raise ValueError(f"{folder}: cannot write the resized frames")
            written += 1
    finally:
        source.close()
    if not written:
        raise ValueError(f"--source {uri}: no frames")
    return written


def proposer_inputs(proposer_config: Any, sizes: Sequence[tuple[int, int]]
                    ) -> dict[tuple[int, int], str | None]:
    """The network input (``"WxH"``, after ``heatmap_max_pixels`` / ``heatmap_min_pixels``)
    the proposer makes of each (width, height) frame size, from one proposer; None for a
    proposer without one (colour windows, external boxes)."""
    from node.propose import build_proposer

    proposer = build_proposer(proposer_config)
    try:
        geometry = next((g for g in (getattr(c, "geometry", None)
                                     for c in (proposer, getattr(proposer, "inner", None)))
                         if callable(g)), None)
        out: dict[tuple[int, int], str | None] = {}
        for w, h in sizes:
            out[(w, h)] = None if geometry is None else "{}x{}".format(*geometry(w, h).size)
        return out
    finally:
        proposer.close()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median FPS (the upper one of an even count), with every run's FPS
    added as ``fps_runs``: interleaved repeats make a comparison fair on a busy machine."""
    ordered = sorted(runs, key=lambda r: r["fps"])
    return {**ordered[len(ordered) // 2], "fps_runs": [r["fps"] for r in runs]}
