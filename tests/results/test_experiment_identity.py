"""A report never averages two experiments: fingerprints, separate rows and tables."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vlmlab.results import fingerprint, identity, table_groups
from vlmlab.specs import validate_spec
from vlmlab.tasks import get_task

BASE = {
    "name": "safe",
    "task": "safe_forgetting",
    "backend": {"name": "conse"},
    "data": {"dataset": "fashion-mnist", "shots": 4, "forget": [0, 1, 2, 3]},
    "method": {"name": "safe_bbf", "popsize": 8, "iterations": 10},
    "budget": {"max_queries": 80},
    "seeds": [11, 12],
}


def _rows(tree: dict, h_by_variant: list[float], *, budget: int | None = None) -> list[dict]:
    """``runs`` rows as the runner writes them: one per (expanded trial, seed)."""
    spec = validate_spec(tree, "test")
    rows = []
    for trial, h in zip(spec.expand_trials(), h_by_variant, strict=True):
        for seed in spec.seeds:
            rows.append(
                {
                    "run_id": f"{trial.name}-{trial.method.name}-s{seed}",
                    "experiment": trial.experiment_name,
                    "fingerprint": trial.fingerprint(),
                    "task": trial.task,
                    "method": trial.method.name,
                    "backend": "ConSE",
                    "model": "efficientnet-lite0+minilm",
                    "dataset": "fashion-mnist",
                    "shots": trial.shots,
                    "seed": seed,
                    "config": trial.model_dump_json(exclude={"tracking"}),
                    "status": "completed",
                    "queries_used": budget or trial.query_budget(),
                    "test_H": h,
                    "test_err_fgt": h,
                    "test_acc_mem": h,
                    "test_devsafety": -0.01,
                    "zeroshot_test_H": 0.2,
                    "zeroshot_test_err_fgt": 0.1,
                    "zeroshot_test_acc_mem": 0.8,
                }
            )
    return rows


def test_fingerprint_ignores_seed_name_and_where_but_not_method_or_data():
    spec = validate_spec(BASE, "test").expand_trials()[0]
    config = json.loads(spec.model_dump_json())
    same = {
        **config,
        "seeds": [99],
        "name": "renamed",
        "pool": {**config["pool"], "replicas": 8},
        "eval_every": 3,
        "backend": {**config["backend"], "device": "cuda:1"},
        "data": {**config["data"], "root": "/mnt/elsewhere"},
    }
    assert fingerprint(same) == fingerprint(config) == spec.fingerprint()
    other_method = {**config, "method": {**config["method"], "prompted": "all"}}
    other_forget = {**config, "data": {**config["data"], "forget": [7, 8, 9]}}
    other_budget = {**config, "budget": {"max_queries": 40, "by_shots": None}}
    assert len({fingerprint(c) for c in (config, other_method, other_forget, other_budget)}) == 4
    # An image folder's root is the dataset itself.
    folder = {**config, "data": {**config["data"], "dataset": "imagefolder", "root": "/a"}}
    moved = {**folder, "data": {**folder["data"], "root": "/b"}}
    assert fingerprint(folder) != fingerprint(moved)
    assert "seeds" not in identity(config) and "method" in identity(config)


def test_two_variants_of_one_method_are_two_rows_labelled_by_what_differs():
    tree = {**BASE, "variants": [{"prompted": "forget"}, {"prompted": "all"}]}
    runs = pd.DataFrame(_rows(tree, [0.908, 0.506]))
    assert runs.fingerprint.nunique() == 2 and runs.experiment.unique().tolist() == ["safe"]
    (table,) = get_task("safe_forgetting").tables(runs)
    labels = [row[0] for row in table.rows]
    assert "safe_bbf (prompted=all)" in labels and "safe_bbf (prompted=forget)" in labels
    by_label = {row[0]: row for row in table.rows}
    # Each row averages its own two seeds only: 90.80 and 50.60, never 70.70.
    assert by_label["safe_bbf (prompted=forget)"][1:3] == ["2", "90.80 ± 0.00"]
    assert by_label["safe_bbf (prompted=all)"][1:3] == ["2", "50.60 ± 0.00"]
    assert not any("70.70" in cell for row in table.rows for cell in row)


def test_two_specs_in_one_folder_are_two_tables_that_say_how_they_differ():
    first = {**BASE, "task": "forgetting", "method": {"name": "bbf", "popsize": 8}}
    second = {
        **first,
        "data": {**first["data"], "forget": [5, 7, 9]},
        "budget": {"max_queries": 160},
    }
    runs = pd.DataFrame(_rows(first, [0.4]) + _rows(second, [0.6]))
    tables = get_task("forgetting").tables(runs)
    assert len(tables) == 2
    for table in tables:
        bbf = next(row for row in table.rows if row[0] == "bbf")
        assert bbf[1] == "2"  # two seeds each, never 4
    titles = " ".join(t.title for t in tables)
    assert "data.forget=[0,1,2,3]" in titles and "data.forget=[5,7,9]" in titles
    assert "budget.max_queries=80" in titles and "budget.max_queries=160" in titles
    queries = sorted(next(r for r in t.rows if r[0] == "bbf")[-1] for t in tables)
    assert queries == ["160", "80"]  # never the mean of two budgets


def test_runs_written_before_fingerprints_are_split_by_their_config():
    tree = {**BASE, "variants": [{"prompted": "forget"}, {"prompted": "all"}]}
    runs = pd.DataFrame(_rows(tree, [0.9, 0.5])).drop(columns=["fingerprint"])
    groups = table_groups(runs[runs.status == "completed"])
    assert len(groups) == 1 and len(groups[0].rows()) == 2


def test_craft_shots_are_columns_not_tables():
    tree = {
        "name": "ladder",
        "task": "craft",
        "backend": {"name": "conse"},
        "data": {"dataset": "fashion-mnist", "shots": [1, 2]},
        "seeds": [1],
    }
    spec = validate_spec(tree, "test")
    rows = []
    for trial in spec.expand_trials():
        rows.append(
            {
                "run_id": f"{trial.name}-k{trial.shots}",
                "experiment": trial.experiment_name,
                "task": "craft",
                "method": trial.method.name,
                "backend": "ConSE",
                "model": "m",
                "dataset": "fashion-mnist",
                "shots": trial.shots,
                "seed": 1,
                "config": trial.model_dump_json(),
                "status": "completed",
                "queries_used": trial.query_budget(),
                "test_acc": 0.5,
                "zeroshot_test_acc": 0.25,
            }
        )
    (table,) = get_task("craft").tables(pd.DataFrame(rows))
    assert table.columns[:3] == ["method", "1-shot", "2-shot"]


@pytest.mark.parametrize("task", ["forgetting", "craft", "devsafety", "safe_forgetting"])
def test_a_task_without_completed_runs_has_no_table(task):
    assert get_task(task).tables(pd.DataFrame(columns=["task", "status"])) == []
