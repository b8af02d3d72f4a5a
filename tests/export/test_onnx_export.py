"""ONNX export: parity with torch, dynamic batch, opset, and metadata from checkpoint to sidecar."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from calib.feed import calibration_batches
from calib.quantize import quantize_qdq
from export.engine import BatchProfile, engine_metadata
from export.onnx import ParityError, export_checkpoint, main, parity_check
from node.infer.metadata import read_onnx_metadata, read_sidecar, sha256_file, sidecar_path
from tests.calib.scenes import scenes, trained_classifier


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, meta = trained_classifier()
    path = tmp_path_factory.mktemp("ckpt") / "cones.pt"
    torch.save({"model": model.state_dict(), "arch": meta.arch, "classes": meta.classes,
                "input_size": meta.input_size, "mean": meta.mean, "std": meta.std,
                "channel_order": "RGB", "crop": meta.crop, "epoch": 3,
                "metrics": {"val_top1": 0.99}, "config": {}}, path)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint):
    out = checkpoint.parent / "cones.onnx"
    report = export_checkpoint(checkpoint, out, parity_data=scenes(3000, 40))
    return out, report


def test_parity_with_torch_on_real_crops(exported):
    _, report = exported
    assert report.crops >= 150
    assert report.max_abs_diff <= 1e-4
    assert report.top1_agreement == 1.0


def test_graph_is_opset17_with_dynamic_batch_and_named_io(exported):
    path, _ = exported
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain == ""] == [17]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("crops", "logits")
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    ops = {n.op_type for n in model.graph.node}
    assert "Identity" not in ops and "BatchNormalization" not in ops  # folded, inlined
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        logits = sess.run(None, {"crops": np.zeros((n, 3, 32, 32), np.float32)})[0]
        assert logits.shape == (n, 5)


def test_metadata_survives_checkpoint_onnx_int8_sidecar(checkpoint, exported, tmp_path):
    path, _ = exported
    meta = read_onnx_metadata(path)
    _, want = trained_classifier()
    assert meta.classes == want.classes and meta.input_size == 32
    assert (meta.mean, meta.std, meta.crop, meta.arch) == (want.mean, want.std, want.crop,
                                                           "se_resnet_slim32")
    assert meta.precision == "fp32" and meta.source_onnx_sha256 == sha256_file(checkpoint)

    int8 = tmp_path / "cones.int8.onnx"
    feed = calibration_batches(scenes(4000, 30), meta, 128, 32)
    quantize_qdq(path, int8, feed, "minmax")
    meta8 = read_onnx_metadata(int8)
    assert meta8.precision == "int8" and meta8.source_onnx_sha256 == sha256_file(path)

    engine = tmp_path / "cones.int8.abc.engine"
    side = engine_metadata(meta8, "int8", sha256_file(int8), "10.3.0", "Orin", "8.7",
                           BatchProfile(1, 16, 64), "abc")
    sidecar_path(engine).write_text(side.to_json())
    back = read_sidecar(engine)
    for key in ("classes", "input_size", "channel_order", "mean", "std", "crop", "arch"):
        assert getattr(back, key) == getattr(meta, key)
    assert back.precision == "int8" and back.source_onnx_sha256 == sha256_file(int8)
    assert back.extra["batch_profile"] == [1, 16, 64]
    assert back.extra["quantization"]["method"] == "minmax"


def test_parity_check_fails_loudly_on_a_different_model(exported):
    path, _ = exported
    model, _ = trained_classifier()
    other = type(model)((1, 1, 1, 1), (16, 32, 64, 128), 5, se=True, stem="slim").eval()
    batch = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    with pytest.raises(ParityError, match="does not match torch"):
        parity_check(other, path, [batch])


def test_cli_exits_nonzero_and_writes_nothing_when_parity_fails(checkpoint, tmp_path, capsys,
                                                                 monkeypatch):
    cfg = tmp_path / "export.yaml"
    cfg.write_text("onnx:\n  parity_atol: 0.0\n  parity_crops: 64\n")
    import calib.feed

    monkeypatch.setattr(calib.feed, "open_samples", lambda *a, **k: scenes(3000, 10))
    out = tmp_path / "strict.onnx"
    rc = main([str(checkpoint), "-o", str(out), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match torch" in err and err.count("\n") == 1
    assert not out.exists()
    rc = main([str(tmp_path / "missing.pt"), "-o", str(out)])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err
