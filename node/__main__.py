"""``python -m node COMMAND ...`` (or the ``cone-node`` console script): the node's command line.

Each command lives in its own module (``node/cli/<name>.py``, ``node/bench/...``) that defines
``add_arguments(parser)`` and ``main(args) -> int``; registering a command is one line in
``COMMANDS``. Only the chosen command's module is imported, so a command's heavy
dependencies never slow down or break another.

Expected failures (a missing file, a bad config value, a wrong model) print one line
``error: ...`` on stderr and exit non-zero: 2 for usage and config errors, 1 otherwise. Set
``NODE_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

COMMANDS: dict[str, tuple[str, str]] = {
    "replay": ("node.cli.replay", "replay a video, image folder, glob or ROS 2 bag"),
    "run": ("node.cli.run", "run on a live camera (csi://N, v4l2:///dev/videoN, rtsp://...)"),
    "demo": ("node.cli.demo", "render a synthetic clip, run the node on it and score it"),
    "reindex": ("node.cli.reindex", ("make a bag interrupted by a crash or kill -9 readable "
                                     "(like ros2 bag reindex)")),
    "bench": ("node.bench.command", "benchmark FPS, latency and accuracy per model (+ a peer detector)"),
    "evaluate": ("node.evaluate.score", "score a replay's cones (or bare proposals) against YOLO labels"),
    "check": ("node.cli.check", ("how a camera's frames look to the node against what it was "
                                 "validated on (blur, burnt out, noise, exposure)")),
    "selfcheck": ("node.bench.selfcheck", ("on the Jetson: build TensorRT engines, compare them with "
                                    "ONNX Runtime, time them")),
}
"""Command name → (module, one-line help)."""

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing a usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported for its arguments."""
    prog = "cone-node" if Path(sys.argv[0]).name == "cone-node" else "python -m node"
    parser = _Parser(prog=prog,
                     description="Cone perception node: proposals, crop classifier, publishers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_command_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args._command_main(args) or 0)
    except Exception as exc:
        if os.environ.get("NODE_DEBUG"):
            raise
        code, message = classify_error(exc)
        print(f"error: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def classify_error(exc: BaseException) -> tuple[int, str]:
    """Exit code and one-line message for an exception that reached the command line."""
    from node.config import ConfigError

    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if isinstance(exc, (UsageError, ConfigError)):
        return EXIT_USAGE, text
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return EXIT_FAILURE, f"{exc.filename}: {exc.strerror or 'not found'}"
    if isinstance(exc, (ValueError, OSError)):  # the project's errors are ValueErrors
        return EXIT_FAILURE, text
    return EXIT_FAILURE, (f"{type(exc).__name__}: {text} (unexpected; rerun with NODE_DEBUG=1 " \
                         f"for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
