"""Evaluation: labelled data in, recall and precision out.

- ``node.evaluate.datasets``: YOLO, FSOCO (Supervisely) and crop-folder datasets, read into one
  ``Sample`` type; class ids are mapped by name.
- ``node.evaluate.splits``: which frames a run is scored on (held-out clips, named spans).
- ``node.evaluate.score``: greedy one-to-one matching at IoU 0.5, the tallies, and the
  ``python -m node evaluate`` command.
"""

from __future__ import annotations

from node.evaluate.score import Tally, iou_matrix, match_greedy, score_proposals, score_run
from node.evaluate.splits import EvaluateError, select_samples

__all__ = ["EvaluateError", "Tally", "iou_matrix", "match_greedy", "score_proposals", "score_run",
           "select_samples"]
