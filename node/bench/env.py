"""Environment facts recorded with every benchmark run, as trtexec and Ultralytics print them.

A timing without its machine is meaningless, so ``python -m node bench`` stores the CPU, the
runtime versions, the GPU and, on a Jetson, the power mode and whether clocks are locked, next
to every row it logs. Every probe is time-limited and failure-tolerant: a missing tool or file
gives ``"n/a"``, never an exception. The host name is deliberately never recorded.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

NA = "n/a"
_TIMEOUT_S = 5.0

ENV_KEYS: tuple[str, ...] = (
    "date", "cpu", "cpu_cores", "cpu_affinity", "load_avg", "machine", "os", "python", "numpy", "opencv",
    "onnxruntime", "ort_providers", "tensorrt", "cuda", "gpu", "jetson_model",
    "jetson_power_mode", "jetson_clocks_locked",
)
"""Keys of ``collect_environment()``, in the order they are logged."""


def run_tool(args: list[str], timeout_s: float = _TIMEOUT_S) -> str | None:
    """stdout of a command, or ``None`` if it is missing, fails or times out."""
    if shutil.which(args[0]) is None:
        return None
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name (x86 ``model name``; on ARM the SoC or ``Hardware`` line)."""
    text = cpuinfo if cpuinfo is not None else (_read("/proc/cpuinfo") or "")
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return platform.processor() or platform.machine() or NA


def _versions() -> dict[str, str]:
    import cv2
    import numpy as np

    out = {"python": platform.python_version(), "numpy": np.__version__,
           "opencv": cv2.__version__}
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        out["ort_providers"] = " ".join(p.replace("ExecutionProvider", "")
                                        for p in ort.get_available_providers())
    except ImportError:
        out["onnxruntime"] = out["ort_providers"] = NA
    return out


def tensorrt_version() -> str:
    """TensorRT's version when it imports (lazily: only while collecting), else ``n/a``."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return NA
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # noqa: BLE001 - the PyPI stub raises at import where the libraries are missing
        return NA


def cuda_and_gpu() -> tuple[str, str]:
    """(CUDA version, GPU name) from nvidia-smi, else from the CUDA toolkit / Jetson model."""
    cuda, gpu = NA, NA
    smi = run_tool(["nvidia-smi"])
    if smi:
        match = re.search(r"CUDA Version:\s*([\d.]+)", smi)
        cuda = match.group(1) if match else NA
        names = run_tool(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
        if names and names.strip():
            gpu = "; ".join(n.strip() for n in names.strip().splitlines())
    if cuda == NA:
        version_json = _read("/usr/local/cuda/version.json")
        match = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([\d.]+)"', version_json or "")
        if not match:
            match = re.search(r"release\s+([\d.]+)", run_tool(["nvcc", "--version"]) or "")
        if match:  # a toolkit without a driver (or nvidia-smi): say which one it is
            cuda = f"{match.group(1)} (toolkit)"
    if gpu == NA and jetson_model() != NA:
        gpu = jetson_model()  # Jetsons have an integrated GPU named after the module
    return cuda, gpu


def jetson_model() -> str:
    """The Jetson module name from the device tree, or ``n/a`` on other machines."""
    model = (_read("/proc/device-tree/model") or "").strip("\x00 \n")
    if model and ("jetson" in model.lower() or Path("/etc/nv_tegra_release").exists()):
        return model
    return NA


def jetson_power_mode() -> str:
    """``nvpmodel -q``'s mode name (``MAXN``, ``15W``…), or ``n/a``."""
    out = run_tool(["nvpmodel", "-q"])
    if not out:
        return NA
    match = re.search(r"NV Power Mode:\s*(.+)", out)
    return match.group(1).strip() if match else out.strip().splitlines()[0]


def clocks_locked(cpufreq_dir: str | Path = "/sys/devices/system/cpu/cpu0/cpufreq") -> str:
    """``yes``/``no``: are the clocks pinned (``jetson_clocks``), read from the CPU's
    scaling_min_freq == scaling_max_freq (the GPU's min/max when ``jetson_clocks --show`` is
    readable), or ``n/a``."""
    show = run_tool(["jetson_clocks", "--show"])
    if show:
        cpu_lines = re.findall(r"MinFreq=(\d+)\s+MaxFreq=(\d+)", show)
        if cpu_lines:
            return "yes" if all(lo == hi for lo, hi in cpu_lines) else "no"
    lo = _read(Path(cpufreq_dir) / "scaling_min_freq")
    hi = _read(Path(cpufreq_dir) / "scaling_max_freq")
    if lo is None or hi is None:
        return NA
    return "yes" if lo.strip() == hi.strip() else "no"


def load_average() -> str:
    """1-minute load average when the run starts: other work on the machine skews timings."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return NA


def busy_warning(env: dict[str, str]) -> str | None:
    """A warning line when the 1-minute load is above half the cores, else ``None``."""
    try:
        load, cores = float(env["load_avg"]), int(env["cpu_cores"])
    except (KeyError, ValueError):
        return None
    if load <= 0.5 * cores:
        return None
    return (f"[W] the machine is busy (load average {load:.1f} on {cores} cores): timings and "
            f"ratios are unreliable; rerun on an idle machine")


def collect_environment() -> dict[str, str]:
    """Everything in ``ENV_KEYS``, as strings (``n/a`` where unknown)."""
    env: dict[str, str] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": str(os.cpu_count() or NA),
        "cpu_affinity": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity")
        else NA,
        "load_avg": load_average(),
        "machine": platform.machine() or NA,
        "os": f"{platform.system()} {platform.release()}".strip() or NA,
    }
    env.update(_versions())
    env["tensorrt"] = tensorrt_version()
    env["cuda"], env["gpu"] = cuda_and_gpu()
    env["jetson_model"] = jetson_model()
    is_jetson = env["jetson_model"] != NA
    env["jetson_power_mode"] = jetson_power_mode() if is_jetson else NA
    env["jetson_clocks_locked"] = clocks_locked() if is_jetson else NA
    return {key: env.get(key, NA) for key in ENV_KEYS}


def describe(env: dict[str, str]) -> str:
    """A few lines for the top of the report (no host name)."""
    lines = [
        f"date: {env['date']}",
        (f"cpu: {env['cpu']} ({env['cpu_cores']} cores, {env['cpu_affinity']} usable, "
         f"{env['machine']}, {env['os']}), load average {env['load_avg']}"),
        (f"onnxruntime {env['onnxruntime']} [{env['ort_providers']}], "
         f"tensorrt {env['tensorrt']}, cuda {env['cuda']}, gpu {env['gpu']}"),
        f"python {env['python']}, numpy {env['numpy']}, opencv {env['opencv']}",
    ]
    if env["jetson_model"] != NA:
        lines.append(f"jetson: {env['jetson_model']}, power mode {env['jetson_power_mode']}, "
                     f"clocks locked {env['jetson_clocks_locked']}")
    return "\n".join(lines)
