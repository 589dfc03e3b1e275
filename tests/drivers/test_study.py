"""`vlmlab study budget`: budgets x methods x seeds as a Tune grid, its table and figure."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from vlmlab.cli import app
from vlmlab.results import budget_tables
from vlmlab.specs import validate_spec
from vlmlab.tasks import study_metrics

pytestmark = pytest.mark.slow

STUDY = {
    "name": "tiny-study",
    "backend": {"name": "conse"},
    "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 100, "forget": [0, 1, 2, 3]},
    "method": {"name": "bbf", "popsize": 8, "iterations": 50, "batch_size": 20},
    "variants": [{"name": "bbf"}, {"name": "bbt"}],
    "study": {"budgets": [32, 16], "max_concurrent": 2, "trial_cpus": 0.5},
    "seeds": [4],
    "eval_every": 2,
}


@pytest.fixture(scope="module")
def study(conse_pool, tmp_path_factory):
    from vlmlab.drivers import run_budget_study

    results = tmp_path_factory.mktemp("study")
    spec = validate_spec(STUDY, "test")
    run_ids = run_budget_study(spec, results, pool=conse_pool)
    return spec, results, run_ids


def test_every_budget_method_and_seed_is_one_row(study):
    _, results, run_ids = study
    assert run_ids == [
        "tiny-study-bbf-q16-s4",
        "tiny-study-bbt-q16-s4",
        "tiny-study-bbf-q32-s4",
        "tiny-study-bbt-q32-s4",
    ]
    runs = pd.read_parquet(results / "runs").set_index("run_id").loc[run_ids]
    assert (runs.status == "completed").all()
    assert runs.budget.tolist() == [16, 16, 32, 32]
    assert runs.queries_used.tolist() == [16, 16, 32, 32]  # the budget, to the query
    assert runs.generations.tolist() == [2, 2, 4, 4]
    assert runs.test_H.notna().all() and runs.zeroshot_test_H.nunique() == 1


def test_rerun_skips_completed_trials(study, conse_pool):
    from vlmlab.drivers import run_budget_study

    spec, results, _ = study
    before = pd.read_parquet(results / "runs")
    run_budget_study(spec, results, pool=conse_pool)
    after = pd.read_parquet(results / "runs")
    pd.testing.assert_frame_equal(
        before.sort_values("run_id").reset_index(drop=True),
        after.sort_values("run_id").reset_index(drop=True),
    )


def test_tables_are_method_by_budget(study):
    _, results, _ = study
    runs = pd.read_parquet(results / "runs")
    tables = budget_tables(runs, study_metrics())
    assert [t.title.split(":")[1].split(" by")[0].strip() for t in tables] == [
        "H",
        "Err_fgt",
        "Acc_mem",
        "DevSafety",  # every forgetting run reports what forgetting cost the kept classes
    ]
    h = tables[0]
    assert h.columns == ["method", "16 queries", "32 queries", "seeds"]
    assert [row[0] for row in h.rows] == ["zero-shot", "bbf", "bbt"]
    bbf_32 = runs[runs.run_id == "tiny-study-bbf-q32-s4"].test_H.iloc[0]
    assert h.rows[1][2] == f"{bbf_32 * 100:.2f}"
    assert "ConSE" in h.title and "fashion-mnist" in h.title


def test_cli_study_writes_table_and_figure(study, conse_pool, tmp_path, cache_dir):
    tree = {
        **STUDY,
        "backend": {"name": "conse", "cache_dir": cache_dir},
        "pool": {"num_cpus": 0.5},
    }
    tree["study"] = {**STUDY["study"], "budgets": [16]}
    tree["variants"] = [{"name": "bbf"}]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tree))
    out = CliRunner().invoke(app, ["study", "budget", str(path), "--results", str(tmp_path)])
    # One budget is no study to tabulate: the command still runs it and says so.
    assert out.exit_code == 0, out.output
    assert "1 trials in" in out.output and "nothing to compare" in out.output
    _, results, _ = study
    report = CliRunner().invoke(app, ["report", str(results)])
    assert report.exit_code == 0, report.output
    assert "Budget study" in report.output
    assert (results / "report" / "budget_study.png").stat().st_size > 1000


def test_spec_without_study_is_refused(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in STUDY.items() if k != "study"}))
    out = CliRunner().invoke(app, ["study", "budget", str(path), "--results", str(tmp_path)])
    assert out.exit_code == 2 and "no `study:` section" in out.output


def test_craft_study_reports_accuracy_by_budget(conse_pool, tmp_path):
    from vlmlab.drivers import run_budget_study

    tree = {
        "name": "craft-study",
        "task": "craft",
        "backend": {"name": "conse"},
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 100},
        "method": {"popsize": 8},
        "study": {"budgets": [16, 24], "trial_cpus": 0.5},  # 2 and 3 generations of 8
        "seeds": [3],
        "eval_every": 2,
    }
    run_ids = run_budget_study(validate_spec(tree, "test"), tmp_path, pool=conse_pool)
    assert run_ids == ["craft-study-craft-q16-s3", "craft-study-craft-q24-s3"]
    runs = pd.read_parquet(tmp_path / "runs").set_index("run_id").loc[run_ids]
    assert runs.queries_used.tolist() == [16, 24] and runs.test_acc.between(0, 1).all()
    (table,) = budget_tables(runs.reset_index(), study_metrics())
    assert "accuracy" in table.title and table.columns[1:3] == ["16 queries", "24 queries"]
