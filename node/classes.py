"""Class names: the one source of truth for labels across training and runtime.

FSOCO's names are used wherever a label is visible. Foreign datasets number their classes
differently, so they are always mapped *by name* (see ``DATASET_IDS``), never by numeric id.
The classifier adds a ``background`` class that is never published.
"""

from __future__ import annotations

BLUE = "blue_cone"
YELLOW = "yellow_cone"
ORANGE = "orange_cone"  # small orange
LARGE_ORANGE = "large_orange_cone"
UNKNOWN = "unknown_cone"
BACKGROUND = "background"

CONE_CLASSES: tuple[str, ...] = (BLUE, YELLOW, ORANGE, LARGE_ORANGE)
"""The four cone colours the classifier separates."""

CLASSIFIER_CLASSES: tuple[str, ...] = CONE_CLASSES + (BACKGROUND,)
"""Default class list of a trained classifier. A model's own list travels in its metadata."""

PUBLISHED_CLASSES: tuple[str, ...] = CONE_CLASSES + (UNKNOWN,)

COLOUR_GROUP: dict[str, str] = {LARGE_ORANGE: ORANGE}
"""Labels that count as one colour where only the colour matters (tracking, nested boxes):
the classifier confuses small and large orange, and a stripe of a large orange cone looks
like a small one."""

DATASET_IDS: dict[str, dict[int, str]] = {
    # FSOCO YOLO exports.
    "fsoco": {0: YELLOW, 1: BLUE, 2: ORANGE, 3: LARGE_ORANGE, 4: UNKNOWN},
    # shared/data/bgracing (Roboflow export of BGRacing's on-board frames).
    "bgracing": {0: BLUE, 1: LARGE_ORANGE, 2: ORANGE, 3: YELLOW},
}

_ALIASES: dict[str, str] = {
    "blue": BLUE,
    "blue_cone": BLUE,
    "yellow": YELLOW,
    "yellow_cone": YELLOW,
    "orange": ORANGE,
    "orange_cone": ORANGE,
    "small_orange": ORANGE,
    "small_orange_cone": ORANGE,
    "large_orange": LARGE_ORANGE,
    "large_orange_cone": LARGE_ORANGE,
    "big_orange": LARGE_ORANGE,
    "big_orange_cone": LARGE_ORANGE,
    "unknown": UNKNOWN,
    "unknown_cone": UNKNOWN,
    "other": UNKNOWN,
    "background": BACKGROUND,
}


def canonical_name(name: str) -> str:
    """Map a dataset's class name (any case, spaces or dashes) to the project's name.

    Raises:
        KeyError: the name is not a known cone class; the message lists the known names.
    """
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    try:
        return _ALIASES[key]
    except KeyError:
        raise KeyError(
            f"unknown class name {name!r}; expected one of {sorted(set(_ALIASES.values()))}"
        ) from None


def names_from_ids(id_to_name: dict[int, str] | list[str]) -> dict[int, str]:
    """Turn a dataset's own id→name table (a list or dict, as in YOLO ``data.yaml``) into
    id→project name."""
    items = enumerate(id_to_name) if isinstance(id_to_name, list) else id_to_name.items()
    return {int(i): canonical_name(str(n)) for i, n in items}
