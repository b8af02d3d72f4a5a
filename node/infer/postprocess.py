"""Post-processing: class scores of a frame's candidates → published cones.

Softmax over the model's classes (names from its metadata, never a literal list), the
``background`` class and low scores dropped, then optional greedy non-maximum suppression
between overlapping candidates (class-agnostic: one place holds one cone), and optionally
of nested boxes (``suppress_nested``): the heatmap proposer can give a near cone two boxes,
the whole cone and one of its parts (a stripe of a large orange cone, the top of a cone cut
by the frame), whose IoU is too small for the first suppression.

Optionally (``post.unknown_colour``), a candidate the classifier is sure is a cone but whose
probability is split between colours (e.g. 0.48 large orange, 0.42 small orange: no colour
reaches the threshold, the cone probability 1 - P(background) does) is published as
``unknown_cone``, FSOCO's label for a cone of unclear colour, scored by its cone probability:
found, without a coin-flip colour. By default such a candidate is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from node.classes import BACKGROUND, COLOUR_GROUP, UNKNOWN
from node.types import Cone


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def overlap_areas(a: np.ndarray, b: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of xyxy boxes ``a`` and ``b``: their (len(a), len(b)) intersection areas, the areas of
    ``a`` as a column (len(a), 1) and those of ``b`` (len(b),)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    # One (len(a), len(b)) array per axis: numpy is several times slower on a trailing axis
    # of two, and these run on every frame (NMS, tracking) for a few dozen boxes.
    ax1, ay1, ax2, ay2 = (a[:, i, None] for i in range(4))
    bx1, by1, bx2, by2 = b.T
    # np.maximum(x, 0.0), not np.clip(x, 0, None): the same values, a fifth of the overhead.
    inter = (np.maximum(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0.0)
             * np.maximum(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0.0))
    area_a = np.maximum(ax2 - ax1, 0.0) * np.maximum(ay2 - ay1, 0.0)
    area_b = np.maximum(bx2 - bx1, 0.0) * np.maximum(by2 - by1, 0.0)
    return inter, area_a, area_b


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes."""
    inter, area_a, area_b = overlap_areas(a, b)
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


_GROUP_CODES: dict[str, int] = {UNKNOWN: -1}
"""Colour group (``COLOUR_GROUP``) of each label seen so far as a small integer; -1 for
``unknown_cone``, which matches any colour."""


def colour_group_codes(labels: Sequence[str]) -> np.ndarray:
    """Each label's colour group as an integer code (``same_colour`` compares them)."""
    codes = []
    for label in labels:
        code = _GROUP_CODES.get(label)
        if code is None:
            group = COLOUR_GROUP.get(label, label)
            code = _GROUP_CODES.setdefault(group, len(_GROUP_CODES))
            _GROUP_CODES[label] = code
        codes.append(code)
    return np.array(codes, np.int64)


def same_colour(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) bool of two ``colour_group_codes`` arrays: the same colour group, or
    either one unknown."""
    return (a[:, None] == b[None, :]) | (a < 0)[:, None] | (b < 0)[None, :]


def _greedy_keep(order: np.ndarray, suppresses: np.ndarray) -> np.ndarray:
    """``order`` (indices, best first) less every entry that an earlier kept one suppresses
    (``suppresses[i, j]``, in ``order``'s positions)."""
    alive = np.ones(len(order), bool)
    for i in range(len(order)):
        if alive[i]:
            alive[i + 1:] &= ~suppresses[i, i + 1:]
    return order[alive]


def suppress_overlaps(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression, class-agnostic (one place holds one cone).

    Returns:
        Indices of the kept boxes, best score first.
    """
    order = np.argsort(-scores, kind="stable")
    if len(order) < 2:
        return order
    b = boxes[order]
    return _greedy_keep(order, iou_matrix(b, b) > iou)


NESTED_CENTRE = 0.25
"""A box nested in another counts as part of the same cone only if their centres are at most
this fraction of the outer box's width apart: a cone's parts lie on its axis, while another
cone seen in a corner of a near cone's box (outside its triangle) does not."""


def suppress_nested(boxes: np.ndarray, scores: np.ndarray, labels: Sequence[str],
                    inside: float) -> np.ndarray:
    """Greedy suppression of nested boxes of one cone: in descending score, a box is dropped
    when it and a box already kept are of one colour (``COLOUR_GROUP``; ``unknown_cone``
    matches any), on one axis (``NESTED_CENTRE``), and at least ``inside`` of the smaller
    one's area lies within the larger one.

    Returns:
        Indices of the kept boxes, best score first.
    """
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    if len(order) < 2:
        return order
    b = np.asarray(boxes, np.float64)[order].reshape(-1, 4)
    inter, area, _ = overlap_areas(b, b)
    smaller = np.minimum(area, area.T)
    width = b[:, 2] - b[:, 0]
    centre = (b[:, 0] + b[:, 2]) / 2
    code = colour_group_codes([labels[i] for i in order])
    nested = (same_colour(code, code) & (inter >= inside * np.maximum(smaller, 1e-9))
              & (np.abs(centre[:, None] - centre) <= NESTED_CENTRE
                 * np.maximum(width[:, None], width)))
    return _greedy_keep(order, nested)


def cones_from_logits(logits: np.ndarray, boxes: np.ndarray, classes: Sequence[str],
                      score_threshold: float, nms_iou: float | None,
                      unknown_colour: bool = False,
                      nested_inside: float | None = None) -> list[Cone]:
    """Softmax, drop ``background`` and low scores, optionally suppress overlaps.

    Args:
        logits: (N, C) class scores, one row per candidate box.
        boxes: (N, 4) candidate boxes in frame pixels.
        classes: the model's class names (from its metadata), C of them.
        score_threshold: minimum softmax probability of the winning class.
        nms_iou: IoU above which the lower-scored of two cones is dropped; None disables.
        unknown_colour: publish a cone whose colours split the probability as
            ``unknown_cone`` (needs a ``background`` class; see the module docstring).
        nested_inside: after the NMS, ``suppress_nested`` with this share of the smaller
            box inside the larger; None disables it.
    """
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2 or logits.shape != (len(boxes), len(classes)):
        raise ValueError(f"backend returned scores of shape {logits.shape}, expected "
                         f"({len(boxes)}, {len(classes)})")
    if len(boxes) == 0:
        return []
    probs = softmax(logits.copy())
    best = probs.argmax(axis=1)
    score = probs[np.arange(len(best)), best]
    keep = score >= score_threshold
    split = np.zeros(len(best), bool)
    if BACKGROUND in classes:
        bg = list(classes).index(BACKGROUND)
        keep &= best != bg
        if unknown_colour:
            cone = 1.0 - probs[:, bg]
            split = (best != bg) & ~keep & (cone >= score_threshold)
            score = np.where(split, cone, score)
            keep |= split
    idx = np.flatnonzero(keep)
    if nms_iou is not None and len(idx) > 1:
        idx = idx[suppress_overlaps(boxes[idx], score[idx], nms_iou)]
    else:
        idx = idx[np.argsort(-score[idx], kind="stable")]
    labels = [UNKNOWN if split[i] else classes[best[i]] for i in idx]
    if nested_inside is not None and len(idx) > 1:
        kept = suppress_nested(boxes[idx], score[idx], labels, nested_inside)
        idx, labels = idx[kept], [labels[k] for k in kept]
    return [Cone(tuple(float(v) for v in boxes[i]), label, float(score[i]))
            for i, label in zip(idx, labels, strict=True)]
