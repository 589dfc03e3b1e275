"""A task is one module: a toy task registered here runs through every command unchanged.

The toy task (random search over soft prompts, on the ``latency:0`` backend:
no model, instant) is defined in a few lines of ``toy_plugin.py`` and registered
with ``register_task``; ``vlmlab run``, ``vlmlab sweep``, ``vlmlab report`` and
the artifact loader then serve it without any other module knowing it.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from toy_plugin import Toy
from typer.testing import CliRunner

from vlmlab.cli import app
from vlmlab.results import ResultsStore
from vlmlab.serving import AdaptedModel, AdapterStore
from vlmlab.tasks import register_task, unregister_task


@pytest.fixture
def toy_task():
    register_task(Toy())
    yield
    unregister_task("toy")


def _spec(tmp_path, **extra) -> str:
    tree = {
        "name": "toy",
        "task": "toy",
        "backend": {"name": "latency:0"},
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 30},
        "method": {"popsize": 4, "iterations": 3},
        "seeds": [1, 2],
        "eval_every": 2,
        "pool": {"num_cpus": 0.25},
        **extra,
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_toy_task_runs_reports_and_serves(toy_task, tmp_path):
    results = tmp_path / "results"
    runner = CliRunner()
    run = runner.invoke(app, ["run", _spec(tmp_path), "--in-process", "--results", str(results)])
    assert run.exit_code == 0, run.output
    assert "Toy task" in run.output and "toy score on the test split" in run.output

    runs = ResultsStore(results).runs().set_index("run_id")
    assert set(runs.index) == {"toy-toy-s1", "toy-toy-s2"}
    row = runs.loc["toy-toy-s1"]
    # The task's metric became runs columns, and no other task's did (each run file holds
    # its task's columns).
    assert 0 <= row.test_toy_score <= 1 and 0 <= row.zeroshot_test_toy_score <= 1
    assert "test_H" not in runs.columns and "test_acc" not in runs.columns
    assert row.queries_used == 12 and row.status == "completed" and row.generations == 3

    report = runner.invoke(app, ["report", str(results)])
    assert report.exit_code == 0, report.output
    assert "Toy task — toy: latency sleep-0ms on fashion-mnist" in report.output

    from vlmlab.oracle import create_oracle

    oracle = create_oracle("latency:0")
    model = AdaptedModel.load(AdapterStore(results / "artifacts"), "toy-toy-s1", oracle)
    pixels = np.zeros((28, 28, 3), dtype=np.uint8)
    top = model.classify(pixels, top_k=3)
    assert len(top) == 3 and top[0]["label"] in model.manifest["class_names"]
    assert model.manifest["kind"] == "toy"


@pytest.mark.slow
def test_toy_task_sweeps_on_ray(toy_task, tmp_path, ray_session):
    import sys

    from ray import cloudpickle

    # Ray workers cannot import the toy plugin module: its classes travel by value.
    cloudpickle.register_pickle_by_value(sys.modules[Toy.__module__])
    space = {"method.spread": {"type": "uniform", "low": 0.5, "high": 2.0}}
    spec = _spec(
        tmp_path,
        seeds=[1],
        sweep={"space": space, "num_samples": 2, "scheduler": "fifo", "trial_cpus": 0.25},
    )
    results = tmp_path / "sweep"
    out = CliRunner().invoke(app, ["sweep", spec, "--results", str(results)])
    assert out.exit_code == 0, out.output
    assert "optimizing val_toy_score" in out.output
    runs = ResultsStore(results).runs()
    assert len(runs) == 2 and set(runs.status) == {"completed"}
    assert runs.val_toy_score.notna().all() and (runs.queries_used == 12).all()


class _Ledgered:
    """The toy's oracle, remembering every budget the harness sets on its ledger."""

    def __init__(self):
        from vlmlab.oracle import create_oracle

        self.oracle = create_oracle("latency:0")
        self.budgets: dict[str, int | None] = {}
        set_budget = self.oracle.ledger.set_budget

        def remember(key, max_queries):
            self.budgets[key] = max_queries
            set_budget(key, max_queries)

        self.oracle.ledger.set_budget = remember


def test_the_harness_arms_the_budget_and_rearms_it_on_resume(toy_task, tmp_path):
    """The toy method never sets a budget: the harness does, per attempt, with what the
    checkpoint left, and the ledger holds a method to it."""
    from vlmlab.errors import TrialsFailedError
    from vlmlab.runner import run_experiment
    from vlmlab.specs import load_spec

    spec = load_spec(_spec(tmp_path, seeds=[1], eval_every=1, budget={"max_queries": 12}))
    first = _Ledgered()
    run_experiment(spec, tmp_path / "r", oracle=first.oracle, stop_after=1)  # 4 of 12 spent
    assert list(first.budgets.values()) == [12]
    second = _Ledgered()  # a new process: a new ledger
    (outcome,) = run_experiment(spec, tmp_path / "r", oracle=second.oracle, resume=True)
    ((key, left),) = second.budgets.items()
    assert key.startswith("toy-toy-s1@") and key not in first.budgets  # a key per attempt
    assert left == 12 - 4 and second.oracle.ledger.usage(key).queries == 8
    assert outcome.queries_used == 12 and outcome.generations == 3

    # A budget the method would overrun: the ledger refuses its third generation.
    short = load_spec(_spec(tmp_path, seeds=[1], budget={"max_queries": 8}))
    with pytest.raises(TrialsFailedError, match="BudgetExceeded"):
        run_experiment(short, tmp_path / "short", oracle=_Ledgered().oracle)
