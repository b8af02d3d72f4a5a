"""The ``python -m node`` commands that run the pipeline: ``replay``, ``run`` and ``demo``.

Each command module defines ``add_arguments(parser)`` and ``main(args) -> int``;
``node.__main__.COMMANDS`` registers it. ``node.cli.common`` builds the pipeline, its
publishers and its source from the config and the command line.
"""
