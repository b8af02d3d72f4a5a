"""The whole node in-process over frames held in memory, and its score against labels.

Shared by ``python -m export.validate`` (camera variants, leave-one-clip-out) and
``python -m export finetune`` (before/after reports): ``run_node`` runs
``node.pipeline.Pipeline`` with a given config, backend and proposer and keeps every
``FrameResult``; ``score_variant`` scores them with ``node.evaluate``'s matching, per clip and
over all clips.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import numpy as np

from node.evaluate.score import Tally
from node.types import Frame


class FrameList:
    """A replay source over frames held in memory (``Pipeline.run`` closes it)."""

    dropped = 0

    def __init__(self, frames: list[Frame], progress: Any = None) -> None:
        self.frames, self.progress = frames, progress

    def __iter__(self):
        for frame in self.frames:
            yield frame
            if self.progress is not None:
                self.progress.update(1)

    def close(self) -> None:
        pass


@contextmanager
def open_node(config: Any):
    """The proposer and the started classifier backend (``model.path``) of a node config, as
    ``(backend, proposer)``; both are closed afterwards."""
    from node.infer import load_backend
    from node.node_config import resolve_path
    from node.propose import build_proposer

    proposer = build_proposer(config.proposer)
    try:
        backend = load_backend(resolve_path(config.model.path), providers=config.model.providers,
                               threads=config.model.threads, max_batch=config.model.max_batch)
        with backend:
            yield backend, proposer
    finally:
        proposer.close()


def run_node(config: Any, backend: Any, proposer: Any, frames: list[Frame],
             progress: Any = None) -> tuple[list[Any], dict]:
    """Every frame's ``FrameResult`` (in order) and the pipeline's summary. The camera watch
    is off: its readings of labelled frames are ``export.validate``'s own (``camera_check``),
    and its thread would only compete with the timed frames."""
    from dataclasses import replace

    from node.pipeline import Pipeline
    from node.publish.publishers import Publisher

    class Keep(Publisher):
        name = "validation collector"

        def __init__(self) -> None:
            super().__init__()
            self.results: list[Any] = []

        def _publish(self, result: Any, image: Any) -> None:
            self.results.append(result)

    keep = Keep()
    config = replace(config, camera_watch=replace(config.camera_watch, every_s=0.0))
    summary = Pipeline(config, backend, proposer, [keep]).run(FrameList(frames, progress))
    return keep.results, summary


def score_variant(results: list[Any], truth: list[tuple[np.ndarray, list[str]]],
                  clips: list[str], scales: list[float] | None = None) -> dict[str, dict]:
    """Tallies per clip and over all (``"all"``) of one variant's results; ``scales``: each
    frame's ``Tally.add`` ``label_scale`` (1 for all when None)."""
    tallies: dict[str, Tally] = defaultdict(Tally)
    scales = scales or [1.0] * len(results)
    for result, (boxes, labels), clip, scale in zip(results, truth, clips, scales, strict=True):
        pred = np.array([c.box for c in result.cones], np.float64).reshape(-1, 4)
        scores = np.array([c.score for c in result.cones])
        names = [c.label for c in result.cones]
        for key in (clip, "all"):
            tallies[key].add(pred, scores, names, boxes, labels, scale)
    return {k: t.report() for k, t in tallies.items()}
