"""launch/: the ROS 2 launch file, its params YAML, the systemd unit and the Jetson scripts.

ROS 2, systemd and a Jetson are not available here, so these tests check what can be checked
without them: the scripts parse (``bash -n``) and behave on fake inputs (a fake ``python`` that
records the engine builds, sample L4T release files), the launch file compiles and declares
its documented arguments, and the params YAML and unit agree with the node.
"""

from __future__ import annotations

import ast
import configparser
import os
import py_compile
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from node.node_config import REPO_ROOT
from node.ros2.lifecycle import NODE_NAME, PARAMETERS

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ("jetson_setup.sh", "build_engines.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_strict(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(path, os.X_OK), f"{script} is not executable"


def _launch_calls(name: str) -> list[ast.Call]:
    tree = ast.parse((LAUNCH / "cone_node.launch.py").read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def test_launch_file_compiles_and_declares_described_arguments(tmp_path):
    py_compile.compile(str(LAUNCH / "cone_node.launch.py"), cfile=str(tmp_path / "l.pyc"),
                       doraise=True)
    declared = {}
    for call in _launch_calls("DeclareLaunchArgument"):
        name = call.args[0].value
        kwargs = {k.arg: k.value for k in call.keywords}
        description = kwargs["description"]
        default = kwargs["default_value"]  # a literal, or code (the params file's path)
        declared[name] = (getattr(default, "value", None), description.value)
    assert {"config", "model", "camera"} <= set(declared)
    for name, (_default, description) in declared.items():
        assert len(description) > 20, f"launch argument {name} has no real description"
    assert declared["python"][0] == "python3" and declared["config"][0] == ""
    assert "params_file" in declared
    (node,) = _launch_calls("LifecycleNode")
    kwargs = {k.arg: k.value for k in node.keywords}
    assert ast.literal_eval(kwargs["arguments"]) == ["-m", "node.ros2"]
    assert {"parameters", "name", "namespace", "executable"} <= set(kwargs)


def test_launch_overrides_and_params_yaml_match_the_node_parameters():
    tree = ast.parse((LAUNCH / "cone_node.launch.py").read_text())
    assigns = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign)
               for t in n.targets if isinstance(t, ast.Name)}
    overriding = ast.literal_eval(assigns["OVERRIDING_ARGUMENTS"])
    assert ast.literal_eval(assigns["NODE_NAME"]) == NODE_NAME
    names = {name for name, _, _ in PARAMETERS}
    assert set(overriding) == {"config", "model", "camera", "image_topic"}
    assert set(overriding.values()) <= names
    params = yaml.safe_load((LAUNCH / "cone_node.params.yaml").read_text())
    assert list(params) == [NODE_NAME]
    ros_params = params[NODE_NAME]["ros__parameters"]
    # Every parameter is in the YAML, with the node's own default.
    assert ros_params == {name: default for name, default, _ in PARAMETERS}
    assert (REPO_ROOT / ros_params["config_file"]).is_file()


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((LAUNCH / "cone-node.service").read_text())
    return parser


def test_systemd_unit_restarts_on_failure_and_sources_ros():
    unit = _unit()
    assert unit["Unit"]["After"] == "network-online.target"
    service = unit["Service"]
    assert service["Restart"] == "on-failure" and int(service["RestartSec"]) > 0
    assert service["KillSignal"] == "SIGINT" and service["User"] == "@USER@"
    assert service["WorkingDirectory"] == "@REPO_DIR@"
    exec_start = service["ExecStart"]
    assert exec_start.startswith("/bin/bash -c '") and exec_start.endswith("'")
    assert "source /opt/ros/${ROS_DISTRO}/setup.bash" in exec_start
    assert "source .venv/bin/activate" in exec_start
    assert "exec ros2 launch launch/cone_node.launch.py" in exec_start
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # jetson_setup.sh --install-service fills exactly these placeholders.
    rendered = (LAUNCH / "cone-node.service").read_text()
    for token in ("@USER@", "@REPO_DIR@", "@ROS_DISTRO@"):
        assert f"s|{token}|" in (LAUNCH / "jetson_setup.sh").read_text()
        rendered = rendered.replace(token, "x")
    assert not re.search(r"@[A-Z_]+@", rendered)


# ---- build_engines.sh on a fake python ----------------------------------------------------------

def _fake_python(tmp_path, exit_code=0):
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\nexit {exit_code}\n')
    fake.chmod(0o755)
    return fake, log


def test_build_engines_covers_three_precisions_int8_from_the_twin(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a.onnx", "a.int8.onnx", "b.onnx", "cone_proposer.onnx", "cone_refiner.onnx"):
        (models / name).write_bytes(b"onnx")
    fake, log = _fake_python(tmp_path)
    run = subprocess.run([str(LAUNCH / "build_engines.sh"), str(models), "--", "--config",
                          "configs/export.yaml"], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(fake)}, check=False)
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    flags = "--config configs/export.yaml"
    assert calls == [f"-m export.engine {models}/a.onnx --precision fp32 {flags}",
                     f"-m export.engine {models}/a.onnx --precision fp16 {flags}",
                     f"-m export.engine {models}/a.int8.onnx --precision int8 {flags}",
                     f"-m export.engine {models}/b.onnx --precision fp32 {flags}",
                     f"-m export.engine {models}/b.onnx --precision fp16 {flags}"]
    assert "b.int8.onnx not found" in run.stderr
    # The proposer and the refiner run on ONNX Runtime: no engines for them.
    assert "skipping" in run.stderr and "cone_refiner.onnx" in run.stderr


def test_build_engines_stops_with_3_without_tensorrt_and_1_without_models(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.onnx").write_bytes(b"onnx")
    fake, log = _fake_python(tmp_path, exit_code=3)
    env = {**os.environ, "PYTHON": str(fake)}
    run = subprocess.run([str(LAUNCH / "build_engines.sh"), str(models)], capture_output=True,
                         text=True, env=env, check=False)
    assert run.returncode == 3 and len(log.read_text().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run([str(LAUNCH / "build_engines.sh"), str(empty)], capture_output=True,
                         text=True, env=env, check=False)
    assert run.returncode == 1 and "no FP32 .onnx model" in run.stderr


# ---- jetson_setup.sh: L4T -> JetPack ------------------------------------------------------------

def _setup(tmp_path, release: str | None):
    """Run jetson_setup.sh on a sample release file, with a fake python3 that reports 3.8, so
    the script stops at its Python check and never creates a venv or installs anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python3"
    fake.write_text('#!/usr/bin/env bash\ncase "$*" in *">= (3, 10)"*) echo 0 ;; '
                    '*) echo 3.8 ;; esac\n')
    fake.chmod(0o755)
    path = tmp_path / "nv_tegra_release"
    if release is not None:
        path.write_text(release)
    env = {**os.environ, "NV_TEGRA_RELEASE": str(path),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(LAUNCH / "jetson_setup.sh")], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def test_jetson_setup_maps_l4t_to_jetpack_and_refuses_what_cannot_work(tmp_path):
    r35 = _setup(tmp_path, "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref\n")
    assert "L4T R35.4.1: JetPack 5.1.x (TensorRT 8.5" in r35.stdout
    assert r35.returncode == 1 and "python3 is 3.8; the project needs >= 3.10" in r35.stderr
    r36 = _setup(tmp_path, "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    assert "L4T R36.4.3: JetPack 6.x (TensorRT 8.6 on 6.0, 10.3 on 6.1/6.2" in r36.stdout
    r32 = _setup(tmp_path, "# R32 (release), REVISION: 7.4, GCID: 1\n")
    assert r32.returncode == 1 and "L4T R32 (JetPack 4 or older) is not supported" in r32.stderr
    (tmp_path / "none").mkdir()
    absent = _setup(tmp_path / "none", None)
    assert absent.returncode == 1 and "this is not a Jetson (use --force" in absent.stderr


# ---- the ROS package ----------------------------------------------------------------------------

def test_package_xml_is_a_format_3_ament_package_with_the_node_dependencies():
    import xml.etree.ElementTree as ET

    root = ET.parse(REPO_ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "cone_perception_node"
    assert root.find("export").findtext("build_type") == "ament_cmake"
    exec_depends = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "vision_msgs", "diagnostic_msgs", "lifecycle_msgs",
            "std_msgs", "launch_ros"} <= exec_depends
    catkin_pkg = pytest.importorskip("catkin_pkg.package")  # in the ros extra
    package = catkin_pkg.parse_package(str(REPO_ROOT / "package.xml"))
    package.validate()
    assert package.get_build_type() == "ament_cmake"


def test_the_package_installs_the_launch_file_and_an_executable_node():
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    assert "project(cone_perception_node NONE)" in cmake and "ament_package()" in cmake
    assert "install(FILES launch/cone_node.launch.py launch/cone_node.params.yaml" in cmake
    assert "install(PROGRAMS ros/cone_node DESTINATION lib/${PROJECT_NAME})" in cmake
    executable = REPO_ROOT / "ros" / "cone_node"
    assert os.access(executable, os.X_OK)
    assert executable.read_text().startswith("#!/usr/bin/env python3\n")
    assert "from node.ros2.lifecycle import main" in executable.read_text()
