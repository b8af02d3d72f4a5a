"""ROS 2 adapter: the ROS-free pipeline as a lifecycle node (rclpy), as yolo_ros and Isaac ROS do.

The node is thin. ``node.pipeline.Pipeline`` does the perception in a worker thread; this
module feeds it frames and publishes its results with the message mapping of
``node.publish.ros_msgs``, the same mapping the bag publisher uses, so live topics and bags never
disagree:

- ``/perception/cones``: ``vision_msgs/Detection2DArray`` (class name and score per
  hypothesis, header stamp = capture time), reliable, depth 10;
- ``/diagnostics``: ``diagnostic_msgs/DiagnosticArray`` with the frame's latency figures;
- optionally annotated frames as ``sensor_msgs/CompressedImage`` (parameter
  ``annotated_topic``).

Frames come from the node's own camera (``node.sources.open_source``, a capture thread that
keeps the newest frame) or from a ``sensor_msgs/Image`` subscription with sensor-data QoS
(best effort, depth 1), decoded without cv_bridge (``ros_msgs.image_to_bgr``). Either way
only the newest frame waits, and the frames overwritten before the pipeline took them are
counted as dropped.

Parameters: ``config_file`` points at the same ``configs/node.yaml`` as ``python -m node run``;
``model`` and ``camera`` override ``model.path`` and ``source.uri`` when not empty;
``overrides`` takes further ``key.path=value`` items (``--set``). The other parameters are
ROS-only (topics, frame id, latency budget, autostart); see ``PARAMETERS`` and
``launch/cone_node.params.yaml``.

Lifecycle (rclpy >= Humble has ``rclpy.lifecycle``): ``on_configure`` reads the parameters,
validates the config and creates the publishers; ``on_activate`` loads the model (engine) and
starts the camera or the subscription; ``on_deactivate`` stops them and frees the model. Older
rclpy gets a plain node that runs the same callbacks on start-up. With ``autostart`` (the
default) the node configures and activates itself. rclpy, the message packages and cv_bridge
are imported only inside ``build_node_class`` and ``main``: importing this module needs none
of them.

The ROS-free pieces (parameters to config, the subscribed-image source, the topic publisher,
the pipeline thread) live in ``node.ros2.bridge`` and are re-exported here.

Run: ``python -m node.ros2 --ros-args --params-file launch/cone_node.params.yaml``, or
``ros2 launch launch/cone_node.launch.py``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from node.node_config import DEFAULT_CONFIG, NodeConfig, resolve_path
from node.ros2.bridge import (
    IMAGE_TRANSPORTS,
    INPUT_QOS,
    PipelineThread,
    RosNodeError,
    RosTopicPublisher,
    TopicBoxProposer,
    TopicSource,
    check_parameters,
    choose_input,
    config_from_parameters,
    file_publishers,
    guarded_change,
    split_overrides,
    stamp_seconds,
    transport_topic,
)
from node.sources.files import Source

log = logging.getLogger(__name__)

NODE_NAME = "cone_node"

PARAMETERS: tuple[tuple[str, Any, str], ...] = (
    ("config_file", DEFAULT_CONFIG, "node config YAML (configs/node.yaml)"),
    ("model", "", "classifier .onnx or .engine; empty keeps model.path of the config"),
    ("camera", "", ("own camera URI (csi://N, v4l2:///dev/videoN, rtsp://...); empty keeps "
                    "source.uri of the config, and without one the node subscribes to "
                    "image_topic")),
    ("image_topic", "/camera/image_raw", "image input when there is no camera"),
    ("image_transport", "raw", ("raw: sensor_msgs/Image on image_topic; compressed: "
                                "sensor_msgs/CompressedImage on <image_topic>/compressed")),
    ("input_qos", "sensor_data", "QoS of the input subscriptions: " + ", ".join(INPUT_QOS)),
    ("proposals_topic", "", ("vision_msgs/Detection2DArray of LiDAR-projected boxes, used as "
                             "the candidates instead of the proposer; empty: off")),
    ("proposals_tolerance_ms", 50.0, "largest stamp difference between a frame and its boxes"),
    ("detections_topic", "/perception/cones", "vision_msgs/Detection2DArray output"),
    ("diagnostics_topic", "/diagnostics", "diagnostic_msgs/DiagnosticArray output"),
    ("diagnostics_period", 1.0, "seconds between diagnostics messages"),
    ("annotated_topic", "", "sensor_msgs/CompressedImage of annotated frames; empty: off"),
    ("frame_id", "camera", "header.frame_id for the own camera (topics keep the image's)"),
    ("warn_total_ms", 0.0, "end-to-end latency p90 above which diagnostics say WARN; 0: off"),
    ("overrides", "", "node config overrides key.path=value (list, or ';'-separated string)"),
    ("autostart", True, "configure and activate on start-up"),
)
"""ROS parameters: (name, default, description)."""

DETECTIONS_DEPTH = 10
DIAGNOSTICS_DEPTH = 10


# ---- the rclpy node ---------------------------------------------------------------------------

def build_node_class() -> type:
    """The ``ConeNode`` class over this machine's rclpy: a lifecycle node where rclpy has
    ``rclpy.lifecycle`` (Humble and later), else a plain node with the same callbacks.

    Raises:
        ImportError: rclpy or a message package is not importable (source ROS 2 first).
    """
    from diagnostic_msgs.msg import DiagnosticArray
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image
    from vision_msgs.msg import Detection2DArray

    try:
        from rcl_interfaces.msg import SetParametersResult
    except ImportError:  # a stand-in rcl_interfaces
        SetParametersResult = None

    try:
        from rclpy.lifecycle import LifecycleNode as BaseNode
        from rclpy.lifecycle import TransitionCallbackReturn
        lifecycle = True
    except ImportError:  # rclpy before Humble: no managed nodes in Python
        from rclpy.node import Node as BaseNode
        lifecycle = False

        class TransitionCallbackReturn:  # the values the callbacks return, for symmetry
            SUCCESS, FAILURE, ERROR = "success", "failure", "error"

    def input_qos(name: str) -> Any:
        if name == "sensor_data":
            return qos_profile_sensor_data
        from rclpy.qos import ReliabilityPolicy

        policy = ReliabilityPolicy.RELIABLE if name == "reliable" else \
            ReliabilityPolicy.BEST_EFFORT
        return QoSProfile(depth=1, reliability=policy)

    class ConeNode(BaseNode):
        """Cone perception as a ROS 2 node (see ``node.ros2.lifecycle``)."""

        is_lifecycle = lifecycle
        Return = TransitionCallbackReturn

        def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
            super().__init__(node_name, **kwargs)
            for name, default, description in PARAMETERS:
                descriptor = ParameterDescriptor(description=description)
                if name == "overrides" and hasattr(descriptor, "dynamic_typing"):
                    descriptor.dynamic_typing = True  # a string or a list of strings
                self.declare_parameter(name, default, descriptor)
            self.config: NodeConfig | None = None
            self.fatal_error: str | None = None
            self.active = False
            self.finalized = False
            self._outputs: dict[str, Any] = {}
            self._proposer: Any = None
            self._backend: Any = None
            self._source: Source | None = None
            self._input_subscriptions: list[Any] = []
            self._runner: PipelineThread | None = None
            self._topics: RosTopicPublisher | None = None
            self._diagnostics_timer: Any = None
            if hasattr(self, "add_on_set_parameters_callback"):
                self.add_on_set_parameters_callback(self._on_set_parameters)

        # -- helpers ---------------------------------------------------------------------
        def parameters(self) -> dict[str, Any]:
            return {name: self.get_parameter(name).value for name, _, _ in PARAMETERS}

        def _fail(self, stage: str, exc: BaseException) -> Any:
            lines = str(exc).strip().splitlines()
            self.get_logger().error(f"{stage} failed: {lines[0] if lines else type(exc).__name__}")
            return self.Return.FAILURE

        def _create_publisher(self, msg_type: type, topic: str, qos: Any) -> Any:
            create = getattr(self, "create_lifecycle_publisher", None) or self.create_publisher
            return create(msg_type, topic, qos)

        def _on_set_parameters(self, changes: list) -> Any:
            """Refuse bad values always, and changes to files, bind addresses, ports and
            cameras while active (a DDS peer may set parameters)."""
            current = self.parameters()
            proposed = {**current, **{p.name: p.value for p in changes}}
            reason = None
            for p in changes:
                if self.active:
                    reason = guarded_change(p.name, current.get(p.name), p.value)
                if reason:
                    break
            if reason is None:
                try:
                    check_parameters({p.name: proposed[p.name] for p in changes
                                      if p.name in proposed})
                except RosNodeError as exc:
                    reason = str(exc)
            if reason:
                self.get_logger().warning(f"refused: {reason}")
            if SetParametersResult is None:
                return reason is None
            return SetParametersResult(successful=reason is None, reason=reason or "")

        # -- lifecycle -------------------------------------------------------------------
        def on_configure(self, state: Any) -> Any:
            params = self.parameters()
            try:
                check_parameters(params)
                self.config = config_from_parameters(params)
                self._input = choose_input(self.config, str(params["image_topic"]))
                if str(params["proposals_topic"]).strip():
                    self._proposer = TopicBoxProposer(
                        self.config.proposer.max_candidates,
                        float(params["proposals_tolerance_ms"]) / 1e3)
                else:
                    from node.propose import build_proposer

                    self._proposer = build_proposer(self.config.proposer)
            except Exception as exc:  # noqa: BLE001 (rclpy would turn it into a silent ERROR)
                self.config = None
                return self._fail("configure", exc)
            reliable = QoSProfile(depth=DETECTIONS_DEPTH)
            self._outputs = {
                "detections": (self._create_publisher(
                    Detection2DArray, params["detections_topic"], reliable), Detection2DArray),
                "diagnostics": (self._create_publisher(
                    DiagnosticArray, params["diagnostics_topic"],
                    QoSProfile(depth=DIAGNOSTICS_DEPTH)), DiagnosticArray),
            }
            if str(params["annotated_topic"]).strip():
                self._outputs["annotated"] = (self._create_publisher(
                    CompressedImage, params["annotated_topic"], qos_profile_sensor_data),
                    CompressedImage)
            kind, name = self._input
            if kind == "topic":
                name = transport_topic(name, str(params["image_transport"]))
                self._input = (kind, name)
            self.get_logger().info(
                f"configured: model {self.config.model.path}, input {kind} {name}, "
                f"publishing {params['detections_topic']}")
            return self.Return.SUCCESS

        def on_activate(self, state: Any) -> Any:
            from node.infer import load_backend
            from node.pipeline import Pipeline

            if self.config is None:
                self.get_logger().error("activate failed: the node is not configured")
                return self.Return.FAILURE
            params = self.parameters()
            config = self.config
            try:
                self._backend = load_backend(resolve_path(config.model.path),
                                             providers=config.model.providers,
                                             threads=config.model.threads,
                                             max_batch=config.model.max_batch)
                self._backend.activate()
                kind, name = self._input
                default_id = str(params["frame_id"])
                qos = input_qos(str(params["input_qos"]))
                if kind == "camera":
                    from node.sources import open_source

                    self._source = open_source(name, live=True,
                                               **config.source.camera_options())
                    frame_id: Any = default_id
                    stamp = None
                else:
                    topic_source = TopicSource(name)
                    self._source = topic_source
                    msg_type = CompressedImage if params["image_transport"] == "compressed" \
                        else Image
                    self._input_subscriptions.append(self.create_subscription(
                        msg_type, name, topic_source.put_message, qos))

                    def frame_id(result: Any) -> str:
                        return topic_source.frame_id_of(result.frame.index, default_id)

                    def stamp(result: Any) -> dict | None:
                        return topic_source.stamp_of(result.frame.index)
                if isinstance(self._proposer, TopicBoxProposer):
                    self._input_subscriptions.append(self.create_subscription(
                        Detection2DArray, str(params["proposals_topic"]).strip(),
                        self._proposer.put_message, qos))
                warn = float(params["warn_total_ms"]) or None
                self._topics = RosTopicPublisher(self._outputs["detections"],
                                                 self._outputs["diagnostics"],
                                                 self._outputs.get("annotated"),
                                                 frame_id=frame_id, warn_total_ms=warn,
                                                 health=self._health, stamp=stamp,
                                                 warning=self._camera_warning)
                pipeline = Pipeline(config, self._backend, self._proposer,
                                    [self._topics, *file_publishers(config)])
            except Exception as exc:  # noqa: BLE001 (rclpy would turn it into a silent ERROR)
                self._release()
                return self._fail("activate", exc)
            period = float(params["diagnostics_period"])
            self._diagnostics_timer = self.create_timer(period, lambda: self._publish_diagnostics(period))
            self._runner = PipelineThread(pipeline, self._source, self._pipeline_ended).start()
            self.active = True
            self.get_logger().info(f"active: {self._backend!r} on {self._input[1]}")
            if pipeline.exposure_warning:
                self.get_logger().warning(pipeline.exposure_warning)
            return super().on_activate(state) if self.is_lifecycle else self.Return.SUCCESS

        def on_deactivate(self, state: Any) -> Any:
            summary = self._release()
            if summary:
                self.get_logger().info(f"deactivated after {summary.get('frames', 0)} frames, "
                                       f"{summary.get('dropped', 0)} dropped")
            return super().on_deactivate(state) if self.is_lifecycle else self.Return.SUCCESS

        def on_cleanup(self, state: Any) -> Any:
            self._release()
            self._unconfigure()
            return self.Return.SUCCESS

        def on_shutdown(self, state: Any) -> Any:
            self._release()
            self._unconfigure()
            self.finalized = True
            return self.Return.SUCCESS

        # -- run and release -------------------------------------------------------------
        def _health(self) -> dict:
            health = dict(self._source.health) if self._source is not None else {}
            health.pop("state", None)
            if isinstance(self._proposer, TopicBoxProposer):
                health.update(self._proposer.health)
            watch = self._camera_watch()
            if watch is not None:
                health.update(watch.diagnostic_values())
            return health

        def _camera_watch(self) -> Any:
            """The running pipeline's camera watch (``CameraWatch``), or None."""
            return getattr(getattr(self._runner, "pipeline", None), "camera_watch", None)

        def _camera_warning(self) -> str | None:
            watch = self._camera_watch()
            return watch.warning() if watch is not None else None

        def _publish_diagnostics(self, period: float) -> None:
            topics = self._topics
            if topics is not None:
                now = self.get_clock().now().nanoseconds * 1e-9
                topics.publish_diagnostics(now, stale_after_s=max(2.0, 2 * period))

        def _pipeline_ended(self, summary: dict | None, error: str | None) -> None:
            if error:  # e.g. the camera is gone for good: exit, let systemd restart us
                self.fatal_error = error
                self.get_logger().error(f"pipeline stopped: {error}")

        def _release(self) -> dict | None:
            self.active = False
            summary = None
            if self._diagnostics_timer is not None:
                self.destroy_timer(self._diagnostics_timer)
                self._diagnostics_timer = None
            if self._runner is not None:
                summary = self._runner.stop()
                self._runner = None
            for subscription in self._input_subscriptions:
                self.destroy_subscription(subscription)
            self._input_subscriptions = []
            if self._source is not None:
                self._source.close()
                self._source = None
            if self._backend is not None:
                self._backend.deactivate()
                self._backend = None
            self._topics = None
            return summary

        def _unconfigure(self) -> None:
            for publisher, _ in self._outputs.values():
                destroy = getattr(self, "destroy_lifecycle_publisher", None) or \
                    self.destroy_publisher
                destroy(publisher)
            self._outputs = {}
            if self._proposer is not None:
                self._proposer.close()
            self._proposer, self.config = None, None

    return ConeNode


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the launch file: ``python -m node.ros2 [--ros-args ...]``.

    Returns 0 on a clean shutdown (Ctrl-C, SIGTERM, or the lifecycle's shutdown transition),
    1 when the node failed (so systemd restarts it), 3 when rclpy is not importable.
    """
    try:
        import rclpy
        from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
        node_class = build_node_class()
    except ImportError as exc:
        print(f"ros2: cannot import ROS 2 ({exc.name or exc}); source "
              f"/opt/ros/<distro>/setup.bash and install ros-<distro>-vision-msgs, or "
              f"run make install-ros", file=sys.stderr)
        return 3
    rclpy.init(args=list(sys.argv if argv is None else argv))
    node = node_class()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    code = 0
    try:
        if node.get_parameter("autostart").value and not _autostart(node):
            code = 1
        while code == 0 and rclpy.ok() and node.fatal_error is None and not node.finalized:
            executor.spin_once(timeout_sec=0.5)
        if node.fatal_error is not None:
            code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if not node.finalized:
            _shutdown(node)
        executor.remove_node(node)
        node.destroy_node()
        rclpy.try_shutdown()
    return code


def _autostart(node: Any) -> bool:
    """Configure and activate; ``False`` (already logged) when a transition fails."""
    if node.is_lifecycle:
        steps = (node.trigger_configure, node.trigger_activate)
    else:
        steps = (lambda: node.on_configure(None), lambda: node.on_activate(None))
    return all(step() == node.Return.SUCCESS for step in steps)


def _shutdown(node: Any) -> None:
    """The shutdown transition where the state machine allows it, else the callback alone."""
    trigger = getattr(node, "trigger_shutdown", None)
    if trigger is not None:
        try:
            trigger()
        except Exception as exc:  # noqa: BLE001 (not allowed from this state: release directly)
            log.debug("shutdown transition refused (%s); releasing directly", exc)
    if not node.finalized:
        node.on_shutdown(None)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())


__all__ = ["IMAGE_TRANSPORTS", "NODE_NAME", "PARAMETERS", "PipelineThread", "RosNodeError",
           "RosTopicPublisher", "TopicBoxProposer", "TopicSource", "build_node_class",
           "choose_input", "config_from_parameters", "main", "split_overrides",
           "stamp_seconds"]
