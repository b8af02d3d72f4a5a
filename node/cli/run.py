"""``python -m node run [URI]``: the node on a live camera.

URI is ``csi://N``, ``v4l2:///dev/videoN`` or ``rtsp://...`` (default: ``source.uri`` of the
config). Live sources keep only the newest frame and count what they drop; lost cameras are
reopened with backoff (``source.reconnect_*``). Rolling latency percentiles and FPS are printed
every ``metrics.print_interval_s`` seconds; SIGINT/SIGTERM stop the node gracefully.
"""

from __future__ import annotations

import argparse

from node.cli.common import CliError, add_node_arguments, config_from_args, run_node


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", metavar="URI", nargs="?",
                        help="camera URI (default: source.uri from the config)")
    add_node_arguments(parser, replay=False)


def main(args: argparse.Namespace) -> int:
    uri = args.uri or config_from_args(args).source.uri
    if not uri:
        raise CliError("no camera URI: pass one (e.g. csi://0) or set source.uri in the config")
    return run_node(args, uri, live=True)
