"""``python -m node check SOURCE``: how a camera's frames look to the node, against what the node
was validated on (``node.sources.frame_check``). No model is loaded.

Reads up to ``--frames`` frames spread over a recording (every ``--every``-th; by default
spaced to cover the whole of a file), or the first ones of a live camera, and prints one row
per property: its median and worst tenth over the frames, the share of frames beyond the
line the validation drew, and what to do where a property is flagged. The exit code is 0
whatever the verdict (1 when no frame could be read); ``--json`` writes the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from node.cli.common import CliError
from node.node_config import DEFAULT_CONFIG, load_node_config

DEFAULT_FRAMES = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="video file, image folder, glob (quote it), ROS 2 bag or camera URI")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, metavar="N",
                        help=f"frames to check (default {DEFAULT_FRAMES})")
    parser.add_argument("--every", type=int, default=None, metavar="K",
                        help="check every K-th frame (default: spread --frames over a "
                             "recording; 1 for a camera)")
    parser.add_argument("--config", metavar="PATH", default=DEFAULT_CONFIG,
                        help=f"node config YAML (default: {DEFAULT_CONFIG})")
    parser.add_argument("--set", metavar="KEY.PATH=VALUE", action="append", default=[],
                        dest="overrides", help="override a config value (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def main(args: argparse.Namespace) -> int:
    from node.sources import open_source
    from node.sources.exposure import Exposure
    from node.sources.frame_check import look_at, summarise

    if args.frames < 1:
        raise CliError(f"--frames {args.frames}: expected at least 1")
    if args.every is not None and args.every < 1:
        raise CliError(f"--every {args.every}: expected at least 1")
    config = load_node_config(args.config, args.overrides)
    stage = Exposure(config.exposure)
    looks = []
    with open_source(args.source, live=False) as source:
        every = args.every or _spread(source, args.frames)
        for i, frame in enumerate(source):
            if i % every or frame.image is None:
                continue
            looks.append(look_at(frame.image, config, stage))
            if len(looks) >= args.frames:
                break
    if not looks:
        print(f"error: {args.source}: no frame could be read", flush=True)
        return 1
    report = summarise(looks, config)
    print(format_report(report, args.source, every), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _spread(source, frames: int) -> int:
    """The stride that spreads ``frames`` over a source of known length (1 otherwise)."""
    try:
        total = len(source)
    except TypeError:
        return 1
    return max(1, total // frames)


UNITS = {"clipped": ("burnt-out pixels", "{:.0%}"), "blur": ("blur (px)", "{:.1f}"),
         "noise": ("noise sigma (grey levels)", "{:.1f}"),
         "white balance": ("white balance: largest channel gain", "{:+.0%}"),
         "brightening": ("brightening (gain)", "x{:.2f}"),
         "veil": ("veil: dark end above max_black", "{:.0f}"),
         "colour": ("colour: saturation gain", "x{:.2f}")}
"""Row title and number format of each verdict."""


def format_report(report, source: str, every: int) -> str:
    """The report as a Markdown table and the advice under it."""
    sizes = ", ".join(f"{w}x{h} (proposer sees {vw}x{vh})" for w, h, vw, vh in report.sizes)
    return "\n".join([f"### {source}: {report.frames} frames checked (every {every}), {sizes}",
                      "", *table_lines(report)])


def table_lines(report) -> list[str]:
    """One table row per property of a ``CheckReport``, then one line per flagged one (also
    the camera section of ``python -m export finetune``'s report)."""
    lines = ["| property | median | worst tenth | frames beyond the line | verdict |",
             "|---|---:|---:|---:|---|"]
    for v in report.verdicts:
        title, fmt = UNITS[v.name]
        median, worst = (("-" if x is None else fmt.format(x)) for x in (v.median, v.worst))
        lines.append(f"| {title} | {median} | {worst} | "
                     f"{v.beyond:.0%} | {'**check**' if v.flagged else 'ok'} |")
    lines.append("")
    if not report.flagged:
        lines.append("Nothing beyond what the node was validated on (docs/validation.md, "
                     "\"Camera check\").")
    for v in report.flagged:
        lines.append(f"- {UNITS[v.name][0]}: {v.note}. {v.advice.capitalize()}.")
    return lines
