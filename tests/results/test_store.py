"""The results layer on its own: store, schema, artifacts, report pieces (fast, no models)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from vlmlab.results import (
    ReportTable,
    ResultsStore,
    budget_tables,
    load_artifact,
    metric_columns,
    runs_schema,
    save_artifact,
)
from vlmlab.tasks import runs_schema_of_task, runs_schema_of_tasks, study_metrics


def _row(run_id: str, **metrics: float) -> dict:
    return {
        "run_id": run_id,
        "experiment": "e",
        "task": "forgetting",
        "method": "bbf",
        "backend": "ConSE",
        "model": "m",
        "dataset": "d",
        "seed": 1,
        "status": "completed",
        "started_at": datetime.now(UTC),
        **metrics,
    }


def test_metric_columns_cover_splits_and_references():
    assert metric_columns(["H", "acc"]) == (
        "test_H",
        "test_acc",
        "val_H",
        "val_acc",
        "zeroshot_test_H",
        "zeroshot_test_acc",
        "zeroshot_val_H",
        "zeroshot_val_acc",
    )
    schema = runs_schema_of_tasks()
    for column in ("test_H", "zeroshot_val_acc", "test_devsafety", "val_safe_gain"):
        assert column in schema.names


def test_store_with_the_task_schema_writes_every_column(tmp_path):
    store = ResultsStore(tmp_path, runs_schema_of_tasks())
    path = store.write_run(_row("a", test_H=0.5))
    assert pq.read_schema(path).names == runs_schema_of_tasks().names
    runs = store.runs()
    assert runs.loc[0, "test_H"] == 0.5 and pd.isna(runs.loc[0, "test_acc"])


def test_each_run_file_holds_its_own_tasks_metric_columns(tmp_path):
    """A forgetting run's file has no CraFT column and a CraFT run's none of forgetting's: a
    metric added to one task changes no other task's files; the folder reads as the union."""
    store = ResultsStore(tmp_path, schema_of=runs_schema_of_task)
    forgetting = pq.read_schema(store.write_run(_row("f", test_H=0.5, dropclasses_test_H=0.4)))
    craft = pq.read_schema(store.write_run({**_row("c", test_acc=0.7), "task": "craft"}))
    assert "test_H" in forgetting.names and "dropclasses_test_H" in forgetting.names
    assert "test_acc" not in forgetting.names and "test_target_gain" not in forgetting.names
    assert "test_acc" in craft.names and "test_H" not in craft.names
    assert forgetting.names == runs_schema_of_task("forgetting").names
    runs = store.runs().set_index("run_id")
    assert runs.loc["f", "test_H"] == 0.5 and pd.isna(runs.loc["f", "test_acc"])
    assert runs.loc["c", "test_acc"] == 0.7 and pd.isna(runs.loc["c", "test_H"])
    # A row read back from the mixed folder and rewritten keeps its task's columns only;
    # a value in another task's column is refused, never dropped.
    row = runs.reset_index().set_index("run_id", drop=False).loc["f"].to_dict()
    rewritten = pq.read_schema(store.write_run({**row, "status": "stopped"}))
    assert rewritten.names == forgetting.names
    with pytest.raises(ValueError, match=r"columns not in the schema: \['test_acc'\]"):
        store.write_run(_row("x", test_H=0.5, test_acc=0.9))
    # An empty folder still reads with the fixed columns.
    assert {"run_id", "status", "task"} <= set(ResultsStore(tmp_path / "empty").runs().columns)


def test_a_folder_written_with_every_tasks_columns_still_reads(tmp_path):
    ResultsStore(tmp_path, runs_schema_of_tasks()).write_run(_row("old", test_H=0.5))
    store = ResultsStore(tmp_path, schema_of=runs_schema_of_task)
    store.write_run({**_row("new", test_acc=0.7), "task": "craft"})
    runs = store.runs().set_index("run_id")
    assert runs.loc["old", "test_H"] == 0.5 and runs.loc["new", "test_acc"] == 0.7
    assert pd.isna(runs.loc["new", "test_H"]) and pd.isna(runs.loc["old", "test_acc"])


def test_store_without_a_schema_reads_the_union_of_its_files(tmp_path):
    store = ResultsStore(tmp_path)
    store.write_run(_row("a", test_H=0.5))
    store.write_run(_row("b", test_custom=0.25, zeroshot_test_custom=0.1))
    runs = store.runs().set_index("run_id")
    assert runs.loc["a", "test_H"] == 0.5 and pd.isna(runs.loc["a", "test_custom"])
    assert runs.loc["b", "test_custom"] == 0.25
    with pytest.raises(ValueError, match="columns not in the schema"):
        store.write_run(_row("c", colour=1.0))
    with pytest.raises(ValueError, match="columns not in the schema"):
        ResultsStore(tmp_path, runs_schema(["H"])).write_run(_row("d", test_acc=1.0))


def test_a_stale_temporary_is_never_read_and_is_cleaned(tmp_path):
    store = ResultsStore(tmp_path, runs_schema_of_tasks())
    store.write_run(_row("a", test_H=0.5))
    stale = tmp_path / "runs" / ".a.parquet.x1y2.tmp"
    stale.write_bytes(b"half a file")
    in_flight = tmp_path / "runs" / ".b.parquet.z3w4.tmp"
    in_flight.write_bytes(b"another trial writing now")
    an_hour_ago = time.time() - 3700
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert list(store.runs().run_id) == ["a"]
    # A new writer removes what a killed one left, never a concurrent writer's file.
    ResultsStore(tmp_path)
    assert not stale.exists() and in_flight.exists()


def test_artifact_round_trip_and_its_main_tensor(tmp_path):
    tensors = {"contexts": torch.randn(1, 4, 8)}
    save_artifact(tmp_path / "a", tensors, {"kind": "toy", "class_names": ["x"]})
    artifact = load_artifact(tmp_path / "a")
    assert torch.equal(artifact.contexts, tensors["contexts"])
    assert artifact.manifest["kind"] == "toy" and artifact.manifest["format_version"] == 1
    with pytest.raises(ValueError, match="needs a 'class_embeddings' tensor"):
        save_artifact(tmp_path / "b", tensors, {"kind": "k"}, required="class_embeddings")
    with pytest.raises(FileNotFoundError, match="not an artifact folder"):
        load_artifact(tmp_path / "missing")


def test_budget_tables_compare_methods_by_budget():
    rows = []
    for budget, h in ((100, 0.5), (200, 0.7)):
        for seed in (1, 2):
            rows.append(
                {
                    **_row(f"r{budget}{seed}", test_H=h + seed / 100, zeroshot_test_H=0.3),
                    "seed": seed,
                    "budget": budget,
                    "queries_used": budget,
                    "test_err_fgt": 0.9,
                    "test_acc_mem": 0.8,
                    "zeroshot_test_err_fgt": 0.2,
                    "zeroshot_test_acc_mem": 0.9,
                }
            )
    tables = budget_tables(pd.DataFrame(rows), study_metrics())
    h_table = next(t for t in tables if ": H by query budget" in t.title)
    assert h_table.columns == ["method", "100 queries", "200 queries", "seeds"]
    assert h_table.rows[0][:2] == ["zero-shot", "30.00"]
    assert h_table.rows[1] == ["bbf", "51.50 ± 0.71", "71.50 ± 0.71", "2"]
    assert budget_tables(pd.DataFrame(rows[:2]), study_metrics()) == []  # one budget


def test_report_table_markdown():
    table = ReportTable("T", ["a", "b"], [["1", "2"]])
    assert table.markdown() == "### T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
