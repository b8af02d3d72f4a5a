"""The tracking stage wired into the node (issue 23): the config's ``camera:`` and
``tracking:`` sections, a replay of a rendered clip giving lasting track ids and ranges that
grow up the frame, the run summary's range note, and the switch that turns it off."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from node.cli.common import format_summary
from node.config import ConfigError
from node.infer import load_backend
from node.node_config import CameraSection, TrackingSection, load_node_config
from node.pipeline import Pipeline
from node.propose import build_proposer
from node.track import CameraConfig, TrackerConfig
from node.types import Frame

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "cone_classifier.onnx"
TRACK_KEYS = {"range_m", "range_sigma_m", "xyz", "range_basis", "track_id"}


class _Records:
    wants_image = False

    def __init__(self) -> None:
        self.records: list[dict] = []

    def publish(self, result, image=None) -> None:
        self.records.append(json.loads(json.dumps(result.to_record())))

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def clip() -> list[Frame]:
    synth = pytest.importorskip("export.synth")
    return [Frame(i, float(i), s.image) for i, s in enumerate(synth.render_clip(3, 12))]


def _replay(frames: list[Frame], **overrides) -> tuple[list[dict], dict]:
    from node.cli.demo import SYNTH_BODY_MASK

    config = load_node_config(None, {"proposer": {"body_mask": SYNTH_BODY_MASK}, **overrides})
    publisher = _Records()
    with load_backend(BUNDLED) as backend:
        summary = Pipeline(config, backend, build_proposer(config.proposer),
                           [publisher]).run(frames)
    return publisher.records, summary


def test_replay_gives_lasting_track_ids_and_range_growing_up_the_frame(clip):
    records, summary = _replay(clip)
    assert [r["frame"] for r in records] == list(range(len(clip)))
    cones = [c for r in records for c in r["cones"]]
    assert len(cones) >= 10 * len(clip)
    assert all(TRACK_KEYS <= set(c) for c in cones)
    assert all(c["range_m"] > 0 and c["range_sigma_m"] > 0 for c in cones)
    assert all(c["range_basis"].endswith("@default_hfov") for c in cones)  # no intrinsics
    assert set(records[0]["latency_ms"]) == {"capture", "propose", "preprocess", "infer",
                                             "post", "total"}  # tracking counts as post

    # Ids persist: most cones of a frame carry an id the previous frame had (the rest are
    # cones coming into view or found again).
    ids = [[c["track_id"] for c in r["cones"]] for r in records]
    assert all(len(set(frame)) == len(frame) for frame in ids)  # unique within a frame
    kept = sum(sum(i in set(prev) for i in cur) for prev, cur in itertools.pairwise(ids))
    assert kept / sum(len(cur) for cur in ids[1:]) >= 0.7

    # Flat track, camera looking ahead: a cone whose base sits higher in the frame is farther.
    higher_farther = pairs = 0
    for r in records:
        for a in r["cones"]:
            for b in r["cones"]:
                if a["box"][3] <= b["box"][3] - 10:
                    pairs += 1
                    higher_farther += a["range_m"] > b["range_m"]
    assert pairs >= 100 and higher_farther / pairs >= 0.9

    assert "default horizontal field of view" in summary["range"]
    assert "range: no intrinsics" in format_summary({**summary, "model": "m", "proposer": "p"})

    # The stage sees frames in input order in both loops: the same ids either way.
    sync_records, _ = _replay(clip, pipeline={"sync": True})
    assert [[c["track_id"] for c in r["cones"]] for r in sync_records] == ids


def test_intrinsics_and_the_off_switch(clip):
    frames = clip[:3]
    records, summary = _replay(frames, camera={"fx": 320.0, "fy": 320.0, "cx": 320.0,
                                               "cy": 320.0, "image_width": 640,
                                               "image_height": 640, "pitch_deg": 5.0})
    assert summary["range"] == "intrinsics from config/CameraInfo"
    assert all(not c["range_basis"].endswith("@default_hfov")
               for r in records for c in r["cones"])

    records, summary = _replay(frames, tracking={"enabled": False})
    assert "range" not in summary
    cones = [c for r in records for c in r["cones"]]
    assert cones and all(set(c) == {"box", "label", "score"} for c in cones)


@pytest.mark.parametrize(("override", "message"), [
    ("camera.fx=0", r"command line: camera\.fx: 0\.0 is below the minimum"),
    ("camera.fx=.nan", r"command line: camera\.fx: nan is not a finite number"),
    ("camera.fx=wide", r"command line: camera\.fx: expected a number"),
    ("camera.fx=500", r"command line: camera\.cx: give all of fx, fy, cx, cy or none"),
    ("camera.focal=500", r"command line: camera\.focal: unknown key"),
    ("tracking.max_age=-1", r"command line: tracking\.max_age: -1 is below the minimum"),
    ("tracking.low_score=0.9", r"command line: tracking\.low_score: 0\.9 is above high_score"),
    ("tracking.enabled=maybe", r"command line: tracking\.enabled: expected true or false"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_node_config(None, [override])
    assert "\n" not in str(info.value)


def test_config_sections_mirror_the_stage_configs():
    """Same keys and defaults as node.track's own config classes, so neither drifts."""
    def defaults(cls, drop=()):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in drop}

    assert defaults(CameraSection) == defaults(CameraConfig)
    assert defaults(TrackingSection, drop=("enabled",)) == defaults(TrackerConfig)
    yaml_config = load_node_config()  # configs/node.yaml documents the same defaults
    assert yaml_config.camera == CameraSection() and yaml_config.tracking == TrackingSection()
