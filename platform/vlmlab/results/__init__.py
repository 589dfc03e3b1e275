"""Results: Arrow/Parquet tables, their atomic writer and readers, artifacts,
and the pieces of reports and plots.

Nothing here knows a task: the metric columns of ``runs`` and each task's
tables come from ``vlmlab.tasks``, which builds them from these parts.
"""

from __future__ import annotations

from vlmlab.results._artifact import MANIFEST, Artifact, load_artifact, save_artifact
from vlmlab.results._identity import (
    RowGroup,
    TableGroup,
    experiments_in,
    fingerprint,
    identity,
    table_groups,
)
from vlmlab.results._report import (
    ReportTable,
    StudyMetrics,
    budget_tables,
    completed,
    finish_panel,
    mean_curve,
    mean_std,
    panels,
    plot_budget,
    save_figure,
)
from vlmlab.results._schema import STEPS_SCHEMA, metric_columns, runs_schema
from vlmlab.results._store import ResultsStore, is_missing, read_table, write_parquet_atomic

__all__ = [
    "MANIFEST",
    "STEPS_SCHEMA",
    "Artifact",
    "ReportTable",
    "ResultsStore",
    "RowGroup",
    "StudyMetrics",
    "TableGroup",
    "budget_tables",
    "completed",
    "experiments_in",
    "fingerprint",
    "finish_panel",
    "identity",
    "is_missing",
    "load_artifact",
    "mean_curve",
    "mean_std",
    "metric_columns",
    "panels",
    "plot_budget",
    "read_table",
    "runs_schema",
    "save_artifact",
    "save_figure",
    "table_groups",
    "write_parquet_atomic",
]
