"""Score a classifier on labelled frames: ``python -m export.evaluate --model M --data yolo:DIR``.

``M`` is a training checkpoint (``.pt``), an ONNX model or a TensorRT engine (both through
``node.infer.load_backend``). Crops come from the ground-truth boxes through the crop policy
in the *model's* metadata (no jitter), plus background crops mined the safe way
(``export.background``, seeded). Prints top-1 accuracy, top-1 over the four cone colours,
per-class recall, the background rejection rate and the confusion matrix, and writes the same
to ``metrics.json`` and ``confusion.png`` under ``--out``.

``evaluate_crops`` is the scoring core, reused by training, the benchmark and the INT8 checks.
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from node.classes import BACKGROUND, CONE_CLASSES


def evaluate_crops(predict_fn: Callable[[np.ndarray], np.ndarray], crops: np.ndarray,
                   labels: Sequence[int] | Sequence[str] | np.ndarray,
                   classes: Sequence[str]) -> dict:
    """Score ``predict_fn`` on labelled crops.

    Args:
        predict_fn: uint8 BGR N×S×S×3 crops → N×C scores (logits or probabilities).
        crops: the crops.
        labels: true class per crop, as indices into ``classes`` or as class names.
        classes: the model's class list (output order).

    Returns:
        ``count``, ``accuracy`` (top-1 over all crops), ``cone_accuracy`` (top-1 over crops
        whose true class is one of the four cone colours), ``recall`` (per class; ``None``
        when a class has no crops), ``min_cone_recall``, ``background_rejection`` (share of
        background crops predicted ``background``), ``balanced_accuracy`` (mean recall over
        classes present) and ``confusion`` (rows: true class, columns: predicted).
    """
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] if isinstance(v, str) else int(v) for v in labels], np.int64)
    if len(y) != len(crops):
        raise ValueError(f"{len(crops)} crops but {len(y)} labels")
    pred = (np.asarray(predict_fn(crops)).argmax(axis=1) if len(crops)
            else np.zeros(0, np.int64))
    k = len(classes)
    confusion = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    support = confusion.sum(axis=1)
    recall = {c: (float(confusion[i, i] / support[i]) if support[i] else None)
              for i, c in enumerate(classes)}
    cone_idx = [index[c] for c in CONE_CLASSES if c in index]
    cone_rows = np.isin(y, cone_idx)
    cone_recalls = [recall[classes[i]] for i in cone_idx if recall[classes[i]] is not None]
    present = [r for r in recall.values() if r is not None]
    return {
        "count": len(y),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "cone_accuracy": float((pred[cone_rows] == y[cone_rows]).mean()) if cone_rows.any()
        else None,
        "recall": recall,
        "min_cone_recall": min(cone_recalls) if cone_recalls else None,
        "background_rejection": recall.get(BACKGROUND),
        "balanced_accuracy": float(np.mean(present)) if present else 0.0,
        "confusion": confusion.tolist(),
        "classes": classes,
    }


SIZE_BUCKETS = (("<12", 0.0, 12.0), ("12-24", 12.0, 24.0), ("24-48", 24.0, 48.0),
                (">=48", 48.0, float("inf")))


def accuracy_by_size(predict_fn: Callable[[np.ndarray], np.ndarray], crops: np.ndarray,
                     labels: Sequence[str], heights: Sequence[float],
                     classes: Sequence[str]) -> dict:
    """Top-1 over the cone crops of each box-height bucket, and how many of them were called
    background: ``{bucket: {"cones", "accuracy", "called_background"}}``."""
    classes = list(classes)
    y = np.array([classes.index(v) for v in labels])
    h = np.asarray(heights, np.float64)
    cone = np.array([v != BACKGROUND for v in labels])
    pred = (np.asarray(predict_fn(crops)).argmax(axis=1) if len(crops)
            else np.zeros(0, np.int64))
    bg = classes.index(BACKGROUND) if BACKGROUND in classes else -1
    out = {}
    for name, lo, hi in SIZE_BUCKETS:
        rows = cone & (h >= lo) & (h < hi)
        n = int(rows.sum())
        out[name] = {"cones": n,
                     "accuracy": float((pred[rows] == y[rows]).mean()) if n else None,
                     "called_background": int((pred[rows] == bg).sum())}
    return out


def accuracy_on_variants(predict_fn: Callable[[np.ndarray], np.ndarray], meta,
                         data_spec: str, clips: Sequence[str] | None,
                         names: Sequence[str] | None = None,
                         frame_filter: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Cone crop top-1 by box height on camera variants of the frames (``export.variants``:
    the ground-truth boxes moved with the pixels, cropped by the model's policy from the frame
    as ``frame_filter`` returns it, the node's exposure stage for one):
    ``{variant: accuracy_by_size(...)}``."""
    from export.data import clip_and_frame, is_heldout
    from export.variants import build_variants, estimate_horizon
    from node.evaluate.datasets import load_samples
    from node.infer.crop import crop_batch

    samples = load_samples(data_spec)
    if clips:
        samples = [s for s in samples if is_heldout(*clip_and_frame(s.image_path), list(clips))]
    known = set(meta.classes) - {BACKGROUND}
    images = [s.load() for s in samples]
    horizon = estimate_horizon([s.boxes for s in samples], images[0].shape[0]) if images else 0.4
    out = {}
    for variant in build_variants(list(names) if names else None):
        xs, labels, heights = [], [], []
        for i, (s, image) in enumerate(zip(samples, images)):
            img, boxes, kept = variant.apply(image, np.asarray(s.boxes, np.float32), horizon, i)
            if frame_filter is not None:
                img = frame_filter(img)
            names_kept = [c for c, k in zip(s.labels, kept) if k]
            rows = [j for j, c in enumerate(names_kept) if c in known]
            if not rows:
                continue
            xs.append(crop_batch(img, boxes[rows], meta.input_size, meta.crop_policy))
            labels += [names_kept[j] for j in rows]
            # Heights in the labelled frame's pixels where the variant enlarges the frame
            # (as node.evaluate.score.Tally.add's label_scale).
            shrink = 1.0 / max(variant.scale(image.shape[1], image.shape[0]), 1.0)
            heights += ((boxes[rows, 3] - boxes[rows, 1]) * shrink).tolist()
        crops = np.concatenate(xs) if xs else np.zeros((0, meta.input_size, meta.input_size, 3),
                                                       np.uint8)
        out[variant.name] = accuracy_by_size(predict_fn, crops, labels, heights, meta.classes)
    return out


def _pct(v: float | None) -> str:
    return "  n/a" if v is None else f"{100 * v:5.1f}"


def format_metrics(m: dict) -> str:
    """One log line: held-out top-1, cone top-1, background rejection, per-class recall."""
    short = {"blue_cone": "blue", "yellow_cone": "yellow", "orange_cone": "orange",
             "large_orange_cone": "big_orange", "background": "bg"}
    rec = " ".join(f"{short.get(c, c)} {_pct(r)}" for c, r in m["recall"].items())
    return (f"top1 {_pct(m['accuracy'])} cone-top1 {_pct(m['cone_accuracy'])} "
            f"bg-reject {_pct(m['background_rejection'])} | recall {rec}")


def format_report(m: dict) -> str:
    """Multi-line report with the confusion matrix."""
    classes = m["classes"]
    width = max(len(c) for c in classes) + 2
    lines = [f"crops: {m['count']}", f"top-1 accuracy: {_pct(m['accuracy'])} %",
             f"top-1 over the four cone colours: {_pct(m['cone_accuracy'])} %",
             f"background rejection: {_pct(m['background_rejection'])} %", "recall:"]
    lines += [f"  {c:<{width}}{_pct(r)} %" for c, r in m["recall"].items()]
    lines.append("confusion (rows: true, columns: predicted):")
    lines.append(" " * width + "".join(f"{c[:8]:>9}" for c in classes))
    lines += [f"{c:<{width}}" + "".join(f"{v:>9}" for v in row)
              for c, row in zip(classes, m["confusion"])]
    return "\n".join(lines)


def plot_confusion(m: dict, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(m["confusion"], float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    k = len(m["classes"])
    ax.set_xticks(range(k), m["classes"], rotation=35, ha="right")
    ax.set_yticks(range(k), m["classes"])
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"top-1 {_pct(m['accuracy'])} %, cone top-1 "
                          f"{_pct(m['cone_accuracy'])} %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_predictor(model_path: str | Path) -> tuple[Callable, object, Callable[[], None]]:
    """``(predict_fn, metadata, close)`` for a checkpoint, ONNX model or engine."""
    from node.infer.preprocess import normalize

    path = Path(model_path)
    if path.suffix == ".pt":
        import torch

        from export.checkpoint import load_checkpoint, metadata_from_checkpoint

        model, ckpt = load_checkpoint(path)
        meta = metadata_from_checkpoint(ckpt)

        @torch.no_grad()
        def run(batch: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(batch)).numpy()

        close = lambda: None
        chunk = 512
    else:
        from node.infer import load_backend

        backend = load_backend(path, max_batch=256).activate()
        meta, run, close, chunk = backend.meta, backend.infer, backend.deactivate, 256
    mean, std = np.asarray(meta.mean, np.float32), np.asarray(meta.std, np.float32)

    def predict(crops: np.ndarray) -> np.ndarray:
        out = [run(normalize(crops[i:i + chunk], mean, std, meta.channel_order == "RGB"))
               for i in range(0, len(crops), chunk)]
        return np.concatenate(out) if out else np.zeros((0, len(meta.classes)), np.float32)

    return predict, meta, close


def crops_for_evaluation(data_spec: str | list, meta, clips: Sequence[str] | None, seed: int,
                         background_cfg=None, box_heights: list[float] | None = None,
                         frame_filter: Callable[[np.ndarray], np.ndarray] | None = None
                         ) -> tuple[np.ndarray, list[str]]:
    """Ground-truth crops (no jitter) and safely mined background crops of a YOLO dataset
    (a data spec, or its samples already read), cropped by the model's own policy. ``clips``
    keeps frames matching clip rules (``CLIP`` or ``CLIP:FIRST-LAST``). A ``box_heights`` list
    receives every crop's box height in frame pixels. ``frame_filter`` turns each frame into
    the one crops are taken from (the node's exposure stage), after background mining."""
    from export.background import HeightByRow, mine_background
    from export.data import clip_and_frame, is_heldout
    from export.train_config import BackgroundConfig
    from node.evaluate.datasets import load_samples
    from node.infer.crop import crop_batch

    samples = load_samples(data_spec) if isinstance(data_spec, str) else list(data_spec)
    if clips:
        samples = [s for s in samples if is_heldout(*clip_and_frame(s.image_path), list(clips))]
    if not samples:
        raise ValueError(f"{data_spec}: no frames" + (f" in clips {list(clips)}" if clips else ""))
    bg_cfg = background_cfg or BackgroundConfig()
    heights = HeightByRow.fit(samples)
    rng = np.random.default_rng(seed)
    policy, size = meta.crop_policy, meta.input_size
    known = set(meta.classes) - {BACKGROUND}
    xs, labels = [], []
    for s in samples:
        image = s.load()
        keep = [i for i, c in enumerate(s.labels) if c in known]
        boxes = [np.asarray(s.boxes, np.float32).reshape(-1, 4)[keep]]
        names = [s.labels[i] for i in keep]
        if BACKGROUND in meta.classes:
            for mined in mine_background(image, s.boxes, rng, bg_cfg, heights).values():
                boxes.append(mined)
                names += [BACKGROUND] * len(mined)
        all_boxes = np.concatenate(boxes)
        if frame_filter is not None:
            image = frame_filter(image)
        xs.append(crop_batch(image, all_boxes, size, policy))
        labels += names
        if box_heights is not None:
            box_heights += (all_boxes[:, 3] - all_boxes[:, 1]).tolist()
    return np.concatenate(xs), labels


def score_true_boxes(model: str | Path, samples: list, seed: int = 0,
                     frame_filter: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """A classifier on the samples' true boxes and safely mined background crops
    (``crops_for_evaluation``): ``evaluate_crops``'s metrics plus ``by_size``."""
    predict, meta, close = load_predictor(model)
    try:
        heights: list[float] = []
        crops, labels = crops_for_evaluation(samples, meta, None, seed, box_heights=heights,
                                             frame_filter=frame_filter)
        metrics = evaluate_crops(predict, crops, labels, meta.classes)
        metrics["by_size"] = accuracy_by_size(predict, crops, labels, heights, meta.classes)
    finally:
        close()
    return metrics


def node_frame_filter(config_path: str | Path | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """The exposure stage (white balance, dark frames brightened, pale colour raised) of a
    node config, which the node applies to every frame before cropping; None when the config
    turns it off."""
    from node.node_config import load_node_config
    from node.sources.exposure import Exposure

    return Exposure.from_config(load_node_config(config_path).exposure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.evaluate",
                                     description="Score a cone classifier on labelled frames.")
    parser.add_argument("--model", required=True, help="checkpoint .pt, .onnx or .engine")
    parser.add_argument("--data", required=True, help="yolo:DIR (a YOLO dataset root)")
    parser.add_argument("--out", default=None, help="folder for metrics.json and confusion.png")
    parser.add_argument("--clips", nargs="*", default=None,
                        help="only these clips (CLIP or CLIP:FIRST-LAST), e.g. the held-out set")
    parser.add_argument("--seed", type=int, default=0, help="seed of background mining")
    parser.add_argument("--variants", nargs="*", default=None, metavar="NAME",
                        help="also score the cone crops on camera variants of the frames "
                             "(export.variants; no NAME: all of them)")
    parser.add_argument("--config", default="configs/node.yaml",
                        help="node config whose exposure section prepares the frames, as the "
                             "node does (default: configs/node.yaml)")
    parser.add_argument("--raw-frames", action="store_true",
                        help="crop from the frames as stored, without the node's exposure stage")
    args = parser.parse_args(argv)
    try:
        frame_filter = None if args.raw_frames else node_frame_filter(args.config)
        predict, meta, close = load_predictor(args.model)
        try:
            heights: list[float] = []
            crops, labels = crops_for_evaluation(args.data, meta, args.clips, args.seed,
                                                 box_heights=heights, frame_filter=frame_filter)
            metrics = evaluate_crops(predict, crops, labels, meta.classes)
            metrics["by_size"] = accuracy_by_size(predict, crops, labels, heights,
                                                  meta.classes)
            if args.variants is not None:
                metrics["variants"] = accuracy_on_variants(predict, meta, args.data, args.clips,
                                                           args.variants, frame_filter)
        finally:
            close()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics.update(model=str(args.model), data=args.data, clips=args.clips, seed=args.seed,
                   frames="raw" if args.raw_frames else f"exposure stage of {args.config}")
    print(format_report(metrics))
    print("cone top-1 by box height: " + "; ".join(
        f"{k} px {_pct(v['accuracy']).strip()} % of {v['cones']} "
        f"({v['called_background']} called background)" for k, v in metrics["by_size"].items()))
    for name, by_size in metrics.get("variants", {}).items():
        print(f"  {name:<16}" + "  ".join(
            f"{k} {_pct(v['accuracy']).strip()} % ({v['called_background']} bg)"
            for k, v in by_size.items() if k != "<12"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_confusion(metrics, out / "confusion.png", title=Path(args.model).name)
        print(f"wrote {out / 'metrics.json'} and {out / 'confusion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
