"""Benchmark of monocular range and cone tracking on rendered clips (issue 23, item 4).

``python -m export.track_eval --clips N --frames M --seed S`` renders N continuous clips with
``export.synth.render_clip`` (seeds S, S+1, ...) and keeps each labelled cone's true position
(camera frame, base centre) and identity. Two runs are scored:

* **oracle**: the true boxes and labels go through ``node.track`` (range estimator error and
  tracker error alone);
* **node**: ``python -m node replay`` runs the real detector over the rendered frames
  (``--jsonl``); its cones are matched to the truth by IoU >= 0.5 and go through the same stage.

Reported: median |range error| / true range by true-range bucket (<= 5, 5-10, 10-20 m),
the fraction of cones whose truth lies within 1 sigma, ID switches per 100 frames (a true
cone matched to another track id than at its previous match) and consecutive-frame ID
persistence (true cones matched in frames t and t+1: the share with the same id). The camera
is "calibrated" per clip from the scene's nominal pose (intrinsics, camera height and pitch
without the renderer's per-frame pitch jitter); ``--pose pitch|none`` leaves the height, or
both, out.
``--calibrate`` prints the box-height noise of the node's matched boxes (to set sigma_h).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import cv2
import numpy as np

from export import synth
from node.evaluate.score import match_greedy
from node.track import CameraConfig, ConeTracker, RangeEstimator, TrackerConfig

BUCKETS = ((0.0, 5.0), (5.0, 10.0), (10.0, 20.0))


@dataclass
class TruthFrame:
    """One rendered frame with per-cone truth (in the order of ``boxes``)."""

    image: np.ndarray
    boxes: np.ndarray
    labels: list[str]
    xyz: np.ndarray  # (N, 3) camera-frame base centre
    ids: list[int]  # index of the cone in its scene
    camera_config: CameraConfig


@contextmanager
def _capture_drawn():
    """Record what ``visible_cones`` returns (the scene cones behind each label)."""
    seen: dict = {}
    original = synth.visible_cones

    def spy(scene, camera, *args, **kwargs):
        drawn = original(scene, camera, *args, **kwargs)
        seen["scene"], seen["drawn"] = scene, drawn
        return drawn

    with mock.patch.object(synth, "visible_cones", spy):
        yield seen


def nominal_camera(scene, camera, pose: str = "full") -> CameraConfig:
    """The per-clip calibration: the frame's intrinsics, the scene's nominal height and pitch
    (``pose`` full), the pitch alone (``pitch``) or neither (``none``)."""
    pitch = math.atan((camera.height / 2.0 - scene.horizon_frac * camera.height) / camera.fy)
    extra = {}
    if pose in ("full", "pitch"):
        extra["pitch_deg"] = math.degrees(pitch)
    if pose == "full":
        extra["height_m"] = float(scene.camera_height)
    return CameraConfig(fx=camera.fx, fy=camera.fy, cx=camera.cx, cy=camera.cy,
                        image_width=camera.width, image_height=camera.height, **extra)


def render_truth_clip(seed: int, n_frames: int, pose: str = "full"):
    """Yield ``TruthFrame``s of one continuous clip (``export.synth.render_clip``)."""
    with _capture_drawn() as seen:
        for frame in synth.render_clip(seed, n_frames):
            scene, drawn = seen["scene"], seen["drawn"]
            assert len(drawn) == len(frame.cones)
            index = {id(c): k for k, c in enumerate(scene.cones)}
            ground = np.array([[d.cone.xz[0], 0.0, d.cone.xz[1]] for d in drawn]).reshape(-1, 3)
            xyz = frame.camera.to_camera(ground) if len(ground) else np.zeros((0, 3))
            yield TruthFrame(frame.image, frame.boxes.astype(np.float64), list(frame.labels),
                             xyz, [index[id(d.cone)] for d in drawn],
                             nominal_camera(scene, frame.camera, pose))


@dataclass
class Score:
    """Range errors and identity statistics accumulated over clips."""

    rel_err: list[list[float]] = field(default_factory=lambda: [[] for _ in BUCKETS])
    covered: list[list[bool]] = field(default_factory=lambda: [[] for _ in BUCKETS])
    dh: list[tuple[float, float]] = field(default_factory=list)  # (true h, det h - true h)
    frames: int = 0
    switches: int = 0
    pairs: int = 0
    kept: int = 0
    matched: int = 0
    truths: int = 0

    def add_range(self, true_xyz: np.ndarray, rng: np.ndarray, sigma: np.ndarray) -> None:
        true_r = np.linalg.norm(true_xyz, axis=1)
        for r_true, r, s in zip(true_r, rng, sigma):
            for k, (lo, hi) in enumerate(BUCKETS):
                if lo < r_true <= hi:
                    self.rel_err[k].append(abs(r - r_true) / r_true)
                    self.covered[k].append(abs(r - r_true) <= s)

    def table_rows(self) -> list[str]:
        rows = []
        for k, (lo, hi) in enumerate(BUCKETS):
            e, c = self.rel_err[k], self.covered[k]
            name = f"<= {hi:g} m" if lo == 0 else f"{lo:g}-{hi:g} m"
            rows.append(f"{name} | {len(e)} | " + (f"{100 * np.median(e):.1f} % | "
                        f"{100 * np.mean(c):.0f} %" if e else "- | -"))
        return rows

    def summary(self) -> dict:
        allc = [x for c in self.covered[:3] for x in c]
        return {
            "median_rel_err": [float(np.median(e)) if e else None for e in self.rel_err],
            "n": [len(e) for e in self.rel_err],
            "coverage_1sigma": [float(np.mean(c)) if c else None for c in self.covered],
            "coverage_1sigma_all": float(np.mean(allc)) if allc else None,
            "frames": self.frames,
            "id_switches_per_100_frames": 100.0 * self.switches / max(self.frames, 1),
            "id_persistence": self.kept / self.pairs if self.pairs else None,
            "recall_iou50": self.matched / self.truths if self.truths else None,
        }


def score_clip(frames: list[TruthFrame], dets: list[tuple[np.ndarray, list[str], np.ndarray]],
               score: Score, tracker_config: TrackerConfig,
               sigma: tuple[float, float] | None = None, ego: bool = True) -> None:
    """Run range + tracker over one clip's detections and add its statistics to ``score``."""
    tracker = ConeTracker(tracker_config)
    last_id: dict[int, int] = {}
    prev: dict[int, int] = {}
    for tf, (boxes, labels, scores) in zip(frames, dets):
        cfg = tf.camera_config
        if sigma is not None:
            cfg = CameraConfig(**{**cfg.__dict__, "sigma_h_px": sigma[0],
                                  "sigma_h_rel": sigma[1]})
        h, w = tf.image.shape[:2]
        est = RangeEstimator(cfg).estimate(boxes, labels, w, h)
        ids = tracker.update(boxes, labels, scores, *(
            (est.xyz, est.sigma_m, RangeEstimator(cfg).view(w, h)) if ego else ()))
        match = match_greedy(boxes, scores, tf.boxes)
        score.frames += 1
        score.truths += len(tf.boxes)
        now: dict[int, int] = {}
        for i, j in enumerate(match):
            if j < 0:
                continue
            score.matched += 1
            score.add_range(tf.xyz[j:j + 1], est.range_m[i:i + 1], est.sigma_m[i:i + 1])
            th = tf.boxes[j, 3] - tf.boxes[j, 1]
            score.dh.append((th, (boxes[i, 3] - boxes[i, 1]) - th))
            cone, tid = tf.ids[j], ids[i]
            if tid is None:
                continue
            now[cone] = tid
            if cone in last_id and last_id[cone] != tid:
                score.switches += 1
            last_id[cone] = tid
            if cone in prev:
                score.pairs += 1
                score.kept += prev[cone] == tid
        prev = now


def run_node(clips: list[list[TruthFrame]], workdir: Path,
             extra: list[str]) -> list[list[tuple[np.ndarray, list[str], np.ndarray]]]:
    """Write all frames to one folder, run ``python -m node replay`` once, split the JSONL."""
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for c, frames in enumerate(clips):
        for f, tf in enumerate(frames):
            cv2.imwrite(str(images / f"c{c:03d}_f{f:05d}.png"), tf.image)
    jsonl = workdir / "node.jsonl"
    cmd = [sys.executable, "-m", "node", "replay", str(images), "--jsonl", str(jsonl),
           "--no-progress", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    out: list[list] = [[] for _ in clips]
    for rec in records:
        c = int(rec["source"].split("_")[0][1:])
        cones = rec["cones"]
        out[c].append((np.array([k["box"] for k in cones], np.float64).reshape(-1, 4),
                       [k["label"] for k in cones],
                       np.array([k["score"] for k in cones], np.float64)))
    return out


def calibrate_sigma(score: Score) -> tuple[float, float, float]:
    """Box-height noise of matched detections: (bias px, sigma_h_px, sigma_h_rel).

    The bias is the median of (detected - true) height; the noise model
    ``sqrt(a² + (b·h)²)`` is fitted to the squared residuals by least squares.
    """
    dh = np.array(score.dh, np.float64).reshape(-1, 2)
    if len(dh) < 10:
        return 0.0, 1.0, 0.05
    h, d = dh[:, 0], dh[:, 1]
    bias = float(np.median(d))
    r2 = (d - bias) ** 2
    design = np.stack([np.ones_like(h), h ** 2], axis=1)
    # robust: drop the 5 % largest residuals (mismatched partial boxes) before the fit
    keep = r2 <= np.quantile(r2, 0.95)
    coef, *_ = np.linalg.lstsq(design[keep], r2[keep], rcond=None)
    a2, b2 = max(coef[0], 0.0), max(coef[1], 0.0)
    return bias, math.sqrt(a2), math.sqrt(b2)


def markdown(title: str, score: Score) -> str:
    s = score.summary()
    lines = [f"#### {title}", "", "| true range | cones | median abs error / range | within 1 sigma |",
             "|---|---|---|---|"]
    lines += ["| " + row + " |" for row in score.table_rows()]
    persistence = f"{s['id_persistence']:.3f}" if s["id_persistence"] is not None else "-"
    lines += ["",
              f"- 1-sigma coverage, all cones <= 20 m: {100 * (s['coverage_1sigma_all'] or 0):.0f} %",
              (f"- ID switches per 100 frames: {s['id_switches_per_100_frames']:.1f} "
               f"({s['frames']} frames)"),
              f"- consecutive-frame ID persistence: {persistence}",
              f"- true cones matched at IoU >= 0.5: {100 * (s['recall_iou50'] or 0):.1f} %", ""]
    return "\n".join(lines)


BGRACING_NAMES = {0: "blue_cone", 1: "large_orange_cone", 2: "orange_cone", 3: "yellow_cone"}


def real_frames_check(root: str | Path, size: int = 640) -> dict:
    """Range against image row on real labelled frames (shared/data/bgracing, YOLO).

    Uses the labelled boxes, the default field of view with the 16:9 squeeze and no camera
    pose. Returns the share of same-frame pairs whose higher cone (base 10+ px above the
    other's) gets the longer range, and Spearman's rho of base row against range.
    """
    est = RangeEstimator(CameraConfig(native_aspect=16 / 9))
    concordant = pairs = 0
    rows, ranges = [], []
    for path in sorted((Path(root) / "labels").glob("*.txt")):
        lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            continue
        a = np.array([[float(v) for v in ln[1:5]] for ln in lines]) * size
        boxes = np.stack([a[:, 0] - a[:, 2] / 2, a[:, 1] - a[:, 3] / 2,
                          a[:, 0] + a[:, 2] / 2, a[:, 1] + a[:, 3] / 2], axis=1)
        r = est.estimate(boxes, [BGRACING_NAMES[int(ln[0])] for ln in lines], size,
                         size).range_m
        y2 = boxes[:, 3]
        higher = y2[:, None] < y2[None, :] - 10
        pairs += int(higher.sum())
        concordant += int((higher & (r[:, None] > r[None, :])).sum())
        rows += list(y2)
        ranges += list(r)
    rho = (float(np.corrcoef(np.argsort(np.argsort(rows)), np.argsort(np.argsort(ranges)))[0, 1])
           if len(rows) > 1 else None)
    return {"cones": len(rows), "pairs": pairs,
            "higher_is_farther": concordant / pairs if pairs else None, "spearman_rho": rho}


def score_node(clips: list[list[TruthFrame]], node_dets: list, tracker_cfg: TrackerConfig,
               sigma: tuple[float, float, float] | None) -> Score:
    """Score the node's detections; ``sigma`` = (box_pad_px, sigma_h_px, sigma_h_rel)."""
    score = Score()
    for frames, dets in zip(clips, node_dets):
        if sigma is not None:
            for tf in frames:
                tf.camera_config = CameraConfig(**{**tf.camera_config.__dict__,
                                                   "box_pad_px": sigma[0]})
        score_clip(frames, dets, score, tracker_cfg, sigma=None if sigma is None else sigma[1:])
    return score


def calibrate(clips: list[list[TruthFrame]], node_dets: list,
              tracker_cfg: TrackerConfig) -> tuple[float, float, float]:
    """Fit (box_pad_px, sigma_h_px, sigma_h_rel) on these clips: the pad and the shape of the
    noise from the node's box heights against the true ones, then one scale factor so that
    68 % of the cones <= 20 m lie within 1 sigma."""
    bias, a, b = calibrate_sigma(score_node(clips, node_dets, tracker_cfg, None))
    pad = 1.0 + bias  # true boxes enclose every touched pixel: about 1 px over the cone
    best = (1.0, 9.0)
    for k in np.arange(0.5, 4.01, 0.1):
        cov = score_node(clips, node_dets, tracker_cfg,
                         (pad, k * a, k * b)).summary()["coverage_1sigma_all"]
        if cov is not None and abs(cov - 0.68) < best[1]:
            best = (float(k), abs(cov - 0.68))
    return pad, best[0] * a, best[0] * b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.track_eval",
                                description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=4, help="rendered clips (default 4)")
    p.add_argument("--frames", type=int, default=50, help="frames per clip (default 50)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first clip")
    p.add_argument("--no-node", action="store_true", help="oracle boxes only (no detector)")
    p.add_argument("--pose", choices=("full", "pitch", "none"), default="full",
                   help="what the camera config gives besides intrinsics: height and pitch "
                        "(full, default), the pitch alone, or none")
    p.add_argument("--calibrate", action="store_true",
                   help="fit box_pad_px, sigma_h_px, sigma_h_rel on these clips and print them")
    p.add_argument("--sigma", type=float, nargs=3, metavar=("PAD", "PX", "REL"), default=None,
                   help="box_pad_px, sigma_h_px, sigma_h_rel for the node run "
                        "(default: node.track's defaults)")
    p.add_argument("--out", default=None, help="write the markdown tables to this file")
    p.add_argument("--node-args", default="", help="extra arguments for node replay")
    p.add_argument("--real", metavar="DIR", default=None,
                   help="only check range against image row on a real YOLO dataset and exit")
    args = p.parse_args(argv)
    if args.real:
        print(json.dumps(real_frames_check(args.real)))
        return 0
    if args.clips < 1 or args.frames < 2:
        p.error("--clips must be >= 1 and --frames >= 2")
    seeds = list(range(args.seed, args.seed + args.clips))
    clips = [list(render_truth_clip(s, args.frames, pose=args.pose)) for s in seeds]
    tracker_cfg = TrackerConfig()
    given = {"full": "camera height and pitch", "pitch": "pitch (no camera height)",
             "none": "neither camera height nor pitch"}[args.pose]
    parts = [(f"Seeds {seeds[0]}..{seeds[-1]}: {args.clips} clips x {args.frames} frames; "
              f"intrinsics and {given} given."), ""]
    oracle = Score()
    for frames in clips:
        dets = [(tf.boxes, tf.labels, np.ones(len(tf.boxes))) for tf in frames]
        score_clip(frames, dets, oracle, tracker_cfg)
    parts.append(markdown("Oracle: true boxes and labels (default sigma)", oracle))
    result = {"oracle": oracle.summary()}
    if not args.no_node:
        with tempfile.TemporaryDirectory() as tmp:
            node_dets = run_node(clips, Path(tmp), args.node_args.split())
        sigma = tuple(args.sigma) if args.sigma else None
        if args.calibrate:
            sigma = calibrate(clips, node_dets, tracker_cfg)
            result["calibration"] = dict(zip(("box_pad_px", "sigma_h_px", "sigma_h_rel"),
                                             sigma))
        node = score_node(clips, node_dets, tracker_cfg, sigma)
        label = "default sigma" if sigma is None else (
            f"box_pad_px {sigma[0]:.2f}, sigma_h_px {sigma[1]:.2f}, sigma_h_rel {sigma[2]:.3f}")
        parts.append(markdown(f"Node: detector boxes and labels ({label})", node))
        result["node"] = node.summary()
    text = "\n".join(parts)
    print(text)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
