"""Model metadata: the preprocessing contract that travels with every exported model.

Stored as one JSON string under the ``cone_node`` key of ONNX ``metadata_props`` and, for
TensorRT engines, in a JSON sidecar next to the engine. Readers never need the ``onnx``
package: ONNX Runtime exposes ``metadata_props`` as ``custom_metadata_map``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from node.infer.crop import CropPolicy

METADATA_KEY = "cone_node"
SCHEMA_VERSION = 1


class MetadataError(ValueError):
    """A model's metadata is missing, malformed or disagrees with what the node expects."""


@dataclass
class ModelMetadata:
    """What the runtime must know to feed a model and read its output.

    Attributes:
        classes: output index → class name (project names, including ``background``).
        input_size: side of the square input in pixels.
        channel_order: ``RGB`` or ``BGR``: the order the network expects.
        mean: per-channel mean in the network's channel order, on a 0..1 scale.
        std: per-channel std in the network's channel order, on a 0..1 scale.
        crop: the crop policy as a dict (see ``CropPolicy``).
        arch: registry name of the architecture.
        precision: ``fp32``, ``fp16`` or ``int8``.
        source_onnx_sha256: sha256 of the ONNX file an artifact was derived from (for the
            FP32 ONNX itself: of the checkpoint it was exported from).
        extra: free-form additions (TensorRT version, GPU, batch profile for engines; training
            figures), never needed to run the model.
    """

    classes: list[str]
    input_size: int
    channel_order: str = "RGB"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    crop: dict = field(default_factory=lambda: CropPolicy().to_dict())
    arch: str = "unknown"
    precision: str = "fp32"
    source_onnx_sha256: str | None = None
    extra: dict = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.classes, list) or not self.classes or \
                not all(isinstance(c, str) for c in self.classes):
            raise MetadataError("metadata 'classes' must be a non-empty list of names")
        if len(set(self.classes)) != len(self.classes):
            raise MetadataError(f"metadata 'classes' has duplicates: {self.classes}")
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or \
                not 8 <= self.input_size <= 1024:
            raise MetadataError(f"metadata 'input_size' must be an int in [8, 1024], got "
                                f"{self.input_size!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise MetadataError(f"metadata 'channel_order' must be RGB or BGR, got "
                                f"{self.channel_order!r}")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    for x in v):
                raise MetadataError(f"metadata '{key}' must be 3 finite numbers, got {v!r}")
        if any(s <= 0 for s in self.std):
            raise MetadataError(f"metadata 'std' must be positive, got {self.std}")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise MetadataError(f"metadata 'precision' must be fp32, fp16 or int8, got "
                                f"{self.precision!r}")
        if not isinstance(self.extra, dict):
            raise MetadataError(f"metadata 'extra' must be a JSON object, got {self.extra!r}")
        if not isinstance(self.crop, dict):
            raise MetadataError(f"metadata 'crop' must be a JSON object, got {self.crop!r}")
        try:
            policy = CropPolicy(**self.crop)
        except (TypeError, ValueError) as exc:
            detail = str(exc).encode("unicode_escape").decode()  # one line, whatever the keys
            raise MetadataError(f"metadata 'crop' is invalid: {detail}") from None
        if not math.isfinite(policy.min_side) or not isinstance(policy.pad_value, int):
            raise MetadataError(f"metadata 'crop' is invalid: min_side must be finite and "
                                f"pad_value an integer, got {self.crop!r}")

    @property
    def crop_policy(self) -> CropPolicy:
        return CropPolicy(**self.crop)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, origin: str = "model") -> ModelMetadata:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # (nesting)
            raise MetadataError(f"{origin}: metadata is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise MetadataError(f"{origin}: metadata must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise MetadataError(f"{origin}: unknown metadata keys {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise MetadataError(f"{origin}: incomplete metadata ({exc})") from None
        except MetadataError as exc:
            raise MetadataError(f"{origin}: {exc}") from None

    def replace(self, **changes) -> ModelMetadata:
        data = asdict(self)
        data.update(changes)
        return ModelMetadata(**data)


def read_onnx_metadata(path: str | Path) -> ModelMetadata:
    """Read the metadata of an ONNX file through ONNX Runtime (no ``onnx`` package needed)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: model file not found")
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several private exception types
        raise MetadataError(f"{path}: not a loadable ONNX model ({_first_line(exc)})") from None
    props = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise MetadataError(
            f"{path}: no '{METADATA_KEY}' metadata; export it with `python -m export.onnx`"
        )
    return ModelMetadata.from_json(props[METADATA_KEY], origin=str(path))


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


def read_sidecar(engine_path: str | Path) -> ModelMetadata:
    """Read the JSON sidecar of a TensorRT engine."""
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise MetadataError(f"{side}: engine sidecar not found; rebuild the engine with "
                            f"`python -m export.engine MODEL.onnx`")
    return ModelMetadata.from_json(side.read_bytes(), origin=str(side))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
