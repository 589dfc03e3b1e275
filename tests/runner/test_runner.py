"""`vlmlab run` end to end on ConSE: results tables, determinism, resume, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from vlmlab.results import ResultsStore, load_artifact
from vlmlab.runner import run_experiment
from vlmlab.specs import validate_spec

pytestmark = pytest.mark.slow

SMALL = {
    "name": "small",
    "backend": {"name": "conse"},
    "data": {"dataset": "fashion-mnist", "shots": 4, "test_size": 200, "forget": [0, 1, 2, 3]},
    "method": {"name": "bbf", "popsize": 8, "iterations": 12, "batch_size": 24},
    "budget": {"max_queries": 96},
    "seeds": [5],
    "eval_every": 4,
}


def _spec(**patch):
    tree = {**SMALL, **patch}
    return validate_spec(tree, "test")


def _steps(folder: Path) -> pd.DataFrame:
    steps = ResultsStore(folder).steps()
    return (
        steps.drop(columns=["wall_seconds"])
        .sort_values(["step", "split", "metric"])
        .reset_index(drop=True)
    )


def test_run_writes_tables_and_artifact(conse, tmp_path):
    outcome = run_experiment(_spec(), tmp_path, oracle=conse)[0]
    runs = pd.read_parquet(tmp_path / "runs")  # plain pandas reads the folder as it is
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row.status == "completed" and row.backend == "ConSE" and row.dataset == "fashion-mnist"
    assert (
        row.queries_used == 96 == outcome.queries_used
        and row.budget == 96
        and row.generations == 12
    )
    for column in ("test_H", "test_err_fgt", "test_acc_mem", "val_H", "zeroshot_test_H"):
        assert 0 <= row[column] <= 1
    assert row.test_H == pytest.approx(outcome.test["H"])
    steps = pd.read_parquet(tmp_path / "steps")
    assert sorted(steps.step.unique()) == list(range(1, 13))
    assert set(steps[steps.split == "test"].step) == {4, 8, 12}
    assert steps.groupby(["step", "split", "metric"]).size().max() == 1
    assert steps.queries_used.max() == 96
    artifact = load_artifact(row.artifact)
    assert artifact.contexts.shape == (1, 4, 384)
    assert artifact.manifest["backend"] == "ConSE" and artifact.manifest["forget"] == [0, 1, 2, 3]
    assert artifact.manifest["metrics"]["test_H"] == pytest.approx(row.test_H)
    assert len(artifact.manifest["class_names"]) == 10


def test_same_seed_same_steps(conse, tmp_path):
    run_experiment(_spec(), tmp_path / "a", oracle=conse)
    run_experiment(_spec(), tmp_path / "b", oracle=conse)
    pd.testing.assert_frame_equal(_steps(tmp_path / "a"), _steps(tmp_path / "b"))


def test_resume_from_checkpoint_equals_uninterrupted(conse, tmp_path):
    straight = run_experiment(_spec(), tmp_path / "straight", oracle=conse)[0]
    cut = run_experiment(_spec(), tmp_path / "cut", oracle=conse, stop_after=5)[0]
    assert cut.extra.get("interrupted") and cut.generations == 5
    runs = ResultsStore(tmp_path / "cut").runs()
    assert runs.status.tolist() == ["running"]
    resumed = run_experiment(_spec(), tmp_path / "cut", oracle=conse, resume=True)[0]
    assert resumed.resumed_from == 4  # the last checkpoint (eval_every=4)
    assert resumed.test == straight.test and resumed.val == straight.val
    pd.testing.assert_frame_equal(_steps(tmp_path / "cut"), _steps(tmp_path / "straight"))
    again = run_experiment(_spec(), tmp_path / "cut", oracle=conse, resume=True)[0]
    assert again.skipped and again.test == straight.test


def test_sigkill_leaves_only_complete_parquet_files(tmp_path, cache_dir):
    spec = {
        **SMALL,
        "method": {**SMALL["method"], "iterations": 40},
        "budget": {"max_queries": 320},
    }
    spec["eval_every"] = 1  # a steps file and a checkpoint every generation
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    env = {**os.environ, "VLMLAB_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "vlmlab.cli",
        "run",
        str(spec_path),
        "--results",
        str(results),
        "--in-process",
    ]
    for extra_delay in (0.0, 0.35, 0.8):
        process = subprocess.Popen(
            [*command, "--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        before = len(list((results / "steps").glob("*.parquet"))) if results.exists() else 0
        while time.monotonic() < deadline and process.poll() is None:
            steps_dir = results / "steps"
            if steps_dir.exists() and len(list(steps_dir.glob("*.parquet"))) > before:
                break
            time.sleep(0.05)
        time.sleep(extra_delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        for table in ("runs", "steps"):
            for path in (results / table).glob("*.parquet"):
                pd.read_parquet(path)  # every visible file is complete
            pd.read_parquet(results / table)
    finished = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    runs = pd.read_parquet(results / "runs")
    assert runs.status.tolist() == ["completed"] and runs.generations.tolist() == [40]
    steps = pd.read_parquet(results / "steps")
    assert steps.groupby(["step", "split", "metric"]).size().max() == 1
    assert sorted(steps.step.unique()) == list(range(1, 41))
    assert not [
        p for p in results.glob("**/*") if p.name.endswith(".tmp") and not p.name.startswith(".")
    ]


def test_cli_run_and_report(conse, tmp_path, cache_dir, monkeypatch):
    from typer.testing import CliRunner

    from vlmlab.cli import app

    monkeypatch.setenv("VLMLAB_CACHE_DIR", cache_dir)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SMALL, "seeds": [5, 6]}))
    results = tmp_path / "results"
    runner = CliRunner()
    ran = runner.invoke(
        app, ["run", str(spec_path), "--results", str(results), "--set", "method.iterations=4"]
    )
    assert ran.exit_code == 0, ran.output
    assert "ConSE" in ran.output and "fashion-mnist" in ran.output and "zero-shot" in ran.output
    assert "32/96" in ran.output  # 4 generations x popsize 8, of a 96-query budget
    report = runner.invoke(app, ["report", str(results)])
    assert report.exit_code == 0, report.output
    assert (
        "Black-Box Forgetting" in report.output and "± " in report.output
    )  # mean ± std over 2 seeds
    png = results / "report" / "forgetting_H_vs_queries.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| bbf | 2 |" in (results / "report" / "report.md").read_text()

    bad = runner.invoke(app, ["run", str(spec_path), "--set", "method.popsize=1"])
    assert bad.exit_code == 2 and "method.popsize: got 1" in bad.output
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no results" in missing.output
