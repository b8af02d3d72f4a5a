"""Benchmark output: the markdown table, the CSV and JSON-lines logs, and the FPS/accuracy plot.

The table follows trtexec's timing report (throughput, then mean and percentile latencies, with
a warning when the spread is high) laid out as Ultralytics' benchmark table (one row per model
and setting, with size, accuracy and speed side by side). Logs are appended, never rewritten,
so runs on different machines and days accumulate in one file; every row carries its
environment. Matplotlib is imported lazily, with the Agg backend, only when a plot is drawn.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from node.bench.env import ENV_KEYS

TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, row key, format)
    ("model", "model", "s"),
    ("backend", "backend", "s"),
    ("precision", "precision", "s"),
    ("input", "input", "d"),
    ("size MB", "size_mb", ".3g"),
    ("batch", "batch", "d"),
    ("crops/s", "crops_per_s", ".0f"),
    ("mean ms", "mean_ms", ".2f"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p90 ms", "p90_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("spread", "spread_warning", "s"),
    ("accuracy %", "accuracy", "pct"),
    ("proposer p50 ms", "proposer_ms_p50", ".2f"),
    ("e2e FPS pipelined", "e2e_fps_pipelined", ".1f"),
    ("e2e FPS sync", "e2e_fps_sync", ".1f"),
    ("peer FPS", "peer_fps", ".1f"),
    ("node/peer", "ratio", ".2f"),
)
"""What the markdown table shows, in order."""

RUN_COLUMNS: tuple[str, ...] = (
    "run_id", "model", "path", "backend", "precision", "arch", "input", "size_mb", "batch",
    "iterations", "crops_per_s", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "cv",
    "spread_warning", "gpu_ms", "accuracy", "accuracy_crops", "e2e_fps_pipelined",
    "e2e_fps_sync", "e2e_frames", "source", "peer", "peer_input", "peer_fps", "ratio",
    "ratio_sync", "rounds", "threads",
)
CSV_COLUMNS: tuple[str, ...] = RUN_COLUMNS + ENV_KEYS
"""Columns of the CSV log: the measurement, then its environment."""


class ReportError(ValueError):
    """A log file cannot be appended to (e.g. a CSV with other columns)."""


def _fmt(value, fmt: str) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "s":
        return str(value)
    if fmt == "pct":
        return f"{100.0 * float(value):.1f}"
    if fmt == "d":
        return str(int(value))
    return format(float(value), fmt)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS
                   ) -> str:
    """The rows as a GitHub markdown table of ``columns`` (header, key, format): numbers
    right-aligned, ``–`` where not measured."""
    headers = [h for h, _, _ in columns]
    body = [[_fmt(row.get(key), fmt) for _, key, fmt in columns] for row in rows]
    align = ["---" if fmt == "s" else "---:" for _, _, fmt in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


SIZE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "s"),
    ("frame size", "size", "s"),
    ("proposer input", "proposer_input", "s"),
    ("frames", "frames", "d"),
    ("e2e FPS pipelined", "fps", ".1f"),
    ("proposer p50 ms", "proposer_ms_p50", ".2f"),
    ("candidates / frame", "candidates_per_frame", ".1f"),
)
"""The frame-size table (``--sizes``): one line per model and size."""


def size_table(rows: Sequence[dict]) -> str:
    """The ``e2e_by_size`` points of the rows as a markdown table, each model once."""
    points, seen = [], set()
    for row in rows:
        if row.get("path") in seen or not row.get("e2e_by_size"):
            continue
        seen.add(row.get("path"))
        points += [{**point, "model": row.get("model")} for point in row["e2e_by_size"]]
    return markdown_table(points, SIZE_COLUMNS)


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Header → cell dicts from a table written by ``markdown_table`` (for tests and tools)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return []
    split = lambda ln: [c.strip() for c in ln.strip("|").split("|")]
    headers = split(lines[0])
    return [dict(zip(headers, split(ln))) for ln in lines[2:]]


def append_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """Append rows to a CSV log, writing the header when the file is new.

    Raises:
        ReportError: the file exists with different columns (use a new file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        if tuple(header) != CSV_COLUMNS:
            raise ReportError(f"{path}: existing CSV has other columns; pass a new --csv file")
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    return path


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def append_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    """Append one JSON object per row (every key, environment included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for row in rows:
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in row.items()}
            fh.write(json.dumps(clean, sort_keys=False) + "\n")
    return path


def plot_fps_accuracy(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Two panels: model-only crops/s against batch per model, and FPS against accuracy per
    model and precision (end-to-end pipelined FPS when measured, else crops/s at the largest
    batch; model size stands in for accuracy when no ``--data`` was given), with the peer
    detector's FPS as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    markers = {"fp32": "o", "fp16": "s", "int8": "^"}
    fig, (ax_batch, ax_acc) = plt.subplots(1, 2, figsize=(12, 6))
    per_model = {m: [r for r in rows if r["model"] == m] for m in models}
    has_acc = any(_finite(r.get("accuracy")) for r in rows)
    has_e2e = any(_finite(r.get("e2e_fps_pipelined")) for r in rows)
    for i, (name, mrows) in enumerate(per_model.items()):
        colour = f"C{i % 10}"
        mrows = sorted(mrows, key=lambda r: r["batch"])
        ax_batch.plot([r["batch"] for r in mrows], [r["crops_per_s"] for r in mrows],
                      marker=markers.get(mrows[0]["precision"], "o"), color=colour, label=name)
        last = mrows[-1]
        y = last.get("e2e_fps_pipelined") if has_e2e else last["crops_per_s"]
        x = 100.0 * last["accuracy"] if has_acc and _finite(last.get("accuracy")) else (
            None if has_acc else last["size_mb"])
        if x is None or not _finite(y):
            continue
        ax_acc.scatter([x], [y], marker=markers.get(last["precision"], "o"), color=colour,
                       s=70, label=f"{name} ({last['backend']} {last['precision']})")
        ax_acc.annotate(last["precision"], (x, y), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
    peer_runs = [r["peer_fps"] for r in rows if _finite(r.get("peer_fps"))]
    peer = sorted(peer_runs)[len(peer_runs) // 2] if peer_runs else None
    if has_e2e and peer is not None:
        ax_acc.axhline(peer, color="grey", linestyle="--",
                       label=f"peer {rows[0].get('peer') or ''}: {peer:.1f} FPS")
    ax_batch.set(xscale="log", yscale="log", xlabel="batch (crops per call)",
                 ylabel="crops/s (model only)", title="Model throughput")
    batches = sorted({r["batch"] for r in rows})
    ax_batch.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_batch.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax_batch.set_xticks(batches)
    ax_batch.grid(True, which="both", alpha=0.3)
    ax_batch.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax_acc.set(xlabel="top-1 accuracy on --data crops (%)" if has_acc else
               "model size (MB) (no --data: accuracy not measured)",
               ylabel="end-to-end FPS (pipelined)" if has_e2e else
               f"crops/s at batch {max(r['batch'] for r in rows)}",
               title="Speed against accuracy" if has_acc else "Speed against size")
    ax_acc.grid(True, alpha=0.3)
    ax_acc.margins(0.2)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
