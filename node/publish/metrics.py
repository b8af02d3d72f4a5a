"""Latency and throughput metrics: rolling percentiles for live logs, a run summary, Prometheus.

``LatencyTracker`` records each frame's ``latency_ms`` (stages of ``node.types.STAGES`` plus
``infer_gpu`` on TensorRT and the end-to-end ``total``).

- *Rolling*: the last ``window`` samples per stage give p50/p90/p99 and the FPS over the same
  frames; ``maybe_report(now)`` returns a one-line report every ``report_every_s`` seconds.
- *Summary*: quantiles are exact (``numpy.percentile``, linear interpolation) while a stage has
  at most ``exact_limit`` samples (65,536 by default, well over a replay). Beyond that a
  fixed-size uniform reservoir (Vitter's Algorithm R, seeded) keeps memory bounded for soak
  runs, so p50/p90/p99 become estimates from a uniform sample of all frames; mean and max stay
  exact (running sums).
- *Prometheus*: ``PrometheusExporter`` serves the text exposition format (version 0.0.4) on
  ``http://127.0.0.1:PORT/metrics`` from a stdlib ``http.server`` in a daemon thread; the
  prometheus-client package is not needed.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import numpy as np

from node.types import STAGES

if TYPE_CHECKING:
    from typing_extensions import Self

TRACKED_STAGES: tuple[str, ...] = STAGES + ("infer_gpu", "total")
QUANTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


class _StageSamples:
    """All samples of one stage: exact up to ``limit``, then a uniform reservoir."""

    def __init__(self, limit: int, window: int, seed: int) -> None:
        self.values = np.empty(limit, dtype=np.float64)
        self.count = 0
        self.total = 0.0
        self.maximum = float("-inf")
        self.recent: deque[float] = deque(maxlen=window)
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        limit = self.values.size
        if self.count < limit:
            self.values[self.count] = value
        else:
            slot = self._rng.randrange(self.count + 1)
            if slot < limit:
                self.values[slot] = value
        self.count += 1
        self.total += value
        self.maximum = max(self.maximum, value)
        self.recent.append(value)

    def kept(self) -> np.ndarray:
        return self.values[: min(self.count, self.values.size)]


class LatencyTracker:
    """Per-stage latency samples, frame counts and FPS of one run (thread-safe).

    Args:
        window: frames in the rolling window.
        report_every_s: period of ``maybe_report``.
        exact_limit: samples kept per stage (exact quantiles up to here, reservoir beyond).
        seed: reservoir seed, so summaries are reproducible.
    """

    def __init__(self, window: int = 300, report_every_s: float = 5.0,
                 exact_limit: int = 65_536, seed: int = 0) -> None:
        if window < 1 or exact_limit < 1:
            raise ValueError("LatencyTracker: window and exact_limit must be >= 1")
        self.window = window
        self.report_every_s = report_every_s
        self.exact_limit = exact_limit
        self.seed = seed
        self.frames = 0
        self.dropped = 0
        self.errors = 0
        self.start_time: float | None = None
        self.last_time: float | None = None
        self._stages: dict[str, _StageSamples] = {}
        self._frame_times: deque[float] = deque(maxlen=window + 1)
        self._next_report: float | None = None
        self._lock = threading.Lock()

    def start(self, now: float | None = None) -> None:
        """Mark the run's start (else the first ``record`` marks it)."""
        with self._lock:
            self.start_time = time.monotonic() if now is None else now
            self._frame_times.append(self.start_time)

    def record(self, latency_ms: dict[str, float], *, error: bool = False,
               now: float | None = None) -> None:
        """Add one published frame's stage latencies (ms)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.start_time is None:
                self.start_time = now
            self.frames += 1
            self.errors += int(error)
            self.last_time = now
            self._frame_times.append(now)
            for stage, value in latency_ms.items():
                samples = self._stages.get(stage)
                if samples is None:
                    samples = self._stages[stage] = _StageSamples(
                        self.exact_limit, self.window, self.seed + len(self._stages))
                samples.add(float(value))

    def set_dropped(self, dropped: int) -> None:
        """The source's drop count (live sources count their own drops)."""
        with self._lock:
            self.dropped = int(dropped)

    def rolling(self) -> dict:
        """FPS and p50/p90/p99 (ms) over the last ``window`` frames."""
        with self._lock:
            times = list(self._frame_times)
            recent = {s: np.asarray(v.recent) for s, v in self._stages.items() if v.recent}
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and \
            times[-1] > times[0] else 0.0
        return {"fps": fps, "latency_ms": {s: _quantiles(v) for s, v in recent.items()}}

    def maybe_report(self, now: float | None = None) -> str | None:
        """A one-line rolling report once every ``report_every_s`` seconds, else ``None``."""
        now = time.monotonic() if now is None else now
        if self._next_report is None:
            self._next_report = now + self.report_every_s
            return None
        if now < self._next_report:
            return None
        self._next_report = now + self.report_every_s
        roll = self.rolling()
        parts = [f"fps {roll['fps']:.1f}"]
        for stage in _ordered(roll["latency_ms"]):
            q = roll["latency_ms"][stage]
            parts.append(f"{stage} {q['p50']:.1f}/{q['p90']:.1f}/{q['p99']:.1f}")
        parts.append(f"frames {self.frames} dropped {self.dropped} errors {self.errors}")
        return " | ".join(parts) + "  (ms p50/p90/p99)"

    def summary(self) -> dict:
        """The whole run: frames, FPS, wall time, drops, errors, per-stage latency (ms)."""
        with self._lock:
            wall = (self.last_time - self.start_time) if self.frames and \
                self.start_time is not None and self.last_time is not None else 0.0
            latency = {}
            for stage in _ordered(self._stages):
                samples = self._stages[stage]
                stats = {"mean": samples.total / samples.count,
                         **_quantiles(samples.kept()), "max": samples.maximum}
                latency[stage] = {k: round(float(v), 3) for k, v in stats.items()}
            return {"frames": self.frames, "fps": round(self.frames / wall, 3) if wall > 0
                    else 0.0, "wall_s": round(wall, 3), "dropped": self.dropped,
                    "errors": self.errors, "latency_ms": latency}


def format_summary(summary: dict) -> str:
    """The summary as a small text table (ms)."""
    head = (f"frames {summary['frames']}  fps {summary['fps']:.1f}  wall {summary['wall_s']:.1f} s"
            f"  dropped {summary['dropped']}  errors {summary['errors']}")
    lines = [head, f"{'stage':<12}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}   (ms)"]
    for stage, q in summary.get("latency_ms", {}).items():
        lines.append(f"{stage:<12}" + "".join(f"{q.get(k, float('nan')):>9.2f}"
                                              for k in ("mean", "p50", "p90", "p99", "max")))
    return "\n".join(lines)


def _quantiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    p50, p90, p99 = np.percentile(values, QUANTILES)
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _ordered(stages: dict | list) -> list[str]:
    known = [s for s in TRACKED_STAGES if s in stages]
    return known + sorted(s for s in stages if s not in TRACKED_STAGES)


def prometheus_text(tracker: LatencyTracker, extra: dict[str, float] | None = None,
                    prefix: str = "cone_node") -> str:
    """Prometheus text exposition (0.0.4): counters, rolling FPS, per-stage latency summary.

    Latency is a ``summary`` in seconds (Prometheus base unit) labelled by ``stage``; its
    quantiles are rolling-window values, ``_sum``/``_count`` cover the whole run.
    """
    roll = tracker.rolling()
    with tracker._lock:
        sums = {s: (v.total, v.count) for s, v in tracker._stages.items()}
        frames, dropped, errors = tracker.frames, tracker.dropped, tracker.errors
    out = [f"# HELP {prefix}_frames_total Frames published.",
           f"# TYPE {prefix}_frames_total counter", f"{prefix}_frames_total {frames}",
           f"# HELP {prefix}_dropped_frames_total Live frames dropped to keep latency bounded.",
           f"# TYPE {prefix}_dropped_frames_total counter",
           f"{prefix}_dropped_frames_total {dropped}",
           f"# HELP {prefix}_frame_errors_total Frames that could not be processed.",
           f"# TYPE {prefix}_frame_errors_total counter", f"{prefix}_frame_errors_total {errors}",
           f"# HELP {prefix}_fps Frames per second over the rolling window.",
           f"# TYPE {prefix}_fps gauge", f"{prefix}_fps {roll['fps']:.6g}",
           f"# HELP {prefix}_stage_latency_seconds Per-stage latency (rolling quantiles).",
           f"# TYPE {prefix}_stage_latency_seconds summary"]
    metric = f"{prefix}_stage_latency_seconds"
    for stage in _ordered(sums):
        q = roll["latency_ms"].get(stage, {})
        for name, level in (("p50", "0.5"), ("p90", "0.9"), ("p99", "0.99")):
            if name in q:
                out.append(f'{metric}{{stage="{stage}",quantile="{level}"}} {q[name] / 1e3:.6g}')
        total, count = sums[stage]
        out.append(f'{metric}_sum{{stage="{stage}"}} {total / 1e3:.6g}')
        out.append(f'{metric}_count{{stage="{stage}"}} {count}')
    for name, value in (extra or {}).items():
        out += [f"# TYPE {prefix}_{name} gauge", f"{prefix}_{name} {float(value):.6g}"]
    return "\n".join(out) + "\n"


class PrometheusExporter:
    """``/metrics`` over HTTP on ``host:port`` (127.0.0.1 unless configured; port 0 = any free).

    Args:
        tracker: the run's tracker.
        extra: optional callable returning extra gauges, e.g. ``{"source_up": 1}``.
    """

    def __init__(self, tracker: LatencyTracker, port: int = 9108, host: str = "127.0.0.1",
                 extra: Callable[[], dict[str, float]] | None = None) -> None:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = prometheus_text(exporter.tracker,
                                       exporter.extra() if exporter.extra else None).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep the node's stderr clean
                pass

        self.tracker = tracker
        self.extra = extra
        try:
            self._server = ThreadingHTTPServer((host, int(port)), Handler)
        except OSError as exc:
            raise ValueError(f"prometheus: cannot listen on {host}:{port} ({exc.strerror})") \
                from None
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="prometheus", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving; safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
