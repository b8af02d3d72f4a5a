"""``python -m node.ros2 [--ros-args ...]``: run the ROS 2 node (see ``node.ros2.lifecycle``)."""

from __future__ import annotations

import logging
import sys

from node.ros2.lifecycle import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
