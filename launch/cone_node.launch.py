"""ROS 2 launch file of the cone perception node (``node/ros2/lifecycle.py``).

Starts one lifecycle node, ``cone_node``, that configures and activates itself (parameter
``autostart``), with one params YAML (default ``launch/cone_node.params.yaml``). The launch
arguments ``config``, ``model``, ``camera`` and ``image_topic`` override the parameters of the
same meaning when they are given, and leave the YAML's values alone when they are not.

    ros2 launch launch/cone_node.launch.py
    ros2 launch launch/cone_node.launch.py camera:=csi://0 model:=models/cone_classifier.int8.engine
    ros2 launch launch/cone_node.launch.py image_topic:=/zed/left/image_rect_color
    ros2 launch cone_perception_node cone_node.launch.py    # after colcon build (package.xml)

The node runs as ``<python> -m node.ros2``; ``python`` must be an interpreter that has the
project installed with pip (the venv made by ``launch/jetson_setup.sh`` or ``make
install-ros``, active in the systemd unit). Installed by colcon, this file and its params YAML
lie in the package's ``share/cone_perception_node/launch``.
"""

from __future__ import annotations

from pathlib import Path

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

HERE = Path(__file__).resolve().parent
DEFAULT_PARAMS = HERE / "cone_node.params.yaml"
NODE_NAME = "cone_node"

# Launch argument -> ROS parameter it overrides when not empty.
OVERRIDING_ARGUMENTS = {
    "config": "config_file",
    "model": "model",
    "camera": "camera",
    "image_topic": "image_topic",
}


def _cone_node(context, *_args, **_kwargs):
    """The node action, with only the launch arguments that were actually given."""
    overrides = {}
    for argument, parameter in OVERRIDING_ARGUMENTS.items():
        value = LaunchConfiguration(argument).perform(context).strip()
        if value:
            overrides[parameter] = value
    parameters = [LaunchConfiguration("params_file").perform(context)]
    if overrides:
        parameters.append(overrides)
    return [LifecycleNode(
        executable=LaunchConfiguration("python").perform(context),
        arguments=["-m", "node.ros2"],
        name=NODE_NAME,
        namespace=LaunchConfiguration("namespace").perform(context),
        parameters=parameters,
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument(
            "config", default_value="",
            description="Node config YAML (model, proposer, thresholds, camera options); "
                        "empty: config_file of the params YAML (configs/node.yaml)"),
        DeclareLaunchArgument(
            "model", default_value="",
            description="Classifier .onnx (FP32 or INT8 Q/DQ) or TensorRT .engine; empty: "
                        "model.path of the node config (the bundled ONNX)"),
        DeclareLaunchArgument(
            "camera", default_value="",
            description="Own camera URI: csi://N, v4l2:///dev/videoN or rtsp://...; empty: "
                        "source.uri of the node config, else subscribe to image_topic"),
        DeclareLaunchArgument(
            "image_topic", default_value="",
            description="sensor_msgs/Image topic used when the node has no camera of its "
                        "own; empty: image_topic of the params YAML (/camera/image_raw)"),
        DeclareLaunchArgument(
            "params_file", default_value=str(DEFAULT_PARAMS),
            description="The node's ROS parameters (one YAML, cone_node: ros__parameters:)"),
        DeclareLaunchArgument(
            "python", default_value="python3",
            description="Python interpreter that has the project installed (the venv of "
                        "launch/jetson_setup.sh)"),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="ROS namespace of the node (empty: global)"),
        OpaqueFunction(function=_cone_node),
    ])
