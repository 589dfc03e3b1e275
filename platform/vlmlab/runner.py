"""The runner: one trial, or a whole spec, in-process.

The public API is :func:`run_trial` (one seed of one expanded spec, the loop
every driver calls: in-process, on Ray actors, in Tune trials) and
:func:`run_experiment` (every trial of a spec, one after another). The loop is
the same for every task; the task (``vlmlab.tasks``) builds the method and
says what its artifact holds.

One trial per seed. Each trial writes its ``runs`` row when it starts
(status ``running``) and when it ends (``completed``, or ``failed`` with its
traceback in ``error`` when it raised); every ``eval_every``
generations it tests the best prompt so far, writes the steps since the last
flush as one Parquet file and checkpoints the method, so ``resume=True``
continues from the last checkpoint and ends with the same numbers as an
uninterrupted run.
"""

from __future__ import annotations

import pickle
import platform
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import vlmlab
from vlmlab.data import load_dataset, read_class_names, rename_classes, stratified_subset
from vlmlab.errors import TrialsFailedError
from vlmlab.methods import Method, Metrics, StepRecord
from vlmlab.oracle import Oracle, create_oracle
from vlmlab.results import ResultsStore, is_missing, save_artifact
from vlmlab.specs import RunSpec
from vlmlab.storage import Location, is_uri, locate
from vlmlab.tasks import (
    DEFAULT_TASK,
    TrialData,
    metric_names,
    reference_metrics,
    runs_schema_of_tasks,
)
from vlmlab.tracking import with_tracking

CHECKPOINT_VERSION = 1


@dataclass
class TrialOutcome:
    """What one finished trial measured (also in its ``runs`` row)."""

    run_id: str
    seed: int
    method: str
    backend: str
    model: str
    dataset: str
    test: dict[str, float]
    val: dict[str, float]
    zeroshot_test: dict[str, float]
    queries_used: int
    budget: int | None
    generations: int
    artifact: Path | str  # a URI when the results live on an object store
    resumed_from: int = 0
    skipped: bool = False
    task: str = DEFAULT_TASK
    shots: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    """Further references on the test split (forgetting: ``dropclasses``, zero queries)."""


class ProgressListener(Protocol):
    """Receives progress; the CLI draws it, tests may ignore it."""

    def trial_started(
        self, run_id: str, generations: int, budget: int | None, start: int
    ) -> None: ...

    def generation_done(self, run_id: str, progress: StepRecord) -> None: ...

    def trial_finished(self, outcome: TrialOutcome) -> None: ...


class SilentListener:
    """A :class:`ProgressListener` that draws nothing (the default)."""

    def trial_started(self, run_id: str, generations: int, budget: int | None, start: int) -> None:
        pass

    def generation_done(self, run_id: str, progress: StepRecord) -> None:
        pass

    def trial_finished(self, outcome: TrialOutcome) -> None:
        pass


def build_oracle(spec: RunSpec) -> Oracle:
    """The spec's backend, in this process."""
    return create_oracle(spec.backend.name, **spec.backend.oracle_kwargs())


def results_store(results_dir: str | Path | Location) -> ResultsStore:
    """A results folder (path or URI) whose ``runs`` files carry every registered task's metric columns."""
    return ResultsStore(results_dir, runs_schema_of_tasks())


def _ray_node() -> str | None:
    """The Ray node this trial runs on (a cluster may hold many per host), or None."""
    import sys

    if "ray" not in sys.modules:  # an in-process run never imports Ray for this
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _now() -> datetime:
    return datetime.now(UTC)


def run_id_for(spec: RunSpec, seed: int) -> str:
    """The task's run id: ``<name>-<method>-s<seed>`` (CraFT: ``...-k<K>-s<seed>``)."""
    return spec.task_entry.run_id(spec, seed)


def load_data(spec: RunSpec) -> TrialData:
    """The spec's train split and (subset of the) test split."""
    options = {"root": spec.data.root} if spec.data.root else {}
    train = load_dataset(spec.data.dataset, "train", **options)
    test = load_dataset(spec.data.dataset, "test", **options)
    names = spec.data.class_names
    if names is not None:
        mapping = read_class_names(names) if isinstance(names, str) else names
        train, test = rename_classes(train, mapping), rename_classes(test, mapping)
    if spec.data.test_size:
        # The same test subset for every seed: seeds vary the shots and the search only.
        test = test.subset(stratified_subset(test.labels, spec.data.test_size, seed=0))
    return TrialData(train, test)


def run_experiment(
    spec: RunSpec,
    results_dir: str | Path | Location,
    *,
    resume: bool = False,
    oracle: Oracle | None = None,
    listener: ProgressListener | None = None,
    stop_after: int | None = None,
) -> list[TrialOutcome]:
    """Run every (variant, shots, seed) trial of ``spec``, one after another, into ``results_dir``.

    Args:
        resume: continue trials from their checkpoints and skip completed ones;
            otherwise each trial starts over (its earlier steps are replaced).
        oracle: reuse an oracle (default: build the spec's backend).
        stop_after: stop each trial after this many generations in total
            (tests use it to simulate an interruption); the trial stays ``running``.

    Raises:
        TrialsFailedError: one or more trials raised (each one's ``runs`` row is
            ``failed``, with its traceback); the other trials ran to their end first.
    """
    store = results_store(results_dir)
    listener = with_tracking(spec, store.location, listener or SilentListener())
    oracle = oracle if oracle is not None else build_oracle(spec)
    data = load_data(spec)
    outcomes: list[TrialOutcome] = []
    failures: list[tuple[str, str]] = []
    trials = [(variant, seed) for variant in spec.expand_trials() for seed in spec.seeds]
    for variant, seed in trials:
        try:
            outcomes.append(
                run_trial(
                    variant,
                    seed,
                    store,
                    oracle,
                    data,
                    resume=resume,
                    listener=listener,
                    stop_after=stop_after,
                )
            )
        except Exception:  # the next seed may well succeed: run it, report all at the end
            failures.append((run_id_for(variant, seed), error_text()))
    if failures:
        raise TrialsFailedError(failures, total=len(trials), result=outcomes)
    return outcomes


def _columns(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


class Checkpointer(Protocol):
    """Where a trial keeps its method state (a file here; Tune's checkpoints in a sweep)."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None: ...


class FileCheckpointer:
    """One pickle file (local or on an object store), replaced atomically at every save."""

    def __init__(self, path: str | Path | Location) -> None:
        self.path = locate(path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state: dict[str, Any] = pickle.loads(self.path.read_bytes())
        return state

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        self.path.write_bytes(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def run_trial(
    spec: RunSpec,
    seed: int,
    results: str | Path | ResultsStore,
    oracle: Oracle,
    data: TrialData,
    *,
    resume: bool = False,
    listener: ProgressListener | None = None,
    stop_after: int | None = None,
    run_id: str | None = None,
    checkpointer: Checkpointer | None = None,
) -> TrialOutcome:
    """One seed of one expanded spec (one variant, one shot count): the loop every driver runs.

    Args:
        results: the results folder (or an open store) for its rows, steps and artifact.
        oracle: the black box (in-process, the pool's client, HTTP); a white-box
            task needs an in-process backend.
        data: the train split and test split (:func:`load_data`).
        resume: continue from the checkpoint, or return a completed trial's row as
            it is; otherwise the trial starts over (its earlier steps are replaced).
        listener: progress (default: none).
        stop_after: stop after this many generations in total, leaving the trial
            ``running`` (tests simulate an interruption with it).
        run_id: the row's id (default: the task's ``<name>-<method>-s<seed>``).
        checkpointer: where the state goes (default: a file in the results folder;
            sweeps pass Tune's checkpoints).

    A trial that raises an ``Exception`` has its row written ``failed``, with the
    traceback in ``error``, before the exception goes on; an interrupt
    (``KeyboardInterrupt``, ``SystemExit``) leaves it ``running``, for ``resume``.
    """
    failure = _FailureRow()
    try:
        return _run_trial(
            spec,
            seed,
            results,
            oracle,
            data,
            resume=resume,
            listener=listener,
            stop_after=stop_after,
            run_id=run_id,
            checkpointer=checkpointer,
            failure=failure,
        )
    except Exception as error:
        failure.write(error_text(), error)
        raise


ERROR_CHARS = 20_000
"""A failed row keeps the last this many characters of its traceback (the end says most)."""


def error_text(limit: int = ERROR_CHARS) -> str:
    """The exception being handled, formatted with its traceback; its last ``limit`` characters."""
    text = traceback.format_exc()
    if len(text) > limit:
        text = f"[{len(text) - limit} characters cut]\n...{text[-limit:]}"
    return text


@dataclass
class _FailureRow:
    """What a trial has set up so far: what its row needs if it fails now."""

    store: ResultsStore | None = None
    row: dict[str, Any] | None = None
    trial: Method | None = None
    started_at: datetime | None = None

    def write(self, text: str, error: BaseException) -> None:
        """The ``failed`` row (none before the trial had one to write)."""
        if self.store is None or self.row is None:
            return
        counts: dict[str, Any] = {}
        if self.trial is not None:
            try:
                counts = {
                    "queries_used": int(self.trial.queries_used),
                    "images_scored": int(self.trial.images_scored),
                    "generations": int(self.trial.generation),
                }
            except Exception:  # a half-built method: its counts stay null
                counts = {}
        try:
            self.store.write_run(
                {
                    **self.row,
                    "status": "failed",
                    "error": text,
                    "started_at": self.started_at or _now(),
                    "finished_at": _now(),
                    **counts,
                }
            )
        except Exception as unwritten:  # the trial's own error is the one to see
            error.add_note(f"(its failed row was not written either: {unwritten!r})")


def _run_trial(
    spec: RunSpec,
    seed: int,
    results: str | Path | ResultsStore,
    oracle: Oracle,
    data: TrialData,
    *,
    resume: bool,
    listener: ProgressListener | None,
    stop_after: int | None,
    run_id: str | None,
    checkpointer: Checkpointer | None,
    failure: _FailureRow,
) -> TrialOutcome:
    """:func:`run_trial`'s loop; ``failure`` learns what a failed row needs as the trial goes."""
    store = results if isinstance(results, ResultsStore) else results_store(results)
    listener = listener or SilentListener()
    task = spec.task_entry
    run_id = run_id or run_id_for(spec, seed)
    meta = oracle.metadata
    budget = None if spec.white_box else spec.query_budget()  # gradients: no queries to cap
    base_row: dict[str, Any] = {
        "run_id": run_id,
        "experiment": spec.experiment_name,
        # Runs with one fingerprint differ only by seed: a report averages only those.
        "fingerprint": spec.fingerprint(),
        "task": spec.task,
        "method": spec.method.name,
        "backend": meta.backend,
        "model": meta.model,
        "dataset": spec.data.dataset,
        "shots": spec.shots,
        "seed": seed,
        # Where progress is also sent is no part of what a trial is: --resume may change it.
        "config": spec.model_dump_json(exclude={"tracking"}),
        "budget": budget,
        "vlmlab_version": vlmlab.__version__,
        "node": platform.node(),
        "ray_node": _ray_node(),
    }
    failure.store, failure.row = store, base_row
    if resume:
        previous = store.runs()
        done = previous[(previous.run_id == run_id) & (previous.status == "completed")]
        if len(done):
            return _outcome_from_row(done.iloc[0].to_dict())
    else:
        store.clear_run(run_id)

    attempt = uuid.uuid4().hex[:8]
    trial = task.build(
        spec,
        seed,
        oracle,
        data,
        # A ledger key per attempt: a resumed trial's budget is what its checkpoint left.
        budget_key=f"{run_id}@{attempt}",
        eval_key=f"{run_id}@{attempt}:eval",
    )
    started_at, elapsed_before, flushed = _now(), 0.0, 0
    checkpointer = checkpointer or FileCheckpointer(store.checkpoint_path(run_id))
    state = checkpointer.load() if resume else None
    if state is not None:
        if state.get("version") != CHECKPOINT_VERSION or state.get("config") != base_row["config"]:
            raise ValueError(
                f"the checkpoint of {run_id} was written by another spec; run without --resume to start over"
            )
        trial.load_state_dict(state["method"])
        started_at, elapsed_before, flushed = (
            state["started_at"],
            state["wall_seconds"],
            state["flushed"],
        )

    resumed_from = trial.generation
    failure.trial, failure.started_at = trial, started_at
    store.write_run({**base_row, "status": "running", "started_at": started_at})
    listener.trial_started(run_id, trial.generations, budget, resumed_from)

    schema_metrics = set(metric_names())
    run_columns = set((store.schema or runs_schema_of_tasks()).names)

    def columns_only(metrics: dict[str, float]) -> dict[str, float]:
        """The metrics the runs table holds (a resumed or skipped run reads them back)."""
        return {name: value for name, value in metrics.items() if name in schema_metrics}

    def outcome(evaluations: dict[str, dict[str, float]], **extra: Any) -> TrialOutcome:
        return TrialOutcome(
            run_id=run_id,
            seed=seed,
            method=spec.method.name,
            backend=meta.backend,
            model=meta.model,
            dataset=spec.data.dataset,
            test=columns_only(evaluations.get("test", {})),
            val=columns_only(task.final_val(trial, evaluations)) if evaluations else {},
            zeroshot_test=columns_only(evaluations.get("zeroshot_test", {})),
            queries_used=trial.queries_used,
            budget=budget,
            generations=trial.generation,
            artifact=store.artifact_dir(run_id).native,
            resumed_from=resumed_from,
            task=spec.task,
            shots=spec.shots,
            extra=extra,
        )

    def evaluate() -> dict[str, Metrics]:
        return {split: trial.evaluate(split) for split in task.evaluation_splits}

    clock = time.perf_counter()
    pending: list[dict[str, Any]] = []
    evaluations: dict[str, dict[str, float]] = {}
    while not trial.done:
        if stop_after is not None and trial.generation >= stop_after:
            return outcome({}, interrupted=True)
        progress = trial.step()
        values = progress.rows()
        wall = elapsed_before + time.perf_counter() - clock
        common = {
            "run_id": run_id,
            "step": progress.generation,
            "queries_used": progress.queries_used,
            "images_scored": progress.images_scored,
            "wall_seconds": wall,
        }
        checkpoint_due = progress.generation % spec.eval_every == 0 or trial.done
        if checkpoint_due:
            evaluations = evaluate()
            recorded = {(split, name) for split, name, _ in values}  # a task may log val each step
            values += [
                (split, name, value)
                for split, metrics in evaluations.items()
                for name, value in metrics.items()
                if (split, name) not in recorded
            ]
        pending += [{**common, "split": s, "metric": m, "value": v} for s, m, v in values]
        listener.generation_done(run_id, progress)
        if checkpoint_due:
            store.write_steps(run_id, flushed + 1, progress.generation, pending)
            pending, flushed = [], progress.generation
            checkpointer.save(
                _checkpoint_state(base_row["config"], trial, started_at, wall, flushed),
                {
                    "queries_used": progress.queries_used,
                    "generation": progress.generation,
                    **_columns("val", task.final_val(trial, evaluations)),
                    **_flat(evaluations),
                },
            )

    if not evaluations:  # resumed at the very end: nothing ran in this process
        evaluations = evaluate()
    zero_shot = {split: trial.reference(split, spec.prompt_phrase) for split in ("test", "val")}
    evaluations = {
        **evaluations,
        "zeroshot_test": zero_shot["test"],
        "zeroshot_val": zero_shot["val"],
    }
    wall = elapsed_before + time.perf_counter() - clock
    final = outcome(evaluations)
    metrics = {  # the manifest's: everything evaluated, per-class accuracies included
        **_columns("test", evaluations.get("test", {})),
        **_columns("val", final.val),
        **_columns("zeroshot_test", _plain(zero_shot["test"], task.extra_references)),
        **_columns("zeroshot_val", _plain(zero_shot["val"], task.extra_references)),
        **_reference_columns("test", zero_shot["test"], task.extra_references),
        **_reference_columns("val", zero_shot["val"], task.extra_references),
    }
    final.references = {
        reference: {
            name.removeprefix(f"{reference}:"): value
            for name, value in zero_shot["test"].items()
            if name.startswith(f"{reference}:")
        }
        for reference in task.extra_references
    }
    tensors, facts = task.artifact(trial)
    save_artifact(
        final.artifact,
        tensors,
        {
            "kind": task.name,
            **facts,
            "run_id": run_id,
            "backend": meta.backend,
            "model": meta.model,
            "dataset": spec.data.dataset,
            "shots": spec.shots,
            "method": spec.method.name,
            "seed": seed,
            "metrics": metrics,
            "spec": spec.model_dump(mode="json"),
        },
        required=task.artifact_tensor,
    )
    store.write_run(
        {
            **base_row,
            "status": "completed",
            "started_at": started_at,
            "finished_at": _now(),
            "queries_used": trial.queries_used,
            "images_scored": trial.images_scored,
            "wall_seconds": wall,
            "generations": trial.generation,
            "best_generation": trial.best_generation,
            "artifact": str(final.artifact),
            # The runs table holds the registered tasks' metrics; the rest (per-class
            # accuracies, ...) lives in the steps table and the artifact manifest.
            **{column: value for column, value in metrics.items() if column in run_columns},
        }
    )
    listener.trial_finished(final)
    return final


def _plain(metrics: dict[str, float], references: tuple[str, ...]) -> dict[str, float]:
    """A reference's own metrics, without the further references it carries
    (``<reference>:<metric>``)."""
    return {
        name: value for name, value in metrics.items() if name.partition(":")[0] not in references
    }


def _reference_columns(
    split: str, metrics: dict[str, float], references: tuple[str, ...]
) -> dict[str, float]:
    """``<reference>:<metric>`` entries of a reference's metrics as ``runs`` columns."""
    columns = {}
    for name, value in metrics.items():
        reference, separator, metric = name.partition(":")
        if separator and reference in references:
            columns[f"{reference}_{split}_{metric}"] = value
    return columns


def _flat(evaluations: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        f"{split}_{name}": value
        for split, metrics in evaluations.items()
        for name, value in metrics.items()
    }


def _checkpoint_state(
    config: str,
    trial: Method,
    started_at: datetime,
    wall: float,
    flushed: int,
) -> dict[str, Any]:
    return {
        "version": CHECKPOINT_VERSION,
        "config": config,
        "method": trial.state_dict(),
        "started_at": started_at,
        "wall_seconds": wall,
        "flushed": flushed,
    }


def _outcome_from_row(row: dict[str, Any]) -> TrialOutcome:
    def pick(prefix: str) -> dict[str, float]:
        return {
            key.removeprefix(prefix): float(value)
            for key, value in row.items()
            if key.startswith(prefix) and not is_missing(value)
        }

    return TrialOutcome(
        run_id=row["run_id"],
        seed=int(row["seed"]),
        method=row["method"],
        backend=row["backend"],
        model=row["model"],
        dataset=row["dataset"],
        test=pick("test_"),
        val=pick("val_"),
        zeroshot_test=pick("zeroshot_test_"),
        queries_used=int(row["queries_used"]),
        budget=None if is_missing(row["budget"]) else int(row["budget"]),
        generations=int(row["generations"]),
        artifact=row["artifact"] if is_uri(row["artifact"]) else Path(row["artifact"]),
        skipped=True,
        task=row["task"],
        shots=None if is_missing(row.get("shots")) else int(row["shots"]),
        references={
            reference: pick(f"{reference}_test_")
            for reference in reference_metrics()
            if pick(f"{reference}_test_")
        },
    )
