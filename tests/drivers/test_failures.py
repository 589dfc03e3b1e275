"""A failing trial reaches the user: its traceback in its ``runs`` row and in the error raised.

The toy ``flaky`` task below raises in ``step`` for one seed; the other seeds
run to their end (in-process and on Ray actors), and the driver then raises
``TrialsFailedError`` naming the failed run. Ray keeps its own defaults:
workers' output reaches the terminal and its memory monitor is left alone.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Literal

import pytest
import torch

from vlmlab.errors import TrialsFailedError
from vlmlab.methods import Metrics, StepRecord
from vlmlab.results import ResultsStore
from vlmlab.runner import error_text, results_store, run_experiment, run_trial
from vlmlab.specs import validate_spec
from vlmlab.tasks import MethodSpec, Task, TrialData, register_task, unregister_task


class FlakyMethodSpec(MethodSpec):
    name: Literal["flaky"] = "flaky"
    iterations: int = 3
    fail_seed: int | None = 2
    fail_at: int = 2
    interrupt: bool = False


class FlakyMethod:
    """Counts generations; raises at ``fail_at`` for ``fail_seed`` (no oracle, no data)."""

    best_generation = None
    broken = True  # a test "fixes the bug" by setting it False

    def __init__(self, config: FlakyMethodSpec, seed: int) -> None:
        self.config, self.seed = config, seed
        self.generation, self.generations = 0, config.iterations
        self.queries_used = self.images_scored = 0

    done = property(lambda self: self.generation >= self.generations)

    def step(self) -> StepRecord:
        failing = self.broken and self.seed == self.config.fail_seed
        if failing and self.generation + 1 == self.config.fail_at:
            if self.config.interrupt:
                raise KeyboardInterrupt
            raise ValueError(f"boom at generation {self.generation + 1}")
        self.generation += 1
        self.queries_used += 4
        self.images_scored += 40
        return StepRecord(self.generation, self.queries_used, self.images_scored, {}, "ok")

    def evaluate(self, split: str) -> Metrics:
        return {"flaky_score": 0.5}

    def reference(self, split: str, prompt: str) -> Metrics:
        return {"flaky_score": 0.25}

    def state_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "queries_used": self.queries_used}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generation, self.queries_used = state["generation"], state["queries_used"]


class Flaky(Task):
    name, title = "flaky", "Flaky task"
    method_spec = FlakyMethodSpec
    metrics = (("flaky_score", "flaky score"),)
    sweep_metrics = ("val_flaky_score",)
    white_box = True  # each trial builds its own (latency:0) backend: no oracle pool

    def build(self, spec, seed, oracle, data, *, budget_key, eval_key):
        return FlakyMethod(spec.method, seed)

    def artifact(self, method):
        return {"contexts": torch.zeros(1, 2, 16)}, {"class_names": ["a", "b"]}


@pytest.fixture
def flaky_task():
    register_task(Flaky())
    yield
    unregister_task("flaky")


@pytest.fixture
def no_data(monkeypatch):
    """The flaky method reads no data: skip loading the dataset in-process."""
    monkeypatch.setattr("vlmlab.runner.load_data", lambda spec: TrialData(None, None))


def _spec(**method: Any):
    tree = {
        "name": "flaky",
        "task": "flaky",
        "backend": {"name": "latency:0"},
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 20},
        "method": {"name": "flaky", **method},
        "seeds": [1, 2],
        "eval_every": 1,
        "pool": {"num_cpus": 0.25},
    }
    return validate_spec(tree, "test")


def _runs(folder) -> dict[str, dict[str, Any]]:
    return {row["run_id"]: row for row in ResultsStore(folder).runs().to_dict("records")}


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def test_a_failing_trial_is_recorded_and_the_others_finish(flaky_task, no_data, tmp_path):
    with pytest.raises(TrialsFailedError) as raised:
        run_experiment(_spec(), tmp_path)
    error = raised.value
    assert [run_id for run_id, _ in error.failures] == ["flaky-flaky-s2"]
    assert error.total == 2 and [o.run_id for o in error.result] == ["flaky-flaky-s1"]
    assert "boom at generation 2" in error.failures[0][1] and "flaky-flaky-s2" in str(error)

    runs = _runs(tmp_path)
    done, failed = runs["flaky-flaky-s1"], runs["flaky-flaky-s2"]
    assert done["status"] == "completed" and _is_null(done["error"])
    assert failed["status"] == "failed"
    assert failed["error"].startswith("Traceback (most recent call last)")
    assert "ValueError: boom at generation 2" in failed["error"]
    assert "in step" in failed["error"]  # the frame that raised, not only the message
    # What it spent before it failed: one generation of 4 queries.
    assert failed["queries_used"] == 4 and failed["generations"] == 1
    assert not _is_null(failed["finished_at"]) and not _is_null(failed["started_at"])

    # Fixed and run again: the row is completed and its error gone.
    assert len(run_experiment(_spec(fail_seed=None), tmp_path)) == 2
    runs = _runs(tmp_path)
    assert {r["status"] for r in runs.values()} == {"completed"}
    assert all(_is_null(r["error"]) for r in runs.values())


def test_a_failed_trial_resumes_from_its_checkpoint(flaky_task, no_data, tmp_path, monkeypatch):
    with pytest.raises(TrialsFailedError):
        run_experiment(_spec(), tmp_path)
    # The bug fixed, --resume: the failed trial continues from generation 1.
    monkeypatch.setattr(FlakyMethod, "broken", False)
    outcomes = run_experiment(_spec(), tmp_path, resume=True)
    resumed = {o.run_id: o for o in outcomes}["flaky-flaky-s2"]
    assert resumed.resumed_from == 1 and resumed.generations == 3
    assert _runs(tmp_path)["flaky-flaky-s2"]["status"] == "completed"


def test_an_interrupt_leaves_the_trial_running(flaky_task, tmp_path):
    from vlmlab.oracle import create_oracle

    spec = _spec(interrupt=True).expand_trials()[0]
    with pytest.raises(KeyboardInterrupt):
        run_trial(spec, 2, tmp_path, create_oracle("latency:0"), TrialData(None, None))  # type: ignore[arg-type]
    row = _runs(tmp_path)["flaky-flaky-s2"]
    assert row["status"] == "running" and _is_null(row["error"])


def test_a_traceback_is_cut_to_its_end():
    try:
        raise ValueError("x" * 500 + " the end")
    except ValueError:
        text = error_text(limit=100)
    assert text.endswith("the end\n") and len(text) < 150 and "characters cut" in text


def test_ensure_ray_keeps_rays_defaults(monkeypatch):
    """Workers' output reaches the terminal; Ray's memory monitor is not switched off."""
    import ray

    from vlmlab.pool import ensure_ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_memory_monitor_refresh_ms", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ensure_ray(num_cpus=2)
    ensure_ray("auto")
    assert [c["address"] for c in calls] == ["local", "auto"]
    for kwargs in calls:
        assert kwargs.get("log_to_driver", True) is True
    assert "RAY_memory_monitor_refresh_ms" not in os.environ


@pytest.mark.slow
def test_a_failing_actor_is_reported_after_the_others_finish(flaky_task, ray_session, tmp_path):
    from ray import cloudpickle

    from vlmlab.drivers import run_experiment_on_pool

    # Ray workers cannot import this test module: its classes travel by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    finished: list[str] = []

    class Listener:
        def trial_started(self, *args: Any) -> None:
            pass

        def generation_done(self, *args: Any) -> None:
            pass

        def trial_finished(self, outcome: Any) -> None:
            finished.append(outcome.run_id)

    with pytest.raises(TrialsFailedError) as raised:
        run_experiment_on_pool(_spec(), tmp_path, listener=Listener(), poll_seconds=0.05)
    error = raised.value
    assert [run_id for run_id, _ in error.failures] == ["flaky-flaky-s2"]
    remote = error.failures[0][1]
    assert "ValueError: boom at generation 2" in remote and "in step" in remote
    assert [o.run_id for o in error.result] == ["flaky-flaky-s1"] and finished == ["flaky-flaky-s1"]

    runs = _runs(tmp_path)
    assert runs["flaky-flaky-s1"]["status"] == "completed"
    failed = runs["flaky-flaky-s2"]
    assert failed["status"] == "failed" and "Traceback" in failed["error"]
    assert "boom at generation 2" in failed["error"]
    assert results_store(tmp_path).runs().status.tolist().count("failed") == 1
