"""The node's typed configuration: ``configs/node.yaml`` as validated dataclasses.

YAML defaults first, then CLI overrides (``--set key.path=value`` and the dedicated flags),
into one ``NodeConfig`` built by ``node.config.load_config``. Every key is documented in place
in ``configs/node.yaml``; bounds live here in ``spec()``. Relative paths (model, config) are
resolved against the working directory first and then against the repository root, so the
bundled model is found from anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from node.config import ConfigError, load_config, spec
from node.infer.base import MAX_BATCH
from node.track.range import DEFAULT_HFOV_DEG, CameraConfig
from node.track.tracker import TrackerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/node.yaml"
DEFAULT_MODEL = "models/cone_classifier.cpu.int8.onnx"


@dataclass
class ModelConfig:
    """The classifier and its backend."""

    path: str = DEFAULT_MODEL
    providers: str | list[str] | None = None
    threads: int | None = spec(1, min=1, max=64)
    max_batch: int = spec(MAX_BATCH, min=1, max=1024)
    score_threshold: float = spec(0.5, min=0.0, max=1.0)


@dataclass
class HueRange:
    """One colour's HSV window (OpenCV scale: hue 0..179, saturation and value 0..255)."""

    hue: list[int] = field(default_factory=lambda: [0, 179])
    sat_min: int = spec(80, min=0, max=255)
    val_min: int = spec(60, min=0, max=255)
    val_max: int = spec(255, min=0, max=255)

    def __post_init__(self) -> None:
        if len(self.hue) != 2 or not all(0 <= h <= 179 for h in self.hue) or \
                self.hue[0] > self.hue[1]:
            raise ValueError(f"hue must be [low, high] within 0..179, got {self.hue}")
        if self.val_min > self.val_max:
            raise ValueError(f"val_min {self.val_min} exceeds val_max {self.val_max}")


def _blue() -> list[HueRange]:
    # Bright blue, plus teal and dark navy (blue cones in shadow lose value and drift green).
    return [HueRange([95, 130], 80, 35), HueRange([85, 135], 60, 20, 110)]


def _yellow() -> list[HueRange]:
    return [HueRange([14, 36], 100, 45)]


def _orange() -> list[HueRange]:
    # Orange and its red end wrap around hue 0.
    return [HueRange([0, 13], 100, 60), HueRange([168, 179], 100, 60)]


@dataclass
class ColourRanges:
    """HSV windows per cone colour; a pixel is that colour if any window holds it."""

    blue: list[HueRange] = field(default_factory=_blue)
    yellow: list[HueRange] = field(default_factory=_yellow)
    orange: list[HueRange] = field(default_factory=_orange)


@dataclass
class ProposerConfig:
    """How candidate boxes are found."""

    kind: str = spec("heatmap", choices=("colour", "hsv", "heatmap", "heatmap+hsv",
                                        "heatmap+colour", "external"))
    external_dir: str | None = None
    max_candidates: int = spec(96, min=1, max=1024)
    colour_model: str = "models/colour_model.json"
    colour_threshold: float = spec(0.2, min=0.0, max=1.0)
    min_part_px: int = spec(2, min=1)
    min_height_frac: float = spec(0.9, min=0.0, max=2.0)
    grow_height: float = spec(1.1, min=0.5, max=3.0)
    grow_width: float = spec(1.1, min=0.5, max=3.0)
    colours: ColourRanges = field(default_factory=ColourRanges)
    open_px: int = spec(0, min=0, max=15)
    stripe_merge: float = spec(0.6, min=0.0, max=5.0)
    min_height_px: int = spec(6, min=1, max=4096)
    max_height_frac: float = spec(0.9, min=0.01, max=1.0)
    min_area_px: int = spec(12, min=1)
    aspect_min: float = spec(0.25, min=0.01, max=10.0)
    aspect_max: float = spec(3.0, min=0.01, max=10.0)
    cone_aspect: float = spec(0.55, min=0.1, max=2.0)
    min_fill: float = spec(0.2, min=0.0, max=1.0)
    base_extend: float = spec(0.04, min=0.0, max=1.0)
    body_mask: list[list[float]] = field(default_factory=list)
    heatmap_model: str = "models/cone_proposer.onnx"
    heatmap_threshold: float = spec(0.25, min=0.0, max=1.0)
    heatmap_shoulders: bool = True
    heatmap_threads: int = spec(1, min=1, max=64)
    heatmap_resize: str = spec("keep_aspect", choices=("keep_aspect", "square"))
    heatmap_max_pixels: int = spec(2_000_000, min=4096, max=50_000_000)
    heatmap_min_pixels: int = spec(409_600, min=0, max=50_000_000)
    heatmap_pyramid: bool = False
    heatmap_rows: list[float] = field(default_factory=lambda: [0.0, 1.0])
    providers: str | list[str] | None = None
    refiner_model: str | None = "models/cone_refiner.onnx"
    refiner_passes: int = spec(1, min=1, max=4)

    def __post_init__(self) -> None:
        if self.aspect_min > self.aspect_max:
            raise ValueError(f"aspect_min {self.aspect_min} exceeds aspect_max "
                             f"{self.aspect_max}")
        if self.kind == "external" and not self.external_dir:
            raise ValueError("kind 'external' needs external_dir (or --proposals yolo:DIR)")
        if self.body_mask and len(self.body_mask) < 3:
            raise ValueError("body_mask needs at least 3 points")
        for point in self.body_mask:
            if len(point) != 2 or not all(-0.5 <= v <= 1.5 for v in point):
                raise ValueError(f"body_mask point {point} must be [x, y] in frame fractions")
        if self.heatmap_min_pixels > self.heatmap_max_pixels:
            raise ValueError(f"heatmap_min_pixels {self.heatmap_min_pixels} exceeds "
                             f"heatmap_max_pixels {self.heatmap_max_pixels}")
        rows = self.heatmap_rows
        if (len(rows) != 2 or not all(isinstance(v, (int, float)) for v in rows)
                or not 0.0 <= rows[0] < rows[1] <= 1.0):
            raise ValueError(f"heatmap_rows {rows} must be [top, bottom] frame fractions with "
                             f"0 <= top < bottom <= 1")


@dataclass
class PostConfig:
    """Turning class scores into published cones."""

    nms_iou: float | None = spec(0.6, min=0.0, max=1.0)
    unknown_colour: bool = False
    nested_inside: float | None = spec(0.7, min=0.0, max=1.0)


@dataclass
class ExposureConfig:
    """White balance, dark frames brightened and pale colour raised before proposals and
    crops (``node.sources.exposure``)."""

    white_balance: bool = True
    max_wb_gain: float = spec(2.0, min=1.0, max=8.0)
    wb_tolerance: float = spec(0.05, min=0.0, max=1.0)
    black_level: bool = True
    max_black: float = spec(30.0, min=0.0, max=255.0)
    auto_gain: bool = True
    target: float = spec(230.0, min=1.0, max=255.0)
    max_gain: float = spec(8.0, min=1.0, max=64.0)
    denoise_sigma: float = spec(0.5, min=0.0, max=10.0)
    saturation: bool = True
    min_chroma: float = spec(40.0, min=0.0, max=255.0)
    max_saturation_gain: float = spec(2.0, min=1.0, max=8.0)


@dataclass
class PipelineConfig:
    """Loop scheduling."""

    sync: bool = False
    cv_threads: int | None = spec(1, min=0, max=256)


@dataclass
class PublishersConfig:
    """Where results go; any number at once. ``null`` disables one."""

    jsonl: str | None = None
    zmq: str | None = None
    bag: str | None = None
    video_out: str | None = None
    annotate_bag_images: bool = False
    video_fps: float = spec(20.0, min=1.0, max=240.0)


@dataclass
class MetricsConfig:
    """Latency reporting."""

    print_interval_s: float = spec(5.0, min=0.1, max=3600.0)
    prometheus_port: int | None = spec(None, min=1, max=65535)
    prometheus_host: str = "127.0.0.1"


@dataclass
class CameraWatchConfig:
    """Frames read now and then as ``python -m node check`` reads them
    (``node.sources.frame_check.CameraWatch``)."""

    every_s: float = spec(5.0, min=0.0, max=3600.0)
    window: int = spec(12, min=1, max=1000)


@dataclass
class SourceConfig:
    """Source options: the live camera of ``python -m node run`` and the replay bag topic."""

    uri: str | None = None
    width: int | None = spec(None, min=1, max=16384)
    height: int | None = spec(None, min=1, max=16384)
    fps: float | None = spec(None, min=0.1, max=1000.0)
    reconnect_initial_s: float = spec(0.5, min=0.01, max=60.0)
    reconnect_max_s: float = spec(5.0, min=0.01, max=600.0)
    max_attempts: int = spec(0, min=0)
    topic: str | None = None

    def camera_options(self) -> dict:
        """Keyword options for ``node.sources.open_source`` on a live camera."""
        opts = {"reconnect_initial_s": self.reconnect_initial_s,
                "reconnect_max_s": self.reconnect_max_s, "max_attempts": self.max_attempts}
        for key in ("width", "height", "fps"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts


@dataclass
class CameraSection:
    """The camera model for cone range (``node.track.range.CameraConfig``, issue 23).

    Intrinsics are optional: without fx, fy, cx, cy the range assumes ``hfov_deg`` and every
    cone's ``range_basis`` says so. The height and pitch enable the ground-plane estimate.
    """

    fx: float | None = spec(None, min=1e-3, max=1e6)
    fy: float | None = spec(None, min=1e-3, max=1e6)
    cx: float | None = spec(None, min=-1e5, max=1e5)
    cy: float | None = spec(None, min=-1e5, max=1e5)
    image_width: int | None = spec(None, min=1, max=65536)
    image_height: int | None = spec(None, min=1, max=65536)
    hfov_deg: float = spec(DEFAULT_HFOV_DEG, min=1.0, max=179.0)
    native_aspect: float | None = spec(None, min=0.1, max=10.0)
    height_m: float | None = spec(None, min=0.01, max=20.0)
    pitch_deg: float | None = spec(None, min=-45.0, max=45.0)
    sigma_h_px: float = spec(1.0, min=0.0, max=100.0)
    sigma_h_rel: float = spec(0.02, min=0.0, max=1.0)
    sigma_pitch_deg: float = spec(0.25, min=0.0, max=10.0)
    box_pad_px: float = spec(1.0, min=-20.0, max=20.0)
    pitch_prior_sigma_deg: float = spec(8.0, min=0.0, max=45.0)

    def __post_init__(self) -> None:
        CameraConfig.from_dict(_section_dict(self))  # fx..cy all or none, with the image size


@dataclass
class TrackingSection:
    """Range and track id for every cone (``node.track``); ``enabled: false`` skips the stage.

    The other keys are ``node.track.tracker.TrackerConfig``'s.
    """

    enabled: bool = True
    high_score: float = spec(0.5, min=0.0, max=1.0)
    low_score: float = spec(0.1, min=0.0, max=1.0)
    new_track_score: float = spec(0.0, min=0.0, max=1.0)
    match_iou: float = spec(0.2, min=0.0, max=1.0)
    low_match_iou: float = spec(0.4, min=0.0, max=1.0)
    max_centre_dist: float = spec(1.0, min=0.0, max=100.0)
    max_age: int = spec(5, min=0, max=1000)
    class_gate: bool = True
    max_step_m: float = spec(2.5, min=0.0, max=50.0)
    max_accel_m: float = spec(0.4, min=0.0, max=50.0)
    ego_smoothing: float = spec(0.5, min=0.01, max=1.0)

    def __post_init__(self) -> None:
        TrackerConfig.from_dict(self.tracker_dict())  # low_score above high_score

    def tracker_dict(self) -> dict:
        """The ``TrackerConfig`` keys (everything but ``enabled``)."""
        out = _section_dict(self)
        del out["enabled"]
        return out


def _section_dict(section: object) -> dict:
    return {f.name: getattr(section, f.name) for f in fields(section)}  # type: ignore[arg-type]


@dataclass
class NodeConfig:
    """Everything ``python -m node replay|run`` needs, as one validated object."""

    model: ModelConfig = field(default_factory=ModelConfig)
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    post: PostConfig = field(default_factory=PostConfig)
    exposure: ExposureConfig = field(default_factory=ExposureConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    publishers: PublishersConfig = field(default_factory=PublishersConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    camera_watch: CameraWatchConfig = field(default_factory=CameraWatchConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    camera: CameraSection = field(default_factory=CameraSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def tracking_stage_config(self) -> dict | None:
        """``node.track.TrackingStage.from_config``'s mapping, or None when tracking is off."""
        if not self.tracking.enabled:
            return None
        return {"camera": _section_dict(self.camera), "tracking": self.tracking.tracker_dict()}

    def __post_init__(self) -> None:
        if self.proposer.max_candidates > self.model.max_batch:
            raise ValueError(f"proposer.max_candidates ({self.proposer.max_candidates}) "
                             f"must not exceed model.max_batch ({self.model.max_batch})")


def resolve_path(path: str | Path) -> Path:
    """A relative path as given if it exists from the working directory, else from the
    repository root (where ``configs/`` and ``models/`` live)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p


def load_node_config(path: str | Path | None = DEFAULT_CONFIG,
                     overrides: Sequence[str] | dict | None = None) -> NodeConfig:
    """Load ``NodeConfig`` from YAML (default ``configs/node.yaml``) plus overrides.

    Raises:
        ConfigError: missing file, unknown key, wrong type or out-of-range value; the message
            names the file (or ``command line``) and the dotted key.
    """
    resolved = resolve_path(path) if path is not None else None
    if resolved is not None and not resolved.is_file():
        raise ConfigError(f"{path}: config file not found")
    return load_config(NodeConfig, resolved, overrides)
