"""``python -m export.validate loco``: leave-one-clip-out, the truth about clips never trained on.

For every clip of a labelled YOLO folder, a classifier is trained on the other clips with the
usual recipe (``python -m export.train`` with ``data.heldout=[CLIP]``, in a subprocess, then
``python -m export.onnx``), and scored on the clip it never saw:

* **crops**: top-1 on the clip's true boxes by box height (12-24, 24-48, >= 48 px), how many
  cones it called background, and background rejection on safely mined crops
  (``export.evaluate``);
* **node**: the whole node (``node.pipeline.Pipeline``, the configured proposer and refiner)
  with that classifier on the clip's frames: recall of cones >= 12 px, precision of detections
  >= 20 px and label accuracy (``node.evaluate`` matching, as ``validate variants`` scores).

The node runs with a low score threshold once, and every threshold of ``--thresholds`` is
applied to its published cones afterwards (exact: the overlap suppression keeps the higher
score, so filtering afterwards equals running with the threshold). The out-of-fold results
give a score threshold **calibrated on clips the classifier never saw**: the one with the best
worst-clip F1.

By default the configured proposer and refiner score every fold: they are not retrained, their
metadata names the clips they held out, and the table says which clips they saw. With
``--proposer-epochs N`` each fold also trains its own heatmap proposer from scratch
(``python -m export.proposer_train``, N epochs) and a refiner on that proposer's candidates
(``python -m export.refiner_train``), both with ``data.heldout=[CLIP]``, and scores the node
with them: every network of the node then never saw the clip. As in the bundled recipe, the
first of ``--proposer-val-clips`` that is not the left-out clip is kept out of both trainings
(the proposer tunes its threshold there); the node runs at the config's threshold, and the
refiner trains on the candidates of ``--config``'s proposer settings with ``--set`` applied.
The fold's proposer trains before its classifier, whose proposer-candidate background
(``data.background.proposals_per_frame``, when set) it then makes.
``--trainer-arg`` passes an option to both trainers (``--device cuda``, ``--threads 2``,
``--camera strong``), ``--proposer-arg`` to the proposer's only (``--channels``,
``--clip-balance``).

Written to ``OUT/loco.md``, ``OUT/loco.json`` and per clip ``OUT/<clip>/`` (the fold's
checkpoint and ONNX model, and with ``--proposer-epochs`` its ``proposer/`` and ``refiner/``
runs). ``--reuse`` keeps fold models already in ``OUT``, so a long run can be resumed.

    python -m export.validate loco --data yolo:DATA --out runs/loco --epochs 12
    python -m export.validate loco --data yolo:DATA --out runs/loco_all --epochs 30 \
        --proposer-epochs 120 --trainer-arg=--device=cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
"""Score thresholds applied to the node's cones after the run (the config's is 0.5)."""
RUN_THRESHOLD = 0.2
"""The threshold the node runs with; every calibrated threshold must be at or above it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="yolo:DIR", help="labelled frames")
    parser.add_argument("--out", required=True, help="folder for loco.md/.json and the folds")
    parser.add_argument("--clips", nargs="+", metavar="CLIP",
                        help="clips to leave out in turn (default: every clip of --data)")
    parser.add_argument("--epochs", type=int, default=12, help="classifier epochs per fold")
    parser.add_argument("--train-config", default="configs/train.yaml")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra export.train override for every fold (repeatable)")
    parser.add_argument("--config", default="configs/node.yaml", help="node config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="node config override (repeatable)")
    parser.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    parser.add_argument("--reuse", action="store_true",
                        help="keep fold models already in OUT/<clip>/ instead of training")
    parser.add_argument("--seed", type=int, default=0, help="seed of background mining")
    parser.add_argument("--proposer-epochs", type=int, default=0, metavar="N",
                        help="also train each fold's proposer from scratch for N epochs, and a "
                        "refiner on its candidates (0: score with the configured ones)")
    parser.add_argument("--refiner-epochs", type=int, default=30, metavar="N",
                        help="refiner epochs per fold, with --proposer-epochs")
    parser.add_argument("--proposer-val-clips", nargs="+", default=["autox4", "autox5"],
                        metavar="CLIP", help="the fold proposer tunes its threshold on the "
                        "first of these that is not the left-out clip (with --proposer-epochs)")
    parser.add_argument("--trainer-arg", action="append", default=[], metavar="ARG",
                        help="option passed to the proposer and refiner trainers, e.g. "
                        "--trainer-arg=--device=cuda (repeatable)")
    parser.add_argument("--proposer-arg", action="append", default=[], metavar="ARG",
                        help="option passed to the proposer trainer only, e.g. "
                        "--proposer-arg=--camera=strong (repeatable)")
    parser.add_argument("--no-progress", action="store_true")


def run_logged(commands: list[list[str]], log_path: Path, clip: str) -> None:
    """Run each command in turn, appending its output to ``log_path``; a failure raises
    naming the fold, the command's module and the log."""
    for cmd in commands:
        with open(log_path, "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"fold {clip}: {cmd[2]} failed (rc {done.returncode}); "
                               f"see {log_path}")


def train_fold(clip: str, data_root: Path, out: Path, args: argparse.Namespace,
               proposer: Path | None = None) -> Path:
    """Train and export the classifier that never saw ``clip``; returns its ONNX path.
    ``proposer`` (the fold's own) makes the proposer-candidate background, if any is mined."""
    onnx = out / "cone_classifier.onnx"
    if args.reuse and onnx.exists():
        return onnx
    out.mkdir(parents=True, exist_ok=True)
    fold_proposer = [f"data.background.proposer_model={proposer}"] if proposer else []
    train = [sys.executable, "-m", "export.train", "--config", args.train_config,
             f"data.heldout=[{clip}]", f"data.root={data_root}", "data.cache=null",
             f"optim.epochs={args.epochs}", f"run.out={out}", "run.progress=false",
             *fold_proposer, *args.train_set]
    run_logged([train, [sys.executable, "-m", "export.onnx", str(out / "last.pt"),
                        "-o", str(onnx)]], out / "train.log", clip)
    return onnx


def fold_proposer(out: Path) -> Path:
    """Where the fold in ``out`` keeps its own proposer (with ``--proposer-epochs``)."""
    return out / "proposer" / "cone_proposer.onnx"


def fold_val_clips(clip: str, candidates: list[str]) -> list[str]:
    """The fold proposer's validation clip: the first candidate that is not ``clip``."""
    return [c for c in candidates if c != clip][:1]


def train_fold_proposer(clip: str, data_root: Path, out: Path,
                        args: argparse.Namespace) -> list[str]:
    """Train the heatmap proposer and the refiner that never saw ``clip`` (in subprocesses,
    ``data.heldout=[CLIP]``, their frames cached in ``out`` while they train); returns the
    node overrides that use them."""
    import yaml

    from node.node_config import resolve_path

    proposer = fold_proposer(out)
    refiner = out / "refiner" / "cone_refiner.onnx"
    if not (args.reuse and proposer.exists() and refiner.exists()):
        out.mkdir(parents=True, exist_ok=True)
        train_config = yaml.safe_load(resolve_path(args.train_config).read_text())
        train_config["data"]["heldout"] = [clip]
        fold_config = out / "fold_train.yaml"
        fold_config.write_text(yaml.safe_dump(train_config, sort_keys=False))
        common = ["--data", str(data_root), "--train-config", str(fold_config),
                  "--cache", str(out / "frames.npz"), "--seed", str(args.seed),
                  "--val-clips", *fold_val_clips(clip, args.proposer_val_clips)]
        run_logged([
            [sys.executable, "-m", "export.proposer_train", "--out", str(proposer.parent),
             "--epochs", str(args.proposer_epochs), "--stem", "patch4", *common,
             *args.trainer_arg, *args.proposer_arg],
            [sys.executable, "-m", "export.refiner_train", "--out", str(refiner.parent),
             "--epochs", str(args.refiner_epochs), "--proposer", str(proposer),
             "--node-config", args.config, *[f"--set={kv}" for kv in args.set], *common,
             *args.trainer_arg],
        ], out / "train.log", clip)
        (out / "frames.npz").unlink(missing_ok=True)  # hundreds of MB, only for training
    return [f"proposer.heatmap_model={proposer}", f"proposer.refiner_model={refiner}"]


def score_crops(model: Path, samples: list, seed: int, config: Any = None) -> dict:
    """The fold classifier on the clip's true boxes and mined background crops, cropped from
    the frames as the node's exposure stage (of ``config``, a node config) prepares them."""
    from export.evaluate import score_true_boxes
    from node.sources.exposure import Exposure

    frame_filter = Exposure.from_config(config.exposure) if config is not None else None
    metrics = score_true_boxes(model, samples, seed, frame_filter)
    return {k: metrics[k] for k in ("count", "cone_accuracy", "background_rejection",
                                    "recall", "by_size")}


def filter_results(results: list, threshold: float) -> list:
    """Copies of the node's results keeping only cones scored at or above ``threshold``."""
    from dataclasses import replace

    return [replace(r, cones=[c for c in r.cones if c.score >= threshold]) for r in results]


def score_node(model: Path, samples: list, clip: str, args: argparse.Namespace,
               progress: Any = None, fold_set: list[str] | None = None) -> dict[str, dict]:
    """The whole node with the fold classifier (and the fold's ``fold_set`` overrides, its
    proposer and refiner) on the clip: ``{threshold: report}``."""
    from export.node_run import open_node, run_node, score_variant
    from node.node_config import load_node_config
    from node.types import Frame

    overrides = [*args.set, *(fold_set or []), f"model.path={model}",
                 f"model.score_threshold={RUN_THRESHOLD}"]
    config = load_node_config(args.config, overrides)
    frames = [Frame(i, float(i), s.load(), s.image_path.name) for i, s in enumerate(samples)]
    truth = [(np.asarray(s.boxes, np.float64).reshape(-1, 4), list(s.labels)) for s in samples]
    with open_node(config) as (backend, proposer):
        results, _ = run_node(config, backend, proposer, frames, progress)
    clips = [clip] * len(samples)
    return {f"{t:g}": score_variant(filter_results(results, t), truth, clips)["all"]
            for t in args.thresholds}


def f1(report: dict) -> float:
    """F1 of recall >= 12 px and precision >= 20 px (0 where either is missing)."""
    r, p = report.get("recall_ge12"), report.get("precision_ge20")
    return 2 * r * p / (r + p) if r and p else 0.0


def calibrate(folds: dict[str, dict]) -> dict:
    """The threshold with the best worst-clip F1 over the folds (ties: the mean F1)."""
    names = list(next(iter(folds.values()))["node"])
    rows = {}
    for t in names:
        scores = [f1(fold["node"][t]) for fold in folds.values()]
        rows[t] = {"worst_f1": min(scores), "mean_f1": float(np.mean(scores))}
    best = max(names, key=lambda t: (rows[t]["worst_f1"], rows[t]["mean_f1"]))
    return {"threshold": float(best), "by_threshold": rows}


def proposer_heldout(config_path: str, overrides: list[str]) -> list[str]:
    """The clip rules the configured heatmap proposer was trained without (its metadata)."""
    from node.node_config import load_node_config, resolve_path

    config = load_node_config(config_path, overrides)
    path = resolve_path(config.proposer.heatmap_model) if config.proposer.heatmap_model else None
    if path is None or not Path(path).exists():
        return []
    import onnx

    from node.propose.heatmap import METADATA_KEY, ProposerMetadata

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    if METADATA_KEY not in props:
        return []
    meta = ProposerMetadata.from_json(props[METADATA_KEY], str(path))
    return list(meta.extra.get("heldout", []))


def format_markdown(result: dict) -> str:
    """Per-clip table at the configured threshold and at the calibrated one, worst clip last."""
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}"

    lines = []
    if result.get("proposer_epochs"):
        lines += [(f"Each fold trained its own proposer from scratch (`--proposer-epochs "
                   f"{result['proposer_epochs']}`) and a refiner on its candidates, without "
                   "the left-out clip."), ""]
    for t in dict.fromkeys([result["config_threshold"], result["calibration"]["threshold"]]):
        key = f"{t:g}"
        lines += [f"### Leave-one-clip-out, score threshold {key}", "",
                  ("| left-out clip | frames | cones | recall ≥ 12 px % | precision ≥ 20 px % | "
                  "labels % | crops 12–24 / 24–48 / ≥ 48 px % | cones called background | "
                  "proposer saw it |"),
                  "|---|---:|---:|---:|---:|---:|---|---:|---|"]
        for clip, fold in result["folds"].items():
            n, b = fold["node"][key], fold["crops"]["by_size"]
            lines.append(
                f"| {clip} | {n['frames']} | {n['labelled_cones']} | {pct(n['recall_ge12'])} | "
                f"{pct(n['precision_ge20'])} | {pct(n['label_accuracy'])} | "
                f"{pct(b['12-24']['accuracy'])} / {pct(b['24-48']['accuracy'])} / "
                f"{pct(b['>=48']['accuracy'])} | "
                f"{sum(v['called_background'] for v in b.values())} | "
                f"{'yes' if fold['proposer_saw_clip'] else 'no'} |")
        worst = result["worst"][key]
        lines += ["", (f"Worst clip: recall {pct(worst['recall_ge12'][1])} % "
                  f"({worst['recall_ge12'][0]}), precision {pct(worst['precision_ge20'][1])} % "
                  f"({worst['precision_ge20'][0]}), labels {pct(worst['label_accuracy'][1])} % "
                  f"({worst['label_accuracy'][0]})."), ""]
    cal = result["calibration"]
    lines += ["Score threshold against worst-clip and mean F1 (out of fold):", "",
              "| threshold | worst-clip F1 | mean F1 |", "|---:|---:|---:|"]
    lines += [f"| {t} | {r['worst_f1']:.3f} | {r['mean_f1']:.3f} |"
              for t, r in cal["by_threshold"].items()]
    lines += ["", f"Calibrated threshold: {cal['threshold']:g}.", ""]
    return "\n".join(lines)


def worst_clips(folds: dict[str, dict], key: str) -> dict:
    out = {}
    for metric in ("recall_ge12", "precision_ge20", "label_accuracy"):
        scored = [(c, f["node"][key][metric]) for c, f in folds.items()
                  if f["node"][key][metric] is not None]
        out[metric] = list(min(scored, key=lambda kv: kv[1])) if scored else [None, None]
    return out


def run_loco(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from export.data import is_heldout
    from node.evaluate.datasets import frame_clip, load_samples
    from node.node_config import load_node_config

    kind, _, root = args.data.partition(":")
    if kind != "yolo" or not root:
        raise ValueError(f"--data {args.data}: expected yolo:DIR")
    if min(args.thresholds) < RUN_THRESHOLD:
        raise ValueError(f"--thresholds: each must be >= {RUN_THRESHOLD}")
    if args.proposer_epochs < 0 or args.refiner_epochs < 1:
        raise ValueError(f"--proposer-epochs {args.proposer_epochs} / --refiner-epochs "
                         f"{args.refiner_epochs}: expected >= 0 and >= 1")
    samples = load_samples(args.data)
    by_clip: dict[str, list] = {}
    for s in samples:
        by_clip.setdefault(frame_clip(s.image_path), []).append(s)
    clips = args.clips or sorted(by_clip)
    missing = [c for c in clips if c not in by_clip]
    if missing:
        raise ValueError(f"--clips: {missing[0]} is not a clip of {args.data} "
                         f"(clips: {', '.join(sorted(by_clip))})")
    node_config = load_node_config(args.config, args.set)
    config_threshold = node_config.model.score_threshold
    args.thresholds = sorted(set(args.thresholds) | {config_threshold})
    seen_rules = proposer_heldout(args.config, args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folds: dict[str, dict] = {}
    total = sum(len(by_clip[c]) for c in clips)
    bar = tqdm(total=total, unit="frame", desc="loco", disable=args.no_progress,
               file=sys.stderr)
    try:
        for clip in clips:
            fold_set: list[str] = []
            fold_rules = seen_rules
            if args.proposer_epochs:  # first: the classifier may mine its candidates
                bar.set_postfix_str(f"{clip}: training the proposer")
                fold_set = train_fold_proposer(clip, Path(root).resolve(), out / clip, args)
                fold_rules = proposer_heldout(args.config, [*args.set, *fold_set])
            bar.set_postfix_str(f"{clip}: training")
            model = train_fold(clip, Path(root).resolve(), out / clip, args,
                               fold_proposer(out / clip) if args.proposer_epochs else None)
            bar.set_postfix_str(f"{clip}: scoring")
            held = by_clip[clip]
            folds[clip] = {
                "model": str(model), "node_set": fold_set,
                "proposer_saw_clip": not is_heldout(clip, None, fold_rules),
                "crops": score_crops(model, held, args.seed, node_config),
                "node": score_node(model, held, clip, args, bar, fold_set)}
            (out / "loco.partial.json").write_text(json.dumps(folds, indent=2) + "\n")
    finally:
        bar.close()
    key = f"{config_threshold:g}"
    cal = calibrate(folds)
    result = {"data": args.data, "epochs": args.epochs, "config_threshold": config_threshold,
              "proposer_epochs": args.proposer_epochs, "proposer_heldout": seen_rules,
              "folds": folds, "calibration": cal,
              "worst": {k: worst_clips(folds, k) for k in dict.fromkeys(
                  [key, f"{cal['threshold']:g}"])}}
    table = format_markdown(result)
    (out / "loco.md").write_text(table)
    (out / "loco.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"wrote {out / 'loco.md'} and {out / 'loco.json'}")
    return 0
