"""``python -m node selfcheck``: prove the TensorRT path on a Jetson with one command.

For every FP32 ONNX in ``--models-dir`` (the bundled ``models/cone_classifier.onnx``) and every
precision asked for (FP16 and INT8 by default) it:

1. builds the engine, or reuses the cached one, with ``export.engine.build_engine`` (FP32 and
   FP16 from the FP32 ONNX, INT8 from its Q/DQ twin ``<stem>.int8.onnx``);
2. runs the engine and ONNX Runtime (CPU) on the *same ONNX the engine was built from* over
   the same sample crops, and compares the softmax probabilities as Polygraphy's comparator
   does: top-1 agreement must be at least ``MIN_TOP1_AGREEMENT`` (99 %) and the largest
   absolute difference of any probability at most the precision's tolerance
   (``TOLERANCES``: FP32 0.02, as TensorRT may use TF32 on Ampere and later; FP16 0.05;
   INT8 0.15, as TensorRT and ONNX Runtime fuse and round the Q/DQ graph differently);
3. times the engine (crops/s at batch 1, 8 and 32) with ``node.bench.measure.time_model``.

It prints one line per check and ends with one verdict line, ``selfcheck: PASS`` or
``selfcheck: FAIL (...)``; the exit code is 0 on PASS and 1 on any mismatch or failed build.
Where TensorRT (or pycuda) is missing it prints one line and exits with ``EXIT_NO_TENSORRT``
(3), without a traceback: that is the expected outcome on a machine without JetPack.

Sample crops: ``<models-dir>/sample_crops.npz`` (``crops``: N×S×S×3 uint8 BGR at the model
input size, already cropped by the model's crop policy; optional ``labels``: class names)
when it is shipped; otherwise crops of synthetic scenes rendered by ``export.synth`` (numpy
and cv2 only), and the report says so. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from node.infer.metadata import ModelMetadata, read_onnx_metadata
from node.infer.preprocess import normalize

EXIT_PASS, EXIT_FAIL, EXIT_NO_TENSORRT = 0, 1, 3
MIN_TOP1_AGREEMENT = 0.99
TOLERANCES: dict[str, float] = {"fp32": 0.02, "fp16": 0.05, "int8": 0.15}
"""Largest allowed absolute difference of any class probability, engine vs ONNX Runtime."""
DEFAULT_PRECISIONS = ("fp16", "int8")
BENCH_BATCHES = (1, 8, 32)
SAMPLE_CROPS = "sample_crops.npz"
NO_TENSORRT = ("selfcheck: TensorRT is not installed; it ships with JetPack (python3-libnvinfer)"
               " - run this on the Jetson")
NO_PYCUDA = ("selfcheck: pycuda is not installed; run launch/jetson_setup.sh (pip install "
             "pycuda) on the Jetson")


class SelfcheckError(ValueError):
    """A selfcheck input is missing or unusable (no ONNX, bad sample crops)."""


# ---- comparison and verdict (pure) -------------------------------------------------------

@dataclass
class Comparison:
    """How an engine's probabilities compare with ONNX Runtime's on the same crops."""

    name: str
    precision: str
    num_crops: int = 0
    top1_agreement: float = math.nan
    max_abs_diff: float = math.nan
    mean_abs_diff: float = math.nan
    tolerance: float = math.nan
    accuracy: float | None = None
    crops_per_s: dict[int, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.top1_agreement >= MIN_TOP1_AGREEMENT
                and self.max_abs_diff <= self.tolerance)

    def problems(self) -> list[str]:
        if self.error is not None:
            return [self.error]
        out = []
        if not self.top1_agreement >= MIN_TOP1_AGREEMENT:
            out.append(f"top-1 agreement {self.top1_agreement:.1%} < "
                       f"{MIN_TOP1_AGREEMENT:.0%}")
        if not self.max_abs_diff <= self.tolerance:
            out.append(f"max |dp| {self.max_abs_diff:.4f} > {self.tolerance:g}")
        return out

    def line(self) -> str:
        if self.error is not None:
            return f"{self.name}: FAIL: {self.error}"
        speed = ", ".join(f"b{b} {v:,.0f}" for b, v in sorted(self.crops_per_s.items()))
        acc = f", accuracy {self.accuracy:.1%}" if self.accuracy is not None else ""
        return (f"{self.name}: {'ok' if self.ok else 'MISMATCH'}: top-1 agreement "
                f"{self.top1_agreement:.2%} on {self.num_crops} crops, max |dp| "
                f"{self.max_abs_diff:.4f} (tolerance {self.tolerance:g}), mean |dp| "
                f"{self.mean_abs_diff:.5f}{acc}" + (f"; crops/s {speed}" if speed else ""))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def compare_probabilities(reference: np.ndarray, candidate: np.ndarray, *, name: str,
                          precision: str, tolerance: float | None = None,
                          labels: np.ndarray | None = None) -> Comparison:
    """Compare an engine's probabilities (N, C) with the reference's.

    Args:
        reference: ONNX Runtime's probabilities.
        candidate: the engine's probabilities on the same crops, same order.
        name, precision: for the report; ``precision`` picks the default tolerance.
        tolerance: overrides ``TOLERANCES[precision]``.
        labels: optional true class indices (N,), for an accuracy figure (not judged).

    Raises:
        SelfcheckError: shapes differ or are empty.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape or reference.ndim != 2 or not reference.size:
        raise SelfcheckError(f"{name}: output shape {candidate.shape} does not match ONNX "
                             f"Runtime's {reference.shape}")
    diff = np.abs(candidate - reference)
    top1 = candidate.argmax(axis=1)
    accuracy = None
    if labels is not None and len(labels) == len(top1) and (labels >= 0).all():
        accuracy = float(np.mean(top1 == labels))
    return Comparison(name, precision, len(reference),
                      float(np.mean(top1 == reference.argmax(axis=1))), float(diff.max()),
                      float(diff.mean()),
                      TOLERANCES[precision] if tolerance is None else float(tolerance),
                      accuracy)


def verdict(comparisons: Sequence[Comparison]) -> tuple[int, str]:
    """Exit code and the one verdict line."""
    if not comparisons:
        return EXIT_FAIL, "selfcheck: FAIL (nothing was checked)"
    failed = [c for c in comparisons if not c.ok]
    if not failed:
        summary = "; ".join(f"{c.name} {c.top1_agreement:.1%} agreement, max |dp| "
                            f"{c.max_abs_diff:.3f}" for c in comparisons)
        return EXIT_PASS, f"selfcheck: PASS ({summary})"
    reasons = "; ".join(f"{c.name}: {', '.join(c.problems())}" for c in failed)
    return EXIT_FAIL, f"selfcheck: FAIL ({reasons})"


# ---- sample crops ----------------------------------------------------------------------------

def load_sample_crops(models_dir: Path, meta: ModelMetadata, count: int, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 BGR crops at the model's input size, true class indices (-1 unknown) and where
    they came from.

    Raises:
        SelfcheckError: the shipped sample file is malformed.
    """
    path = models_dir / SAMPLE_CROPS
    size = meta.input_size
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if "crops" not in data:
                raise SelfcheckError(f"{path}: no 'crops' array")
            crops = np.asarray(data["crops"])
            names = [str(n) for n in data["labels"]] if "labels" in data else None
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
            raise SelfcheckError(f"{path}: 'crops' must be N×S×S×3 uint8, got {crops.shape} "
                                 f"{crops.dtype}")
        if crops.shape[1:3] != (size, size):
            crops = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA)
                              for c in crops])
        origin = f"{path.name} ({len(crops)} real crops)"
    else:
        crops, names = _synthetic_crops(meta, count, seed)
        origin = (f"{len(crops)} synthetic crops (export.synth; {SAMPLE_CROPS} is not in "
                  f"{models_dir})")
    crops, names = crops[:count], (names[:count] if names is not None else None)
    index = {c: i for i, c in enumerate(meta.classes)}
    labels = np.array([index.get(n, -1) for n in names] if names is not None
                      else [-1] * len(crops), np.int64)
    return np.ascontiguousarray(crops), labels, origin


def _synthetic_crops(meta: ModelMetadata, count: int, seed: int
                     ) -> tuple[np.ndarray, list[str]]:
    from export.synth import render_scene
    from node.infer.crop import crop_batch

    crops, names = [], []
    for i in range(200):  # bounded: a few dozen scenes give hundreds of cones
        frame = render_scene(seed + i, 640, 480)
        if len(frame.boxes):
            crops.append(crop_batch(frame.image, frame.boxes, meta.input_size,
                                    meta.crop_policy).copy())
            names += list(frame.labels)
        if len(names) >= count:
            break
    if not names:
        raise SelfcheckError("export.synth rendered no cones for the sample crops")
    return np.concatenate(crops), names


# ---- the check ------------------------------------------------------------------------------

def tensorrt_missing() -> str | None:
    """The one-line reason the TensorRT path cannot run here, or ``None``."""
    if importlib.util.find_spec("tensorrt") is None:
        return NO_TENSORRT
    if importlib.util.find_spec("pycuda") is None:
        return NO_PYCUDA
    return None


def find_models(models_dir: Path) -> list[Path]:
    """The FP32 ONNX files of ``models_dir`` (not their ``*.int8.onnx`` twins)."""
    if not models_dir.is_dir():
        raise SelfcheckError(f"{models_dir}: models folder not found")
    found = sorted(p for p in models_dir.glob("*.onnx") if not p.name.endswith(".int8.onnx"))
    if not found:
        raise SelfcheckError(f"{models_dir}: no FP32 .onnx model to check")
    return found


def engine_source(onnx: Path, precision: str) -> Path:
    """The ONNX an engine of ``precision`` is built from (INT8: the Q/DQ twin)."""
    return onnx.with_name(onnx.stem + ".int8.onnx") if precision == "int8" else onnx


def run_selfcheck(models_dir: Path, precisions: Sequence[str], *, crops: int = 512,
                  batches: Sequence[int] = BENCH_BATCHES, bench_seconds: float = 1.0,
                  build: Callable[..., Path] | None = None,
                  load: Callable[..., Any] | None = None,
                  report: Callable[[str], None] = print) -> list[Comparison]:
    """Build, compare and time every (model, precision); returns the comparisons.

    ``build(onnx, precision) -> engine path`` and ``load(path, max_batch=...) -> backend``
    default to ``export.engine.build_engine`` and ``node.infer.load_backend``; tests inject
    fakes.
    """
    from node.bench.measure import time_model

    if build is None:
        from export.engine import build_engine

        def build(onnx: Path, precision: str) -> Path:
            return build_engine(onnx, precision, log=lambda m: report(f"  {m}"))
    if load is None:
        from node.infer import load_backend as load

    results: list[Comparison] = []
    for onnx in find_models(models_dir):
        meta = read_onnx_metadata(onnx)
        sample, labels, origin = load_sample_crops(models_dir, meta, crops)
        report(f"{onnx.name}: {origin}")
        batch = normalize(sample, np.asarray(meta.mean, np.float32),
                          np.asarray(meta.std, np.float32), meta.channel_order == "RGB")
        references: dict[Path, np.ndarray] = {}
        for precision in precisions:
            name = f"{onnx.stem} {precision}"
            source = engine_source(onnx, precision)
            try:
                if not source.is_file():
                    raise SelfcheckError(f"{source.name} not found (make the Q/DQ model with "
                                         f"`python -m calib.quantize`)")
                if source not in references:
                    with load(source, max_batch=64) as reference:
                        references[source] = _infer_all(reference, batch)
                engine = build(source, precision)
                with load(engine, max_batch=64) as backend:
                    comparison = compare_probabilities(
                        references[source], _infer_all(backend, batch), name=name,
                        precision=precision, labels=labels)
                    for b in batches:
                        if b <= backend.max_batch:
                            point = time_model(backend, b, seconds=bench_seconds, warmup=5)
                            comparison.crops_per_s[b] = float(point["crops_per_s"])
            except (ValueError, RuntimeError, OSError) as exc:
                lines = str(exc).strip().splitlines()
                comparison = Comparison(name, precision,
                                        error=lines[0] if lines else type(exc).__name__)
            report(comparison.line())
            results.append(comparison)
    return results


def _infer_all(backend: Any, batch: np.ndarray) -> np.ndarray:
    """Probabilities of ``batch`` from an active backend, in chunks it accepts."""
    chunk = max(1, int(backend.max_batch))
    logits = [backend.infer(np.ascontiguousarray(batch[i:i + chunk]))
              for i in range(0, len(batch), chunk)]
    return probabilities(np.concatenate(logits))


# ---- command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", default="models", type=Path,
                        help="folder with <model>.onnx and its <model>.int8.onnx twin "
                             "(default: models)")
    parser.add_argument("--precisions", nargs="+", default=list(DEFAULT_PRECISIONS),
                        choices=sorted(TOLERANCES), help="engines to build and check "
                                                          "(default: fp16 int8)")
    parser.add_argument("--crops", type=int, default=512,
                        help="sample crops to compare on (default: 512)")
    parser.add_argument("--bench-seconds", type=float, default=1.0,
                        help="time budget per benchmark batch size (default: 1.0)")
    parser.add_argument("--json", metavar="FILE", type=Path,
                        help="also write the comparisons as JSON")


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``python -m node selfcheck``; returns 0 (PASS), 1 (FAIL) or 3 (no TensorRT)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m node selfcheck",
                                         description=__doc__.splitlines()[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    missing = tensorrt_missing()
    if missing is not None:
        print(missing, file=sys.stderr)
        return EXIT_NO_TENSORRT
    from node.node_config import resolve_path

    try:
        results = run_selfcheck(resolve_path(args.models_dir), args.precisions,
                                crops=args.crops, bench_seconds=args.bench_seconds)
    except (SelfcheckError, ValueError) as exc:
        print(f"selfcheck: FAIL ({str(exc).strip().splitlines()[0]})")
        return EXIT_FAIL
    code, line = verdict(results)
    if args.json is not None:
        args.json.write_text(json.dumps([{**vars(c), "ok": c.ok} for c in results], indent=2))
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
