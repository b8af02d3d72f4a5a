"""Checkpoint → FP32 ONNX with the preprocessing contract inside, proven equal to torch.

Uses ``torch.onnx.export`` with ``dynamo=False`` (the TorchScript exporter). On torch 2.14 the
default torch.export-based exporter cannot emit opset 17: it raises the model to opset 18
(after a failed down-conversion), which TensorRT 8.5 on JetPack 5 cannot parse, and it names
nodes ``node_Conv_101`` instead of by module path. The TorchScript exporter writes opset 17
exactly, a small graph (Conv/BN folded, GlobalAveragePool, Gemm) with a symbolic ``batch``
axis, and module-path node names, in a tenth of a second. ``--exporter dynamo`` remains for
when the legacy exporter is gone.

The graph has one input ``crops`` (N×3×S×S float32, normalised as the metadata says) and one
output ``logits`` (N×classes). The metadata (``node.infer.metadata.ModelMetadata`` as JSON under
``cone_node`` in ``metadata_props``) records, for the FP32 ONNX, ``source_onnx_sha256`` =
the sha256 of the checkpoint file it was exported from. Before anything is written, a parity
check runs the same crops through torch and ONNX Runtime and fails loudly unless the logits
agree to 1e-4 and top-1 agrees on every crop.

    python -m export.onnx CKPT -o model.onnx [--opset 17] [--parity-data yolo:DIR]
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

import argparse
import sys
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.config import ConfigError, load_config, spec
from node.infer.metadata import METADATA_KEY, MetadataError, ModelMetadata, sha256_file

INPUT_NAME = "crops"
OUTPUT_NAME = "logits"
MIN_OPSET = 17


class ExportError(ValueError):
    """The checkpoint cannot be exported, or the export does not match torch."""


class ParityError(ExportError):
    """ONNX Runtime's logits differ from torch's beyond the tolerance."""


@dataclass
class OnnxExportConfig:
    """The ``onnx`` section of ``configs/export.yaml`` (documented there)."""

    opset: int = spec(17, min=MIN_OPSET, max=23)
    exporter: str = spec("torchscript", choices=("torchscript", "dynamo"))
    parity_crops: int = spec(256, min=8, max=100000)
    parity_atol: float = spec(1e-4, min=0.0, max=1.0)


@dataclass
class _FileConfig:
    onnx: OnnxExportConfig = field(default_factory=OnnxExportConfig)
    calibration: dict = field(default_factory=dict)
    quantize: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)


@dataclass
class ParityReport:
    """Torch vs ONNX Runtime on the same crops.

    Attributes:
        crops: number of crops compared.
        max_abs_diff: largest absolute logit difference.
        top1_agreement: fraction of crops with the same arg-max class.
    """

    crops: int
    max_abs_diff: float
    top1_agreement: float

    def summary(self) -> str:
        return (f"parity on {self.crops} crops: max |Δlogit| {self.max_abs_diff:.2e}, top-1 "
                f"agreement {100 * self.top1_agreement:.2f}%")


def load_checkpoint(path: str | Path):
    """Load a training checkpoint as (eval-mode model, metadata).

    Uses ``export.checkpoint.load_checkpoint`` and ``metadata_from_checkpoint`` (the checkpoint
    contract lives there). The metadata's ``source_onnx_sha256`` is set to the sha256 of the
    checkpoint file.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: checkpoint not found")
    from export.checkpoint import load_checkpoint as train_load
    from export.checkpoint import metadata_from_checkpoint

    model, ckpt = train_load(path)
    meta = metadata_from_checkpoint(ckpt)
    model.eval()
    return model, meta.replace(precision="fp32", source_onnx_sha256=sha256_file(path))


def export_onnx(model, meta: ModelMetadata, out_path: str | Path, opset: int = 17,
                exporter: str = "torchscript"):
    """Export ``model`` to ONNX with a dynamic batch axis and ``meta`` in ``metadata_props``.

    Returns:
        The checked ``onnx.ModelProto`` (also written to ``out_path``).
    """
    import onnx
    import torch

    if opset < MIN_OPSET:
        raise ExportError(f"--opset must be >= {MIN_OPSET}, got {opset}")
    model = model.eval()
    size = meta.input_size
    dummy = torch.zeros(2, 3, size, size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        if exporter == "torchscript":
            torch.onnx.export(model, (dummy,), str(out_path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (dummy,), str(out_path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, dynamo=True,
                              dynamic_shapes=({0: batch},), verbose=False)
    proto = onnx.load(str(out_path))
    _inline_identity_initializers(proto)
    extra = dict(meta.extra)
    extra["onnx_export"] = {"exporter": exporter, "torch": torch.__version__, "opset": opset}
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = meta.replace(precision="fp32", extra=extra).to_json()
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "cone_node.export.onnx"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(out_path))
    return proto


def _inline_identity_initializers(proto) -> None:
    """Replace ``Identity(initializer)`` nodes (the TorchScript exporter's way of sharing equal
    folded constants) by plain initializers, so the graph holds compute nodes only."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            proto.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    if len(keep) != len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(keep)


def parity_check(model, onnx_path: str | Path, batches: Iterable[np.ndarray],
                 atol: float = 1e-4) -> ParityReport:
    """Compare torch and ONNX Runtime logits on the same crops.

    Raises:
        ParityError: max abs difference above ``atol`` or any top-1 disagreement.
    """
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    worst, agree, total = 0.0, 0, 0
    with torch.inference_mode():
        for batch in batches:
            ref = model(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).numpy()
            got = sess.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
            worst = max(worst, float(np.max(np.abs(ref - got))))
            agree += int(np.sum(ref.argmax(1) == got.argmax(1)))
            total += len(batch)
    if total == 0:
        raise ParityError("parity check got no crops")
    report = ParityReport(total, worst, agree / total)
    if worst > atol or agree != total:
        raise ParityError(f"ONNX export does not match torch: {report.summary()} "
                          f"(need max |Δlogit| <= {atol:g} and 100% top-1 agreement)")
    return report


def export_checkpoint(ckpt_path: str | Path, out_path: str | Path, parity_data: str = "synth",
                      config: str | Path | None = None, opset: int | None = None
                      ) -> ParityReport:
    """The CLI's work: load, export to a temporary file, prove parity, then move in place."""
    from calib.feed import calibration_batches

    cfg = load_config(_FileConfig, config)
    model, meta = load_checkpoint(ckpt_path)
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="export.") as tmp:
        tmp_path = Path(tmp) / out_path.name
        export_onnx(model, meta, tmp_path, opset or cfg.onnx.opset, cfg.onnx.exporter)
        # Synthetic frames hold ~10 cones each: render just enough for the parity crops.
        batches = calibration_batches(parity_data, meta, cfg.onnx.parity_crops, 64, seed=1,
                                      synth_frames=max(8, cfg.onnx.parity_crops // 6))
        report = parity_check(model, tmp_path, batches, cfg.onnx.parity_atol)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(tmp_path.read_bytes())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.onnx",
                                     description="Export a checkpoint to FP32 ONNX with parity "
                                                 "check.")
    parser.add_argument("checkpoint", help="training checkpoint (.pt)")
    parser.add_argument("-o", "--output", required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 17)")
    parser.add_argument("--parity-data", default="synth",
                        help="crops for the parity check: yolo:DIR or synth[:N] (default)")
    parser.add_argument("--config", default=None, help="configs/export.yaml")
    args = parser.parse_args(argv)
    try:
        report = export_checkpoint(args.checkpoint, args.output, args.parity_data, args.config,
                                   args.opset)
    except (ExportError, ConfigError, MetadataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}; {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
