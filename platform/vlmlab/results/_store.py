"""Writing and reading a results folder (a local path or a URI: :mod:`vlmlab.storage`).

Layout under DIR::

    runs/<run_id>.parquet                  one row; rewritten as the run's status changes
    steps/<run_id>-<first>-<last>.parquet  steps of generations first..last
    artifacts/<run_id>/                    learned prompt + manifest.json
    checkpoints/<run_id>.pkl               method state, for --resume

Every file is written atomically: on a local disk to a hidden temporary name
and renamed, so a killed writer leaves only complete files (and hidden
temporaries that readers skip and the next writer removes); on an object store
as one upload, visible only once complete. Step files are named by their generation range,
so re-running a range after a resume replaces a file instead of duplicating
rows. pandas, duckdb and polars read ``runs/`` and ``steps/`` as they are.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vlmlab._io import remove_stale_temporaries
from vlmlab.results._schema import STEPS_SCHEMA, runs_schema
from vlmlab.storage import Location, locate


def _table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    rows = list(rows)
    unknown = {key for row in rows for key in row} - set(schema.names)
    if unknown:
        raise ValueError(f"columns not in the schema: {sorted(unknown)}")
    # A row read back through pandas has NaN / NaT where it had no value: null again here.
    columns = {
        name: [None if is_missing(row.get(name)) else row.get(name) for row in rows]
        for name in schema.names
    }
    return pa.table(columns, schema=schema)


def write_parquet_atomic(table: pa.Table, path: str | Path | Location) -> None:
    """Serialize ``table`` in memory, then write it in one atomic step."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    locate(path).write_bytes(buffer.getvalue())


class ResultsStore:
    """A results folder (see the module docstring for its layout).

    Args:
        root: the folder (created if missing): a path or a URI (``s3://bucket/prefix``).
        schema: one ``runs`` schema for every row (``vlmlab.tasks.runs_schema_of_tasks()``,
            the union of the registered tasks' metric columns).
        schema_of: the ``runs`` schema of a row's task, by the row's ``task``
            (``vlmlab.tasks.runs_schema_of_task``): each file then holds its task's
            columns only, and a metric added to one task changes nothing else.
            Without ``schema`` or ``schema_of``, rows are written with their own metric
            columns. Unless ``schema`` is set, reads return the union of the files'
            columns (and the fixed ones, even in an empty folder).
    """

    def __init__(
        self,
        root: str | Path | Location,
        schema: pa.Schema | None = None,
        *,
        schema_of: Callable[[object], pa.Schema] | None = None,
    ) -> None:
        if schema is not None and schema_of is not None:
            raise ValueError("give ResultsStore a schema or a schema_of, not both")
        self.location = locate(root)
        self.schema = schema
        self.schema_of = schema_of
        self.runs_dir = self.location / "runs"
        self.steps_dir = self.location / "steps"
        self.artifacts_dir = self.location / "artifacts"
        self.checkpoints_dir = self.location / "checkpoints"
        for folder in (self.runs_dir, self.steps_dir, self.artifacts_dir, self.checkpoints_dir):
            folder.make_folder()
        if self.location.is_local:
            remove_stale_temporaries(self.location.path)

    @property
    def root(self) -> Path | str:
        """The folder as a ``Path`` (local) or its URI (remote)."""
        return self.location.native

    # ---------------------------------------------------------------- writing
    def write_run(self, row: dict[str, Any]) -> Path | str:
        path = self.runs_dir / f"{row['run_id']}.parquet"
        if self.schema is not None:
            schema = self.schema
        elif self.schema_of is not None:
            schema = self.schema_of(row.get("task"))
            # A null cell of a column this task does not have (a row read back from a
            # folder of several tasks) is no value; a value there is refused by _table.
            row = {k: v for k, v in row.items() if k in schema.names or not is_missing(v)}
        else:
            schema = runs_schema(_metrics_of(row))
        write_parquet_atomic(_table([row], schema), path)
        return path.native

    def write_steps(
        self, run_id: str, first: int, last: int, rows: list[dict[str, Any]]
    ) -> Path | str:
        path = self.steps_dir / f"{run_id}-{first:06d}-{last:06d}.parquet"
        write_parquet_atomic(_table(rows, STEPS_SCHEMA), path)
        return path.native

    def checkpoint_path(self, run_id: str) -> Location:
        return self.checkpoints_dir / f"{run_id}.pkl"

    def artifact_dir(self, run_id: str) -> Location:
        return self.artifacts_dir / run_id

    def clear_run(self, run_id: str) -> None:
        """Forget a run's earlier steps and checkpoint (a fresh start of the same id)."""
        for step_file in self.steps_dir.entries(suffix=".parquet"):
            name = step_file.name
            if name.startswith(f"{run_id}-") and name.removeprefix(f"{run_id}-")[:6].isdigit():
                step_file.delete()
        self.checkpoint_path(run_id).delete()

    # ---------------------------------------------------------------- reading
    def runs(self) -> pd.DataFrame:
        return read_table(self.runs_dir, self.schema, base=runs_schema())

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


def read_table(
    folder: str | Path | Location,
    schema: pa.Schema | None = None,
    *,
    base: pa.Schema | None = None,
) -> pd.DataFrame:
    """All Parquet files of a table folder, read with ``schema`` (default: the union of
    theirs, and of ``base``: columns every reader may count on, even with no file).

    The files are read as one pyarrow dataset: in parallel, which is what keeps a
    1,000-file ``runs`` table on an object store from costing 1,000 round trips
    in a row.
    """
    location = locate(folder)
    files = [entry.path for entry in location.entries(suffix=".parquet")]
    if schema is None:
        with ThreadPoolExecutor(max_workers=16) as pool:
            schemas = list(
                pool.map(lambda f: pq.read_schema(f, filesystem=location.filesystem), files)
            )
        known = [*([base] if base is not None else []), *schemas]
        if not known:
            return pd.DataFrame()  # no file and no columns asked for
        schema = pa.unify_schemas(known)
    if not files:
        return schema.empty_table().to_pandas()
    dataset = pads.dataset(files, schema=schema, filesystem=location.filesystem, format="parquet")
    return dataset.to_table().to_pandas()


def is_missing(value: Any) -> bool:
    """A null cell as pandas reads it back (None, NaN, NA, NaT); lists and strings never are."""
    return value is None or (not isinstance(value, str | list | dict) and bool(pd.isna(value)))
