"""Build the vision_msgs Python messages for rclpy into this virtual environment.

vision_msgs is not in the Python package registry, unlike rclpy and the other ROS 2 Jazzy
message packages. This script builds the real package with the rosidl generators of those
Python packages (``make install-ros`` installs them and runs it):

1. the ``.msg`` files are written into the build folder from
   ``node.publish.ros_msgs.VISION_MSGS_DEFINITIONS`` (the definitions the bag writer uses);
2. ``ros/vision_msgs/CMakeLists.txt`` (``rosidl_generate_interfaces``) and ``package.xml`` are
   configured, built and installed with CMake into the environment's prefix, where the ROS 2
   Python packages keep their own libraries (``lib``, ``share``, ``site-packages``);
3. a fresh interpreter checks that ``vision_msgs.msg.Detection2DArray`` has its type support.

Usage: ``python ros/build_vision_msgs.py [--build-dir build/ros/vision_msgs] [--prefix PREFIX]``.
It needs a C and C++ compiler, CMake >= 3.21 and the Python headers. Exit status 0 on
success, 1 with a one-line error (and the log file's name) otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEMPLATE = HERE / "vision_msgs"
CHECK = ("from vision_msgs.msg import Detection2DArray\n"
         "from rclpy.type_support import check_for_type_support\n"
         "check_for_type_support(Detection2DArray)\n"
         "print(len(Detection2DArray.get_fields_and_field_types()))\n")


class BuildError(RuntimeError):
    """A step failed; the message is one line."""


def write_sources(src: Path) -> list[str]:
    """CMakeLists.txt, package.xml and msg/*.msg in ``src``; returns the message names."""
    sys.path.insert(0, str(REPO))
    from node.publish.ros_msgs import VISION_MSGS_DEFINITIONS

    if src.exists():
        shutil.rmtree(src)
    (src / "msg").mkdir(parents=True)
    for name in ("CMakeLists.txt", "package.xml"):
        shutil.copy2(TEMPLATE / name, src / name)
    names = []
    for msgtype, text in sorted(VISION_MSGS_DEFINITIONS.items()):
        package, kind, name = msgtype.split("/")
        if (package, kind) != ("vision_msgs", "msg"):
            raise BuildError(f"{msgtype}: not a vision_msgs message")
        (src / "msg" / f"{name}.msg").write_text(text)
        names.append(name)
    return names


def _run(cmd: list[str], log: Path, env: dict, what: str) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise BuildError(f"{what} failed (exit {done.returncode}); see {log}")


def build(build_dir: Path, prefix: Path, jobs: int) -> None:
    """Generate, build and install vision_msgs into ``prefix``."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError("cmake not found: install CMake >= 3.21 (e.g. pip install cmake)")
    for compiler in ("cc", "c++"):
        if shutil.which(compiler) is None and not os.environ.get(compiler.upper()):
            raise BuildError(f"no {compiler} compiler found: install gcc and g++")
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.is_file():
        raise BuildError(f"{include} not found: install the Python development headers")
    if not (prefix / "share" / "rosidl_default_generators").is_dir():
        raise BuildError(f"{prefix}: no rosidl_default_generators; install the ros extra first "
                         f"(pip install -e '.[ros]')")
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    log.write_text("")
    src, work = build_dir / "src", build_dir / "build"
    names = write_sources(src)
    if work.exists():
        shutil.rmtree(work)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("AMENT_PREFIX_PATH", str(prefix))
    configure = [cmake, "-S", str(src), "-B", str(work), f"-DCMAKE_PREFIX_PATH={prefix}",
                 f"-DCMAKE_INSTALL_PREFIX={prefix}", f"-DPython3_EXECUTABLE={sys.executable}",
                 "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_TESTING=OFF"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    print(f"vision_msgs: {len(names)} messages; building in {build_dir} (log: {log})",
          flush=True)
    _run(configure, log, env, "cmake configure")
    _run([cmake, "--build", str(work), "--parallel", str(jobs)], log, env, "cmake build")
    _run([cmake, "--install", str(work)], log, env, "cmake install")
    # A fresh interpreter, so that the environment's start-up hooks (library path) apply.
    check_env = {k: v for k, v in os.environ.items() if k != "_ROS_WHEELS_BOOTSTRAP_COMPLETE"}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                          env=check_env, cwd=str(build_dir), check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise BuildError(f"vision_msgs was installed but does not import: "
                         f"{lines[-1] if lines else done.returncode}")
    print(f"vision_msgs: installed into {prefix}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, default=REPO / "build" / "ros" / "vision_msgs",
                        help="where the sources and the CMake build go (default: %(default)s)")
    parser.add_argument("--prefix", type=Path, default=Path(sys.prefix),
                        help="install prefix: the environment holding rclpy (default: this "
                             "interpreter's, %(default)s)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel build jobs (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        build(args.build_dir.resolve(), args.prefix.resolve(), max(1, args.jobs))
    except BuildError as exc:
        print(f"build_vision_msgs: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
