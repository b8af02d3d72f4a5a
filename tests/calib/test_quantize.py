"""INT8 Q/DQ quantization: TensorRT's rules, the accuracy bound, reproducible calibration.

A briefly trained ``se_resnet_slim32`` (see ``tests/calib/scenes.py``) is exported, calibrated
on one set of scenes and scored on another. Bound used: INT8 top-1 within 2 percentage points
of FP32, and INT8/FP32 top-1 agreement >= 97%, on held-out synthetic crops.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calib.feed import calibration_batches
from calib.qdq import QuantizationError, resolve_keep_float, verify_qdq
from calib.quantize import main, quantize_qdq
from export.engine import build_engine
from export.onnx import export_onnx
from export.trt_flags import UnsupportedBuild
from node.infer.metadata import read_onnx_metadata, sha256_file
from tests.calib.scenes import labelled_batch, scenes, trained_classifier, write_yolo

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    model, meta = trained_classifier()
    path = tmp_path_factory.mktemp("q") / "cones.onnx"
    export_onnx(model, meta.replace(source_onnx_sha256="ab" * 32, extra={"epoch": 3}), path)
    return path


@pytest.fixture(scope="module")
def int8(fp32):
    cache = fp32.parent / "calib.json"
    out = fp32.parent / "cones.int8.onnx"
    report = quantize_qdq(fp32, out, _feed(fp32), "minmax", cache)
    return out, cache, report


@pytest.fixture(scope="module")
def held_out():
    _, meta = trained_classifier()
    return labelled_batch(scenes(9000, 80), meta, 400, seed=11)


def _feed(path, count=256):
    return calibration_batches(scenes(5000, 60), read_onnx_metadata(path), count, 32, seed=0)


def _top1(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"crops": x})[0].argmax(1)


def test_every_zero_point_is_zero_and_weights_are_per_channel(int8):
    path, _, report = int8
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == report.quantize_nodes + report.dequantize_nodes > 40
    for node in qdq:
        assert inits[node.input[2]].dtype == np.int8 and not inits[node.input[2]].any()
    assert not [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    # every Conv and the Gemm read their weight through a per-channel DQ on axis 0
    weights = {n.input[1] for n in onnx.load(str(path)).graph.node
               if n.op_type in ("Conv", "Gemm")}
    assert len(report.per_channel_weights) == len(weights) == 21
    for name, channels in report.per_channel_weights.items():
        assert channels == inits[name].shape[0] > 1
    assert report.float_ops == []


def test_int8_accuracy_stays_within_bound_of_fp32(fp32, int8, held_out):
    x, y = held_out
    p32, p8 = _top1(fp32, x), _top1(int8[0], x)
    acc32, acc8 = (p32 == y).mean(), (p8 == y).mean()
    assert acc32 > 0.85  # the model learned the task: the bound means something
    assert abs(acc8 - acc32) <= 0.02
    assert (p8 == p32).mean() >= 0.97


def test_metadata_survives_quantization(fp32, int8):
    meta32, meta8 = read_onnx_metadata(fp32), read_onnx_metadata(int8[0])
    assert meta8.precision == "int8" and meta32.precision == "fp32"
    assert meta8.source_onnx_sha256 == sha256_file(fp32)
    assert meta32.source_onnx_sha256 == "ab" * 32
    for key in ("classes", "input_size", "channel_order", "mean", "std", "crop", "arch"):
        assert getattr(meta8, key) == getattr(meta32, key)
    assert meta8.extra["epoch"] == 3 and meta8.extra["quantization"]["method"] == "minmax"


def test_calibration_cache_rebuilds_the_identical_model(fp32, int8, tmp_path):
    path, cache, _ = int8
    data = json.loads(cache.read_text())
    assert data["source_onnx_sha256"] == sha256_file(fp32) and len(data["ranges"]) > 20
    again = tmp_path / "again.onnx"
    quantize_qdq(fp32, again, None, "minmax", cache)  # no data: ranges come from the cache
    assert again.read_bytes() == path.read_bytes()
    with pytest.raises(QuantizationError, match="no calibration data"):
        quantize_qdq(fp32, tmp_path / "x.onnx", None, "entropy", cache)  # method differs


def test_keep_float_groups_leave_those_nodes_unquantized(fp32, int8, tmp_path, held_out):
    model = onnx.load(str(fp32))
    assert resolve_keep_float(model, ["first_conv"]) == ["/stem/stem.0/Conv"]
    assert resolve_keep_float(model, ["classifier"]) == ["/fc/Gemm"]
    se = resolve_keep_float(model, ["se"])
    assert len([n for n in se if n.endswith("Sigmoid")]) == 4 and len(se) == 16
    out = tmp_path / "kf.onnx"
    report = quantize_qdq(fp32, out, None, "minmax", int8[1],
                          keep_float=["first_conv", "se", "classifier"])
    assert sorted(report.float_ops) == sorted(
        ["/stem/stem.0/Conv", "/fc/Gemm"] + [n for n in se if n.endswith("Conv")])
    x, _ = held_out
    assert (_top1(out, x) == _top1(fp32, x)).mean() >= 0.97
    with pytest.raises(QuantizationError, match="matches no node"):
        resolve_keep_float(model, ["no_such_layer"])


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_give_valid_symmetric_models(fp32, tmp_path, held_out, method):
    out = tmp_path / f"{method}.onnx"
    report = quantize_qdq(fp32, out, _feed(fp32, 128), method)
    assert len(report.per_channel_weights) == 21
    x, _ = held_out
    assert (_top1(out, x) == _top1(fp32, x)).mean() >= 0.95


def test_verify_rejects_asymmetric_uint8_quantization(fp32, tmp_path):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batches = iter(list(_feed(fp32, 64)))

    class Reader(CalibrationDataReader):
        def get_next(self):
            b = next(batches, None)
            return None if b is None else {"crops": b}

    bad = tmp_path / "asym.onnx"
    quantize_static(str(fp32), str(bad), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    with pytest.raises(QuantizationError, match="uint8|UINT8"):
        verify_qdq(bad)


def _fused_integer_convs(path) -> tuple[int, int]:
    """(Conv nodes ONNX Runtime's CPU provider runs as integer QLinearConv, Conv nodes it
    leaves in float) after its graph optimisations."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path) + ".opt.onnx"
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    return ops.count("QLinearConv"), sum(op in ("Conv", "FusedConv") for op in ops)


def test_cpu_target_runs_every_quantized_conv_as_one_integer_kernel(fp32, int8, tmp_path,
                                                                    held_out):
    """--target cpu: uint8 activations with zero points, 7-bit per-channel weights, each
    quantized Conv (with its ReLU) fused into an integer QLinearConv by ONNX Runtime, the
    same answers as FP32; TensorRT's rules refuse it, and its ranges are cached apart."""
    cache = tmp_path / "cpu.calib.json"
    out = tmp_path / "cones.cpu.int8.onnx"
    report = quantize_qdq(fp32, out, _feed(fp32), "minmax", cache, keep_float=["first_conv"],
                          target="cpu")
    assert report.target == "cpu" and "uint8 activations" in report.summary()
    assert report.float_ops == ["/stem/stem.0/Conv"] and len(report.per_channel_weights) == 20
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [inits[name] for name in report.per_channel_weights]
    assert all(w.dtype == np.int8 and w.min() >= -64 and w.max() <= 64 for w in weights)
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.uint8 for z in zps) and any(z.any() for z in zps)
    integer, floating = _fused_integer_convs(out)
    assert (integer, floating) == (19, 1)  # the float one is the first conv, kept so
    assert _fused_integer_convs(int8[0])[0] < 19  # TensorRT's symmetric INT8 fuses fewer
    x, y = held_out
    p32, p8 = _top1(fp32, x), _top1(out, x)
    assert abs((p8 == y).mean() - (p32 == y).mean()) <= 0.02
    assert (p8 == p32).mean() >= 0.97
    assert read_onnx_metadata(out).extra["quantization"]["target"] == "cpu"
    with pytest.raises(QuantizationError, match="uint8"):
        verify_qdq(out)  # the default target is TensorRT's
    with pytest.raises(UnsupportedBuild, match="ONNX Runtime's CPU"):
        build_engine(out, "int8")  # refused before TensorRT is even imported
    assert json.loads(cache.read_text())["target"] == "cpu"
    again = tmp_path / "again.onnx"
    quantize_qdq(fp32, again, None, "minmax", cache, keep_float=["first_conv"], target="cpu")
    assert again.read_bytes() == out.read_bytes()
    with pytest.raises(QuantizationError, match="no calibration data"):
        quantize_qdq(fp32, tmp_path / "x.onnx", None, "minmax", int8[1], target="cpu")


def test_cli_quantizes_from_yolo_data_and_refuses_bad_input(fp32, tmp_path, capsys):
    data = write_yolo(scenes(7000, 12), tmp_path / "data")
    out = tmp_path / "cli.int8.onnx"
    rc = main([str(fp32), "-o", str(out), "--data", f"yolo:{data}", "--method", "minmax",
               "--keep-float", "classifier"])
    assert rc == 0, capsys.readouterr().err
    meta = read_onnx_metadata(out)
    assert meta.extra["quantization"]["keep_float"] == ["/fc/Gemm"]
    assert meta.extra["quantization"]["calibration"]["data"] == f"yolo:{data}"
    assert verify_qdq(out).float_ops == ["/fc/Gemm"]
    rc = main([str(fp32), "-o", str(tmp_path / "x.onnx"), "--data", "yolo:/no/such/dir"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "/no/such/dir" in err
    rc = main([str(out), "-o", str(tmp_path / "y.onnx"), "--data", f"yolo:{data}"])
    assert rc == 2 and "already int8" in capsys.readouterr().err


def test_export_yaml_quantize_section_equals_the_code_defaults():
    """`python -m calib.quantize` without --config must build what configs/export.yaml says
    (the bundled INT8 model was made with it)."""
    from pathlib import Path

    from calib.quantize import QuantizeConfig, _FileConfig
    from node.config import load_config

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(_FileConfig, repo / "configs" / "export.yaml")
    assert cfg.quantize == QuantizeConfig()
    assert cfg.quantize.method == "entropy" and cfg.quantize.keep_float == ["first_conv"]
