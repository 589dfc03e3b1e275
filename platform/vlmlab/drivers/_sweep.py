"""Sweeps: Ray Tune trials with Optuna search and ASHA, on the shared oracle pool.

``run_sweep`` turns ``spec.sweep`` into a Tuner: ``OptunaSearch`` (TPE, or
Optuna's CMA-ES sampler) wrapped in a ``ConcurrencyLimiter``, ASHA with
``queries_used`` as its clock, ``reuse_actors``, ``FailureConfig`` and the
method's state as each trial's Tune checkpoint. Each trial is the same loop
as ``vlmlab run`` (``vlmlab.runner``), writing its rows into the results
folder under the run id ``<spec name>-<trial id>``; Tune's trial ids survive
``Tuner.restore``, and step files are named by generation range, so a resumed
sweep has one ``runs`` row per trial and no duplicate steps.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlmlab.drivers._parallel import deploy_for_spec, remote_traceback
from vlmlab.errors import TrialsFailedError
from vlmlab.pool import PoolOracle, ensure_ray
from vlmlab.specs import RunSpec, SpecError, apply_overrides, validate_spec
from vlmlab.storage import Location, locate, tune_storage
from vlmlab.tasks import Task, ensure_registered

SPEC_FILE = "sweep_spec.json"
TUNE_DIR = "tune"


class TuneCheckpointer:
    """Method state as Tune checkpoints; every save is also a Tune report (ASHA's clock)."""

    def load(self) -> dict[str, Any] | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return pickle.loads((Path(folder) / "state.pkl").read_bytes())

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        from ray import tune

        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.pkl").write_bytes(
                pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
            )
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


_DATA_CACHE: dict[str, Any] = {}
_BACKEND_CACHE: dict[str, Any] = {}


def _trial(
    config: dict[str, Any],
    *,
    spec_json: str,
    results: str,
    app_name: str,
    shard_size: int,
    task: Task,
) -> None:
    """One Tune trial: the spec with this trial's hyperparameters, on the pool."""
    from ray import tune

    from vlmlab.runner import build_oracle, load_data, run_trial

    ensure_registered(task)  # a task registered in the driver only (a plugin, a test)
    tree = json.loads(spec_json)
    tree.pop("sweep", None)
    apply_overrides(tree, [f"{path}={json.dumps(value)}" for path, value in config.items()])
    spec = validate_spec(tree, f"sweep trial {config}")
    trial_id = tune.get_context().get_trial_id()
    data_key = spec.data.model_dump_json()
    if data_key not in _DATA_CACHE:  # reused actors keep the loaded data
        _DATA_CACHE.clear()
        _DATA_CACHE[data_key] = load_data(spec)
    if spec.white_box:  # trains the model: a backend in this trial's process (and GPU)
        backend_key = spec.backend.model_dump_json()
        if backend_key not in _BACKEND_CACHE:
            _BACKEND_CACHE.clear()
            _BACKEND_CACHE[backend_key] = build_oracle(spec)
        oracle = _BACKEND_CACHE[backend_key]
    else:
        oracle = PoolOracle(app_name, shard_size=shard_size)
    run_trial(
        spec,
        spec.seeds[0],
        results,
        oracle,
        _DATA_CACHE[data_key],
        resume=True,
        run_id=f"{spec.name}-{trial_id}",
        checkpointer=TuneCheckpointer(),
    )


def _optuna_space(spec: RunSpec) -> dict[str, Any]:
    from optuna import distributions as d

    space: dict[str, d.BaseDistribution] = {}
    assert spec.sweep is not None
    for path, param in spec.sweep.space.items():
        if param.type == "choice":
            space[path] = d.CategoricalDistribution(param.choices())
            continue
        low, high = param.bounds()
        if param.type == "int":
            space[path] = d.IntDistribution(int(low), int(high))
        else:
            space[path] = d.FloatDistribution(low, high, log=param.type == "loguniform")
    return space


def _check_space_paths(spec: RunSpec) -> None:
    """Every searched path must exist in the spec: try each range's low end."""
    assert spec.sweep is not None
    tree = json.loads(spec.model_dump_json())
    tree.pop("sweep")
    probe = []
    for path, param in spec.sweep.space.items():
        value = (
            param.choices()[0]
            if param.type == "choice"
            else (int(param.bounds()[0]) if param.type == "int" else param.bounds()[0])
        )
        probe.append(f"{path}={json.dumps(value)}")
    apply_overrides(tree, probe)
    validate_spec(tree, "sweep.space")


def _tuner(
    spec: RunSpec,
    results: Location,
    pool: PoolOracle | None,
    *,
    restore: bool,
    callbacks: list[Any],
):
    from optuna.samplers import CmaEsSampler, TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    sweep = spec.sweep
    assert sweep is not None
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            spec_json=spec.model_dump_json(),
            task=spec.task_entry,
            results=results.uri,
            app_name=pool.app_name if pool is not None else "",
            shard_size=pool.shard_size if pool is not None else 0,
        ),
        {"cpu": sweep.trial_cpus, "gpu": sweep.trial_gpus},
    )
    storage = tune_storage(results / TUNE_DIR)
    if restore:
        experiment = results / TUNE_DIR / spec.name
        return tune.Tuner.restore(
            experiment.path,  # within storage_filesystem when the results are remote
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage.get("storage_filesystem"),
        )
    sampler = (
        TPESampler(seed=sweep.seed) if sweep.sampler == "tpe" else CmaEsSampler(seed=sweep.seed)
    )
    search = ConcurrencyLimiter(
        OptunaSearch(_optuna_space(spec), metric=sweep.metric, mode=sweep.mode, sampler=sampler),
        max_concurrent=sweep.max_concurrent,
    )
    if sweep.scheduler == "asha":
        if spec.white_box:  # no queries spent: ASHA's clock is the epoch
            clock, budget, grace = "generation", spec.generations, sweep.grace_epochs
        else:
            clock, grace = "queries_used", sweep.grace_queries
            budget = spec.task_entry.max_queries(spec)
        scheduler: Any = ASHAScheduler(
            time_attr=clock,
            metric=sweep.metric,
            mode=sweep.mode,
            # Past the budget: ASHA must not stop a trial at its last report, before it
            # writes its final row (the budget itself ends the trial).
            max_t=budget + 1,
            grace_period=min(grace, budget),
            reduction_factor=sweep.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search, scheduler=scheduler, num_samples=sweep.num_samples, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            **storage,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            # Tune deletes a trial's older checkpoints when a new one registers, before
            # its next experiment snapshot: a driver killed in between leaves a snapshot
            # naming a deleted checkpoint, and --resume fails that trial (seen in CI).
            # Black-box states are small (kB): keep them all. A white-box state holds
            # model weights: keep three, and the race stays possible (README says so).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=3 if spec.white_box else None),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def run_sweep(
    spec: RunSpec,
    results_dir: str | Path | Location,
    *,
    resume: bool = False,
    address: str | None = None,
    pool: PoolOracle | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """Run (or, with ``resume``, restore and finish) the spec's sweep; returns Tune's ResultGrid.

    Raises:
        SpecError: the spec has no ``sweep`` section, a searched path does not
            exist, or ``resume`` finds no sweep (or a different spec) in ``results_dir``.
        TrialsFailedError: one or more trials failed for good (after
            ``sweep.max_failures`` retries); the others ran to their end first.
            ``result``: the ResultGrid.
    """
    if spec.sweep is None:
        raise SpecError(f"{spec.name}: a sweep needs a `sweep:` section (space, num_samples, ...)")
    _check_space_paths(spec)
    results = locate(results_dir)
    results.make_folder()
    spec_path = results / SPEC_FILE
    if resume:
        if not (results / TUNE_DIR / spec.name).is_dir():
            raise SpecError(f"nothing to resume: no sweep {spec.name!r} in {str(results)!r}")
        if spec_path.is_file() and _without_tracking(spec_path.read_text()) != _without_tracking(
            spec.model_dump_json()
        ):
            raise SpecError(f"{results}: holds a sweep of another spec; resume it with that spec")
    spec_path.write_text(spec.model_dump_json(indent=2))
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Experiment snapshots every second make --resume after a killed driver lose little;
    # Tune's warning about frequent snapshots is off.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ensure_ray(address)
    if spec.white_box:
        pool = None  # each trial trains its own model in-process
    elif pool is None:
        pool = deploy_for_spec(spec, address=address)
    callbacks = [*(callbacks or []), *tune_callbacks(spec, results)]
    grid = _tuner(spec, results, pool, restore=resume, callbacks=callbacks).fit()
    _close_stopped_trials(spec, results, grid)
    _write_ledger_audit(spec, results)
    failures = [
        (_run_id(spec, result), remote_traceback(result.error)) for result in grid if result.error
    ]
    if failures:
        raise TrialsFailedError(failures, total=len(grid), result=grid)
    return grid


def tune_callbacks(spec: RunSpec, results: Location) -> list[Any]:
    """Ray Tune's logger callbacks for the spec's ``tracking`` section (none without one)."""
    from vlmlab.tracking import mlflow_uri

    tracking = spec.tracking
    if tracking is None or not tracking.enabled:
        return []
    callbacks: list[Any] = []
    uri = mlflow_uri(tracking, results)
    if uri is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=uri,
                experiment_name=tracking.experiment or spec.name,
                save_artifact=False,
            )
        )
    if tracking.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    return callbacks


def _without_tracking(spec_json: str) -> dict[str, Any]:
    tree: dict[str, Any] = json.loads(spec_json)
    tree.pop("tracking", None)
    return tree


LEDGER_AUDIT = "ledger.json"


def _write_ledger_audit(spec: RunSpec, results: Location) -> None:
    """Every ledger account of this sweep's trials, one per attempt (``<run id>@<attempt>``).

    A trial restored after a failure has two or more attempts: the queries its
    lost attempt spent after its last checkpoint were served, so they are
    counted there, and ``reserved`` shows calls that died in flight.
    """
    from vlmlab.pool import RemoteLedger
    from vlmlab.runner import results_store

    ledger = RemoteLedger()
    run_ids = set(results_store(results).runs().run_id)  # this folder's trials only
    names = ledger.keys()
    accounts = {key: ledger.account(key) for key in names if key.split("@")[0] in run_ids}
    audit = {
        "accounts": accounts,
        "queries": sum(a["queries"] for a in accounts.values()),
        "reserved": sum(a["reserved"] for a in accounts.values()),
    }
    (results / LEDGER_AUDIT).write_text(json.dumps(audit, indent=2))


def _run_id(spec: RunSpec, result: Any) -> str:
    """A Tune result's run id: ``<spec name>-<trial id>``."""
    trial_id = Path(result.path).name.split("_")[1] if result.path else None
    return f"{spec.name}-{(result.metrics or {}).get('trial_id', trial_id)}"


def _close_stopped_trials(spec: RunSpec, results: Location, grid: Any) -> None:
    """Trials ASHA stopped (or that failed for good) never finish their row: close it here."""
    from vlmlab.runner import results_store

    store = results_store(results)
    runs = store.runs()
    columns = spec.task_entry.metric_columns()
    known: set[str] = set()
    for result in grid:
        metrics = result.metrics or {}
        run_id = _run_id(spec, result)
        known.add(run_id)
        rows = runs[runs.run_id == run_id]
        if rows.empty or rows.iloc[0].status != "running":
            continue
        row = rows.iloc[0].to_dict()
        row.update(
            # Failed without a row of its own (its process died): Tune's error says why.
            status="failed" if result.error else "stopped",
            error=remote_traceback(result.error) if result.error else None,
            finished_at=datetime.now(UTC),
            queries_used=int(metrics.get("queries_used", 0)),
            generations=int(metrics.get("generation", 0)),
            # The last report's metrics (a stopped trial's latest evaluation).
            **{column: metrics.get(column) for column in columns if column in metrics},
        )
        store.write_run(row)  # the store writes NaN / NaT cells as nulls
    # A trial a killed driver started less than a snapshot (~1 s) before it died is
    # unknown to the restored sweep, which samples another in its place: its row is
    # closed as `abandoned` (its queries were spent; it is nobody's result).
    for row in runs[(runs.status == "running") & ~runs.run_id.isin(known)].to_dict("records"):
        row.update(status="abandoned", finished_at=datetime.now(UTC))
        store.write_run(row)  # the store writes NaN / NaT cells as nulls
