"""Arrow schemas of the two result tables.

``runs``: one row per trial (ids, what ran, status, counts, final metrics).
Final metrics are columns named ``<split>_<metric>``; a run's reference
(the zero-shot prompt, or the model before training) sits beside them as
``zeroshot_<split>_<metric>`` (a forgetting run also has the zero-query
``dropclasses_<split>_<metric>``). Metrics are fractions; the unit of every
column that has one is in its Arrow field metadata. Each run's file holds the
fixed columns and its own task's metric columns (``Task.runs_schema()``), so a
metric added to one task changes no other task's files; a folder read as one
table (pandas, duckdb, polars, ``ResultsStore.runs``) is the union of its
files' columns, null where a run's task has no such metric. Folders written
when every file held every task's columns read the same way.

``steps``: long format, one row per (run, step, split, metric).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyarrow as pa

SPLITS = ("test", "val")
"""The splits whose final metrics are ``runs`` columns."""

BASE_RUN_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("run_id", pa.string()),
    ("experiment", pa.string()),
    ("fingerprint", pa.string()),
    ("task", pa.string()),
    ("method", pa.string()),
    ("backend", pa.string()),
    ("model", pa.string()),
    ("dataset", pa.string()),
    ("shots", pa.int64()),
    ("seed", pa.int64()),
    ("config", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
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


REFERENCE = "zeroshot"
"""Every task's reference (the zero-shot prompt, or the model before training)."""


def metric_columns(
    metrics: Iterable[str], references: Mapping[str, Iterable[str]] | None = None
) -> tuple[str, ...]:
    """``<split>_<metric>`` and ``zeroshot_<split>_<metric>`` for each metric name, in order,
    then ``<reference>_<split>_<metric>`` for each further reference and its metrics (the
    forgetting task's ``dropclasses``)."""
    names = list(dict.fromkeys(metrics))
    columns = [
        f"{prefix}{split}_{metric}"
        for prefix in ("", f"{REFERENCE}_")
        for split in SPLITS
        for metric in names
    ]
    for reference, of_reference in (references or {}).items():
        columns += [
            f"{reference}_{split}_{metric}"
            for split in SPLITS
            for metric in dict.fromkeys(of_reference)
        ]
    return tuple(columns)


METRIC_UNIT = {"unit": "fraction", "display": "percent (points) = value x 100"}
"""Arrow field metadata of every metric column: stored as fractions, shown in percent."""

FIELD_UNITS: dict[str, dict[str, str]] = {
    "queries_used": {"unit": "queries", "meaning": "candidate prompts scored on one batch each"},
    "budget": {"unit": "queries"},
    "images_scored": {"unit": "images"},
    "wall_seconds": {"unit": "seconds"},
    "shots": {"unit": "images per class"},
    "generations": {"unit": "generations (epochs for white-box methods)"},
    "best_generation": {"unit": "generation"},
}
"""Arrow field metadata of the fixed ``runs`` columns that carry a unit."""


def _field(name: str, dtype: pa.DataType, unit: Mapping[str, str] | None) -> pa.Field:
    return pa.field(name, dtype, metadata=dict(unit) if unit else None)


def runs_schema(
    metrics: Iterable[str] = (), references: Mapping[str, Iterable[str]] | None = None
) -> pa.Schema:
    """The ``runs`` schema: the fixed columns, then a float column per metric column.

    Each column with a unit carries it in its Arrow field metadata (``unit``):
    metric columns are fractions (reports show them in percent), counts name
    what they count, times are seconds.
    """
    return pa.schema(
        [
            *[_field(name, dtype, FIELD_UNITS.get(name)) for name, dtype in BASE_RUN_FIELDS],
            *[
                _field(name, pa.float64(), METRIC_UNIT)
                for name in metric_columns(metrics, references)
            ],
        ]
    )


STEPS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int64()),
        _field("queries_used", pa.int64(), FIELD_UNITS["queries_used"]),
        _field("images_scored", pa.int64(), FIELD_UNITS["images_scored"]),
        _field("wall_seconds", pa.float64(), FIELD_UNITS["wall_seconds"]),
        ("split", pa.string()),
        ("metric", pa.string()),
        pa.field(
            "value",
            pa.float64(),
            metadata={"unit": "by metric: accuracies, errors, H and deltas are fractions"},
        ),
    ]
)
