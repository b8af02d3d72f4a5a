"""``python -m node replay SOURCE``: run the node over a recording (docs/design.md contract).

SOURCE is a video file, an image folder (natural sort), a glob or a ROS 2 bag. Every input
frame gets exactly one JSONL record, in input order; a progress bar runs on stderr and the
summary is printed at the end (``--summary FILE`` writes it as JSON).
"""

from __future__ import annotations

import argparse

from node.cli.common import add_node_arguments, run_node


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="video file, image folder, glob (quote it) or ROS 2 bag")
    add_node_arguments(parser, replay=True)


def main(args: argparse.Namespace) -> int:
    return run_node(args, args.source, live=False)
