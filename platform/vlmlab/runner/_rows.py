"""What a trial writes and reads back: its outcome, its ``runs`` columns and its checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vlmlab.methods import Method
from vlmlab.results import is_missing
from vlmlab.storage import is_uri
from vlmlab.tasks import DEFAULT_TASK, reference_metrics

CHECKPOINT_VERSION = 1


@dataclass
class TrialOutcome:
    """What one finished trial measured (also in its ``runs`` row)."""

    run_id: str
    seed: int
    method: str
    backend: str
    model: str
    dataset: str
    test: dict[str, float]
    val: dict[str, float]
    zeroshot_test: dict[str, float]
    queries_used: int
    budget: int | None
    generations: int
    artifact: Path | str  # a URI when the results live on an object store
    resumed_from: int = 0
    skipped: bool = False
    task: str = DEFAULT_TASK
    shots: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    """Further references on the test split (forgetting: ``dropclasses``, zero queries)."""


def columns(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` as ``runs`` columns ``<prefix>_<metric>``."""
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def plain(metrics: dict[str, float], references: tuple[str, ...]) -> dict[str, float]:
    """A reference's own metrics, without the further references it carries
    (``<reference>:<metric>``)."""
    return {
        name: value for name, value in metrics.items() if name.partition(":")[0] not in references
    }


def reference_columns(
    split: str, metrics: dict[str, float], references: tuple[str, ...]
) -> dict[str, float]:
    """``<reference>:<metric>`` entries of a reference's metrics as ``runs`` columns."""
    found = {}
    for name, value in metrics.items():
        reference, separator, metric = name.partition(":")
        if separator and reference in references:
            found[f"{reference}_{split}_{metric}"] = value
    return found


def flat(evaluations: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every split's metrics as ``<split>_<metric>``."""
    return {
        f"{split}_{name}": value
        for split, metrics in evaluations.items()
        for name, value in metrics.items()
    }


def checkpoint_state(
    config: str,
    trial: Method,
    started_at: datetime,
    wall: float,
    flushed: int,
) -> dict[str, Any]:
    """What a checkpoint holds: the spec it belongs to, the method's state and the clock."""
    return {
        "version": CHECKPOINT_VERSION,
        "config": config,
        "method": trial.state_dict(),
        "started_at": started_at,
        "wall_seconds": wall,
        "flushed": flushed,
    }


def outcome_from_row(row: dict[str, Any]) -> TrialOutcome:
    """A completed trial's outcome read back from its ``runs`` row (``resume`` skips it)."""

    def pick(prefix: str) -> dict[str, float]:
        return {
            key.removeprefix(prefix): float(value)
            for key, value in row.items()
            if key.startswith(prefix) and not is_missing(value)
        }

    return TrialOutcome(
        run_id=row["run_id"],
        seed=int(row["seed"]),
        method=row["method"],
        backend=row["backend"],
        model=row["model"],
        dataset=row["dataset"],
        test=pick("test_"),
        val=pick("val_"),
        zeroshot_test=pick("zeroshot_test_"),
        queries_used=int(row["queries_used"]),
        budget=None if is_missing(row["budget"]) else int(row["budget"]),
        generations=int(row["generations"]),
        artifact=row["artifact"] if is_uri(row["artifact"]) else Path(row["artifact"]),
        skipped=True,
        task=row["task"],
        shots=None if is_missing(row.get("shots")) else int(row["shots"]),
        references={
            reference: pick(f"{reference}_test_")
            for reference in reference_metrics()
            if pick(f"{reference}_test_")
        },
    )
