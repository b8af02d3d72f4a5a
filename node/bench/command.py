"""``python -m node bench``: FPS and accuracy per model, the table a team picks a model from.

In the style of trtexec's timing report and Ultralytics' benchmark table: for every model
(``--models``, default every ``*.onnx``/``*.engine`` in ``models/``) it measures model-only
throughput and latency percentiles at several batch sizes, top-1 accuracy on labelled crops
(``--data``), the model's size, end-to-end pipeline FPS on a replay source (``--source``,
pipelined and sync), with ``--sizes``, the pipelined node on the source's frames resized to
each given frame size, with ``--peer``, a single-stage detector timed on the same frames
under the same runtime and thread count, and with ``--against KEY=VALUE``, the pipelined node
with that setting changed, in the same rounds, and its FPS as a ratio to the config's. The
environment is recorded with every row. Output: a markdown table on stdout, rows appended to
a CSV and a JSON-lines log, and a PNG plot.

The same command runs on a CPU and on a Jetson: the backend is picked by file suffix
(``node.infer``), and nothing here assumes a particular device.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.node_config import DEFAULT_CONFIG, REPO_ROOT, resolve_path

MODEL_SUFFIXES = (".onnx", ".engine", ".plan")
DEFAULT_MODELS_DIR = "models"
DEFAULT_OUT_DIR = "runs/bench"


class BenchError(ValueError):
    """An expected benchmark failure (no models, bad flag value); one line, names the cause."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m node bench``."""
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help="model files (.onnx FP32/INT8, .engine); default: every .onnx and "
                             ".engine in models/")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32], metavar="N",
                        help="batch sizes of the model-only timing (default: 1 8 32)")
    parser.add_argument("--iters", type=int, default=200,
                        help="most timed calls per batch size (default: 200)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed calls before timing (default: 10)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="time budget per batch size, in seconds (default: 2)")
    parser.add_argument("--data", metavar="yolo:DIR",
                        help="labelled data for top-1 accuracy (yolo:DIR, fsoco:DIR, crops:DIR)")
    parser.add_argument("--max-crops", type=int, default=2000,
                        help="evenly spaced subset of --data boxes (default: 2000; 0: all)")
    parser.add_argument("--source", metavar="SRC",
                        help="replay source for the proposer and end-to-end timing (folder, "
                             "glob, video, bag; default: a synthetic clip rendered once into "
                             "OUT_DIR; 'none' skips it)")
    parser.add_argument("--frames", type=int, default=0,
                        help="use the first N frames of --source (default: all)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="end-to-end repeats, interleaving pipelined, sync and peer; the "
                             "median run is reported (default: 1)")
    parser.add_argument("--sizes", nargs="+", metavar="WxH", default=[],
                        help="also time the node with the source's frames resized to each "
                             "frame size (e.g. 800x320 2592x640 2048x1536): FPS per frame "
                             "size, pipelined, in a second table")
    parser.add_argument("--peer", metavar="DETECTOR.onnx",
                        help="time this YOLO-layout ONNX detector on the same frames")
    parser.add_argument("--threads", type=int,
                        help="ONNX Runtime intra-op threads (and OpenCV's) for node and peer "
                             "(default: the node config's model.threads for the node, ONNX "
                             "Runtime's own choice for the peer)")
    parser.add_argument("--providers", default=None,
                        help="ONNX Runtime providers for node and peer: 'auto' or a "
                             "comma-separated list (default: CPU)")
    parser.add_argument("--config", metavar="PATH", default=DEFAULT_CONFIG,
                        help="node config for the end-to-end runs (default: configs/node.yaml "
                             "if present, else built-in defaults)")
    parser.add_argument("--set", metavar="KEY.PATH=VALUE", action="append", default=[],
                        dest="overrides", help="override a node config value (repeatable)")
    parser.add_argument("--against", metavar="KEY.PATH=VALUE", action="append", default=[],
                        help="also time the pipelined node with this override on top of the "
                             "config (repeatable: all of them together), in the same rounds, "
                             "alternating which goes first; reports its FPS and the median "
                             "per-round ratio to the config's: what a setting costs here")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"where logs and plot go by default (default: {DEFAULT_OUT_DIR})")
    parser.add_argument("--csv", help="CSV log to append to (default: OUT_DIR/bench.csv)")
    parser.add_argument("--json", help="JSON-lines log to append to (default: "
                                       "OUT_DIR/bench.jsonl)")
    parser.add_argument("--plot", help="PNG plot (default: OUT_DIR/bench.png)")


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run the benchmark; ``args`` is parsed flags or an argv list (without ``bench``)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m node bench")
        add_arguments(parser)
        args = parser.parse_args(list(sys.argv[1:] if args is None else args))
    _check_args(args)
    import cv2

    previous_cv_threads = cv2.getNumThreads()
    if args.threads:
        cv2.setNumThreads(args.threads)
    try:
        return _run(args)
    finally:
        cv2.setNumThreads(previous_cv_threads)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("iters", "warmup", "frames", "max_crops"):
        if getattr(args, name) < 0:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 0")
    if args.rounds < 1:
        raise BenchError("--rounds must be >= 1")
    if args.iters < 1:
        raise BenchError("--iters must be >= 1")
    if any(b < 1 for b in args.batches):
        raise BenchError(f"--batches must be positive, got {args.batches}")
    if args.seconds <= 0:
        raise BenchError("--seconds must be > 0")
    if args.threads is not None and args.threads < 1:
        raise BenchError("--threads must be >= 1")
    if args.peer and args.source is not None and args.source.lower() == "none":
        raise BenchError("--peer needs a source (not --source none): the detector is timed on "
                         "the same frames")
    if args.sizes and args.source is not None and args.source.lower() == "none":
        raise BenchError("--sizes needs a source (not --source none): its frames are resized")
    if args.against and args.source is not None and args.source.lower() == "none":
        raise BenchError("--against needs a source (not --source none): both configs are "
                         "timed on its frames")
    from node.bench.measure import parse_frame_size

    try:
        args.frame_sizes = [parse_frame_size(text) for text in args.sizes]
    except ValueError as exc:
        raise BenchError(f"--sizes: {exc}") from None


def discover_models(paths: Sequence[str] | None) -> list[Path]:
    """The given model files, or every model file in ``models/`` (cwd, then repo root)."""
    if paths:
        models = [resolve_path(p) for p in paths]
        for p in models:
            if not p.is_file():
                raise BenchError(f"{p}: model file not found")
            if p.suffix.lower() not in MODEL_SUFFIXES:
                raise BenchError(f"{p}: not a model file (expected {', '.join(MODEL_SUFFIXES)})")
        return models
    folder = resolve_path(DEFAULT_MODELS_DIR)
    models = sorted(p for p in folder.glob("*") if p.suffix.lower() in MODEL_SUFFIXES) \
        if folder.is_dir() else []
    if not models:
        raise BenchError(f"{DEFAULT_MODELS_DIR}/: no .onnx or .engine models found; pass "
                         f"--models FILE ...")
    return models


def _providers(args: argparse.Namespace) -> Any:
    if not args.providers:
        return None
    if args.providers == "auto":
        return "auto"
    return [p.strip() for p in args.providers.split(",") if p.strip()]


def _node_config(args: argparse.Namespace, against: Sequence[str] = ()) -> Any:
    from node.node_config import load_node_config

    path = resolve_path(args.config)
    if not path.is_file() and args.config != DEFAULT_CONFIG:
        raise BenchError(f"{args.config}: config file not found")
    overrides = [*args.overrides, *against]
    if args.threads:
        overrides.append(f"model.threads={args.threads}")
    return load_node_config(path if path.is_file() else None, overrides)


def _run(args: argparse.Namespace) -> int:
    from node.bench.env import busy_warning, collect_environment, describe
    from node.bench.measure import (
        LabelledCrops,
        evaluate_accuracy,
        median_run,
        proposer_inputs,
        run_pipeline,
        write_sized_frames,
    )
    from node.bench.peer import PeerDetector, run_peer
    from node.bench.report import (
        append_csv,
        append_jsonl,
        markdown_table,
        plot_fps_accuracy,
        size_table,
    )
    from node.infer import load_backend

    models = discover_models(args.models)
    if args.source is None:
        args.source = str(synthetic_source(Path(args.out_dir)))
    elif args.source.lower() == "none":
        args.source = None
    env = collect_environment()
    run_id = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    providers = _providers(args)
    config = _node_config(args)
    other = _node_config(args, args.against) if args.against and args.source else None
    # The classifier runs as the node would run it: with the config's threads unless told.
    threads = args.threads or config.model.threads
    if args.source:  # fail before minutes of timing, not after
        from node.sources import open_source

        open_source(args.source, live=False).close()
    if args.peer and not resolve_path(args.peer).is_file():
        raise BenchError(f"{args.peer}: peer detector not found")
    data = LabelledCrops(args.data, args.max_crops) if args.data else None
    out_dir = Path(args.out_dir)
    # (w, h) -> the source's frames at that size, and the proposer's network input for them
    sized: dict[tuple[int, int], tuple[Path, str | None]] = {}
    sizes = args.frame_sizes if args.source else []
    inputs = proposer_inputs(config.proposer, sizes) if sizes else {}
    for w, h in sizes:
        folder = out_dir / "sizes" / f"{w}x{h}"
        try:
            write_sized_frames(args.source, (w, h), args.frames, folder)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        sized[(w, h)] = folder, inputs[(w, h)]
    print(describe(env), file=sys.stderr, flush=True)
    if busy_warning(env):
        print(busy_warning(env), file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    peer = None
    for path in models:
        max_batch = max(max(args.batches), config.model.max_batch if args.source else 1)
        try:
            backend = load_backend(path, providers=providers, threads=threads,
                                   max_batch=max_batch)
        except ValueError as exc:  # BackendError, MetadataError
            if args.models:  # asked for by name: that is an error
                raise
            print(f"[W] skipping {path.name}: {exc}", file=sys.stderr)
            continue
        model_info = _model_info(path, backend, threads)
        with backend:
            if args.peer and peer is None:  # same runtime, providers and threads as the node
                peer = PeerDetector(resolve_path(args.peer), threads=args.threads,
                                    providers=_peer_providers(backend))
            points = [_time_point(backend, path, batch, args) for batch in args.batches
                      if _fits(backend, path, batch)]
            accuracy = evaluate_accuracy(backend, data) if data else {}
            runs: dict[str, list] = {"pipelined": [], "against": [], "sync": [], "peer": []}
            for i in range(args.rounds if args.source else 0):  # interleaved: fair when busy
                pair = [("pipelined", config), ("against", other)]
                for mode, cfg in (pair if i % 2 == 0 else pair[::-1]) + [("sync", config)]:
                    if cfg is not None:
                        runs[mode].append(run_pipeline(cfg, backend, args.source, args.frames,
                                                       sync=mode == "sync"))
                if peer is not None:
                    runs["peer"].append(run_peer(peer, args.source, args.frames))
            by_size = [_size_point(size, folder, network_input, config, backend, args.rounds)
                       for size, (folder, network_input) in sized.items()]
        e2e = {mode: median_run(r) for mode, r in runs.items() if r}
        against = _against(args.against, runs) if other is not None else None
        for point in points:
            rows.append(_row(run_id, model_info, point, accuracy, e2e, args, env))
            rows[-1]["e2e_by_size"] = by_size or None
            rows[-1]["against"] = against
        _print_progress(path, points, accuracy, e2e, against)

    if not rows:
        raise BenchError("no model could be benchmarked (see the warnings above)")
    table = markdown_table(rows)
    if sized:
        table += "\n\nFrames per second by frame size (the source's frames resized to each):\n\n"
        table += size_table(rows)
    table += "".join(against_lines(rows))
    print(table)
    csv_path = append_csv(args.csv or out_dir / "bench.csv", rows)
    json_path = append_jsonl(args.json or out_dir / "bench.jsonl", rows)
    if importlib.util.find_spec("matplotlib") is None:
        plot_note = 'no plot (install it with pip install -e ".[plot]")'
    else:
        plot_note = "plot " + str(plot_fps_accuracy(rows, args.plot or out_dir / "bench.png",
                                                    title=f"{env['cpu']} · {env['date']}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text(f"```\n{describe(env)}\n```\n\n{table}\n")
    print(f"logged {len(rows)} rows to {csv_path} and {json_path}; {plot_note}",
          file=sys.stderr)
    return 0


SYNTH_FRAMES = 60


def synthetic_source(out_dir: Path) -> Path:
    """The default ``--source``: a synthetic clip of ``SYNTH_FRAMES`` frames (seed 0), rendered
    once by ``python -m export.synth`` and reused by later runs."""
    video = out_dir / "synth_clip.mp4"
    if not video.is_file():
        from node.cli.demo import render_clip

        out_dir.mkdir(parents=True, exist_ok=True)
        render_clip(out_dir / "synth_clip", video, SYNTH_FRAMES, seed=0)
    return video


def _fits(backend: Any, path: Path, batch: int) -> bool:
    if batch <= backend.max_batch:
        return True
    print(f"[W] {path.name}: batch {batch} skipped, above the model's max batch "
          f"{backend.max_batch} (e.g. the engine's optimisation profile)", file=sys.stderr)
    return False


def _time_point(backend: Any, path: Path, batch: int, args: argparse.Namespace) -> dict:
    from node.bench.measure import time_model

    point = time_model(backend, batch, args.iters, args.warmup, args.seconds)
    if point["spread_warning"]:
        print(f"[W] {path.name} batch {batch}: run-to-run spread is high "
              f"({point['spread_warning']}); close other programs or lock the clocks, and "
              f"rerun", file=sys.stderr)
    return point


def _model_info(path: Path, backend: Any, threads: int | None) -> dict[str, Any]:
    meta = backend.meta
    return {"model": path.name, "path": _display_path(path),
            "backend": backend.name.split(":", 1)[0], "precision": meta.precision,
            "arch": meta.arch, "input": meta.input_size,
            "size_mb": path.stat().st_size / 1e6, "threads": threads}


def _peer_providers(backend: Any) -> list[str]:
    # The peer runs under exactly the providers the node's session got.
    return list(getattr(backend, "providers", None) or ["CPUExecutionProvider"])


def _size_point(size: tuple[int, int], folder: Path, network_input: str | None, config: Any,
                backend: Any, rounds: int) -> dict[str, Any]:
    """The pipelined node over the frames resized to one size: the median of ``rounds``."""
    from node.bench.measure import median_run, run_pipeline

    run = median_run([run_pipeline(config, backend, str(folder), 0, sync=False)
                      for _ in range(rounds)])
    return {"size": f"{size[0]}x{size[1]}", "proposer_input": network_input,
            "fps": run["fps"], "fps_runs": run["fps_runs"], "frames": run["frames"],
            "proposer_ms_p50": run["propose_ms"].get("p50_ms"),
            "candidates_per_frame": run["candidates_per_frame"]}


def _row(run_id: str, info: dict, point: dict, accuracy: dict, e2e: dict,
         args: argparse.Namespace, env: dict) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": run_id, **info}
    row.update({k: point[k] for k in ("batch", "iterations", "crops_per_s", "mean_ms", "p50_ms",
                                      "p90_ms", "p99_ms", "cv", "spread_warning", "gpu_ms")})
    row["accuracy"] = accuracy.get("accuracy", math.nan)
    row["accuracy_crops"] = accuracy.get("crops")
    row["accuracy_per_class"] = accuracy.get("per_class")
    row["data"] = args.data
    pipelined, sync, peer = (e2e.get(k, {}) for k in ("pipelined", "sync", "peer"))
    row["e2e_fps_pipelined"] = pipelined.get("fps", math.nan)
    row["e2e_fps_sync"] = sync.get("fps", math.nan)
    row["e2e_fps_runs"] = {k: r["fps_runs"] for k, r in e2e.items()} or None
    row["e2e_frames"] = pipelined.get("frames")
    row["e2e_latency_ms"] = {k: r["latency_ms"] for k, r in e2e.items()} or None
    row["candidates_per_frame"] = pipelined.get("candidates_per_frame")
    row["proposer_ms_p50"] = pipelined.get("propose_ms", {}).get("p50_ms", math.nan)
    row["proposer_ms_p90"] = pipelined.get("propose_ms", {}).get("p90_ms", math.nan)
    row["source"] = args.source
    peer_fps = peer.get("fps", math.nan)
    ok = peer_fps > 0 and math.isfinite(peer_fps)
    row.update({"peer": Path(args.peer).name if args.peer else None,
                "peer_input": peer.get("input"), "peer_fps": peer_fps,
                "ratio": row["e2e_fps_pipelined"] / peer_fps if ok else math.nan,
                "ratio_sync": row["e2e_fps_sync"] / peer_fps if ok else math.nan,
                "rounds": args.rounds if args.source else None})
    row.update(env)
    return row


def _against(settings: Sequence[str], runs: dict[str, list]) -> dict[str, Any]:
    """``--against``'s result: its settings, its median-run FPS, and the median over rounds
    of its FPS over the config's in the same round."""
    import statistics

    from node.bench.measure import median_run

    ratios = [b["fps"] / a["fps"] for a, b in zip(runs["pipelined"], runs["against"],
                                                   strict=True) if a["fps"] > 0]
    median = median_run(runs["against"])
    return {"set": list(settings), "fps": median["fps"],
            "candidates_per_frame": median["candidates_per_frame"],
            "fps_runs": [r["fps"] for r in runs["against"]],
            "ratio": statistics.median(ratios) if ratios else math.nan,
            "ratio_runs": ratios}


def against_lines(rows: Sequence[dict]) -> list[str]:
    """One line per model timed ``--against`` other settings, for the printed table."""
    lines, seen = [], set()
    for row in rows:
        a = row.get("against")
        if a and row.get("path") not in seen:
            seen.add(row.get("path"))
            lines.append(f"\n\n{row.get('model')}: pipelined with {' '.join(a['set'])}: "
                         f"{a['fps']:.1f} FPS, {a['ratio']:.3f}x the config's "
                         f"(median of {len(a['ratio_runs'])} rounds' ratios)")
    return lines


def _print_progress(path: Path, points: list, accuracy: dict, e2e: dict,
                    against: dict | None = None) -> None:
    parts = [f"b{p['batch']}: {p['crops_per_s']:.0f} crops/s" for p in points]
    if accuracy:
        parts.append(f"top-1 {100 * accuracy['accuracy']:.1f}% on {accuracy['crops']} crops")
    if "pipelined" in e2e:
        parts.append(f"proposer p50 {e2e['pipelined']['propose_ms']['p50_ms']:.1f} ms")
    for mode, result in e2e.items():
        if mode == "against":
            continue
        parts.append(f"{mode} {result['fps']:.1f} FPS"
                     + (f" (median of {len(result['fps_runs'])})"
                        if len(result["fps_runs"]) > 1 else ""))
    if against is not None:
        parts.append(f"with {' '.join(against['set'])}: pipelined {against['fps']:.1f} FPS, "
                     f"{against['ratio']:.3f}x the config's (median of "
                     f"{len(against['ratio_runs'])} rounds' ratios)")
    print(f"{path.name}: " + ", ".join(parts), file=sys.stderr, flush=True)


def _display_path(path: Path) -> str:
    """Relative to the repo when inside it, so logs name no machine paths."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path.name


if __name__ == "__main__":
    sys.exit(main())
