"""Which frames a run is scored on: held-out clips, training clips, or named clip spans.

Real data is split by clip, never by frame (neighbouring frames of a clip are near copies).
``configs/train.yaml``'s ``data.heldout`` names the classifier's held-out clips; the same rules
select frames for evaluation, benchmarking and fitting the colour model.
"""

from __future__ import annotations

from pathlib import Path

TRAIN_CONFIG = "configs/train.yaml"


class EvaluateError(ValueError):
    """The run or the labels cannot be scored; the message names the file."""



def parse_clip_rules(rules: list[str]) -> list[tuple[str, int | None, int | None]]:
    """``["accel", "skidpad:20-37"]`` → ``[("accel", None, None), ("skidpad", 20, 37)]``."""
    out = []
    for rule in rules:
        clip, _, span = str(rule).partition(":")
        lo, sep, hi = span.partition("-")
        if span and not (sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
            raise EvaluateError(f"clip rule {rule!r} must be CLIP or CLIP:FIRST-LAST")
        out.append((clip, int(lo), int(hi)) if span else (clip, None, None))
    return out


def in_clips(name: str, rules: list[tuple[str, int | None, int | None]]) -> bool:
    """Whether a BGRacing frame name falls under a rule (whole clip, or a video-frame span;
    the clip's single frames ``<clip>_<n>_jpg`` are held out only by whole-clip rules)."""
    from node.evaluate.datasets import bgracing_clip, frame_index

    clip = bgracing_clip(name)
    video = "_mp4-" in name
    for rule_clip, lo, hi in rules:
        if clip == rule_clip and (lo is None or (video and lo <= frame_index(name) <= hi)):
            return True
    return False


def heldout_rules(config_path: str | Path = TRAIN_CONFIG) -> list[str]:
    """``data.heldout`` of the training config (the classifier's held-out clips)."""
    import yaml

    from node.node_config import resolve_path

    path = resolve_path(config_path)
    try:
        rules = (yaml.safe_load(path.read_text()) or {}).get("data", {}).get("heldout")
    except (OSError, yaml.YAMLError) as exc:
        raise EvaluateError(f"{config_path}: cannot read data.heldout ({exc})") from None
    if not isinstance(rules, list):
        raise EvaluateError(f"{config_path}: data.heldout must be a list of clip rules")
    return [str(r) for r in rules]


def select_samples(samples: list, split: str = "all", clips: list[str] | None = None) -> list:
    """The samples of a split: ``heldout`` / ``train`` by ``configs/train.yaml``, or the
    frames named by ``clips`` rules; ``all`` keeps everything."""
    if clips:
        rules = parse_clip_rules(clips)
        return [s for s in samples if in_clips(s.image_path.name, rules)]
    if split == "all":
        return list(samples)
    rules = parse_clip_rules(heldout_rules())
    held = [in_clips(s.image_path.name, rules) for s in samples]
    return [s for s, h in zip(samples, held, strict=True) if h == (split == "heldout")]
