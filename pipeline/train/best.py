"""The best checkpoint of a validating run: chosen by AP, kept beside the latest.

With periodic validation on (``train.eval_every``, or stage tune), each scored checkpoint's
report carries ``val_ap`` (AP at IoU .50:.95 on the held-out images, `pipeline.train.validation`);
checkpoints not scored carry NaN. Both sessions keep the same set (`pipeline.train.sessions`):

* the latest checkpoint, always (a restart resumes from it), and
* the ``keep`` best by `BEST_METRIC` -- Ray Train's ``CheckpointConfig(num_to_keep=keep,
  checkpoint_score_attribute="val_ap", checkpoint_score_order="max")``, which ranks NaN below
  any score and keeps the latest too; `LocalSession` does the same with `rank`.

Without validation every score is missing, the ranking falls back to the iteration, and the
newest ``keep`` are kept, as before.

`best_of` picks the best of the kept ones at the end of a run (stage train reports it: its
iteration, scores and location, and logs its model file to MLflow).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

BEST_METRIC = "val_ap"  # what "best" means: AP at IoU .50:.95 on the held-out images
BEST_SCORES = ("val_ap", "val_ap50")  # reported with the best checkpoint


@dataclass(frozen=True)
class BestCheckpoint:
    """A scored checkpoint: where it is (a folder or a URI), its iteration and validation scores."""

    location: str
    iteration: int
    scores: dict[str, float]


def score(metrics: Mapping[str, Any]) -> float | None:
    """``metrics[BEST_METRIC]`` when it is a finite number; None (not scored) otherwise."""
    value = metrics.get(BEST_METRIC)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def rank(metrics: Mapping[str, Any], iteration: int) -> tuple[bool, float, int]:
    """Sort key, best last: scored above not scored, then by score, ties to the later iteration."""
    value = score(metrics)
    return (value is not None, value if value is not None else -math.inf, iteration)


def best_of(candidates: Iterable[tuple[str, Mapping[str, Any]]]) -> BestCheckpoint | None:
    """The best of ``(location, metrics)`` pairs by `rank`; None when none was scored.

    ``metrics`` are the checkpoint's report (rank 0's): ``iteration`` and the scores.
    """
    scored = [(loc, m) for loc, m in candidates if score(m) is not None]
    if not scored:
        return None
    location, metrics = max(scored, key=lambda item: rank(item[1], int(item[1]["iteration"])))
    return BestCheckpoint(
        location=location,
        iteration=int(metrics["iteration"]),
        scores={k: float(metrics[k]) for k in BEST_SCORES if k in metrics},
    )
