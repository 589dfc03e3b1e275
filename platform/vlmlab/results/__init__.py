"""Result tables (Arrow/Parquet), their atomic writer and readers, reports and plots."""

from __future__ import annotations

from vlmlab.results._report import (
    ReportTable,
    budget_tables,
    craft_tables,
    devsafety_tables,
    forgetting_tables,
    plot_budget,
    plot_craft,
    plot_devsafety,
    plot_forgetting,
)
from vlmlab.results._schema import METRIC_COLUMNS, RUNS_SCHEMA, STEPS_SCHEMA
from vlmlab.results._store import ResultsStore, is_missing, read_table, write_parquet_atomic

__all__ = [
    "METRIC_COLUMNS",
    "RUNS_SCHEMA",
    "STEPS_SCHEMA",
    "ReportTable",
    "ResultsStore",
    "budget_tables",
    "craft_tables",
    "devsafety_tables",
    "forgetting_tables",
    "is_missing",
    "plot_budget",
    "plot_craft",
    "plot_devsafety",
    "plot_forgetting",
    "read_table",
    "write_parquet_atomic",
]
