"""The evaluation as one PNG: precision-recall curve, confusion matrix, recall by cone height.

matplotlib is optional (the ``[plot]`` extra) and imported only here, inside the function, with
the non-interactive Agg backend, so a headless car computer never needs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

CLASS_ORDER = ("blue_cone", "yellow_cone", "orange_cone", "large_orange_cone", "unknown_cone")


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def confusion_table(tally: Any) -> tuple[list[str], list[str], np.ndarray]:
    """Rows (true class, then ``none`` for detections of no labelled cone), columns (predicted
    class, then ``missed`` for labelled cones no detection matched) and counts."""
    truths = {t for t, _ in tally.confusion} - {"none"}
    preds = {p for _, p in tally.confusion} - {"missed"}
    order = {name: i for i, name in enumerate(CLASS_ORDER)}
    rows = sorted(truths, key=lambda n: (order.get(n, 99), n)) + ["none"]
    cols = sorted(preds, key=lambda n: (order.get(n, 99), n)) + ["missed"]
    counts = np.zeros((len(rows), len(cols)), np.int64)
    for (truth, pred), n in tally.confusion.items():
        counts[rows.index(truth), cols.index(pred)] += n
    return rows, cols, counts


def plot_evaluation(tally: Any, report: dict, path: str | Path, title: str = "") -> Path:
    """Write the three panels to ``path`` and return it.

    Args:
        tally: the ``node.evaluate.score.Tally`` of a scored run.
        report: its ``report()``.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable('no PNG: matplotlib is not installed (pip install -e ".[plot]")')
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_pr, ax_cm, ax_h) = plt.subplots(1, 3, figsize=(17, 5.2))

    precision, recall, _ = tally.precision_recall()
    if len(precision):
        ax_pr.plot(recall, precision, color="tab:blue")
        ax_pr.scatter(recall[-1:], precision[-1:], color="tab:red", zorder=3,
                      label=f"as published: P {precision[-1]:.1%}, R {recall[-1]:.1%}")
        ax_pr.legend(loc="lower left")
    ax_pr.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall (all labelled cones)",
              ylabel="precision (all detections)",
              title="precision-recall over the score threshold")
    ax_pr.grid(alpha=0.3)

    rows, cols, counts = confusion_table(tally)
    ax_cm.imshow(np.log1p(counts), cmap="Blues")
    ax_cm.set_xticks(range(len(cols)), [c.replace("_cone", "") for c in cols], rotation=30)
    ax_cm.set_yticks(range(len(rows)), [r.replace("_cone", "") for r in rows])
    for (i, j), n in np.ndenumerate(counts):
        ax_cm.text(j, i, str(n), ha="center", va="center", fontsize=9,
                   color="white" if n > counts.max() / 2 else "black")
    ax_cm.set(xlabel="published as", ylabel="labelled as",
              title="confusion (none: no such cone; missed: not found)")

    by_height = report["recall_by_height"]
    names = list(by_height)
    values = [by_height[n]["recall"] or 0.0 for n in names]
    bars = ax_h.bar(names, values, color="tab:green")
    for bar, n in zip(bars, names):
        ax_h.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01,
                  f"{by_height[n]['cones']} cones", ha="center", fontsize=9)
    ax_h.set(ylim=(0, 1.08), xlabel="labelled cone height (px)", ylabel="recall",
             title="recall by cone height")
    ax_h.grid(axis="y", alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
