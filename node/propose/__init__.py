"""Cone candidate proposers (stage 2 of a frame's way): where in a frame the classifier should look.

Every proposer answers ``propose(frame) -> (N, 4) float32 xyxy boxes`` in pixels of the
frame, highest-ranked first and capped at ``max_candidates`` so that latency stays bounded.

* ``ColourProposer`` (``kind: colour``): learned colour statistics (``node.propose.colour_model``:
  a grey-world white balance, then a per-pixel Bayesian colour look-up counted from the
  training frames' labelled cones) give one mask per cone colour; its connected components
  are the parts of cones (a stripe splits a cone into two or three). Parts of one colour are
  merged bottom-up while their union still fits one cone of the size the row prior expects
  (a cone's height is bounded by the row it stands on: ground plane, pinhole camera); the
  merged box is shaped to a cone (the prior's width / height, base included) and ranked by
  how much of the expected cone area its colour covers. A polygon mask hides the car's body.
* ``HsvProposer`` (``kind: hsv``, ``node.propose.hsv``): hand-typed HSV windows, the first
  version, kept for comparison.
* ``HeatmapProposer`` (``kind: heatmap``, ``node.propose.heatmap``): peaks of a tiny learned
  CenterNet-style cone-centre heatmap (ONNX, trained by ``export.proposer_train``).
* ``ExternalBoxProposer`` (``kind: external``): boxes from YOLO label files matched by image
  stem (``--proposals yolo:DIR``). This is also the seam for LiDAR-projected boxes on the car.
"""

from __future__ import annotations

import numpy as np

from node.infer.postprocess import suppress_overlaps
from node.node_config import ProposerConfig, resolve_path
from node.propose.base import (
    _EMPTY,
    ColourProposer,
    ExternalBoxProposer,
    ProposalError,
    Proposer,
    yolo_to_xyxy,
)
from node.types import Frame


def _hsv_proposer(config: ProposerConfig) -> Proposer:
    from node.propose.hsv import HsvProposer

    return HsvProposer(config)


def _heatmap_proposer(config: ProposerConfig) -> Proposer:
    from node.propose.heatmap import HeatmapProposer

    return HeatmapProposer(config)


class CombinedProposer(Proposer):
    """The union of several proposers' candidates (e.g. the learned heatmap and a colour
    proposer, which miss different cones).

    Candidates are taken in turns from each proposer's ranked list, so every proposer keeps its
    best boxes under the cap; a box overlapping an already taken one at IoU > ``dedup_iou`` is
    the same cone and is skipped.
    """

    def __init__(self, parts: list[Proposer], max_candidates: int, dedup_iou: float = 0.6):
        super().__init__(max_candidates)
        self.parts = parts
        self.dedup_iou = dedup_iou

    def _propose(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        ranked = [p.propose(frame) for p in self.parts]
        boxes = np.concatenate(ranked) if ranked else _EMPTY
        if len(boxes) == 0:
            return _EMPTY, np.zeros(0)
        # Turn order: rank r of every part comes before rank r + 1 of any part.
        turn = np.concatenate([np.arange(len(r)) * len(ranked) + i for i, r in enumerate(ranked)])
        priority = -turn.astype(np.float64)
        keep = suppress_overlaps(boxes, priority, self.dedup_iou)
        return boxes[keep], priority[keep]

    def close(self) -> None:
        for p in self.parts:
            p.close()


PROPOSERS = {"colour": ColourProposer, "hsv": _hsv_proposer, "heatmap": _heatmap_proposer}
"""``proposer.kind`` → constructor taking the proposer config (``external`` takes a folder)."""


def build_proposer(config: ProposerConfig) -> Proposer:
    """The proposer named by ``config.kind``, followed by the box refiner when
    ``config.refiner_model`` names one (external boxes are taken as they are)."""
    if config.kind == "external":
        return ExternalBoxProposer(config.external_dir, config.max_candidates)
    if "+" in config.kind:  # e.g. heatmap+hsv: the union, taken in turns under one cap
        parts = [PROPOSERS[k](config) for k in config.kind.split("+")]
        proposer: Proposer = CombinedProposer(parts, config.max_candidates)
    else:
        proposer = PROPOSERS[config.kind](config)
    if config.refiner_model:
        from node.propose.refiner import BoxRefiner, RefinedProposer

        refiner = BoxRefiner(resolve_path(config.refiner_model), config.heatmap_threads,
                             config.max_candidates, config.refiner_passes, config.providers)
        return RefinedProposer(proposer, refiner, config.max_candidates)
    return proposer


__all__ = ["PROPOSERS", "ColourProposer", "CombinedProposer", "ExternalBoxProposer",
           "ProposalError", "Proposer", "build_proposer", "yolo_to_xyxy"]
