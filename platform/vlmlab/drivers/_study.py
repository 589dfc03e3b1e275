"""Query-budget scaling studies: budgets x method variants x seeds as one Ray Tune grid.

``run_budget_study`` expands ``spec.study.budgets`` against the spec's
variants and seeds, runs each combination as a Tune trial on the shared
oracle pool (the same loop as ``vlmlab run``, with its budget set to the
study's), and writes every trial's rows into the results folder under the
run id ``<name>-<method>-q<budget>-s<seed>``. A trial whose row is already
``completed`` is skipped, so running a study again finishes only what is
missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlmlab.drivers._parallel import deploy_for_spec, remote_traceback
from vlmlab.drivers._sweep import TUNE_DIR, TuneCheckpointer
from vlmlab.errors import TrialsFailedError
from vlmlab.pool import PoolOracle, ensure_ray
from vlmlab.specs import BudgetSpec, RunSpec, SpecError
from vlmlab.storage import Location, locate, tune_storage
from vlmlab.tasks import Task, ensure_registered

_DATA_CACHE: dict[str, Any] = {}


def study_trials(spec: RunSpec) -> list[tuple[str, RunSpec, int]]:
    """``(run id, trial spec, seed)`` for every budget x variant x seed, in that order."""
    if spec.study is None:
        raise SpecError(f"{spec.name}: a budget study needs a `study:` section (budgets: [...])")
    trials = []
    for budget in spec.study.budgets:
        base = spec.model_copy(update={"budget": BudgetSpec(max_queries=budget), "study": None})
        for variant in base.expand_trials():
            for seed in spec.seeds:
                method = variant.method.name
                run_id = f"{variant.name}-{method}-q{budget}-s{seed}"
                trials.append((run_id, variant, seed))
    return trials


def _trial(
    config: dict[str, Any],
    *,
    trials: list[tuple[str, str, int]],
    results: str,
    app_name: str,
    shard_size: int,
    task: Task,
) -> None:
    """One Tune trial: one (budget, variant, seed) of the study, on the pool."""
    from vlmlab.runner import load_data, run_trial

    run_id, spec_json, seed = trials[config["trial"]]
    ensure_registered(task)
    spec = RunSpec.model_validate_json(spec_json)
    data_key = spec.data.model_dump_json()
    if data_key not in _DATA_CACHE:  # reused actors keep the loaded data
        _DATA_CACHE.clear()
        _DATA_CACHE[data_key] = load_data(spec)
    run_trial(
        spec,
        seed,
        results,
        PoolOracle(app_name, shard_size=shard_size),
        _DATA_CACHE[data_key],
        resume=True,  # completed trials are skipped; a restarted one resumes its checkpoint
        run_id=run_id,
        checkpointer=TuneCheckpointer(),
    )


def run_budget_study(
    spec: RunSpec,
    results_dir: str | Path | Location,
    *,
    address: str | None = None,
    pool: PoolOracle | None = None,
    callbacks: list[Any] | None = None,
) -> list[str]:
    """Run the spec's budget study into ``results_dir``; return the study's run ids.

    Raises:
        SpecError: the spec has no ``study`` section.
        TrialsFailedError: one or more trials failed for good (after Tune's
            retries); the others ran to their end first. ``result``: the run ids.
    """
    from ray import tune

    trials = study_trials(spec)
    assert spec.study is not None
    results = locate(results_dir)
    results.make_folder()
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ensure_ray(address)
    pool = pool if pool is not None else deploy_for_spec(spec, address=address)
    encoded = [(run_id, variant.model_dump_json(), seed) for run_id, variant, seed in trials]
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            trials=encoded,
            task=spec.task_entry,
            results=results.uri,
            app_name=pool.app_name,
            shard_size=pool.shard_size,
        ),
        {"cpu": spec.study.trial_cpus},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(range(len(trials))))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.study.max_concurrent, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-study",
            **tune_storage(results / TUNE_DIR),
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks or [],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    run_ids = [run_id for run_id, _, _ in trials]
    failures = sorted(
        ((result.config or {})["trial"], remote_traceback(result.error))
        for result in (grid[i] for i in range(len(grid)))
        if result.error is not None
    )
    if failures:
        raise TrialsFailedError(
            [(run_ids[index], text) for index, text in failures],
            total=len(trials),
            result=run_ids,
        )
    return run_ids
