"""Registry tests: every registered architecture builds, has the expected size, runs on a batch
and exports to ONNX (opset 17, dynamic batch) with outputs matching PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from export.model import REGISTRY, create_model

# Expected parameter counts (5 classes), as a range so small refactors don't break the test
# but a wrong width or a lost SE block does.
PARAM_RANGE = {
    "se_resnet18": (11.0e6, 11.5e6),
    "resnet18": (11.0e6, 11.3e6),
    "se_resnet_slim32": (0.2e6, 0.7e6),
    "se_resnet_slim32_s2": (0.2e6, 0.7e6),  # the same layers, the first stage strided
    "resnet_slim32": (0.2e6, 0.7e6),
    "se_resnet_slim64": (0.2e6, 0.75e6),
    "resnet_slim64": (0.2e6, 0.75e6),
}
NUM_CLASSES = 5


def test_every_variant_has_an_expected_size() -> None:
    assert set(PARAM_RANGE) == set(REGISTRY)


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def built(request):
    torch.manual_seed(0)
    model = create_model(request.param, NUM_CLASSES).eval()
    return request.param, model


def test_forward_shape(built) -> None:
    name, model = built
    size = REGISTRY[name].input_size
    with torch.no_grad():
        out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_parameter_count(built) -> None:
    name, model = built
    lo, hi = PARAM_RANGE[name]
    count = sum(p.numel() for p in model.parameters())
    assert lo <= count <= hi, f"{name}: {count} parameters"


def test_se_adds_parameters_only_where_expected() -> None:
    for se_name, plain in [("se_resnet18", "resnet18"), ("se_resnet_slim32", "resnet_slim32"),
                           ("se_resnet_slim64", "resnet_slim64")]:
        n_se = sum(p.numel() for p in create_model(se_name, 5).parameters())
        n_plain = sum(p.numel() for p in create_model(plain, 5).parameters())
        assert 0 < n_se - n_plain < 0.05 * n_plain


def test_onnx_export_matches_torch(built, tmp_path) -> None:
    name, model = built
    size = REGISTRY[name].input_size
    # Randomise BN statistics so the comparison is not between near-identity blocks.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    got = sess.run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (4, NUM_CLASSES)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope", 5)
