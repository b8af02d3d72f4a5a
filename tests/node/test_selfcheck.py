"""``python -m node selfcheck``: the no-TensorRT exit, the comparison and verdict rules, and
the build -> compare -> time flow with fake engines (TensorRT cannot be installed here).

The fake engines are ONNX Runtime on the same model with controlled changes to its logits,
so the expected agreement and probability differences are known exactly.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from node.bench import selfcheck
from node.bench.selfcheck import (
    EXIT_FAIL,
    EXIT_NO_TENSORRT,
    EXIT_PASS,
    MIN_TOP1_AGREEMENT,
    TOLERANCES,
    compare_probabilities,
    probabilities,
    run_selfcheck,
    verdict,
)
from node.infer import load_backend

ROOT = Path(__file__).resolve().parents[2]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


# ---- no TensorRT ------------------------------------------------------------------------------

def test_without_tensorrt_one_line_and_exit_3_in_process(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(selfcheck.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorrt" else real(name, *a))
    assert selfcheck.main([]) == EXIT_NO_TENSORRT == 3
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [selfcheck.NO_TENSORRT]
    assert "JetPack" in err and "Jetson" in err


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_cli_exits_3_without_a_traceback():
    run = subprocess.run([sys.executable, "-m", "node", "selfcheck"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 3
    assert run.stdout == "" and run.stderr.strip() == selfcheck.NO_TENSORRT
    assert "Traceback" not in run.stderr


# ---- comparison and verdict ---------------------------------------------------------------------

def _probs(n=100, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), rng.integers(0, classes, n)] += 4.0  # confident, as real crops are
    return probabilities(logits)


def test_full_agreement_within_tolerance_passes():
    ref = _probs()
    close = ref + 0.01 * np.eye(5)[(ref.argmax(1) + 1) % 5]  # +0.01 on a losing class
    c = compare_probabilities(ref, close, name="m fp16", precision="fp16")
    assert c.top1_agreement == 1.0 and c.max_abs_diff == pytest.approx(0.01)
    assert c.tolerance == TOLERANCES["fp16"] == 0.05 and c.ok
    code, line = verdict([c])
    assert code == EXIT_PASS and line.startswith("selfcheck: PASS")
    assert "m fp16 100.0% agreement" in line


def test_98_percent_agreement_fails_with_exit_1():
    ref = _probs()
    flipped = ref.copy()
    for i in (3, 40):  # swap the winner with the runner-up on 2 of 100 crops
        order = np.argsort(ref[i])
        flipped[i, [order[-1], order[-2]]] = ref[i, [order[-2], order[-1]]]
    c = compare_probabilities(ref, flipped, name="m int8", precision="int8", tolerance=1.0)
    assert c.top1_agreement == pytest.approx(0.98) and c.top1_agreement < MIN_TOP1_AGREEMENT
    assert not c.ok
    code, line = verdict([c])
    assert code == EXIT_FAIL
    assert line == "selfcheck: FAIL (m int8: top-1 agreement 98.0% < 99%)"


def test_probability_difference_over_tolerance_fails():
    ref = _probs()
    off = ref.copy()
    loser = ref[7].argmin()
    off[7] = 0.8 * ref[7] + 0.2 * np.eye(5)[loser]  # same winner, 20 % of mass moved
    diff = float(np.abs(off - ref).max())
    good = compare_probabilities(ref, ref, name="m fp16", precision="fp16")
    bad = compare_probabilities(ref, off, name="m fp32", precision="fp32")
    assert bad.top1_agreement == 1.0 and 0.15 < diff < 0.25 and diff > TOLERANCES["fp32"]
    assert bad.max_abs_diff == pytest.approx(diff) and not bad.ok
    code, line = verdict([good, bad])
    assert code == EXIT_FAIL and "m fp32: max |dp|" in line and "> 0.02" in line
    assert "m fp16" not in line  # only the failing check is named
    with pytest.raises(ValueError, match="shape"):
        compare_probabilities(ref, ref[:, :4], name="m", precision="fp16")
    assert verdict([])[0] == EXIT_FAIL


# ---- the flow over fake engines -----------------------------------------------------------------

class FakeEngine:
    """ONNX Runtime on the engine's source ONNX, with its logits changed by ``alter``."""

    def __init__(self, source, alter):
        self._inner = load_backend(source, max_batch=16)
        self.alter, self.max_batch, self.meta = alter, 16, self._inner.meta
        self.last_timing: dict = {}

    def __enter__(self):
        self._inner.activate()
        return self

    def __exit__(self, *exc):
        self._inner.deactivate()

    def infer(self, batch):
        logits = self.alter(self._inner.infer(batch))
        self.last_timing = self._inner.last_timing
        return logits


def _models_dir(tmp_path, with_twin=True):
    from .backend_doubles import make_onnx

    make_onnx(tmp_path / "cone_classifier.onnx")
    if with_twin:
        make_onnx(tmp_path / "cone_classifier.int8.onnx")  # same weights: a stand-in twin
    return tmp_path


def _run(models_dir, alters, precisions=("fp16", "int8")):
    built, lines = [], []

    def build(source, precision):
        built.append((source.name, precision))
        return models_dir / f"{source.stem}.{precision}.engine"

    def load(path, max_batch=64):
        if path.suffix == ".onnx":
            return load_backend(path, max_batch=max_batch)
        precision = path.stem.rsplit(".", 1)[1]
        return FakeEngine(models_dir / ("cone_classifier.int8.onnx" if precision == "int8"
                                        else "cone_classifier.onnx"), alters[precision])

    results = run_selfcheck(models_dir, precisions, crops=48, batches=(1, 8),
                            bench_seconds=0.02, build=build, load=load, report=lines.append)
    return results, built, lines


def test_flow_builds_from_the_right_onnx_compares_and_times(tmp_path):
    models = _models_dir(tmp_path)
    rng = np.random.default_rng(0)
    noise = lambda z: z + rng.normal(0, 1e-4, z.shape).astype(np.float32)

    def flip_some(z):  # the INT8 stand-in ranks a different class first on 3 crops
        z = z.copy()
        z[:3, :] = z[:3, ::-1]
        return z

    results, built, lines = _run(models, {"fp16": noise, "int8": flip_some})
    assert built == [("cone_classifier.onnx", "fp16"), ("cone_classifier.int8.onnx", "int8")]
    fp16, int8 = results
    assert fp16.ok and fp16.num_crops == 48 and fp16.max_abs_diff < 1e-3
    assert set(fp16.crops_per_s) == {1, 8} and all(v > 0 for v in fp16.crops_per_s.values())
    assert 0.0 <= fp16.accuracy <= 1.0  # synthetic crops carry their cone labels (reported)
    assert int8.top1_agreement <= 1 - 1 / 48 and not int8.ok
    assert "synthetic crops (export.synth; sample_crops.npz is not in" in lines[0]
    assert lines[1].startswith("cone_classifier fp16: ok: top-1 agreement 100.00% on 48 crops")
    assert lines[2].startswith("cone_classifier int8: MISMATCH")
    code, line = verdict(results)
    assert code == EXIT_FAIL and line.startswith("selfcheck: FAIL (cone_classifier int8: top-1")


def test_shipped_sample_crops_are_used_and_scored(tmp_path):
    models = _models_dir(tmp_path, with_twin=False)
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (20, 40, 40, 3), dtype=np.uint8)  # resized to 32 px
    names = np.array(["blue_cone", "yellow_cone", "orange_cone", "large_orange_cone",
                      "background"] * 4)
    np.savez(models / "sample_crops.npz", crops=crops, labels=names)
    results, built, lines = _run(models, {"fp32": lambda z: z, "int8": lambda z: z},
                                 precisions=("fp32", "int8"))
    assert lines[0] == "cone_classifier.onnx: sample_crops.npz (20 real crops)"
    fp32, int8 = results
    assert fp32.ok and fp32.max_abs_diff == 0.0 and fp32.num_crops == 20
    assert fp32.accuracy is not None and 0.0 <= fp32.accuracy <= 1.0
    assert built == [("cone_classifier.onnx", "fp32")]  # no twin: the INT8 check fails early
    assert int8.error.startswith("cone_classifier.int8.onnx not found")
    assert verdict(results)[0] == EXIT_FAIL


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and a CUDA GPU (JetPack)")
def test_real_engines_agree_with_onnx_runtime(tmp_path):
    """On a Jetson: the bundled model's FP16 and INT8 engines pass the selfcheck."""
    if not (ROOT / "models" / "cone_classifier.onnx").is_file():
        pytest.skip("the bundled model is not in models/")
    run = subprocess.run([sys.executable, "-m", "node", "selfcheck", "--crops", "256",
                          "--json", str(tmp_path / "selfcheck.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("selfcheck: PASS")
