"""`vlmlab sweep`: Tune + Optuna + ASHA on the pool; a killed driver resumes cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from vlmlab.specs import validate_spec

pytestmark = pytest.mark.slow

SWEEP = {
    "name": "tiny-sweep",
    "backend": {"name": "conse"},
    "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 100, "forget": [0, 1, 2, 3]},
    "method": {"name": "bbf", "popsize": 8, "iterations": 12, "batch_size": 20},
    "budget": {"max_queries": 96},
    "seeds": [2],
    "eval_every": 3,
    "pool": {"num_cpus": 0.5},
    "sweep": {
        "num_samples": 6,
        "max_concurrent": 2,
        "grace_queries": 48,
        "trial_cpus": 0.5,
        "space": {
            "method.sigma": {"type": "loguniform", "low": 0.3, "high": 3.0},
            "method.n_context": {"type": "choice", "values": [2, 4]},
        },
    },
}


def _check_tables(results, expected_trials: int) -> pd.DataFrame:
    everything = pd.read_parquet(results / "runs")
    # A trial started just before a driver was killed, and unknown to the restored
    # sweep, is closed as abandoned; every trial the sweep knows has one row.
    runs = everything[everything.status != "abandoned"]
    assert len(runs) == expected_trials and everything.run_id.is_unique
    assert set(runs.status) <= {"completed", "stopped"}, everything.status.tolist()
    assert (runs.status == "completed").any()
    steps = pd.read_parquet(results / "steps")
    assert steps.groupby(["run_id", "step", "split", "metric"]).size().max() == 1
    assert set(runs.run_id) <= set(steps.run_id) <= set(everything.run_id)
    for row in runs.itertuples():
        mine = steps[steps.run_id == row.run_id]
        assert mine.step.max() * 8 == row.queries_used  # rows stop where the trial stopped
    return runs


def test_sweep_of_six_trials(conse_pool, tmp_path):
    from vlmlab.drivers import run_sweep

    tracked = {**SWEEP, "tracking": {"mlflow": True, "tensorboard": True}}
    spec = validate_spec(tracked, "test")
    grid = run_sweep(spec, tmp_path, pool=conse_pool)
    assert len(grid) == 6 and not grid.errors
    runs = _check_tables(tmp_path, 6)
    # Tune's MLflow logger: a run per trial, its hyperparameters and its reports.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny-sweep")
    tracked_runs = client.search_runs([experiment.experiment_id])
    assert len(tracked_runs) == 6
    assert all("method.sigma" in r.data.params and "val_H" in r.data.metrics for r in tracked_runs)
    assert list((tmp_path / "tune" / "tiny-sweep").glob("*/events.out.tfevents.*"))
    completed = runs[runs.status == "completed"]
    assert (completed.queries_used == 96).all() and completed.zeroshot_test_H.notna().all()
    configs = {(r.config) for r in runs.itertuples()}
    assert len(configs) == 6  # every trial ran its own hyperparameters


def test_craft_sweep_scores_trials_on_validation_accuracy(conse_pool, tmp_path):
    from vlmlab.drivers import run_sweep

    tree = {
        "name": "craft-sweep",
        "task": "craft",
        "backend": {"name": "conse"},
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 100},
        "method": {"popsize": 8},
        "budget": {"max_queries": 32},  # 4 generations of 8 candidates
        "seeds": [3],
        "eval_every": 2,
        "pool": {"num_cpus": 0.5},
        "sweep": {
            "num_samples": 3,
            "max_concurrent": 2,
            "scheduler": "fifo",
            "trial_cpus": 0.5,
            "space": {
                "method.sigma": {"type": "loguniform", "low": 0.05, "high": 2.0},
                "method.consistency_weight": {"type": "loguniform", "low": 0.001, "high": 1.0},
                "method.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            },
        },
    }
    spec = validate_spec(tree, "test")
    assert spec.sweep.metric == "val_acc"  # the task's validation metric by default
    grid = run_sweep(spec, tmp_path, pool=conse_pool)
    assert len(grid) == 3 and not grid.errors
    assert all("val_acc" in result.metrics for result in grid)
    runs = pd.read_parquet(tmp_path / "runs")
    assert len(runs) == 3 and (runs.status == "completed").all()
    assert (runs.task == "craft").all() and (runs.queries_used == 32).all()
    assert runs.val_acc.between(0, 1).all() and runs.test_acc.between(0, 1).all()
    searched = {
        (m["sigma"], m["consistency_weight"], m["lr"])
        for m in (json.loads(c)["method"] for c in runs.config)
    }
    assert len(searched) == 3  # every trial ran its own hyperparameters


def test_sweep_bad_space_is_refused(conse_pool, tmp_path):
    from vlmlab.drivers import run_sweep
    from vlmlab.specs import SpecError

    bad = {
        **SWEEP,
        "sweep": {
            **SWEEP["sweep"],
            "space": {"method.sigmaa": {"type": "uniform", "low": 0.1, "high": 1}},
        },
    }
    with pytest.raises(SpecError, match=r"method\.sigmaa: unknown field"):
        run_sweep(validate_spec(bad, "test"), tmp_path, pool=conse_pool)
    with pytest.raises(SpecError, match="nothing to resume"):
        run_sweep(validate_spec(SWEEP, "test"), tmp_path / "empty", pool=conse_pool, resume=True)


def test_killed_driver_resumes_to_one_row_per_trial(ray_session, conse_pool, tmp_path, cache_dir):
    spec = {
        **SWEEP,
        "name": "killed-sweep",
        "method": {**SWEEP["method"], "iterations": 24},
        "budget": {"max_queries": 192},
    }
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "VLMLAB_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "vlmlab.cli",
        "sweep",
        str(spec_path),
        "--results",
        str(results),
        "--address",
        address,
    ]
    driver = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if len(list((results / "steps").glob("*.parquet"))) >= 6:
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the sweep finished before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    runs_before = (
        pd.read_parquet(results / "runs") if list((results / "runs").glob("*.parquet")) else None
    )
    # The kill landed mid-sweep: some trial has not written its final row yet.
    assert runs_before is None or len(runs_before) < 6 or (runs_before.status != "completed").any()

    resumed = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _check_tables(results, 6)


def test_a_trial_unknown_to_the_restored_sweep_is_closed_as_abandoned(tmp_path):
    """A killed driver's last-second trial: its `running` row must not stay open forever."""
    from vlmlab.drivers._sweep import _close_stopped_trials
    from vlmlab.results import ResultsStore

    spec = validate_spec(SWEEP, "test")
    store = ResultsStore(tmp_path)
    store.write_run(
        {"run_id": "tiny-sweep-orphan", "experiment": "tiny-sweep", "status": "running"}
    )
    store.write_run(
        {"run_id": "tiny-sweep-done", "experiment": "tiny-sweep", "status": "completed"}
    )
    _close_stopped_trials(spec, tmp_path, grid=[])
    status = dict(zip(store.runs().run_id, store.runs().status, strict=True))
    assert status == {"tiny-sweep-orphan": "abandoned", "tiny-sweep-done": "completed"}
