"""Drivers: where a spec's trials run, and many trials at once on Ray, each the runner's one loop.

- :func:`executor_for`: the one parameter that says where (``in-process`` or ``ray``):
  an :class:`Executor` prepares the backend or the pool, and runs the trials.

- :func:`run_experiment_on_pool`: a spec's trials as Ray actors sharing one
  oracle pool (white-box trials as actors with their own backend).
- :func:`run_sweep`: Ray Tune with Optuna search and ASHA over a spec's space.
- :func:`run_budget_study`: budgets x variants x seeds as a Tune grid.

Each trial calls :func:`vlmlab.runner.run_trial` with a
:class:`~vlmlab.pool.PoolOracle` (or an in-process backend), so a seed gives
the same numbers here as in-process. Ray is imported when a driver runs.
"""

from __future__ import annotations

from typing import Any

from vlmlab.drivers._executors import Executor, InProcess, OnRay, Where, executor_for
from vlmlab.drivers._parallel import deploy_for_spec, run_experiment_on_pool
from vlmlab.drivers._study import run_budget_study, study_trials
from vlmlab.drivers._sweep import LEDGER_AUDIT, TUNE_DIR, run_sweep


def __getattr__(name: str) -> Any:
    # The sweep's live table subclasses a Tune callback: Ray loads only when it is asked for.
    if name == "sweep_progress":
        from vlmlab.drivers._progress import sweep_progress

        return sweep_progress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LEDGER_AUDIT",
    "TUNE_DIR",
    "Executor",
    "InProcess",
    "OnRay",
    "Where",
    "deploy_for_spec",
    "executor_for",
    "run_budget_study",
    "run_experiment_on_pool",
    "run_sweep",
    "study_trials",
    "sweep_progress",
]
