"""Outputs of the node: where a frame's result goes.

- ``node.publish.publishers``: JSONL, annotated video, ZeroMQ, ROS 2 bag, and the fan-out;
- ``node.publish.annotate``: drawing boxes and labels on a frame;
- ``node.publish.ros_msgs``: ROS message mapping and image decoding without ROS installed;
- ``node.publish.metrics``: per-stage latency statistics and the Prometheus exporter.
"""
