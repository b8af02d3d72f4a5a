"""``python -m node.bench.soak``: a long run with every publisher on, for resident memory growth.

A clip is looped for ``--frames`` frames through the real node: the model and proposer of the
node config, the pipelined loop, the latency tracker, and every publisher at once (JSONL,
ZeroMQ PUB on a free local port, ROS 2 bag (MCAP, with annotated images) and annotated
video), written under a temporary folder (or ``--out``). The process's resident set size
(RSS) is sampled after ``--warm-up`` frames and then every ``--every`` frames; the result is
the growth from the warm-up sample to the last one. It prints one JSON object and exits 1 when
the growth reaches ``--limit-mb`` (20 MB: issue 20), so a CI job can run it too.

The clip is a video file or an image folder given with ``--clip`` (its frames are decoded once
and kept in memory, so the source itself does not grow), or by default 64 frames with painted
blue, yellow and orange cones. This is a benchmark, not a test: see docs/reliability.md.

Example::

    python -m node.bench.soak --frames 20000 --set proposer.kind=colour
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from node.node_config import DEFAULT_CONFIG, load_node_config, resolve_path
from node.sources import Source, open_source
from node.types import Frame

CONE_COLOURS = ((200, 60, 20), (20, 210, 230), (20, 110, 245))  # BGR blue, yellow, orange


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            import os

            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def painted_clip(count: int = 64, height: int = 240, width: int = 320) -> list[np.ndarray]:
    """Frames of a grey road with three drifting cones (blue, yellow, orange)."""
    frames = []
    for i in range(count):
        image = np.full((height, width, 3), 90, np.uint8)
        for k, colour in enumerate(CONE_COLOURS):
            x = 30 + 100 * k + (i * 3) % 40
            y = 120 + (i + 11 * k) % 30
            pts = np.array([[x, y + 50], [x + 14, y], [x + 28, y + 50]], np.int32)
            cv2.fillPoly(image, [pts], colour)
        frames.append(image)
    return frames


def load_clip(path: str) -> list[np.ndarray]:
    """Every readable frame of a video file or image folder, decoded once."""
    with open_source(path) as source:
        frames = [f.image for f in source if f.image is not None]
    if not frames:
        raise SystemExit(f"error: {path}: no readable frame")
    return frames


class LoopedClip(Source):
    """``frames`` frames cycling over ``images``; samples RSS as it goes."""

    def __init__(self, images: list[np.ndarray], frames: int, warm_up: int, every: int) -> None:
        super().__init__("looped clip")
        self.images, self.frames, self.warm_up, self.every = images, frames, warm_up, every
        self.samples: list[tuple[int, int]] = []  # (frame index, RSS bytes)

    def __len__(self) -> int:
        return self.frames

    def _generate(self) -> Iterator[Frame]:
        start = time.time()
        for i in range(self.frames):
            if i >= self.warm_up and (i - self.warm_up) % self.every == 0:
                gc.collect()
                self.samples.append((i, rss_bytes()))
            yield Frame(i, start + i / 30.0, self.images[i % len(self.images)], None, 0.0)
        gc.collect()
        self.samples.append((self.frames, rss_bytes()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.bench.soak", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20_000, help="frames to run (20000)")
    parser.add_argument("--warm-up", type=int, default=1_000,
                        help="frames before the first RSS sample (1000)")
    parser.add_argument("--every", type=int, default=1_000, help="RSS sample period (1000)")
    parser.add_argument("--clip", help="video file or image folder to loop (default: painted)")
    parser.add_argument("--model", help="classifier (default: model.path of the config)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="node config YAML")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY.PATH=VALUE", help="config override (repeatable)")
    parser.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--limit-mb", type=float, default=20.0,
                        help="exit 1 when RSS grows this much after warm-up (20)")
    args = parser.parse_args(argv)
    if args.frames <= args.warm_up:
        parser.error("--frames must exceed --warm-up")

    from node.infer import load_backend
    from node.pipeline import Pipeline
    from node.propose import build_proposer
    from node.publish.metrics import LatencyTracker
    from node.publish.publishers import build_publishers

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={json.dumps(args.model)}")
    config = load_node_config(args.config, overrides)
    images = load_clip(args.clip) if args.clip else painted_clip()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        publishers = build_publishers(
            jsonl=out / "soak.jsonl", zmq="tcp://127.0.0.1:0", bag=out / "bag",
            video=out / "soak.mp4", bag_images=True, video_fps=30.0, overwrite=True)
        source = LoopedClip(images, args.frames, args.warm_up, args.every)
        proposer = build_proposer(config.proposer)
        t0 = time.perf_counter()
        try:
            with load_backend(resolve_path(config.model.path), providers=config.model.providers,
                              threads=config.model.threads,
                              max_batch=config.model.max_batch) as backend:
                pipeline = Pipeline(config, backend, proposer, publishers, LatencyTracker())
                summary = pipeline.run(source)
        finally:
            proposer.close()
        elapsed = time.perf_counter() - t0
        sizes = {p.name: p.stat().st_size for p in out.rglob("*") if p.is_file()}
    (_, first), (_, last) = source.samples[0], source.samples[-1]
    result = {
        "frames": summary["frames"], "errors": summary["errors"],
        "fps": round(summary["frames"] / elapsed, 1), "wall_s": round(elapsed, 1),
        "warm_up": args.warm_up, "clip_frames": len(images),
        "clip_size": list(images[0].shape[1::-1]),
        "publishers": ["jsonl", "zmq", "bag+images", "video"],
        "proposer": config.proposer.kind, "model": str(config.model.path),
        "rss_after_warm_up_mb": round(first / 2**20, 1), "rss_end_mb": round(last / 2**20, 1),
        "rss_growth_mb": round((last - first) / 2**20, 2),
        "rss_samples_mb": [[i, round(rss / 2**20, 1)] for i, rss in source.samples],
        "output_bytes": sizes,
        "limit_mb": args.limit_mb,
    }
    print(json.dumps(result, indent=1), flush=True)
    if summary.get("output_error"):
        print(f"error: {summary['output_error']}", file=sys.stderr)
        return 1
    return 0 if result["rss_growth_mb"] < args.limit_mb else 1


if __name__ == "__main__":
    sys.exit(main())
