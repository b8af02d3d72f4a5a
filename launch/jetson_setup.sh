#!/usr/bin/env bash
# Set up the cone perception node on a Jetson, from a fresh JetPack install.
#
# What it does (every step says what it checks and how to fix a failure):
#   1. reads the L4T release from /etc/nv_tegra_release and maps it to JetPack;
#   2. checks the system Python (>= 3.10), JetPack's TensorRT Python bindings, the CUDA
#      toolkit (nvcc, needed to build pycuda) and the system OpenCV (it has GStreamer);
#   3. makes a venv with --system-site-packages, so that JetPack's tensorrt and cv2 (and ROS 2's
#      rclpy once its setup.bash is sourced) stay visible inside it;
#   4. installs the project with its runtime dependencies and pycuda into the venv, then
#      removes the pip OpenCV wheel again (see below);
#   5. checks ROS 2 (rclpy, vision_msgs, diagnostic_msgs) under /opt/ros/<distro>;
#   6. optionally installs the systemd unit and sets the maximum power mode and clocks.
#
# Why the pip OpenCV wheel is removed: pyproject.toml depends on opencv-python-headless, whose wheel is
# built without GStreamer, so csi:// cameras (nvarguscamerasrc) and the low-latency rtsp://
# pipeline cannot open with it. JetPack's OpenCV has GStreamer. Installed into the venv, the
# wheel would shadow it; after `pip uninstall opencv-python-headless` the venv sees the system cv2.
# numpy stays below 2 because JetPack's cv2 is compiled against numpy 1.x.
#
# Usage: launch/jetson_setup.sh [--venv DIR] [--ros-distro NAME] [--install-service]
#                               [--max-perf] [--force]
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --venv DIR          virtual environment to create or reuse (default: .venv in the checkout)
  --ros-distro NAME   ROS 2 distribution under /opt/ros (default: the one found there)
  --install-service   install and enable launch/cone-node.service for the current user
  --max-perf          set the maximum power mode (nvpmodel -m 0) and lock clocks (jetson_clocks)
  --force             continue on a machine without /etc/nv_tegra_release (not a Jetson)
EOF
}

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The L4T release file; overridable only so that tests can feed sample releases.
TEGRA_RELEASE="${NV_TEGRA_RELEASE:-/etc/nv_tegra_release}"
VENV="$REPO_DIR/.venv"
ROS_DISTRO_NAME=""
INSTALL_SERVICE=0
MAX_PERF=0
FORCE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --venv) VENV="$(realpath -m "$2")"; shift 2 ;;
        --ros-distro) ROS_DISTRO_NAME="$2"; shift 2 ;;
        --install-service) INSTALL_SERVICE=1; shift ;;
        --max-perf) MAX_PERF=1; shift ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "jetson_setup: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '\n== %s\n' "$*"; }
die() { printf 'jetson_setup: %s\n' "$*" >&2; exit 1; }

cd "$REPO_DIR"

# ---- 1. JetPack / L4T -------------------------------------------------------------------
say "JetPack"
if [[ -r "$TEGRA_RELEASE" ]]; then
    # First line looks like: "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, ..."
    L4T_LINE="$(head -n 1 "$TEGRA_RELEASE")"
    L4T_MAJOR="$(sed -n 's/^# R\([0-9]\+\) (release).*/\1/p' <<<"$L4T_LINE")"
    L4T_REVISION="$(sed -n 's/.*REVISION: \([0-9.]\+\).*/\1/p' <<<"$L4T_LINE")"
    [[ -n "$L4T_MAJOR" ]] || die "cannot parse $TEGRA_RELEASE: $L4T_LINE"
    case "$L4T_MAJOR" in
        32) JETPACK="4.x (TensorRT 8.2 or older)" ;;
        35) JETPACK="5.1.x (TensorRT 8.5, Ubuntu 20.04, Python 3.8)" ;;
        36) JETPACK="6.x (TensorRT 8.6 on 6.0, 10.3 on 6.1/6.2; Ubuntu 22.04, Python 3.10)" ;;
        38) JETPACK="7.x (TensorRT 10.x; Ubuntu 24.04, Python 3.12)" ;;
        *) JETPACK="unknown to this script" ;;
    esac
    echo "L4T R${L4T_MAJOR}.${L4T_REVISION}: JetPack ${JETPACK}"
    if [[ "$L4T_MAJOR" -lt 35 ]]; then
        die "L4T R${L4T_MAJOR} (JetPack 4 or older) is not supported: its TensorRT lacks the tensor-name API (needs TensorRT >= 8.5)"
    fi
elif [[ "$FORCE" -eq 1 ]]; then
    echo "no /etc/nv_tegra_release: not a Jetson; continuing (--force)"
else
    die "$TEGRA_RELEASE not found: this is not a Jetson (use --force to set up anyway)"
fi

# ---- 2. system Python, TensorRT, CUDA, OpenCV ---------------------------------------------
say "System Python, TensorRT, CUDA and OpenCV"
PY_OK="$(python3 -c 'import sys; print(int(sys.version_info >= (3, 10)))')"
PY_VERSION="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$PY_OK" != 1 ]]; then
    die "python3 is $PY_VERSION; the project needs >= 3.10. JetPack 5 ships 3.8 and TensorRT bindings for 3.8 only: use JetPack 6, or build TensorRT's Python bindings for a newer Python yourself (see launch/README.md)"
fi
echo "python3 $PY_VERSION"
if TRT_VERSION="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null)"; then
    echo "TensorRT $TRT_VERSION (JetPack's python3-libnvinfer)"
else
    die "python3 cannot import tensorrt: sudo apt install nvidia-jetpack (or python3-libnvinfer python3-libnvinfer-dev)"
fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
if command -v nvcc >/dev/null; then
    echo "CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]\+\).*/\1/p') at $CUDA_HOME"
else
    die "nvcc not found under $CUDA_HOME/bin (pycuda is compiled against the CUDA toolkit): sudo apt install nvidia-jetpack (or cuda-toolkit-<version>)"
fi
if ! python3 -c 'import cv2' 2>/dev/null; then
    die "python3 cannot import cv2: sudo apt install nvidia-opencv (JetPack's OpenCV, built with GStreamer)"
fi
CV_GSTREAMER="$(python3 -c 'import cv2, re; m = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation()); print(m.group(1) if m else "NO")')"
echo "system OpenCV $(python3 -c 'import cv2; print(cv2.__version__)'), GStreamer: $CV_GSTREAMER"
if [[ "$CV_GSTREAMER" != YES ]]; then
    echo "warning: the system OpenCV has no GStreamer: csi:// cameras will not open (v4l2:// and image topics still work)"
fi

# ---- 3. venv ---------------------------------------------------------------------------
say "Virtual environment $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
if [[ "$("$VPY" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')" != 1 ]]; then
    die "$VENV is not a virtual environment"
fi
if ! grep -q '^include-system-site-packages = true' "$VENV/pyvenv.cfg"; then
    die "$VENV was made without --system-site-packages (tensorrt and cv2 would be invisible): remove it and rerun"
fi

# ---- 4. project, dependencies, pycuda -------------------------------------------------------
say "Installing the project and pycuda"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo 'numpy<2' >"$CONSTRAINTS"
"$VPY" -m pip install --upgrade pip wheel
# .[jetson] adds pycuda, built here against $CUDA_HOME.
"$VPY" -m pip install -c "$CONSTRAINTS" -e ".[jetson]"
# Drop the GStreamer-less wheel so the venv falls through to JetPack's cv2 (see the header).
"$VPY" -m pip uninstall -y opencv-python opencv-python-headless opencv-contrib-python \
    opencv-contrib-python-headless 2>/dev/null || true
"$VPY" - <<'EOF'
import re
import sys

import cv2
import numpy
import tensorrt

gst = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation())
print(f"venv: cv2 {cv2.__version__} from {cv2.__file__} (GStreamer: {gst.group(1) if gst else 'NO'})")
print(f"venv: numpy {numpy.__version__}, tensorrt {tensorrt.__version__}")
if "site-packages" in cv2.__file__ and sys.prefix in cv2.__file__:
    sys.exit("jetson_setup: the venv still has its own cv2 (a pip OpenCV wheel); uninstall it")
import pycuda.driver as cuda

cuda.init()
device = cuda.Device(0)
print(f"venv: pycuda sees {device.name()} (compute {'.'.join(map(str, device.compute_capability()))})")
EOF

# ---- 5. ROS 2 --------------------------------------------------------------------------
say "ROS 2"
if [[ -z "$ROS_DISTRO_NAME" ]]; then
    ROS_DISTRO_NAME="$(find /opt/ros -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort | tail -n 1 || true)"
fi
ROS_OK=0
if [[ -n "$ROS_DISTRO_NAME" && -r "/opt/ros/$ROS_DISTRO_NAME/setup.bash" ]]; then
    # ROS setup scripts read unset variables: source them in a subshell without `set -u`.
    if (set +u; source "/opt/ros/$ROS_DISTRO_NAME/setup.bash"
        "$VPY" -c 'import rclpy, vision_msgs.msg, diagnostic_msgs.msg, sensor_msgs.msg'); then
        echo "ROS 2 $ROS_DISTRO_NAME: rclpy, vision_msgs, diagnostic_msgs and sensor_msgs import in the venv"
        ROS_OK=1
    else
        echo "warning: ROS 2 $ROS_DISTRO_NAME is missing a package; install it with:"
        echo "  sudo apt install ros-$ROS_DISTRO_NAME-ros-base ros-$ROS_DISTRO_NAME-vision-msgs ros-$ROS_DISTRO_NAME-diagnostic-msgs"
    fi
else
    echo "warning: no ROS 2 under /opt/ros. On JetPack 6 (Ubuntu 22.04) install Humble from packages.ros.org:"
    echo "  sudo apt install ros-humble-ros-base ros-humble-vision-msgs ros-humble-diagnostic-msgs"
    echo "The ROS-free node (python -m node run csi://0) works without it."
fi

# ---- 6. service, power mode, clocks -----------------------------------------------------------
if [[ "$INSTALL_SERVICE" -eq 1 ]]; then
    say "systemd unit"
    [[ "$ROS_OK" -eq 1 ]] || die "not installing the service: ROS 2 is incomplete (see above)"
    [[ "$(id -u)" -ne 0 ]] || die "run --install-service as the user the node should run as, not root"
    sed -e "s|@USER@|$(id -un)|g" -e "s|@REPO_DIR@|$REPO_DIR|g" \
        -e "s|@ROS_DISTRO@|$ROS_DISTRO_NAME|g" launch/cone-node.service |
        sudo tee /etc/systemd/system/cone-node.service >/dev/null
    sudo systemctl daemon-reload
    sudo systemctl enable cone-node.service
    echo "enabled: starts on the next boot; now: sudo systemctl start cone-node; logs: journalctl -u cone-node -f"
fi

say "Power mode and clocks"
cat <<'EOF'
For stable timings (engine builds, selfcheck, benchmarks) run the Jetson at a fixed, high
power mode with locked clocks:
  sudo nvpmodel -q            # current mode
  sudo nvpmodel -m 0          # mode 0 is MAXN on AGX Orin and Orin NX; check the modes of
                              # your module in /etc/nvpmodel.conf (grep POWER_MODEL)
  sudo jetson_clocks          # pin CPU, GPU and EMC clocks at the mode's maximum
  sudo jetson_clocks --show   # verify
Both reset on reboot; jetson_clocks can be re-run from a systemd unit if wanted.
EOF
if [[ "$MAX_PERF" -eq 1 ]]; then
    sudo nvpmodel -m 0
    sudo jetson_clocks
    sudo jetson_clocks --show | head -n 20
fi

say "Next steps"
echo "  launch/build_engines.sh                         # FP32, FP16 and INT8 classifier engines"
echo "  $VENV/bin/python -m node selfcheck             # engines vs ONNX Runtime, and FPS"
echo "  ros2 launch launch/cone_node.launch.py python:=$VPY camera:=csi://0"
