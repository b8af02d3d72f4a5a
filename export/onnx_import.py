"""Load a bundled ONNX network's weights back into its torch module, to train it further.

The bundled models ship as ONNX only. Their TorchScript export (``torch.onnx.export``,
``do_constant_folding``) folds every BatchNorm into the convolution before it, and names each
``Conv`` node by its module path (``/stage8/stage8.0/stage8.0.0/Conv`` is
``stage8.0.0``). ``load_conv_weights`` walks those nodes: a convolution that has its own bias
in torch takes the weight and bias as they are; one followed by a BatchNorm takes the folded
weight, and the BatchNorm becomes the identity plus the folded bias (weight 1, running mean 0,
running variance ``1 - eps``, bias = the folded bias). The module then computes exactly what the
ONNX graph computes in eval mode; train it with its BatchNorms kept in eval mode
(``freeze_batchnorm``), since batch statistics would replace the folded ones.

Only the ``onnx`` package and torch are used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class OnnxImportError(ValueError):
    """The ONNX file does not match the module; names the file and the layer."""


def onnx_initialisers(path: str | Path) -> tuple[list, dict]:
    """The graph's nodes and its initialisers as numpy arrays."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # noqa: BLE001 (onnx raises DecodeError and friends)
        raise OnnxImportError(f"{path}: not an ONNX model ({str(exc).splitlines()[0]})") from None
    return list(graph.node), {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def module_path(node_name: str) -> str:
    """The torch module path of a node: ``/stage8/stage8.0/stage8.0.0/Conv`` → ``stage8.0.0``,
    ``/stages/stages.1/downsample/downsample.0/Conv`` → ``stages.1.downsample.0``,
    ``/heads/Conv`` → ``heads``. Each scope is the attribute name of a module in its parent,
    written ``<parent's name>.<index>`` for the children of an ``nn.Sequential``."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"node {node_name!r} has no module path")
    path, previous = "", ""
    for scope in parts[:-1]:
        if previous and scope.startswith(previous + "."):
            path += scope[len(previous):]
        else:
            path = f"{path}.{scope}" if path else scope
        previous = scope
    return path


def batchnorm_after(root: nn.Module, path: str) -> nn.BatchNorm2d | None:
    """The BatchNorm that follows the convolution at ``path``: the next module of its
    ``nn.Sequential``, or the sibling named like it with ``bn`` for ``conv``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, nn.Sequential) and name.isdigit():
        nxt = int(name) + 1
        if nxt < len(parent) and isinstance(parent[nxt], nn.BatchNorm2d):
            return parent[nxt]
    sibling = name.replace("conv", "bn")
    if sibling != name and isinstance(getattr(parent, sibling, None), nn.BatchNorm2d):
        return getattr(parent, sibling)
    return None


def _layer(root: nn.Module, where: str, path: str | Path) -> nn.Module:
    """The module at ``where`` in ``root``; ``OnnxImportError`` naming the file if absent."""
    try:
        return root.get_submodule(where)
    except AttributeError:
        raise OnnxImportError(f"{path}: layer {where} is not in the "
                              f"{type(root).__name__}") from None


def load_conv_weights(root: nn.Module, path: str | Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every ``Conv`` node's weights of the ONNX file at ``path`` into ``root`` (module
    paths in ``skip`` are left to the caller); returns the loaded module paths.

    Raises:
        OnnxImportError: a node names a module ``root`` lacks, or a shape differs.
    """
    nodes, init = onnx_initialisers(path)
    loaded = []
    with torch.no_grad():
        for node in nodes:
            if node.op_type != "Conv":
                continue
            where = module_path(node.name)
            if where in skip:
                continue
            conv = _layer(root, where, path)
            weight = torch.from_numpy(init[node.input[1]].copy())
            bias = torch.from_numpy(init[node.input[2]].copy()) if len(node.input) > 2 else None
            if not isinstance(conv, nn.Conv2d) or conv.weight.shape != weight.shape:
                raise OnnxImportError(f"{path}: layer {where}: weights {tuple(weight.shape)} "
                                      f"in the file do not fit the module")
            conv.weight.copy_(weight)
            bn = batchnorm_after(root, where)
            if bn is not None:  # the file's bias is the folded BatchNorm's
                if conv.bias is not None:
                    conv.bias.zero_()
                bn.weight.fill_(1.0)
                bn.bias.copy_(bias if bias is not None else torch.zeros_like(bn.bias))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            elif conv.bias is not None:
                conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
            elif bias is not None:
                raise OnnxImportError(f"{path}: layer {where} has a bias in the file but "
                                      f"neither a bias nor a BatchNorm in the module")
            loaded.append(where)
    return loaded


def load_linear_weights(root: nn.Module, path: str | Path) -> list[str]:
    """Copy every ``Gemm`` node's weight and bias of the ONNX file into the ``nn.Linear`` at
    its module path (``/fc/Gemm`` → ``fc``); returns the loaded module paths.

    Raises:
        OnnxImportError: a node names a module ``root`` lacks, or a shape differs.
    """
    nodes, init = onnx_initialisers(path)
    loaded = []
    with torch.no_grad():
        for node in nodes:
            if node.op_type != "Gemm":
                continue
            where = module_path(node.name)
            linear = _layer(root, where, path)
            weight = init[node.input[1]]
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            weight = torch.from_numpy((weight if trans_b else weight.T).copy())
            if not isinstance(linear, nn.Linear) or linear.weight.shape != weight.shape:
                raise OnnxImportError(f"{path}: layer {where}: weights {tuple(weight.shape)} "
                                      f"in the file do not fit the module")
            linear.weight.copy_(weight)
            if linear.bias is not None:
                linear.bias.copy_(torch.from_numpy(init[node.input[2]].copy()))
            loaded.append(where)
    return loaded


def import_weights(root: nn.Module, path: str | Path) -> nn.Module:
    """Every convolution and linear layer of ``root`` from the ONNX file at ``path``
    (``load_conv_weights`` and ``load_linear_weights``); returns ``root`` in eval mode.

    Raises:
        OnnxImportError: the file is not an export of this architecture (a layer missing on
            either side, or a shape that differs); the message names the file and the layer.
    """
    loaded = set(load_conv_weights(root, path)) | set(load_linear_weights(root, path))
    wanted = {name for name, m in root.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    missing = sorted(wanted - loaded)
    if missing:
        raise OnnxImportError(f"{path}: layer {missing[0]} of the {type(root).__name__} is not "
                              f"in the file")
    return root.eval()


def freeze_batchnorm(root: nn.Module) -> None:
    """Put every BatchNorm in eval mode (running statistics kept); call after ``train()``."""
    for m in root.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
