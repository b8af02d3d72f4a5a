"""Latency metrics: exact quantiles vs numpy, bounded memory on long runs, rolling report,
summary table and the Prometheus text endpoint on loopback."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest

from node.publish.metrics import LatencyTracker, PrometheusExporter, format_summary, prometheus_text


def _feed(tracker: LatencyTracker, n: int, seed: int = 0, dt: float = 0.02) -> dict:
    rng = np.random.default_rng(seed)
    samples = {"capture": rng.gamma(2.0, 1.0, n), "infer": rng.normal(10, 2, n),
               "total": rng.gamma(5.0, 3.0, n)}
    tracker.start(now=100.0)
    for i in range(n):
        tracker.record({k: v[i] for k, v in samples.items()}, error=(i % 50 == 0),
                       now=100.0 + (i + 1) * dt)
    return samples


def test_summary_quantiles_match_numpy():
    tracker = LatencyTracker()
    samples = _feed(tracker, 1000)
    tracker.set_dropped(7)
    summary = tracker.summary()
    assert summary["frames"] == 1000 and summary["errors"] == 20 and summary["dropped"] == 7
    assert summary["wall_s"] == pytest.approx(20.0)
    assert summary["fps"] == pytest.approx(50.0)
    assert list(summary["latency_ms"]) == ["capture", "infer", "total"]  # pipeline order
    for stage, values in samples.items():
        got = summary["latency_ms"][stage]
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        assert got["p50"] == pytest.approx(p50, abs=1e-3)
        assert got["p90"] == pytest.approx(p90, abs=1e-3)
        assert got["p99"] == pytest.approx(p99, abs=1e-3)
        assert got["mean"] == pytest.approx(values.mean(), abs=1e-3)
        assert got["max"] == pytest.approx(values.max(), abs=1e-3)


def test_long_runs_keep_memory_bounded_with_a_uniform_reservoir():
    tracker = LatencyTracker(exact_limit=2000, window=100)
    values = np.linspace(0, 100, 30_000)  # rising over the run: a biased sample would show
    for i, v in enumerate(values):
        tracker.record({"total": v}, now=float(i))
    stage = tracker._stages["total"]
    assert stage.values.size == 2000 and stage.count == 30_000
    summary = tracker.summary()["latency_ms"]["total"]
    assert summary["mean"] == pytest.approx(values.mean(), abs=1e-3)  # exact: running sum
    assert summary["max"] == pytest.approx(values.max(), abs=1e-3)
    # quantiles are estimated from a uniform sample of all 30k values (2k kept), not the
    # first 2k (which would give p50 ~ 3)
    assert summary["p50"] == pytest.approx(50, abs=4)
    assert summary["p90"] == pytest.approx(90, abs=3)
    assert summary["p99"] == pytest.approx(99, abs=1.5)


def test_rolling_window_and_periodic_report():
    tracker = LatencyTracker(window=100, report_every_s=5.0)
    samples = _feed(tracker, 500)
    roll = tracker.rolling()
    assert roll["fps"] == pytest.approx(50.0)
    assert roll["latency_ms"]["total"]["p90"] == pytest.approx(
        np.percentile(samples["total"][-100:], 90))
    assert tracker.maybe_report(now=0.0) is None  # first call arms the timer
    assert tracker.maybe_report(now=4.9) is None
    line = tracker.maybe_report(now=5.0)
    assert line.startswith("fps 50.0 | capture ") and "frames 500 dropped 0 errors 10" in line
    assert tracker.maybe_report(now=6.0) is None


def test_format_summary_table():
    tracker = LatencyTracker()
    _feed(tracker, 200)
    text = format_summary(tracker.summary())
    lines = text.splitlines()
    assert lines[0].startswith("frames 200  fps 50.0  wall 4.0 s  dropped 0  errors 4")
    assert lines[1].split()[:6] == ["stage", "mean", "p50", "p90", "p99", "max"]
    assert [ln.split()[0] for ln in lines[2:]] == ["capture", "infer", "total"]


def test_prometheus_endpoint_on_loopback():
    tracker = LatencyTracker(window=10)
    for i in range(10):
        tracker.record({"infer": float(i + 1), "total": 20.0}, now=float(i))
    with PrometheusExporter(tracker, port=0, extra=lambda: {"source_up": 1}) as exporter:
        assert exporter.host == "127.0.0.1" and exporter.port > 0
        with urllib.request.urlopen(exporter.url, timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = resp.read().decode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(exporter.url.replace("/metrics", "/"), timeout=5)
        assert err.value.code == 404
    lines = body.splitlines()
    assert "cone_node_frames_total 10" in lines
    assert "# TYPE cone_node_stage_latency_seconds summary" in lines
    p50 = np.percentile(np.arange(1, 11, dtype=float), 50) / 1e3
    assert f'cone_node_stage_latency_seconds{{stage="infer",quantile="0.5"}} {p50:.6g}' in lines
    assert 'cone_node_stage_latency_seconds_sum{stage="infer"} 0.055' in lines
    assert 'cone_node_stage_latency_seconds_count{stage="total"} 10' in lines
    assert "cone_node_source_up 1" in lines
    assert body == prometheus_text(tracker, {"source_up": 1})
    exporter.close()  # idempotent
