"""Writing and reading a results folder.

Layout under DIR::

    runs/<run_id>.parquet                  one row; rewritten as the run's status changes
    steps/<run_id>-<first>-<last>.parquet  steps of generations first..last
    artifacts/<run_id>/                    learned prompt + manifest.json
    checkpoints/<run_id>.pkl               method state, for --resume

Every file is written to a hidden temporary name and renamed, so a killed
writer leaves only complete files (and hidden temporaries that readers skip
and the next writer removes). Step files are named by their generation range,
so re-running a range after a resume replaces a file instead of duplicating
rows. pandas, duckdb and polars read ``runs/`` and ``steps/`` as they are.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlab._io import atomic_write_bytes, remove_stale_temporaries
from vlmlab.results._schema import STEPS_SCHEMA, runs_schema


def _table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    rows = list(rows)
    unknown = {key for row in rows for key in row} - set(schema.names)
    if unknown:
        raise ValueError(f"columns not in the schema: {sorted(unknown)}")
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.table(columns, schema=schema)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class ResultsStore:
    """A results folder (see the module docstring for its layout).

    Args:
        root: the folder (created if missing).
        schema: the ``runs`` schema (``vlmlab.tasks.runs_schema()`` holds every
            registered task's metric columns). Without one, rows are written with
            their own metric columns and reads return the union of the files' columns.
    """

    def __init__(self, root: str | Path, schema: pa.Schema | None = None) -> None:
        self.root = Path(root)
        self.schema = schema
        self.runs_dir = self.root / "runs"
        self.steps_dir = self.root / "steps"
        self.artifacts_dir = self.root / "artifacts"
        self.checkpoints_dir = self.root / "checkpoints"
        for folder in (self.runs_dir, self.steps_dir, self.artifacts_dir, self.checkpoints_dir):
            folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.root)

    # ---------------------------------------------------------------- writing
    def write_run(self, row: dict[str, Any]) -> Path:
        path = self.runs_dir / f"{row['run_id']}.parquet"
        schema = self.schema or runs_schema(_metrics_of(row))
        write_parquet_atomic(_table([row], schema), path)
        return path

    def write_steps(self, run_id: str, first: int, last: int, rows: list[dict[str, Any]]) -> Path:
        path = self.steps_dir / f"{run_id}-{first:06d}-{last:06d}.parquet"
        write_parquet_atomic(_table(rows, STEPS_SCHEMA), path)
        return path

    def checkpoint_path(self, run_id: str) -> Path:
        return self.checkpoints_dir / f"{run_id}.pkl"

    def artifact_dir(self, run_id: str) -> Path:
        return self.artifacts_dir / run_id

    def clear_run(self, run_id: str) -> None:
        """Forget a run's earlier steps and checkpoint (a fresh start of the same id)."""
        for path in self.steps_dir.glob(f"{run_id}-*.parquet"):
            if path.name.removeprefix(f"{run_id}-")[:6].isdigit():
                path.unlink()
        self.checkpoint_path(run_id).unlink(missing_ok=True)

    # ---------------------------------------------------------------- reading
    def runs(self) -> pd.DataFrame:
        return read_table(self.runs_dir, self.schema)

    def steps(self) -> pd.DataFrame:
        return read_table(self.steps_dir, STEPS_SCHEMA)


def _metrics_of(row: dict[str, Any]) -> list[str]:
    """Metric names of a row's ``test_``/``val_`` columns (the schema's metric part)."""
    fixed = set(runs_schema().names)
    names = []
    for key in row:
        if key not in fixed:
            for prefix in ("zeroshot_test_", "zeroshot_val_", "test_", "val_"):
                if key.startswith(prefix):
                    names.append(key.removeprefix(prefix))
                    break
            else:
                raise ValueError(f"columns not in the schema: [{key!r}]")
    return names


def read_table(folder: Path, schema: pa.Schema | None = None) -> pd.DataFrame:
    """All Parquet files of a table folder, read with ``schema`` (default: the union of theirs)."""
    files = sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))
    if schema is None:
        if not files:
            return runs_schema().empty_table().to_pandas()
        schema = pa.unify_schemas([pq.read_schema(path) for path in files])
    if not files:
        return schema.empty_table().to_pandas()
    tables = [pq.read_table(path, schema=schema) for path in files]
    return pa.concat_tables(tables).to_pandas()


def is_missing(value: Any) -> bool:
    """A null cell as pandas reads it back (None, NaN, NA, NaT); lists and strings never are."""
    return value is None or (not isinstance(value, str | list | dict) and bool(pd.isna(value)))
