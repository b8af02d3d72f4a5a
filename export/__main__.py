"""``python -m export COMMAND [ARGS]``: the training side's commands under one name.

Each command is also its own module (``python -m export.finetune``, ``python -m export.train``,
...); this dispatcher imports only the one asked for.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "finetune": ("export.finetune", "fine-tune the bundled networks on a team's YOLO folder"),
    "pseudo_check": ("export.pseudo_check", "score pseudo-labels against hand labels"),
    "validate": ("export.validate", "the whole node on camera variants of labelled frames"),
    "evaluate": ("export.evaluate", "score a classifier on the true boxes of labelled frames"),
    "train": ("export.train", "train the classifier"),
    "proposer_train": ("export.proposer_train", "train the heatmap proposer"),
    "refiner_train": ("export.refiner_train", "train the box refiner"),
    "data": ("export.data", "build the classifier's crop cache"),
    "onnx": ("export.onnx", "export a classifier checkpoint to ONNX"),
    "engine": ("export.engine", "build TensorRT engines"),
    "synth": ("export.synth", "render synthetic labelled scenes"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: python -m export COMMAND [ARGS]\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0].replace("-", "_")
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
