"""Q/DQ graph rules: which nodes stay float, and whether a Q/DQ ONNX is legal for its target.

TensorRT's explicit quantization (TensorRT developer guide, "Explicit Quantization") accepts
only symmetric INT8: every zero point is 0 and signed, weights are quantized per output channel
(axis 0 of a Conv kernel or of a transposed Gemm weight) within [-127, 127]. ``verify_qdq``
checks exactly that on an ONNX file, so a model that TensorRT would reject, or would run with
silently shifted values, never leaves ``calib.quantize``.

The ``cpu`` target is ONNX Runtime's CPU kernels instead: activations are unsigned with a zero
point (so that a ReLU folds into the convolution before it, and the whole Conv runs as one
integer kernel), weights stay signed, symmetric and per output channel. ``verify_qdq(path,
"cpu")`` checks those rules; such a model is refused for TensorRT.

Keep-float groups are found by graph structure, not by layer names, so they work for any
exporter's naming: ``first_conv`` (Conv nodes reading the network input), ``se`` (the
squeeze-and-excitation gates: the chain from the pooled squeeze to the Sigmoid that scales the
features) and ``classifier`` (the last Gemm/MatMul before the output).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KEEP_FLOAT_GROUPS = ("first_conv", "se", "classifier")
_POOLS = ("GlobalAveragePool", "ReduceMean")
_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Add", "Transpose")


TARGETS = ("tensorrt", "cpu")
"""What a Q/DQ model is made for: TensorRT's symmetric INT8, or ONNX Runtime's CPU kernels."""


class QuantizationError(ValueError):
    """Quantization cannot proceed or produced a model its target would not accept."""


@dataclass
class QdqReport:
    """What ``verify_qdq`` found in a Q/DQ model.

    Attributes:
        quantize_nodes: number of QuantizeLinear nodes.
        dequantize_nodes: number of DequantizeLinear nodes.
        per_channel_weights: weight name → number of channels of its per-channel scale.
        float_ops: op types of compute nodes (Conv, Gemm, MatMul) left unquantized, by name.
        target: ``tensorrt`` or ``cpu`` (``TARGETS``), whose rules the model passed.
    """

    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    per_channel_weights: dict[str, int] = field(default_factory=dict)
    float_ops: list[str] = field(default_factory=list)
    target: str = "tensorrt"

    def summary(self) -> str:
        points = ("all zero points 0" if self.target == "tensorrt"
                  else "uint8 activations, weight zero points 0")
        return (f"{self.quantize_nodes} Q / {self.dequantize_nodes} DQ nodes, "
                f"{len(self.per_channel_weights)} per-channel weights, {points}, "
                f"{len(self.float_ops)} compute nodes kept float")


def resolve_keep_float(model, keep: Iterable[str]) -> list[str]:
    """Node names to exclude from quantization for the given groups or name regexes.

    Args:
        model: an ``onnx.ModelProto``.
        keep: ``first_conv``, ``se``, ``classifier``, or regular expressions matched against
            node names (``re.search``).

    Raises:
        QuantizationError: a regex that matches nothing, or a group absent from the graph.
    """
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out: set[str] = set()
    for item in (k.strip() for k in keep):
        if not item:
            continue
        if item == "first_conv":
            found = {n.name for n in nodes if n.op_type == "Conv"
                     and n.input[0] in {i.name for i in model.graph.input}}
        elif item == "se":
            found = _se_gate_nodes(nodes, producer, consumers)
        elif item == "classifier":
            found = _classifier_nodes(model, producer)
        else:
            try:
                pattern = re.compile(item)
            except re.error as exc:
                raise QuantizationError(f"keep_float: bad pattern {item!r} ({exc})") from None
            found = {n.name for n in nodes if pattern.search(n.name)}
        if not found:
            raise QuantizationError(f"keep_float: {item!r} matches no node of the model")
        out |= found
    return sorted(out)


def _se_gate_nodes(nodes, producer, consumers) -> set[str]:
    """Nodes from an SE squeeze (pool) to its Sigmoid, for every Sigmoid that gates a Mul."""
    found: set[str] = set()
    for sig in (n for n in nodes if n.op_type in ("Sigmoid", "HardSigmoid")):
        if not any(c.op_type == "Mul" for c in consumers.get(sig.output[0], [])):
            continue
        chain, frontier, reached_pool = {sig.name}, [sig], False
        while frontier:
            node = frontier.pop()
            for name in node.input:
                up = producer.get(name)
                if up is None:
                    continue
                if up.op_type in _POOLS:
                    reached_pool = True
                    continue
                if up.name not in chain and len(chain) < 16:
                    chain.add(up.name)
                    frontier.append(up)
        if reached_pool:
            found |= chain
    return found


def _classifier_nodes(model, producer) -> set[str]:
    found: set[str] = set()
    for out in model.graph.output:
        frontier = [producer.get(out.name)]
        while frontier:
            node = frontier.pop()
            if node is None:
                continue
            if node.op_type in ("Gemm", "MatMul"):
                found.add(node.name)
            elif node.op_type in _SHAPE_OPS:
                if node.op_type == "Add":
                    found.add(node.name)  # MatMul + Add is a Gemm split in two
                frontier.extend(producer.get(i) for i in node.input)
    return found


def verify_qdq(path: str | Path, target: str = "tensorrt") -> QdqReport:
    """Check that a Q/DQ ONNX follows its target's rules and runs in ONNX Runtime.

    ``tensorrt``: every zero point INT8 and 0, no uint8 tensor. ``cpu``: weights' zero points
    INT8 and 0, activations' UINT8. Both: weights per output channel, some Q/DQ at all.

    Raises:
        QuantizationError: a zero point of the wrong type or value, a missing zero point, a
            uint8 tensor (``tensorrt``), a per-tensor weight scale, a per-channel scale on the
            wrong axis, no Q/DQ at all, or a model ONNX Runtime cannot run.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    if target not in TARGETS:
        raise QuantizationError(f"unknown quantization target {target!r}; expected one of "
                                f"{list(TARGETS)}")
    path = Path(path)
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    tensors = {**consts, **inits}
    report = QdqReport(target=target)
    if target == "tensorrt":
        uint8 = uint8_tensors(model)
        if uint8:
            raise QuantizationError(f"{path}: uint8 tensors {uint8[:3]}; TensorRT needs signed "
                                    f"INT8 (a model quantized for the cpu target?)")
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    quant_input = {n.output[0]: n.input[0] for n in model.graph.node
                   if n.op_type == "QuantizeLinear"}
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.op_type == "QuantizeLinear":
            report.quantize_nodes += 1
        else:
            report.dequantize_nodes += 1
        if len(n.input) < 3 or n.input[2] not in tensors:
            raise QuantizationError(f"{path}: {n.name} has no constant zero point (it would "
                                    f"default to uint8)")
        zp = tensors[n.input[2]]
        want = _zero_point_type(n, target, inits, quant_input)
        signed = want != TensorProto.UINT8
        if zp.data_type != want:
            raise QuantizationError(f"{path}: {n.name} zero point is "
                                    f"{TensorProto.DataType.Name(zp.data_type)}, not "
                                    f"{TensorProto.DataType.Name(want)}")
        if signed and np.any(numpy_helper.to_array(zp) != 0):
            raise QuantizationError(f"{path}: {n.name} has a non-zero zero point (asymmetric)")
        _check_weight_scale(n, inits, tensors, consumers, quant_input, report, path)
    if report.quantize_nodes == 0 or report.dequantize_nodes == 0:
        raise QuantizationError(f"{path}: no QuantizeLinear/DequantizeLinear nodes")
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            weight = n.input[1] if len(n.input) > 1 else ""
            if weight in inits:  # weight read straight from an initializer: not quantized
                report.float_ops.append(n.name)
    _check_runs(path)
    return report


def uint8_tensors(model) -> list[str]:
    """Names of the uint8 tensors (constants, Constant outputs, typed values) of an
    ``onnx.ModelProto``: TensorRT's INT8 is signed only, so any of them rules TensorRT out."""
    from onnx import TensorProto

    consts = [n.attribute[0].t for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    found = [t.name or "Constant" for t in [*model.graph.initializer, *consts]
             if t.data_type == TensorProto.UINT8]
    return found + [v.name for v in [*model.graph.value_info, *model.graph.output]
                    if v.type.tensor_type.elem_type == TensorProto.UINT8]


def _zero_point_type(n, target: str, inits, quant_input: dict[str, str]) -> int:
    """The zero point's type that ``target`` wants for this Q or DQ node: INT8 throughout for
    TensorRT; for the CPU, a quantized constant's own type (INT8 weights, INT32 biases), INT8
    for a float weight's Q/DQ pair, and UINT8 for activations."""
    from onnx import TensorProto

    src = inits.get(n.input[0])
    if target == "tensorrt":
        return TensorProto.INT8
    if src is not None and src.data_type != TensorProto.FLOAT:
        return src.data_type
    if src is not None or (n.op_type == "DequantizeLinear"
                           and _weight_source(n, inits, quant_input)):
        return TensorProto.INT8
    return TensorProto.UINT8


def _check_weight_scale(n, inits, tensors, consumers, quant_input, report, path) -> None:
    """A DequantizeLinear that feeds a Conv/Gemm weight input must be per-channel on the
    output-channel axis, with as many scales as output channels."""
    from onnx import numpy_helper

    if n.op_type != "DequantizeLinear":
        return
    users = [(c, k) for c in consumers.get(n.output[0], []) for k, i in enumerate(c.input)
             if i == n.output[0]]
    weight_users = [c for c, k in users if k == 1 and c.op_type in ("Conv", "Gemm", "MatMul")]
    if not weight_users:
        return
    weight_name = _weight_source(n, inits, quant_input)
    if weight_name is None:
        return
    dims = list(inits[weight_name].dims)
    user = weight_users[0]
    want_axis = 0
    if user.op_type == "Gemm":
        trans_b = next((a.i for a in user.attribute if a.name == "transB"), 0)
        want_axis = 0 if trans_b else 1
    elif user.op_type == "MatMul":
        want_axis = len(dims) - 1
    axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
    scale = numpy_helper.to_array(tensors[n.input[1]])
    if scale.ndim != 1 or scale.size != dims[want_axis] or axis != want_axis:
        raise QuantizationError(f"{path}: weight {weight_name} of {user.name} is not quantized "
                                f"per output channel (scale shape {list(scale.shape)}, axis "
                                f"{axis}; want {dims[want_axis]} scales on axis {want_axis})")
    report.per_channel_weights[weight_name] = int(scale.size)


def _weight_source(dq, inits, quant_input: dict[str, str]) -> str | None:
    """The initializer a weight DequantizeLinear reads: directly (int8 weights) or through a
    QuantizeLinear (float weights with a Q/DQ pair)."""
    src = dq.input[0]
    if src in inits:
        return src
    src = quant_input.get(src, "")
    return src if src in inits else None


def _check_runs(path: Path) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        out = sess.run(None, {inp.name: np.zeros(shape, np.float32)})[0]
    except Exception as exc:  # noqa: BLE001 - ORT raises several private exception types
        raise QuantizationError(f"{path}: ONNX Runtime cannot run the Q/DQ model "
                                f"({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if not np.all(np.isfinite(out)):
        raise QuantizationError(f"{path}: the Q/DQ model outputs non-finite values")
