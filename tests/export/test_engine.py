"""TensorRT side without TensorRT: the flag table, engine cache keys and sidecars, the legacy
calibrator's logic over a stand-in ``tensorrt`` module, and clean skips where TensorRT is absent.
Tests marked ``tensorrt`` build real engines and run only where TensorRT is installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from calib.trt_calibrator import (
    CalibratorUnavailable,
    legacy_calibrator_status,
    make_entropy_calibrator,
)
from export.engine import (
    EXIT_NO_TENSORRT,
    BatchProfile,
    cache_key,
    engine_metadata,
    engine_path,
    is_up_to_date,
    main,
    timing_cache_path,
)
from export.trt_flags import BuildPlan, UnsupportedBuild, builder_plan
from node.config import ConfigError
from node.infer.metadata import ModelMetadata, sidecar_path

ROOT = Path(__file__).resolve().parents[2]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
S, F, I8, E = "STRONGLY_TYPED", "FP16", "INT8", "EXPLICIT_BATCH"

FLAG_TABLE = [
    # version, precision, qdq -> network flags, builder flags, calibrator, fp16 onnx
    ("8.5.2", "fp32", False, (E,), (), False, False),
    ("8.5.2", "fp16", False, (E,), (F,), False, False),
    ("8.6.1", "int8", True, (E,), (I8, F), False, False),
    ("8.6.1", "int8", False, (E,), (I8,), True, False),
    ("10.0.1", "fp32", False, (), (), False, False),
    ("10.3.0", "fp16", False, (), (F,), False, False),
    ("10.3.0", "int8", True, (S,), (), False, False),
    ("10.0.1", "int8", False, (), (I8,), True, False),
    ("11.0", "fp32", False, (S,), (), False, False),
    ("11.0", "fp16", False, (S,), (), False, True),
    ("11.1.0", "int8", True, (S,), (), False, False),
]


@pytest.mark.parametrize("version,precision,qdq,net,builder,calib,fp16_onnx", FLAG_TABLE)
def test_flag_table(version, precision, qdq, net, builder, calib, fp16_onnx):
    plan = builder_plan(version, precision, qdq)
    assert isinstance(plan, BuildPlan)
    assert (plan.network_flags, plan.builder_flags) == (net, builder)
    assert (plan.needs_calibrator, plan.requires_fp16_onnx) == (calib, fp16_onnx)
    assert plan.strongly_typed == (S in net)


@pytest.mark.parametrize("version,precision,qdq,message", [
    ("10.1.0", "int8", False, "deprecated from TensorRT 10.1"),
    ("10.7.0", "int8", False, "python -m calib.quantize"),
    ("11.0", "int8", False, "no implicit INT8"),
    ("8.4.3", "fp16", False, "too old"),
    ("9.2.0", "fp32", False, "ships on no JetPack"),
    ("10.3.0", "fp16", True, "builds as int8"),
    ("10.3.0", "bf16", False, "precision must be one of"),
    ("latest", "fp32", False, "cannot read TensorRT version"),
])
def test_flag_table_refusals_say_what_to_do(version, precision, qdq, message):
    with pytest.raises(UnsupportedBuild, match=message):
        builder_plan(version, precision, qdq)


def test_cache_key_changes_with_every_fact_and_names_the_engine(tmp_path):
    base = ("a" * 64, "10.3.0", "Orin", "8.7", "int8", BatchProfile(1, 16, 64))
    key = cache_key(*base)
    assert len(key) == 12 and int(key, 16) >= 0 and cache_key(*base) == key
    for i, other in enumerate(("b" * 64, "10.3.1", "Xavier", "7.2", "fp16",
                               BatchProfile(1, 8, 64))):
        changed = list(base)
        changed[i] = other
        assert cache_key(*changed) != key
    assert engine_path(tmp_path / "cones.int8.onnx", "int8", key) == \
        tmp_path / f"cones.int8.{key}.engine"
    assert engine_path("m/cones.onnx", "fp16", key, "out").as_posix() == \
        f"out/cones.fp16.{key}.engine"
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        BatchProfile(1, 32, 16)


def test_sidecar_holds_build_facts_and_drives_the_rebuild_skip(tmp_path):
    meta = ModelMetadata(classes=["blue_cone", "background"], input_size=32, arch="x",
                         precision="int8", source_onnx_sha256="c" * 64, extra={"epoch": 2})
    profile = BatchProfile(1, 16, 64)
    side = engine_metadata(meta, "int8", "d" * 64, "8.5.2", "Orin", "8.7", profile, "k1")
    assert side.source_onnx_sha256 == "d" * 64 and side.precision == "int8"
    assert side.extra == {"epoch": 2, "tensorrt_version": "8.5.2", "gpu_name": "Orin",
                          "compute_capability": "8.7", "batch_profile": [1, 16, 64],
                          "cache_key": "k1", "onnx_sha256": "d" * 64}
    engine = tmp_path / "m.int8.k1.engine"
    assert not is_up_to_date(engine, "k1")
    engine.write_bytes(b"plan")
    assert not is_up_to_date(engine, "k1")  # no sidecar yet
    sidecar_path(engine).write_text(side.to_json())
    assert is_up_to_date(engine, "k1") and not is_up_to_date(engine, "k2")
    assert timing_cache_path("auto", tmp_path, "10.3.0", "8.7") == \
        tmp_path / "timing.trt10.3.0.sm87.cache"
    assert timing_cache_path("t.cache", tmp_path, "10.3.0", "8.7") == Path("t.cache")


class _FakeBuffer:
    def __init__(self, shape, dtype):
        self.host = np.zeros(shape, dtype)
        self.device = np.zeros(shape, dtype)
        self.device_ptr = 4096

    def copy_to_device(self, rows, stream):
        self.device[:rows] = self.host[:rows]


def _fake_trt(version):
    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    return types.SimpleNamespace(__version__=version,
                                 IInt8EntropyCalibrator2=IInt8EntropyCalibrator2)


def test_legacy_calibrator_feeds_full_batches_and_caches(tmp_path):
    batches = [np.full((4, 3, 8, 8), k, np.float32) for k in range(3)] + \
        [np.zeros((2, 3, 8, 8), np.float32)]
    cache = tmp_path / "calib.cache"
    calib = make_entropy_calibrator(iter(batches), 4, (3, 8, 8), cache, trt=_fake_trt("8.6.1"),
                                    buffer_factory=_FakeBuffer)
    assert calib.get_batch_size() == 4
    for k in range(3):
        assert calib.get_batch(["crops"]) == [4096]
        assert np.all(calib._buffer.device == k)
    assert calib.get_batch(["crops"]) is None  # the short batch ends calibration
    assert calib.batches_fed == 3
    assert calib.read_calibration_cache() is None
    calib.write_calibration_cache(b"TRT-8601-EntropyCalibration2\n")
    assert calib.read_calibration_cache() == b"TRT-8601-EntropyCalibration2\n"


def test_legacy_calibrator_version_gate():
    assert [legacy_calibrator_status(v) for v in ("8.5.2", "10.0.1", "10.1.0", "11.0")] == \
        ["supported", "supported", "deprecated", "removed"]
    with pytest.warns(DeprecationWarning, match="deprecated since TensorRT 10.1"):
        make_entropy_calibrator([], 1, (3, 8, 8), "c", trt=_fake_trt("10.3.0"),
                                buffer_factory=_FakeBuffer)
    with pytest.raises(CalibratorUnavailable, match="removed in 11"):
        make_entropy_calibrator([], 1, (3, 8, 8), "c", trt=_fake_trt("11.0.0"),
                                buffer_factory=_FakeBuffer)


def test_modules_import_without_tensorrt_or_pycuda():
    code = ("import sys, export.engine, export.trt_flags, calib.trt_calibrator, calib.quantize\n"
            "print(','.join(h for h in ('tensorrt', 'pycuda', 'torch') if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_cli_without_tensorrt_says_so_in_one_line(tmp_path, capsys):
    rc = main([str(tmp_path / "m.onnx"), "--precision", "fp16"])
    err = capsys.readouterr().err
    assert rc == EXIT_NO_TENSORRT == 3
    assert err.count("\n") == 1 and "TensorRT isn't installed" in err and "JetPack" in err


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT not installed (it ships with JetPack)")
def test_builds_then_skips_a_cached_fp32_engine(tmp_path):
    torch = pytest.importorskip("torch")
    del torch
    from export.engine import build_engine
    from export.model import create_model
    from export.onnx import export_onnx
    from tests.calib.scenes import metadata

    onnx_path = tmp_path / "m.onnx"
    export_onnx(create_model("se_resnet_slim32", 5).eval(), metadata(), onnx_path)
    logs: list[str] = []
    engine = build_engine(onnx_path, "fp32", log=logs.append)
    assert engine.is_file() and any("several minutes" in line for line in logs)
    assert build_engine(onnx_path, "fp32", log=logs.append) == engine
    assert logs[-1].startswith("engine up to date")
