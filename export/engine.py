"""ONNX → TensorRT engine for the Jetson, cached by a key over everything that shapes it.

Follows the TensorRT Python API common to 8.5 through 10.x (``trt.Builder``,
``create_network``, ``trt.OnnxParser``, ``create_builder_config``, ``set_memory_pool_limit``,
``create_optimization_profile``/``add_optimization_profile``, ``create_timing_cache``/
``set_timing_cache``, ``build_serialized_network``) and jetson-inference's habit of naming
engines by what they were built for. The flags come from the pure table in
``export.trt_flags``. The engine is written as ``<stem>.<precision>.<key>.engine`` where
``key`` is the first 12 hex digits of a sha256 over the ONNX's sha256, TensorRT version, GPU
name, compute capability, precision and batch profile; its JSON sidecar
(``node.infer.metadata.sidecar_path``) holds the model's metadata plus those facts, and a build whose
key matches an existing engine and sidecar is skipped.

    python -m export.engine model.onnx --precision fp32|fp16|int8 [--config configs/export.yaml]
        [--out-dir DIR] [--calib-data yolo:DIR]

TensorRT ships with JetPack; where it is missing the command says so in one line and exits 3.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from calib.feed import CalibrationConfig
from export.trt_flags import PRECISIONS, UnsupportedBuild, builder_plan
from node.config import ConfigError, load_config, spec
from node.infer.base import MAX_BATCH
from node.infer.metadata import (
    MetadataError,
    ModelMetadata,
    read_onnx_metadata,
    read_sidecar,
    sha256_file,
    sidecar_path,
)

EXIT_NO_TENSORRT = 3


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build the engine."""


@dataclass
class EngineConfig:
    """The ``engine`` section of ``configs/export.yaml`` (documented there)."""

    opt_batch: int = spec(16, min=1, max=4096)
    max_batch: int = spec(MAX_BATCH, min=1, max=4096)
    workspace_mib: int = spec(1024, min=16, max=65536)
    timing_cache: str = "auto"
    out_dir: str | None = None


@dataclass
class _FileConfig:
    onnx: dict = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantize: dict = field(default_factory=dict)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass(frozen=True)
class BatchProfile:
    """The dynamic-batch optimisation profile: min, opt and max batch."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"engine batch profile needs 1 <= min <= opt <= max, got "
                              f"{self.min}/{self.opt}/{self.max}")

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


def cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: str,
              precision: str, profile: BatchProfile) -> str:
    """First 12 hex digits of a sha256 over everything an engine depends on."""
    facts = [onnx_sha256, trt_version, gpu_name, compute_capability, precision,
             profile.as_list()]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:12]


def engine_path(onnx_path: str | Path, precision: str, key: str,
                out_dir: str | Path | None = None) -> Path:
    """``<out_dir>/<stem>.<precision>.<key>.engine`` (out_dir defaults to the ONNX's folder).

    The stem drops a trailing ``.int8``/``.fp16`` so ``model.int8.onnx`` gives
    ``model.int8.<key>.engine`` rather than ``model.int8.int8.…``.
    """
    onnx_path = Path(onnx_path)
    stem = re.sub(r"\.(fp32|fp16|int8)$", "", onnx_path.stem)
    folder = Path(out_dir) if out_dir is not None else onnx_path.parent
    return folder / f"{stem}.{precision}.{key}.engine"


def engine_metadata(meta: ModelMetadata, precision: str, onnx_sha256: str, trt_version: str,
                    gpu_name: str, compute_capability: str, profile: BatchProfile,
                    key: str) -> ModelMetadata:
    """The sidecar content: the ONNX's metadata with the engine's build facts in ``extra``."""
    extra = dict(meta.extra)
    extra.update(tensorrt_version=trt_version, gpu_name=gpu_name,
                 compute_capability=compute_capability, batch_profile=profile.as_list(),
                 cache_key=key, onnx_sha256=onnx_sha256)
    return meta.replace(precision=precision, source_onnx_sha256=onnx_sha256, extra=extra)


def is_up_to_date(engine: Path, key: str) -> bool:
    """An engine and its sidecar exist and the sidecar records ``key``."""
    if not engine.is_file() or not sidecar_path(engine).is_file():
        return False
    try:
        return read_sidecar(engine).extra.get("cache_key") == key
    except MetadataError:
        return False


def timing_cache_path(setting: str, out_dir: Path, trt_version: str, compute_capability: str
                      ) -> Path:
    """``auto`` → ``<out_dir>/timing.trt<version>.sm<cc>.cache``; else the path as given."""
    if setting != "auto":
        return Path(setting)
    cc = compute_capability.replace(".", "")
    return out_dir / f"timing.trt{trt_version}.sm{cc}.cache"


def detect_gpu() -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") via pycuda, else ``nvidia-smi``."""
    if importlib.util.find_spec("pycuda") is not None:
        from node.infer.cuda_mem import device_info

        name, (major, minor) = device_info(0)
        return name, f"{major}.{minor}"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        raise EngineBuildError("cannot identify the GPU: install pycuda or make nvidia-smi "
                               "available") from None
    name, cc = (part.strip() for part in out.split(",", 1))
    return name, cc


def build_engine(onnx_path: str | Path, precision: str, cfg: _FileConfig | None = None,
                 out_dir: str | Path | None = None, calib_data: str | None = None,
                 log=print) -> Path:
    """Build (or reuse) the engine for ``onnx_path`` at ``precision``; returns its path.

    Raises:
        ModuleNotFoundError: TensorRT is not installed.
        UnsupportedBuild: the precision cannot be built on this TensorRT (advice included).
        EngineBuildError: parse or build failure.
    """
    onnx_path = Path(onnx_path)
    meta = read_onnx_metadata(onnx_path)
    if meta.precision == "int8":
        _refuse_unsigned_int8(onnx_path)
    import tensorrt as trt

    cfg = cfg or _FileConfig()
    qdq = meta.precision == "int8"
    plan = builder_plan(trt.__version__, precision, qdq)
    if plan.requires_fp16_onnx and not _input_is_fp16(onnx_path):
        raise UnsupportedBuild(plan.notes[0])
    if plan.needs_calibrator and calib_data is None:
        raise UnsupportedBuild("implicit INT8 needs --calib-data yolo:DIR|synth for the legacy "
                               "calibrator (or quantize to Q/DQ with `python -m calib.quantize`)")
    gpu_name, cc = detect_gpu()
    profile = BatchProfile(1, cfg.engine.opt_batch, cfg.engine.max_batch)
    onnx_sha = sha256_file(onnx_path)
    key = cache_key(onnx_sha, trt.__version__, gpu_name, cc, precision, profile)
    folder = Path(out_dir or cfg.engine.out_dir or onnx_path.parent)
    engine = engine_path(onnx_path, precision, key, folder)
    if is_up_to_date(engine, key):
        log(f"engine up to date: {engine}")
        return engine
    for note in plan.notes:
        log(f"note: {note}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.engine.workspace_mib << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    size = meta.input_size
    opt_profile = builder.create_optimization_profile()
    input_name = network.get_input(0).name  # "crops" for models from export.onnx
    opt_profile.set_shape(input_name, *((b, 3, size, size) for b in profile.as_list()))
    config.add_optimization_profile(opt_profile)

    cache_file = timing_cache_path(cfg.engine.timing_cache, folder, trt.__version__, cc)
    timing = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(timing, False)

    calibrator, context = None, None
    if plan.needs_calibrator:
        calibrator, context = _legacy_calibrator(trt, cfg, meta, calib_data, folder, onnx_path)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(opt_profile)

    log(f"building engine, this may take several minutes ({precision}, TensorRT "
        f"{trt.__version__}, {gpu_name} sm{cc}, batch {profile.as_list()})")
    start = time.monotonic()
    try:
        if context is not None:
            with context.scope():
                serialized = builder.build_serialized_network(network, config)
                calibrator.free()
        else:
            serialized = builder.build_serialized_network(network, config)
    finally:
        if context is not None:
            context.release()
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build the {precision} engine "
                               f"(see the TensorRT log above)")
    folder.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(memoryview(serialized))
    cache_file.write_bytes(memoryview(config.get_timing_cache().serialize()))
    side = engine_metadata(meta, precision, onnx_sha, trt.__version__, gpu_name, cc, profile,
                           key)
    sidecar_path(engine).write_text(side.to_json())
    log(f"built {engine} in {time.monotonic() - start:.1f} s")
    return engine


def _refuse_unsigned_int8(onnx_path: Path) -> None:
    """TensorRT's INT8 is signed only: a Q/DQ model with uint8 tensors (``calib.quantize
    --target cpu`` makes them, for ONNX Runtime's CPU) is refused before TensorRT is loaded."""
    import onnx

    from calib.qdq import uint8_tensors

    found = uint8_tensors(onnx.load(str(onnx_path), load_external_data=False))
    if found:
        raise UnsupportedBuild(
            f"{onnx_path}: uint8 tensors ({found[0]}, ...), as quantized for ONNX Runtime's "
            f"CPU; TensorRT takes signed INT8 only: quantize the FP32 ONNX with `python -m "
            f"calib.quantize MODEL.onnx -o MODEL.int8.onnx` (the default --target tensorrt)")


def _legacy_calibrator(trt, cfg: _FileConfig, meta: ModelMetadata, calib_data: str,
                       folder: Path, onnx_path: Path):
    """The legacy entropy calibrator over the feed, with its CUDA context (8.5–10.0 only)."""
    from calib.feed import calibration_batches
    from calib.trt_calibrator import make_entropy_calibrator
    from node.infer.cuda_mem import CudaContext

    c = cfg.calibration
    context = CudaContext(0)
    with context.scope():
        batches = calibration_batches(calib_data, meta, c.count, c.batch_size, c.seed,
                                      c.background_share, drop_last=True,
                                      synth_frames=c.synth_frames,
                                      synth_size=(c.synth_width, c.synth_height))
        calibrator = make_entropy_calibrator(
            batches, c.batch_size, (3, meta.input_size, meta.input_size),
            folder / f"{onnx_path.stem}.calib.cache", trt=trt)
    return calibrator, context


def _input_is_fp16(onnx_path: Path) -> bool:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return sess.get_inputs()[0].type == "tensor(float16)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.engine",
                                     description="Build a cached TensorRT engine from an ONNX.")
    parser.add_argument("model", help="ONNX from export.onnx (FP32) or calib.quantize (Q/DQ)")
    parser.add_argument("--precision", choices=PRECISIONS, required=True)
    parser.add_argument("--config", default=None, help="configs/export.yaml")
    parser.add_argument("--out-dir", default=None, help="engine folder (default: the ONNX's)")
    parser.add_argument("--calib-data", default=None,
                        help="yolo:DIR or synth, for implicit INT8 (legacy, TensorRT < 10.1)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("tensorrt") is None:
        print("error: TensorRT isn't installed; it ships with JetPack (python3-libnvinfer) on "
              "the Jetson, so build engines there", file=sys.stderr)
        return EXIT_NO_TENSORRT
    try:
        cfg = load_config(_FileConfig, args.config)
        build_engine(args.model, args.precision, cfg, args.out_dir, args.calib_data)
    except (UnsupportedBuild, EngineBuildError, ConfigError, MetadataError,
            FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
