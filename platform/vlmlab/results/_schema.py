"""Arrow schemas of the two result tables.

``runs``: one row per trial (ids, what ran, status, counts, final metrics).
Final metrics are columns named ``<split>_<metric>``; a run's reference
(the zero-shot prompt, or the model before training) sits beside them as
``zeroshot_<split>_<metric>``. The metric names come from the task registry
(``vlmlab.tasks.runs_schema()``), so the schema is fixed for a given set of
tasks: every file holds the metric columns of every task, null where a task
has none, and any Parquet reader sees the same columns in every file.

``steps``: long format, one row per (run, step, split, metric).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

SPLITS = ("test", "val")
"""The splits whose final metrics are ``runs`` columns."""

BASE_RUN_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("run_id", pa.string()),
    ("experiment", pa.string()),
    ("task", pa.string()),
    ("method", pa.string()),
    ("backend", pa.string()),
    ("model", pa.string()),
    ("dataset", pa.string()),
    ("shots", pa.int64()),
    ("seed", pa.int64()),
    ("config", pa.string()),
    ("status", pa.string()),
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("finished_at", pa.timestamp("us", tz="UTC")),
    ("queries_used", pa.int64()),
    ("budget", pa.int64()),
    ("images_scored", pa.int64()),
    ("wall_seconds", pa.float64()),
    ("generations", pa.int64()),
    ("best_generation", pa.int64()),
    ("artifact", pa.string()),
    ("vlmlab_version", pa.string()),
    ("node", pa.string()),
    ("ray_node", pa.string()),
)


def metric_columns(metrics: Iterable[str]) -> tuple[str, ...]:
    """``<split>_<metric>`` and ``zeroshot_<split>_<metric>`` for each metric name, in order."""
    names = list(dict.fromkeys(metrics))
    return tuple(
        f"{prefix}{split}_{metric}"
        for prefix in ("", "zeroshot_")
        for split in SPLITS
        for metric in names
    )


def runs_schema(metrics: Iterable[str] = ()) -> pa.Schema:
    """The ``runs`` schema: the fixed columns, then a float column per metric column."""
    return pa.schema(
        [*BASE_RUN_FIELDS, *[(name, pa.float64()) for name in metric_columns(metrics)]]
    )


STEPS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int64()),
        ("queries_used", pa.int64()),
        ("images_scored", pa.int64()),
        ("wall_seconds", pa.float64()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)
