"""Draw published cones on a frame: class-coloured boxes, label tags, FPS/latency overlay.

Used by the annotated video (``--video-out``) and the bag's optional CompressedImage topic.
Colours are BGR and follow the cone colours so a glance at the video checks the labels. A
tracked cone's tag reads ``blue_cone #12 7.4 m`` (class, track id, range); an untracked one's
``blue 0.97`` (class and score).
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from node.classes import BLUE, LARGE_ORANGE, ORANGE, UNKNOWN, YELLOW
from node.types import Cone, label_text

CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    BLUE: (255, 80, 0),
    YELLOW: (0, 230, 255),
    ORANGE: (0, 140, 255),
    LARGE_ORANGE: (0, 60, 230),
    UNKNOWN: (200, 200, 200),
}
_SHORT = {BLUE: "blue", YELLOW: "yellow", ORANGE: "orange", LARGE_ORANGE: "large orange",
          UNKNOWN: "unknown"}
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def draw_cones(image: np.ndarray, cones: Iterable[Cone], fps: float | None = None,
               latency_ms: float | None = None, *, copy: bool = True,
               error: str | None = None) -> np.ndarray:
    """Annotated copy of ``image`` (BGR uint8), or ``image`` itself when ``copy=False``.

    Args:
        image: H×W×3 BGR frame.
        cones: boxes in pixels of this frame.
        fps: shown top-left when given.
        latency_ms: end-to-end latency shown next to the FPS when given.
        error: a frame error shown in red across the top.
    """
    out = image.copy() if copy else image
    h, w = out.shape[:2]
    scale = max(0.35, min(w, h) / 1000.0)
    thickness = max(1, round(scale * 2))
    cones = list(cones)
    for cone in cones:
        colour = CLASS_COLOURS.get(cone.label, CLASS_COLOURS[UNKNOWN])
        x1, y1, x2, y2 = (round(float(v)) for v in cone.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
    # Tags after all boxes, the most confident first, each where it overlaps no earlier tag:
    # in a row of distant cones they would otherwise pile up into an unreadable stack.
    taken: list[tuple[int, int, int, int]] = []
    for cone in sorted(cones, key=lambda c: -float(c.score)):
        colour = CLASS_COLOURS.get(cone.label, CLASS_COLOURS[UNKNOWN])
        text = tag_text(cone)
        (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
        rect = place_tag([round(float(v)) for v in cone.box], (tw + 2, th + base + 1), (w, h),
                         taken)
        if rect is None:
            continue  # no free place near its box: the box alone says enough
        taken.append(rect)
        cv2.rectangle(out, rect[:2], (rect[2] - 1, rect[3] - 1), colour, cv2.FILLED)
        b, g, r = colour  # dark label backgrounds (blue, large orange) get white text
        ink = (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 110 else (255, 255, 255)
        cv2.putText(out, text, (rect[0] + 1, rect[3] - base), _FONT, scale, ink, 1, cv2.LINE_AA)
    overlay = []
    if fps is not None:
        overlay.append(f"{fps:.1f} FPS")
    if latency_ms is not None:
        overlay.append(f"{latency_ms:.1f} ms")
    if overlay:
        _banner(out, " | ".join(overlay), (0, 0), scale * 1.2, (255, 255, 255))
    if error:
        _banner(out, error[:80], (0, h // 2), scale * 1.2, (0, 0, 255))
    return out


def tag_text(cone: Cone) -> str:
    """The tag drawn next to a cone's box: ``label_text`` once the cone has a track id or a
    range, else the short class name and the score."""
    if cone.track_id is not None or cone.range_m is not None:
        return label_text(cone)
    return f"{_SHORT.get(cone.label, cone.label)} {float(cone.score):.2f}"


def place_tag(box: list[int], size: tuple[int, int], frame: tuple[int, int],
              taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """Where a label tag of ``size`` (w, h) goes for a box: above it, else below, else right or
    left of it, else stacked above the first place, inside the frame and overlapping none of
    the ``taken`` tags; None when no such place is free. Rectangles are (x1, y1, x2, y2),
    end-exclusive."""
    x1, y1, x2, y2 = box
    tw, th = size
    width, height = frame
    spots = [(x1, y1 - th), (x1, y2 + 1), (x2 + 2, y1), (x1 - tw - 2, y1),
             (x1, y1 - 2 * th), (x1, y1 - 3 * th)]
    for x, y in spots:
        x = min(max(x, 0), max(width - tw, 0))
        rect = (x, y, x + tw, y + th)
        if y < 0 or y + th > height:
            continue
        if all(rect[2] <= o[0] or o[2] <= rect[0] or rect[3] <= o[1] or o[3] <= rect[1]
               for o in taken):
            return rect
    return None


def blank_frame(width: int, height: int) -> np.ndarray:
    """A dark grey frame for records without an image (unreadable input)."""
    return np.full((height, width, 3), 40, dtype=np.uint8)


def _banner(image: np.ndarray, text: str, origin: tuple[int, int], scale: float,
            colour: tuple[int, int, int]) -> None:
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
    x, y = origin
    cv2.rectangle(image, (x, y), (x + tw + 8, y + th + base + 8), (0, 0, 0), cv2.FILLED)
    cv2.putText(image, text, (x + 4, y + th + 4), _FONT, scale, colour, 1, cv2.LINE_AA)
