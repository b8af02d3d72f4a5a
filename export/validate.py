"""``python -m export.validate variants``: the whole node on camera variants of labelled clips.

What a team with another camera gets is what matters, not the score on the clips the node was
tuned on. This command takes labelled frames (by default the clips that ``configs/train.yaml``
holds out), turns them into what other cameras would have recorded (``export.variants``:
horizon shifted, aspect restored, other sensor sizes, lens water, blur, noise, low light,
JPEG), runs the whole node in-process on each variant (``node.pipeline.Pipeline`` with the
configured proposer, refiner and classifier) and scores it against the moved labels with
``node.evaluate``'s matching.

Reported per variant: recall of cones >= 12 px, precision of detections >= 20 px, label
accuracy, the recall relative to the base frames, per clip and over all clips, the worst clip,
and the median proposer and end-to-end milliseconds per frame at the variant's frame size.
Written to ``OUT/variants.md`` (a table), ``OUT/variants.json`` and ``OUT/variants.png``
(recall by variant, when matplotlib is installed).

    python -m export.validate variants --data yolo:DATA --out runs/variants

``python -m export.validate loco`` (``export.loco``) is leave-one-clip-out: a classifier
trained without each clip, scored on it, and the score threshold calibrated out of fold.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from export.node_run import run_node, score_variant
from export.variants import build_variants, estimate_horizon
from node.evaluate.datasets import bgracing_clip
from node.evaluate.score import Tally
from node.evaluate.splits import select_samples
from node.sources.frame_check import judge, readings
from node.types import Frame


def clip_of(sample: Any) -> str:
    """BGRacing clip name of a sample, or its folder's name for other datasets."""
    try:
        return bgracing_clip(sample.image_path)
    except ValueError:
        return sample.image_path.parent.parent.name


def _is_bgracing(sample: Any) -> bool:
    try:
        bgracing_clip(sample.image_path)
    except ValueError:
        return False
    return True


def validate_variants(samples: list, config: Any, backend: Any, proposer: Any,
                      names: list[str] | None = None, show_progress: bool = True,
                      camera_check: bool = True) -> dict:
    """Run and score every variant; returns ``{variant: {"clips": {clip: report}, "all":
    report, "propose_ms", "total_ms", "size"}}``, and with ``camera_check`` what ``python -m
    node check`` reads on each variant's frames (``"camera_check"``)."""
    from tqdm import tqdm

    variants = build_variants(names)
    clips = [clip_of(s) for s in samples]
    images = [s.load() for s in samples]
    by_clip: dict[str, list[np.ndarray]] = defaultdict(list)
    for clip, s in zip(clips, samples, strict=True):
        by_clip[clip].append(s.boxes)
    horizon = {c: estimate_horizon(b, images[0].shape[0]) for c, b in by_clip.items()}
    out: dict[str, dict] = {}
    bar = tqdm(total=len(variants) * len(samples), unit="frame", disable=not show_progress,
               desc="variants", file=sys.stderr)
    try:
        for variant in variants:
            frames, truth = [], []
            looks: dict[str, list[float]] = defaultdict(list)
            for i, (image, s, clip) in enumerate(zip(images, samples, clips, strict=True)):
                img, boxes, keep = variant.apply(image, s.boxes, horizon[clip], i)
                labels = [lab for lab, k in zip(s.labels, keep, strict=True) if k]
                frames.append(Frame(i, float(i), img, s.image_path.name))
                truth.append((boxes, labels))
                if camera_check:
                    for key, value in readings(img, config).items():
                        looks[key].append(value)
            scales = [variant.scale(im.shape[1], im.shape[0]) for im in images]
            bar.set_postfix_str(variant.name)
            recorder = ProposalRecorder(proposer)
            results, summary = run_node(config, backend, recorder, frames, bar)
            reports = score_variant(results, truth, clips, scales)
            proposals = proposal_recall(recorder.boxes, frames, truth, scales)
            lat = [r.latency_ms for r in results]
            out[variant.name] = {
                "kind": variant.kind,
                "size": [int(frames[0].image.shape[1]), int(frames[0].image.shape[0])],
                "all": reports.pop("all"), "clips": reports,
                "proposal_recall_ge12": proposals,
                "propose_ms": round(float(np.median([x.get("propose", np.nan) for x in lat])), 2),
                "total_ms": round(float(np.median([x.get("total", np.nan) for x in lat])), 2),
                "fps": round(float(summary["fps"]), 1)}
            if camera_check:  # what `python -m node check` reads on these frames
                out[variant.name]["camera_check"] = judge(looks)
    finally:
        bar.close()
    base = out.get("base")
    for row in out.values():
        row["recall_vs_base"] = _ratio(row["all"]["recall_ge12"],
                                       base["all"]["recall_ge12"] if base else None)
        worst = min(row["clips"].items(), key=lambda kv: kv[1]["recall_ge12"] or 0.0)
        row["worst_clip"] = {"clip": worst[0], "recall_ge12": worst[1]["recall_ge12"]}
    return out


class ProposalRecorder:
    """The node's proposer, keeping the boxes it proposes for each frame (by frame index),
    so that the proposals are scored without running the proposer twice."""

    def __init__(self, proposer: Any) -> None:
        self.proposer = proposer
        self.boxes: dict[int, np.ndarray] = {}

    def propose(self, frame: Frame) -> np.ndarray:
        boxes = self.proposer.propose(frame)
        self.boxes[frame.index] = boxes
        return boxes

    def __getattr__(self, name: str) -> Any:  # max_candidates, suppress_overlaps, close
        return getattr(self.proposer, name)


def proposal_recall(proposals: dict[int, np.ndarray], frames: list[Frame],
                    truth: list[tuple[np.ndarray, list[str]]],
                    scales: list[float] | None = None) -> float | None:
    """Recall of cones >= 12 px by the proposer's boxes alone (IoU >= 0.5): the most the
    classifier could find. Below the node's recall by much, the classifier loses the cones;
    close to it, the proposer does. ``scales``: as ``score_variant``'s."""
    tally = Tally()
    scales = scales or [1.0] * len(frames)
    for frame, (boxes, labels), scale in zip(frames, truth, scales, strict=True):
        found = proposals.get(frame.index, np.zeros((0, 4), np.float32))
        tally.add(found, -np.arange(len(found), dtype=np.float64), None, boxes, labels, scale)
    return tally.report()["recall_ge12"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def format_markdown(results: dict, title: str) -> str:
    """The variant table: one row per variant, recall relative to base, the worst clip."""
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}"

    lines = [f"### {title}", "",
             ("| variant | frame size | recall ≥ 12 px % | of base | precision ≥ 20 px % | "
             "labels % | worst clip (recall %) | proposals' recall % | proposer ms | "
             "node ms | `node check`: burnt out / blur px / noise |"),
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for name, row in results.items():
        a = row["all"]
        w = row["worst_clip"]
        rel = "—" if row["recall_vs_base"] is None else f"{row['recall_vs_base']:.2f}"
        lines.append(
            f"| {name} | {row['size'][0]}×{row['size'][1]} | {pct(a['recall_ge12'])} | "
            f"{rel} | "
            f"{pct(a['precision_ge20'])} | {pct(a['label_accuracy'])} | "
            f"{w['clip']} ({pct(w['recall_ge12'])}) | "
            f"{pct(row.get('proposal_recall_ge12'))} | {row['propose_ms']} | {row['total_ms']} | "
            f"{_check_cell(row.get('camera_check'))} |")
    return "\n".join(lines) + "\n"


def _check_cell(check: dict | None) -> str:
    """The camera check's medians on a variant's frames, the flagged properties in bold."""
    if not check:
        return "—"
    fmt = {"clipped": "{:.0%}", "blur": "{:.1f}", "noise": "{:.1f}"}
    cells = []
    for name, f in fmt.items():
        got = check.get(name)
        if not got or got["median"] is None:
            cells.append("—")
            continue
        text = f.format(got["median"])
        cells.append(f"**{text}**" if got["flagged"] else text)
    return " / ".join(cells)


def plot(results: dict, path: Path) -> bool:
    """Recall by variant as a bar chart with the 0.9-of-base line; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    recall = [results[n]["all"]["recall_ge12"] or 0.0 for n in names]
    worst = [results[n]["worst_clip"]["recall_ge12"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(names)), 4.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, recall, 0.4, label="all clips")
    ax.bar(x + 0.2, worst, 0.4, label="worst clip")
    if "base" in results:
        ax.axhline(0.9 * recall[0], color="k", ls="--", lw=1, label="0.9 × base")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("recall, cones ≥ 12 px")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="yolo:DIR", help="labelled frames")
    parser.add_argument("--clips", nargs="+", metavar="RULE",
                        help="BGRacing clips to use: CLIP or CLIP:FIRST-LAST (default: the "
                             "clips configs/train.yaml holds out; every frame of other data)")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="variants or families to run (default: all), e.g. horizon noise")
    parser.add_argument("--config", default="configs/node.yaml", help="node config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. proposer.heatmap_rows=[0.2,1]")
    parser.add_argument("--model", help="classifier (default: the config's model.path)")
    parser.add_argument("--out", required=True, help="folder for variants.md/.json/.png")
    parser.add_argument("--title", default=None, help="table heading")
    parser.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.validate",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("variants", help="the node on camera variants"))
    from export import loco

    loco.add_arguments(sub.add_parser("loco", help="leave-one-clip-out: train without each "
                                      "clip, score on it, calibrate the score threshold"))
    args = parser.parse_args(argv)
    try:
        return loco.run_loco(args) if args.command == "loco" else run_variants(args)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


def run_variants(args: argparse.Namespace) -> int:
    from export.node_run import open_node
    from node.evaluate.datasets import load_samples
    from node.node_config import load_node_config

    if args.data.partition(":")[0] != "yolo":
        raise ValueError(f"--data {args.data}: only yolo:DIR is supported")
    samples = load_samples(args.data)
    named = all(_is_bgracing(s) for s in samples)
    if args.clips and not named:
        raise ValueError(f"--clips: the frames of {args.data} are not named by clip; omit "
                         f"--clips to use them all")
    samples = select_samples(samples, "all" if args.clips or not named else "heldout",
                             args.clips)
    if not samples:
        raise ValueError(f"--data {args.data}: no labelled frames in the chosen clips")
    overrides = list(args.set) + ([f"model.path={args.model}"] if args.model else [])
    config = load_node_config(args.config, overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open_node(config) as (backend, proposer):
        results = validate_variants(samples, config, backend, proposer, args.variants,
                                    not args.no_progress)
    clips = ", ".join(sorted(set(map(clip_of, samples))))
    title = args.title or f"{len(samples)} frames of {clips}; {' '.join(args.set) or 'defaults'}"
    table = format_markdown(results, title)
    (out / "variants.md").write_text(table)
    (out / "variants.json").write_text(json.dumps({"title": title, "variants": results},
                                                  indent=2) + "\n")
    plotted = plot(results, out / "variants.png")
    print(table)
    print(f"wrote {out / 'variants.md'}, {out / 'variants.json'}"
          + (f", {out / 'variants.png'}" if plotted else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
