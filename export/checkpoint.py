"""Classifier checkpoints: load one back into a model, and read its preprocessing contract;
``import_classifier`` does the same for an exported ONNX (the bundled model, to fine-tune it).

Checkpoints hold only tensors and primitives (``export.train`` writes them), so
``torch.load(weights_only=True)`` reads them; a pickle with code in it is refused.
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

import pickle
from pathlib import Path

import torch
from torch import nn

from export.model import create_model
from node.infer.metadata import ModelMetadata


class CheckpointError(ValueError):
    """A checkpoint is missing or is not one of ours; the message names the file."""


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint (eval mode, CPU); ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first})") from None
    missing = {"model", "arch", "classes", "input_size"} - set(ckpt if isinstance(ckpt, dict)
                                                                  else {})
    if missing:
        raise CheckpointError(f"{path}: not a classifier checkpoint (missing {sorted(missing)})")
    model = create_model(ckpt["arch"], len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def metadata_from_checkpoint(ckpt: dict) -> ModelMetadata:
    """The runtime preprocessing contract of a checkpoint (precision fp32)."""
    metrics = ckpt.get("metrics", {})
    data = ckpt.get("config", {}).get("data", {})
    extra = {"epoch": ckpt.get("epoch"), "heldout": data.get("heldout"),
             "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    if data.get("normalise") is not None:  # frames white-balanced as the node does (train.py)
        extra["normalise"] = {"wb_tolerance": float(data["normalise"])}
    return ModelMetadata(classes=list(ckpt["classes"]), input_size=int(ckpt["input_size"]),
                         channel_order=ckpt.get("channel_order", "RGB"),
                         mean=list(ckpt["mean"]), std=list(ckpt["std"]), crop=dict(ckpt["crop"]),
                         arch=ckpt["arch"], precision="fp32", extra=extra)


def import_classifier(path: str | Path) -> tuple[nn.Module, ModelMetadata]:
    """The classifier of an exported FP32 ONNX (e.g. ``models/cone_classifier.onnx``) as a
    torch module in eval mode, and its metadata. Its BatchNorms hold the biases the export
    folded into the convolutions (``export.onnx_import``): train it with them frozen.

    Raises:
        CheckpointError: the file is missing, has no classifier metadata, or does not hold
            the architecture its metadata names; the message names the file.
    """
    from export.onnx_import import import_weights
    from node.infer.metadata import MetadataError, read_onnx_metadata

    path = Path(path)
    try:
        meta = read_onnx_metadata(path)
        model = create_model(meta.arch, len(meta.classes))
        import_weights(model, path)
    except (MetadataError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load as a classifier "
                              f"({str(exc).splitlines()[0]})") from None
    return model.eval(), meta
