"""``python -m node demo --out runs/demo``: the whole node on a synthetic clip, one command.

Renders a clip with the project's cone renderer (``python -m export.synth``, numpy and cv2
only), replays its MP4 through the node with the bundled model and the colour proposer, and
writes under ``--out``:

- ``clip/`` (the rendered frames and their exact YOLO labels) and ``clip.mp4``;
- ``cones.jsonl`` (one record per frame), ``bag/`` (ROS 2 MCAP bag), ``annotated.webm``
  (VP9: plays in a browser);
- ``summary.json``; the summary is printed too;
- ``evaluate.json`` and ``evaluate.png``: the run scored against the clip's exact labels
  (``node.evaluate``); recall and precision are printed last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from node.cli.common import CliError, check_model_path, run_node
from node.cli.replay import add_arguments as add_replay_arguments
from node.node_config import load_node_config, resolve_path

SYNTH_BODY_MASK = [[0.43, 0.62], [0.57, 0.62], [0.83, 1.0], [0.17, 1.0]]
"""The synthetic car's nose (``export.synth.camera.draw_car_nose``) as a proposer body mask, in
frame fractions: it covers the nose's blue side panels in every variant the renderer draws."""

OUTPUTS = ("clip", "clip.mp4", "cones.jsonl", "bag", "annotated.webm", "summary.json",
           "evaluate.json", "evaluate.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--frames", type=int, default=60, help="frames to render (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="renderer seed (default: 0)")
    parser.add_argument("--model", metavar="PATH", help="classifier (default: the bundled one)")
    parser.add_argument("--sync", action="store_true", help="run the stages serially")


def main(args: argparse.Namespace) -> int:
    if args.frames < 1:
        raise CliError(f"--frames must be >= 1, got {args.frames}")
    model = args.model or load_node_config().model.path
    check_model_path(model, resolve_path(model))  # fail before spending time on rendering
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a rerun replaces the previous demo (a bag refuses to overwrite)
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    render_clip(out / "clip", out / "clip.mp4", args.frames, args.seed)
    replay_argv = [str(out / "clip.mp4"), "--jsonl", str(out / "cones.jsonl"),
                   "--bag", str(out / "bag"), "--video-out", str(out / "annotated.mp4"),
                   "--summary", str(out / "summary.json"), "--overwrite"]
    replay_argv += ["--set", f"proposer.body_mask={json.dumps(SYNTH_BODY_MASK)}"]
    if args.model:
        replay_argv += ["--model", args.model]
    if args.sync:
        replay_argv.append("--sync")
    parser = argparse.ArgumentParser(prog="python -m node replay")
    add_replay_arguments(parser)
    code = run_node(parser.parse_args(replay_argv), replay_argv[0], live=False)
    if code == 0:
        frames = transcode_for_browser(out / "annotated.mp4", out / "annotated.webm")
        print(f"annotated video for a browser: {out / 'annotated.webm'} ({frames} frames, VP9)",
              flush=True)
        print(score_demo(out), flush=True)
    print(f"demo outputs in {out}/: " + ", ".join(OUTPUTS), flush=True)
    return code


def transcode_for_browser(src: Path, dst: Path) -> int:
    """Re-encode the run's MPEG-4 video as VP9 WebM, which browsers play, and remove ``src``.

    The replay writes MPEG-4 because VP9 encoding costs about a third of a second per frame on
    a small CPU; doing it after the run keeps the demo's latency figures those of the node.
    Returns the number of frames written.
    """
    import cv2

    from node.publish.publishers import VideoPublisher
    from node.types import Frame, FrameResult

    capture = cv2.VideoCapture(str(src))
    fps = capture.get(cv2.CAP_PROP_FPS) or 20.0
    count = 0
    with VideoPublisher(dst, fps=fps, overwrite=True) as video:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            video.publish(FrameResult(Frame(count, 0.0, image)), image)
            count += 1
    capture.release()
    src.unlink()
    return count


def score_demo(out: Path) -> str:
    """Score the demo's JSONL against the rendered clip's exact labels; write
    ``evaluate.json`` (and ``evaluate.png`` where matplotlib is installed) and return the
    line to print."""
    from node.evaluate.datasets import load_samples
    from node.evaluate.plot import PlotUnavailable, plot_evaluation
    from node.evaluate.score import tally_run

    tally, report = tally_run(out / "cones.jsonl", load_samples(f"yolo:{out / 'clip'}"))
    (out / "evaluate.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot_evaluation(tally, report, out / "evaluate.png", "demo against its synthetic labels")
    except PlotUnavailable:
        pass
    labelled, detections = report["labelled_cones"], len(tally.det_matched)
    found = sum(tally.det_matched)
    recall = found / labelled if labelled else 0.0
    precision = found / detections if detections else 0.0
    return (f"demo score against the synthetic ground truth: recall {recall:.1%} "
            f"({found} of {labelled} cones), precision {precision:.1%} ({found} of {detections} "
            f"detections), label accuracy {report['label_accuracy'] or 0:.1%}; "
            f"cones >= 12 px: recall {report['recall_ge12'] or 0:.1%}")


def render_clip(folder: Path, video: Path, frames: int, seed: int) -> None:
    """Render the synthetic clip with ``python -m export.synth`` (its own process, so the
    renderer's imports stay out of the node)."""
    cmd = [sys.executable, "-m", "export.synth", "--out", str(folder), "--frames", str(frames),
           "--seed", str(seed), "--video", str(video)]
    print(f"rendering {frames} synthetic frames (seed {seed}) ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not video.is_file():
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise CliError(f"rendering the synthetic clip failed: "
                       f"{lines[-1] if lines else f'exit code {done.returncode}'}")
