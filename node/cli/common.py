"""What ``replay`` and ``run`` share: node flags, config resolution, assembly and the summary.

The loop reads like jetson-inference's ``imagenet.py``: open the model, the proposer, the
source and the publishers, run the pipeline, print the summary. Flags become config overrides
(JSON-quoted, so a path such as ``-`` or ``123`` stays a string), applied after ``--set``; the
resulting ``NodeConfig`` is the one source of truth for the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from node.node_config import DEFAULT_CONFIG, NodeConfig, load_node_config, resolve_path
from node.sources.exposure import describe as describe_exposure


class CliError(ValueError):
    """An expected command-line failure with a one-line message."""


def add_node_arguments(parser: argparse.ArgumentParser, *, replay: bool) -> None:
    """The flags shared by ``replay`` and ``run`` (docs/design.md, ``python -m node replay``)."""
    parser.add_argument("--model", metavar="PATH",
                        help="classifier .onnx (FP32 or INT8 Q/DQ) or .engine "
                             "(default: model.path of the config, the bundled model)")
    parser.add_argument("--config", metavar="PATH", default=DEFAULT_CONFIG,
                        help=f"node config YAML (default: {DEFAULT_CONFIG})")
    if replay:
        parser.add_argument("--proposals", metavar="yolo:DIR",
                            help="take candidate boxes from YOLO label files matched by image "
                                 "stem (DIR: folder of .txt files or a YOLO root with labels/)")
    parser.add_argument("--jsonl", metavar="FILE", help="write one JSON record per frame "
                                                         "('-' for stdout)")
    parser.add_argument("--summary", metavar="FILE", help="write the final summary as JSON")
    parser.add_argument("--bag", metavar="DIR", help="write a ROS 2 bag (MCAP)")
    parser.add_argument("--video-out", metavar="F.mp4", help="write an annotated video")
    parser.add_argument("--zmq", metavar="ENDPOINT",
                        help="publish on a ZeroMQ PUB socket (e.g. tcp://127.0.0.1:5555)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing --jsonl, --summary, --video-out and --bag "
                             "outputs (without it they are refused)")
    parser.add_argument("--sync", action="store_true",
                        help="run the stages serially instead of pipelined")
    parser.add_argument("--set", metavar="KEY.PATH=VALUE", action="append", default=[],
                        dest="overrides", help="override a config value (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Config file, then ``--set``, then the dedicated flags.

    Raises:
        ConfigError: bad file, key or value (names the file or ``command line``).
        CliError: a malformed ``--proposals`` value.
    """
    flags: list[str] = list(args.overrides)

    def put(key: str, value: Any) -> None:
        flags.append(f"{key}={json.dumps(value)}")

    if args.model:
        put("model.path", args.model)
    proposals = getattr(args, "proposals", None)
    if proposals:
        kind, _, folder = proposals.partition(":")
        if kind != "yolo" or not folder:
            raise CliError(f"--proposals {proposals!r}: expected yolo:DIR")
        put("proposer.kind", "external")
        put("proposer.external_dir", folder)
    for flag, key in (("jsonl", "jsonl"), ("bag", "bag"), ("video_out", "video_out"),
                      ("zmq", "zmq")):
        if getattr(args, flag):
            put(f"publishers.{key}", getattr(args, flag))
    if args.sync:
        put("pipeline.sync", True)
    return load_node_config(args.config, flags)


EXIT_INTERRUPTED = 130
"""Stopped by SIGINT (Ctrl-C), as shells report it. SIGTERM is a requested, clean stop: 0."""


def check_model_path(path: str | Path, resolved: Path) -> None:
    """A model path that is missing or a directory, in one line (raises ``CliError``)."""
    if resolved.is_dir():
        raise CliError(f"{path}: is a directory, not a model file (pass --model PATH to an "
                       f".onnx or .engine file)")
    if not resolved.is_file():
        raise CliError(f"{path}: model file not found (pass --model PATH or set model.path)")


def run_node(args: argparse.Namespace, uri: str, *, live: bool) -> int:
    """Assemble the node from ``args`` and run it over ``uri``; prints the summary.

    Every output path is checked before anything is loaded or written. The exit code is 0,
    1 when no frame was processed, every inference failed or an output failed (after the
    summary is printed and written), or 130 after SIGINT.
    """
    from node.pipeline import Pipeline, check_batch_capacity
    from node.publish.outputs import check_outputs

    config = config_from_args(args)
    overwrite = bool(getattr(args, "overwrite", False))
    pub = config.publishers
    check_outputs({"--jsonl": pub.jsonl, "--bag": pub.bag, "--video-out": pub.video_out,
                   "--summary": args.summary}, overwrite=overwrite)
    model_path = resolve_path(config.model.path)
    check_model_path(config.model.path, model_path)
    proposer = _build_proposer(config)
    backend = _load_backend(model_path, config)
    progress = exporter = None
    publishers: list = []
    try:
        with backend:  # the model is loaded before any output file is created
            check_batch_capacity(proposer, backend)  # engines know their batch limit now
            source = _open_source(uri, config, live)
            try:
                publishers = _build_publishers(config, overwrite)
                tracker, exporter = _build_tracker(config)
            except BaseException:
                _close_quietly([source, *publishers])
                raise
            progress = _progress_bar(source, enabled=not live and not args.no_progress)
            report = (lambda line: print(line, file=sys.stderr, flush=True)) if live else None
            pipeline = Pipeline(config, backend, proposer, publishers, tracker, progress, report)
            if live and pipeline.exposure_warning:  # replays print it with the summary
                print(f"warning: {pipeline.exposure_warning}", file=sys.stderr, flush=True)
            summary = pipeline.run(source)  # closes the source and the publishers
    finally:
        if progress is not None:
            progress.close()
        proposer.close()
        if exporter is not None:
            exporter.close()
    summary["model"] = str(config.model.path)
    summary["proposer"] = config.proposer.kind
    refiner = getattr(proposer, "refiner", None)  # node.propose.refiner.RefinedProposer
    summary["refiner"] = str(config.proposer.refiner_model) if refiner is not None else None
    _emit_summary(summary, args, to_stderr=config.publishers.jsonl == "-")
    return exit_code(summary, uri)


def exit_code(summary: dict, uri: str) -> int:
    """130 after SIGINT, 0 after SIGTERM; otherwise raises ``CliError`` (exit 1) when an
    output failed, no frame was processed or every inference failed, else 0."""
    if summary.get("signal") == "SIGINT":
        return EXIT_INTERRUPTED
    if summary.get("output_error"):
        raise CliError(summary["output_error"])
    if summary.get("signal") == "SIGTERM":
        return 0
    frames = summary["frames"]
    if summary.get("inference_failed") and not summary.get("inferred"):
        raise CliError(f"every inference failed ({summary['inference_failed']} of {frames} "
                       f"frames; first: {summary.get('first_inference_error')})")
    if frames - summary["errors"] <= 0:
        why = f"all {frames} frames unreadable" if frames else "the source gave no frame"
        raise CliError(f"{uri}: no frame was processed ({why})")
    return 0


def _build_proposer(config: NodeConfig) -> Any:
    from node.propose import build_proposer

    return build_proposer(config.proposer)


def _load_backend(path: Path, config: NodeConfig) -> Any:
    from node.infer import load_backend

    return load_backend(path, providers=config.model.providers, threads=config.model.threads,
                        max_batch=config.model.max_batch)


def _open_source(uri: str, config: NodeConfig, live: bool) -> Any:
    from node.sources import open_source

    if live:
        return open_source(uri, live=True, **config.source.camera_options())
    opts = {"topic": config.source.topic} if config.source.topic else {}
    return open_source(uri, live=False, **opts)


def _build_publishers(config: NodeConfig, overwrite: bool = False) -> list:
    from node.publish.publishers import build_publishers

    pub = config.publishers
    return build_publishers(jsonl=pub.jsonl, zmq=pub.zmq, bag=pub.bag, video=pub.video_out,
                            bag_images=pub.annotate_bag_images,
                            video_fps=pub.video_fps, overwrite=overwrite)


def _build_tracker(config: NodeConfig) -> tuple[Any, Any]:
    """The latency tracker and, when configured, its Prometheus endpoint."""
    from node.publish.metrics import LatencyTracker, PrometheusExporter

    m = config.metrics
    tracker = LatencyTracker(report_every_s=m.print_interval_s)
    exporter = None
    if m.prometheus_port is not None:
        exporter = PrometheusExporter(tracker, port=m.prometheus_port, host=m.prometheus_host)
    return tracker, exporter


def _progress_bar(source: Any, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    try:
        total = len(source)
    except TypeError:
        total = None
    return tqdm(total=total, unit="frame", file=sys.stderr, dynamic_ncols=True, leave=False)


def _emit_summary(summary: dict, args: argparse.Namespace, to_stderr: bool) -> None:
    print(format_summary(summary), file=sys.stderr if to_stderr else sys.stdout, flush=True)
    if args.summary:  # checked (and refused if it existed) before the run
        path = Path(args.summary)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            raise CliError(f"{path}: cannot write the summary ({exc.strerror})") from None


def format_summary(summary: dict) -> str:
    """Human-readable summary: counts, FPS, drops and the per-stage latency table."""
    from node.publish.metrics import format_summary as latency_table

    proposer = f"{summary.get('proposer')}{' + refiner' if summary.get('refiner') else ''}"
    head = (f"mode {summary['mode']}  model {summary.get('model')}  proposer {proposer}  "
            f"cones {summary['cones']}  candidates/frame {summary['candidates_per_frame']}")
    if summary.get("interrupted"):
        head += "  (interrupted: stopped by signal)"
    notes = [f"warning: {note}" for note in summary.get("source_warnings", [])]
    if summary.get("exposure_warning"):
        notes.append(f"warning: {summary['exposure_warning']}")
    if summary.get("camera_warning"):
        notes.append(f"warning: {summary['camera_warning']}")
    if summary.get("range"):
        notes.append(f"range: {summary['range']}")
    exposure = describe_exposure(summary.get("exposure") or {})
    if exposure:
        notes.append(f"exposure: {exposure}")
    return "\n".join([head, latency_table(summary), *notes])


def _close_quietly(things: list) -> None:
    for thing in things:
        try:
            thing.close()
        except Exception:  # noqa: BLE001, S110 - already failing; the first error is reported
            pass
