"""INT8 explicit quantization: FP32 ONNX → Q/DQ ONNX for TensorRT, or for ONNX Runtime's CPU.

Follows ONNX Runtime's static quantization tools (``onnxruntime.quantization``): the model is
pre-processed with ``quant_pre_process``, activation ranges are measured by ORT's calibrator
API (``create_calibrator`` → ``collect_data`` → ``compute_data``) over ``calib.feed``, stored in
a JSON cache, and handed to ``quantize_static`` (QDQ format, QInt8 activations and weights,
per-channel symmetric weights, symmetric activations). TensorRT's explicit-quantization rules
(symmetric INT8, zero points 0, per-channel weight scales on axis 0) are checked on the result
by ``verify_qdq``. NVIDIA ModelOpt's ONNX PTQ is used instead when importable (``--engine
modelopt``); it is not installed on the development machines.

``--target cpu`` makes the model for ONNX Runtime's CPU kernels instead (a node without a GPU):
activations are calibrated asymmetric and stored as uint8, so that each Conv with its ReLU runs
as one integer kernel, and weights keep 7 of their 8 bits (``reduce_range``: x86 CPUs without
VNNI multiply uint8 by int8 in pairs summed into 16 bits, which full-range weights can
overflow). TensorRT refuses such a model.

    python -m calib.quantize model.onnx --data yolo:DIR|synth -o model.int8.onnx \
        [--method minmax|entropy|percentile] [--cache calib.json] [--keep-float first_conv,se] \
        [--target tensorrt|cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calib.feed import CalibrationConfig, FeedError, calibration_batches
from calib.qdq import (
    KEEP_FLOAT_GROUPS,
    TARGETS,
    QdqReport,
    QuantizationError,
    resolve_keep_float,
    verify_qdq,
)
from node.config import ConfigError, load_config, spec
from node.infer.metadata import METADATA_KEY, MetadataError, ModelMetadata, sha256_file

METHODS = ("minmax", "entropy", "percentile")
CACHE_FORMAT = "cone_node.calibration/1"
QDQ_OPTIONS = {
    "ActivationSymmetric": True,  # zero points 0: TensorRT's INT8 is symmetric only
    "WeightSymmetric": True,  # weights in [-127, 127]
    # Float weights behind a Q/DQ pair: every TensorRT from 8.x quantizes them itself with the
    # Q scale, whereas pre-quantized INT8 initializers need newer parsers.
    "AddQDQPairToWeight": True,
    # Biases stay float; TensorRT folds them into the INT8 kernels and its 8.x parser rejects
    # INT32 DequantizeLinear.
    "QuantizeBias": False,
}
CPU_QDQ_OPTIONS = {
    "ActivationSymmetric": False,  # uint8 with a zero point: a ReLU folds into its Conv
    "WeightSymmetric": True,
    "QuantizeBias": True,  # INT32 biases, added in the integer accumulator (ORT's default)
}

__all__ = [
    "KEEP_FLOAT_GROUPS",
    "METHODS",
    "TARGETS",
    "QdqReport",
    "QuantizationError",
    "QuantizeConfig",
    "main",
    "quantize_qdq",
    "quantize_with_config",
    "verify_qdq",
]


@dataclass
class QuantizeConfig:
    """The ``quantize`` section of ``configs/export.yaml`` (documented there)."""

    method: str = spec("entropy", choices=METHODS)
    percentile: float = spec(99.999, min=90.0, max=100.0)
    keep_float: list[str] = field(default_factory=lambda: ["first_conv"])


@dataclass
class _FileConfig:
    """The sections of ``configs/export.yaml`` this module reads; others are checked by their
    owners (``export.onnx``, ``export.engine``)."""

    onnx: dict = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    engine: dict = field(default_factory=dict)


def quantize_qdq(fp32_path: str | Path, out_path: str | Path,
                 batches: Iterable[np.ndarray] | None, method: str = "minmax",
                 cache_path: str | Path | None = None, keep_float: Iterable[str] = (),
                 percentile: float = 99.999, calibration_note: dict | None = None,
                 tool: str = "onnxruntime", target: str = "tensorrt") -> QdqReport:
    """Quantize an FP32 ONNX to an INT8 Q/DQ ONNX for ``target`` and verify it.

    Args:
        fp32_path: the FP32 ONNX (with ``cone_node`` metadata).
        out_path: where the Q/DQ ONNX goes.
        batches: calibration batches (N×3×S×S float32); may be ``None`` when ``cache_path``
            holds ranges for this very model and method.
        method: ``minmax``, ``entropy`` or ``percentile``.
        cache_path: JSON file of calibration ranges; read when it matches the model and
            method, written otherwise.
        keep_float: groups (``first_conv``, ``se``, ``classifier``) or node-name regexes to
            leave in float.
        percentile: the percentile for ``percentile`` calibration.
        calibration_note: what the calibration data was (recorded in the metadata).
        tool: ``onnxruntime`` or ``modelopt`` (NVIDIA ModelOpt's ONNX PTQ, only where
            installed; it takes minmax or entropy, and no ``cache_path``).
        target: ``tensorrt`` (symmetric INT8, zero points 0) or ``cpu`` (uint8 activations
            with zero points, 7-bit int8 weights, for ONNX Runtime's CPU kernels).

    Returns:
        The verification report of the written model.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if method not in METHODS:
        raise QuantizationError(f"--method must be one of {list(METHODS)}, got {method!r}")
    if target not in TARGETS:
        raise QuantizationError(f"--target must be one of {list(TARGETS)}, got {target!r}")
    if tool == "modelopt" and target != "tensorrt":
        raise QuantizationError("ModelOpt quantizes for TensorRT only; use --engine "
                                "onnxruntime for --target cpu")
    meta = _read_metadata(fp32_path)
    if meta.precision != "fp32":
        raise QuantizationError(f"{fp32_path}: is already {meta.precision}; quantize the FP32 "
                                f"ONNX written by `python -m export.onnx`")
    source_sha = sha256_file(fp32_path)

    with tempfile.TemporaryDirectory(prefix="calib.") as tmp:
        pre_path = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre_path))
        pre_model = onnx.load(str(pre_path))
        input_name = pre_model.graph.input[0].name
        exclude = resolve_keep_float(pre_model, keep_float)

        if tool == "modelopt":
            model = _quantize_modelopt(pre_path, Path(tmp), input_name, batches, method,
                                       exclude, cache_path)
        else:
            ranges = _load_cache(cache_path, source_sha, method, percentile, target)
            if ranges is None:
                if batches is None:
                    raise QuantizationError("no calibration data and no matching --cache file")
                ranges = _calibrate(pre_path, Path(tmp), input_name, batches, method, percentile,
                                    symmetric=target == "tensorrt")
                if cache_path is not None:
                    _save_cache(cache_path, source_sha, method, percentile, ranges, target)
            model = _quantize_with_ranges(pre_path, Path(tmp), ranges, method, exclude, target)

    extra = dict(meta.extra)
    extra["quantization"] = {"tool": tool, "format": "QDQ", "target": target, "method": method,
                             "keep_float": sorted(exclude),
                             **({"percentile": percentile} if method == "percentile" else {}),
                             **({"calibration": calibration_note} if calibration_note else {})}
    int8_meta = meta.replace(precision="int8", source_onnx_sha256=source_sha, extra=extra)
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = int8_meta.to_json()
    onnx.helper.set_model_props(model, props)
    _drop_unused_opset_imports(model)
    onnx.checker.check_model(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return verify_qdq(out_path, target)


def _ort_method(method: str):
    from onnxruntime.quantization.calibrate import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def _quantize_with_ranges(pre_path: Path, tmp: Path, ranges: dict[str, tuple[float, float]],
                          method: str, exclude: list[str], target: str = "tensorrt"):
    """ORT's ``quantize_static`` over precomputed ranges (handed in as its calibration cache,
    so no data is run again: the same ranges give the same model, byte for byte)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    ort_ranges = tmp / "ranges.json"
    save_tensors_data(TensorsData(_ort_method(method), {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
        for name, (lo, hi) in ranges.items()}), ort_ranges)
    raw_out = tmp / "int8.onnx"
    cpu = target == "cpu"
    quantize_static(str(pre_path), str(raw_out), calibration_data_reader=None,
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=cpu,
                    activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    calibrate_method=_ort_method(method),
                    extra_options=CPU_QDQ_OPTIONS if cpu else QDQ_OPTIONS,
                    calibration_cache_path=str(ort_ranges))
    return onnx.load(str(raw_out))


def _calibrate(model_path: Path, tmp: Path, input_name: str, batches: Iterable[np.ndarray],
               method: str, percentile: float, symmetric: bool = True
               ) -> dict[str, tuple[float, float]]:
    """Activation ranges by ORT's calibrator API, symmetric as TensorRT requires (or not, for
    the CPU target's uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import create_calibrator

    ort_method = _ort_method(method)

    class _OneBatch(CalibrationDataReader):
        def __init__(self, batch: np.ndarray) -> None:
            self._feed = iter([{input_name: np.ascontiguousarray(batch, np.float32)}])

        def get_next(self):
            return next(self._feed, None)

    options = {"symmetric": symmetric}
    if ort_method.name == "Percentile":
        options["percentile"] = percentile
    calibrator = create_calibrator(model_path, None, augmented_model_path=str(tmp / "aug.onnx"),
                                   calibrate_method=ort_method, extra_options=options)
    # One collect_data call per batch: ORT keeps every intermediate output of a call in memory,
    # and its histogram collectors cannot stack batches of different sizes.
    seen = 0
    with contextlib.redirect_stdout(io.StringIO()):  # ORT prints progress per call
        for batch in batches:
            if len(batch):
                calibrator.collect_data(_OneBatch(batch))
                seen += len(batch)
        if seen == 0:
            raise QuantizationError("the calibration feed yielded no crops")
        data = calibrator.compute_data()
    return {name: (_scalar(td.range_value[0]), _scalar(td.range_value[1]))
            for name, td in sorted(data.data.items())}


def _drop_unused_opset_imports(model) -> None:
    """ORT's pre-processing declares every domain it knows (com.microsoft, ai.onnx.training,
    ...); keep only the ones nodes use, so TensorRT's parser sees a plain ONNX model."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _scalar(value) -> float:
    """A float32 range end as a Python float (exact, so JSON round-trips bit for bit)."""
    return float(np.asarray(value, np.float32).reshape(-1)[0])


def _load_cache(path: str | Path | None, source_sha: str, method: str, percentile: float,
                target: str = "tensorrt") -> dict[str, tuple[float, float]] | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") != CACHE_FORMAT:
            raise QuantizationError(f"{path}: not a calibration cache ({CACHE_FORMAT})")
        ranges = {k: (float(v[0]), float(v[1])) for k, v in data["ranges"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise QuantizationError(f"{path}: unreadable calibration cache ({exc})") from None
    # Caches written before the cpu target existed hold TensorRT's symmetric ranges.
    same = (data.get("source_onnx_sha256") == source_sha and data.get("method") == method
            and (method != "percentile" or data.get("percentile") == percentile)
            and data.get("target", "tensorrt") == target)
    if not same:
        print(f"calibration cache {path} is for another model, method or target; "
              f"recalibrating", file=sys.stderr)
        return None
    return ranges


def _save_cache(path: str | Path, source_sha: str, method: str, percentile: float,
                ranges: dict[str, tuple[float, float]], target: str = "tensorrt") -> None:
    payload = {"format": CACHE_FORMAT, "source_onnx_sha256": source_sha, "method": method,
               "percentile": percentile, "target": target,
               "ranges": {k: list(v) for k, v in ranges.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1, sort_keys=True))


def _read_metadata(path: Path) -> ModelMetadata:
    from node.infer.metadata import read_onnx_metadata

    try:
        return read_onnx_metadata(path)
    except MetadataError as exc:
        raise QuantizationError(str(exc)) from None


def _quantize_modelopt(pre_path: Path, tmp: Path, input_name: str,
                       batches: Iterable[np.ndarray] | None, method: str, exclude: list[str],
                       cache_path: str | Path | None):
    """NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``), INT8, float
    weights behind Q/DQ pairs, zero points 0. Not installed on the development machines."""
    import onnx

    if not _modelopt_available():
        raise QuantizationError("ModelOpt is not installed (pip install nvidia-modelopt[onnx])")
    if method not in ("minmax", "entropy"):
        raise QuantizationError(f"ModelOpt calibrates with minmax or entropy, not {method}")
    if cache_path is not None or batches is None:
        raise QuantizationError("the calibration cache is an onnxruntime feature; run "
                                "ModelOpt with --data and without --cache")
    from modelopt.onnx.quantization import quantize as modelopt_quantize

    data = np.concatenate([np.asarray(b, np.float32) for b in batches])
    out = tmp / "modelopt.int8.onnx"
    modelopt_quantize(str(pre_path), quantize_mode="int8", calibration_data={input_name: data},
                      calibration_method="max" if method == "minmax" else "entropy",
                      calibration_eps=["cpu"], nodes_to_exclude=exclude or None,
                      output_path=str(out), high_precision_dtype="fp32", dq_only=False,
                      use_zero_point=False)
    return onnx.load(str(out))


def _modelopt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("modelopt") is not None


def quantize_with_config(model: str | Path, output: str | Path, data: str | Iterable[Any],
                         config: str | Path | None = None, method: str | None = None,
                         cache: str | Path | None = None, keep_float: str | None = None,
                         engine: str = "onnxruntime", note: str | None = None,
                         target: str = "tensorrt") -> QdqReport:
    """What ``python -m calib.quantize`` does: ``configs/export.yaml``'s calibration feed of
    ``data`` (a data spec, or labelled samples such as ``export.finetune``'s training frames;
    ``note`` names them in the output's metadata) and quantize settings, with the command
    line's overrides."""
    cfg = load_config(_FileConfig, config)
    method = method or cfg.quantize.method
    keep = (cfg.quantize.keep_float if keep_float is None
            else [k for k in keep_float.split(",") if k.strip()])
    if engine == "modelopt" and not _modelopt_available():
        raise QuantizationError("--engine modelopt: ModelOpt is not installed "
                                "(pip install nvidia-modelopt[onnx])")
    meta = _read_metadata(Path(model))
    c = cfg.calibration
    batches = calibration_batches(data, meta, c.count, c.batch_size, c.seed,
                                  c.background_share, synth_frames=c.synth_frames,
                                  synth_size=(c.synth_width, c.synth_height))
    return quantize_qdq(model, output, batches, method, cache, keep, cfg.quantize.percentile,
                        calibration_note={"data": note or str(data), "count": c.count,
                                          "seed": c.seed}, tool=engine, target=target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.quantize", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("model", help="FP32 ONNX written by `python -m export.onnx`")
    parser.add_argument("-o", "--output", required=True, help="Q/DQ ONNX to write")
    parser.add_argument("--data", default="synth", help="yolo:DIR or synth[:N] (default synth)")
    parser.add_argument("--config", default=None, help="configs/export.yaml")
    parser.add_argument("--method", choices=METHODS, default=None, help="calibration method")
    parser.add_argument("--cache", default=None, help="calibration ranges JSON (read/write)")
    parser.add_argument("--keep-float", default=None,
                        help=f"comma list of {sorted(KEEP_FLOAT_GROUPS)} or node-name regexes")
    parser.add_argument("--engine", choices=("onnxruntime", "modelopt"), default="onnxruntime")
    parser.add_argument("--target", choices=TARGETS, default="tensorrt",
                        help="tensorrt: symmetric INT8 for TensorRT engines (default); cpu: "
                             "uint8 activations for ONNX Runtime on a CPU")
    args = parser.parse_args(argv)
    try:
        report = quantize_with_config(args.model, args.output, args.data, args.config,
                                      args.method, args.cache, args.keep_float, args.engine,
                                      target=args.target)
    except (QuantizationError, FeedError, ConfigError, MetadataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
