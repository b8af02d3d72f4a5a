"""ROS 2: the node as a thin lifecycle node over the ROS-free pipeline.

- ``node.ros2.lifecycle``: the rclpy node (parameters, QoS, lifecycle callbacks), imported
  lazily so that ``import node.ros2`` works without ROS;
- ``node.ros2.bridge``: the ROS-free half (parameters to config, topic source, topic
  publisher, pipeline thread), tested without ROS.

Run it with ``python -m node.ros2`` (what ``launch/cone_node.launch.py`` starts).
"""
