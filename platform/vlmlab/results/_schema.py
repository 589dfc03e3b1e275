"""Arrow schemas of the two result tables.

``runs``: one row per trial (ids, what ran, status, counts, final metrics).
Final metrics are columns named ``<split>_<metric>``; a run's zero-shot
reference sits beside them as ``zeroshot_<split>_<metric>``. The schema is
fixed (metric columns of every method, null where a method has none), so any
Parquet reader sees the same columns in every file.

``steps``: long format, one row per (run, step, split, metric).
"""

from __future__ import annotations

import pyarrow as pa

FORGETTING_METRICS = ("H", "err_fgt", "acc_mem")
CRAFT_METRICS = ("acc",)
DEVSAFETY_METRICS = ("target_acc", "target_gain", "devsafety", "protected_acc", "safe_gain")
"""devsafety's ``zeroshot_`` columns hold its reference model ``w_old`` (gains of 0)."""

METRIC_COLUMNS: tuple[str, ...] = tuple(
    f"{prefix}{split}_{metric}"
    for prefix in ("", "zeroshot_")
    for split in ("test", "val")
    for metric in (*FORGETTING_METRICS, *CRAFT_METRICS, *DEVSAFETY_METRICS)
)

RUNS_SCHEMA = pa.schema(
    [
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
        *[(name, pa.float64()) for name in METRIC_COLUMNS],
    ]
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
