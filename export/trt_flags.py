"""Which TensorRT network and builder flags build a given precision: one pure function.

The table follows NVIDIA's TensorRT developer guide for each release line a Jetson ships:

- **8.5/8.6** (JetPack 5): networks need ``EXPLICIT_BATCH``. FP16 is the ``FP16`` builder flag.
  A Q/DQ ONNX builds with ``INT8`` + ``FP16`` (explicit quantization; FP16 lets the layers
  between Q/DQ pairs run in half precision). Implicit INT8 is ``INT8`` plus a calibrator.
- **10.x** (JetPack 6): ``EXPLICIT_BATCH`` is deprecated and ignored, so it is not set. A Q/DQ
  ONNX builds as a **strongly typed** network (``STRONGLY_TYPED``), with no precision flags:
  the graph's own types decide. FP16 uses the ``FP16`` builder flag on an FP32 ONNX (chosen
  over converting the ONNX to FP16 because it needs no extra tool and works on every 10.x; the
  weakly typed flags are deprecated late in 10.x, which the plan notes). The legacy calibrator
  is accepted before 10.1 only; from 10.1 it is deprecated and the plan refuses it, with advice.
- **11 and later**: strongly typed only. FP16 needs an FP16 ONNX (the plan says so);
  implicit INT8 no longer exists and is refused.

Names in the plan are the members of ``tensorrt.NetworkDefinitionCreationFlag`` and
``tensorrt.BuilderFlag``, so the engine builder applies them with ``getattr`` and this module
never imports TensorRT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRECISIONS = ("fp32", "fp16", "int8")


class UnsupportedBuild(ValueError):
    """The requested precision cannot be built with this TensorRT version."""


@dataclass(frozen=True)
class BuildPlan:
    """How to configure one TensorRT build.

    Attributes:
        network_flags: ``NetworkDefinitionCreationFlag`` member names for ``create_network``.
        builder_flags: ``BuilderFlag`` member names for ``config.set_flag``.
        needs_calibrator: implicit INT8: attach the legacy entropy calibrator.
        requires_fp16_onnx: the ONNX itself must be FP16 (strongly typed FP16 builds).
        notes: human-readable reasons, printed by the builder.
    """

    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()
    needs_calibrator: bool = False
    requires_fp16_onnx: bool = False
    notes: tuple[str, ...] = ()

    @property
    def strongly_typed(self) -> bool:
        return "STRONGLY_TYPED" in self.network_flags


def parse_trt_version(version: str) -> tuple[int, int]:
    """``"10.3.0.30"`` → ``(10, 3)``.

    Raises:
        UnsupportedBuild: not a version string.
    """
    match = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    if not match:
        raise UnsupportedBuild(f"cannot read TensorRT version {version!r}")
    return int(match.group(1)), int(match.group(2))


def builder_plan(trt_version: str, precision: str, qdq: bool) -> BuildPlan:
    """The flags for building ``precision`` from an ONNX that does (``qdq``) or does not hold
    Q/DQ nodes, on TensorRT ``trt_version``.

    Raises:
        UnsupportedBuild: unknown precision, a TensorRT older than 8.5, or a combination this
            version cannot build; the message says what to do instead.
    """
    if precision not in PRECISIONS:
        raise UnsupportedBuild(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    major, minor = parse_trt_version(trt_version)
    if (major, minor) < (8, 5):
        raise UnsupportedBuild(f"TensorRT {trt_version} is too old: the node needs 8.5 or "
                               f"newer (JetPack 5.1+)")
    if major == 9:
        raise UnsupportedBuild(f"TensorRT {trt_version} ships on no JetPack; use 8.5/8.6 "
                               f"(JetPack 5) or 10.x (JetPack 6)")
    if qdq and precision != "int8":
        raise UnsupportedBuild(f"the ONNX holds Q/DQ nodes, so it builds as int8; pass "
                               f"--precision int8, or build {precision} from the FP32 ONNX")
    if major == 8:
        return _plan_8(precision, qdq)
    if major == 10:
        return _plan_10(minor, precision, qdq)
    return _plan_11(trt_version, precision, qdq)


def _plan_8(precision: str, qdq: bool) -> BuildPlan:
    base = ("EXPLICIT_BATCH",)
    if precision == "fp32":
        return BuildPlan(base)
    if precision == "fp16":
        return BuildPlan(base, ("FP16",))
    if qdq:
        return BuildPlan(base, ("INT8", "FP16"), notes=(
            "explicit quantization: INT8 where the Q/DQ nodes say, FP16 elsewhere",))
    return BuildPlan(base, ("INT8",), needs_calibrator=True, notes=(
        ("implicit INT8 with the legacy entropy calibrator; prefer a Q/DQ ONNX from "
         "`python -m calib.quantize`"),))


def _plan_10(minor: int, precision: str, qdq: bool) -> BuildPlan:
    if precision == "fp32":
        return BuildPlan()
    if precision == "fp16":
        return BuildPlan((), ("FP16",), notes=(
            ("weakly typed FP16 via the FP16 builder flag (deprecated in late 10.x; TensorRT "
             "11 needs an FP16 ONNX)"),))
    if qdq:
        return BuildPlan(("STRONGLY_TYPED",), notes=(
            "strongly typed network: the Q/DQ nodes set INT8, no precision flags",))
    if minor < 1:
        return BuildPlan((), ("INT8",), needs_calibrator=True, notes=(
            "implicit INT8 with the legacy entropy calibrator (deprecated from 10.1)",))
    raise UnsupportedBuild(
        f"implicit INT8 calibration is deprecated from TensorRT 10.1 (this is 10.{minor}); "
        f"quantize to Q/DQ with `python -m calib.quantize MODEL.onnx -o MODEL.int8.onnx` and "
        f"build that with --precision int8")


def _plan_11(version: str, precision: str, qdq: bool) -> BuildPlan:
    strong = ("STRONGLY_TYPED",)
    if precision == "fp32":
        return BuildPlan(strong)
    if precision == "fp16":
        return BuildPlan(strong, requires_fp16_onnx=True, notes=(
            (f"TensorRT {version} is strongly typed only: fp16 needs an FP16 ONNX (convert "
             f"the FP32 ONNX's weights and activations to float16 first)"),))
    if qdq:
        return BuildPlan(strong, notes=("strongly typed network: the Q/DQ nodes set INT8",))
    raise UnsupportedBuild(
        f"TensorRT {version} has no implicit INT8 calibration; quantize to Q/DQ with "
        f"`python -m calib.quantize MODEL.onnx -o MODEL.int8.onnx` and build that")
