"""One trial in steps: start or resume, step, evaluate and checkpoint, finish.

:class:`TrialRun` is the harness every driver runs a method in: it owns what is
the same for every task (the ``runs`` row, the steps table, checkpoints, the
query budget on the ledger, the final references and the artifact), so a method
only steps and spends. :func:`run_trial` drives one from start to finish.
"""

from __future__ import annotations

import pickle
import platform
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import vlmlab
from vlmlab.methods import Method, Metrics, StepRecord
from vlmlab.oracle import Oracle
from vlmlab.results import ResultsStore, save_artifact
from vlmlab.runner._rows import (
    CHECKPOINT_VERSION,
    TrialOutcome,
    checkpoint_state,
    columns,
    flat,
    outcome_from_row,
    plain,
    reference_columns,
)
from vlmlab.specs import RunSpec
from vlmlab.storage import Location, locate
from vlmlab.tasks import TrialData, runs_schema_of_task


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


def results_store(results_dir: str | Path | Location) -> ResultsStore:
    """A results folder (path or URI) whose ``runs`` files each carry their task's metric columns."""
    return ResultsStore(results_dir, schema_of=runs_schema_of_task)


def run_id_for(spec: RunSpec, seed: int) -> str:
    """The task's run id: ``<name>-<method>-s<seed>`` (CraFT: ``...-k<K>-s<seed>``)."""
    return spec.task_entry.run_id(spec, seed)


ERROR_CHARS = 20_000
"""A failed row keeps the last this many characters of its traceback (the end says most)."""


def error_text(limit: int = ERROR_CHARS) -> str:
    """The exception being handled, formatted with its traceback; its last ``limit`` characters."""
    text = traceback.format_exc()
    if len(text) > limit:
        text = f"[{len(text) - limit} characters cut]\n...{text[-limit:]}"
    return text


def _ray_node() -> str | None:
    """The Ray node this trial runs on (a cluster may hold many per host), or None."""
    if "ray" not in sys.modules:  # an in-process run never imports Ray for this
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _now() -> datetime:
    return datetime.now(UTC)


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


class TrialRun:
    """One attempt at one trial (one seed of one expanded spec), in the steps every driver takes.

    ``start`` builds the method (or resumes it from its checkpoint) and arms the
    ledger with what is left of the trial's query budget; ``advance`` runs one
    generation and, every ``eval_every`` generations and at the end, ``checkpoint``
    evaluates, flushes the steps and saves the state; ``finish`` scores the
    references, writes the artifact and the ``completed`` row. What a failed
    attempt's row needs is kept in ``failure`` as the attempt goes.
    """

    def __init__(
        self,
        spec: RunSpec,
        seed: int,
        store: ResultsStore,
        oracle: Oracle,
        data: TrialData,
        *,
        run_id: str | None = None,
        listener: ProgressListener | None = None,
        checkpointer: Checkpointer | None = None,
        failure: _FailureRow | None = None,
    ) -> None:
        self.spec, self.seed, self.store, self.oracle, self.data = spec, seed, store, oracle, data
        self.task = spec.task_entry
        self.run_id = run_id or run_id_for(spec, seed)
        self.listener = listener or SilentListener()
        self.checkpointer = checkpointer or FileCheckpointer(store.checkpoint_path(self.run_id))
        self.failure = failure or _FailureRow()
        meta = oracle.metadata
        # The trial's query budget, worked out once (gradients: no queries to cap).
        self.budget = None if spec.white_box else spec.query_budget()
        self.row: dict[str, Any] = {
            "run_id": self.run_id,
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
            "budget": self.budget,
            "vlmlab_version": vlmlab.__version__,
            "node": platform.node(),
            "ray_node": _ray_node(),
        }
        self.failure.store, self.failure.row = store, self.row
        # What this run's row holds: its task's metric columns (a store given one schema for
        # every row, such as the union of the registered tasks', holds that schema's).
        self._schema_metrics = {name for name, _ in self.task.metrics}
        self._run_columns = set((store.schema or self.task.runs_schema()).names)
        self.evaluations: dict[str, Metrics] = {}
        self._pending: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ start
    def completed(self) -> TrialOutcome | None:
        """A completed earlier attempt's outcome, read from its row (``resume`` skips it)."""
        previous = self.store.runs()
        done = previous[(previous.run_id == self.run_id) & (previous.status == "completed")]
        return outcome_from_row(done.iloc[0].to_dict()) if len(done) else None

    def start(self, *, resume: bool) -> None:
        """Build the method, resume it from its checkpoint (``resume``) or start over, and arm
        the ledger: a new key per attempt, charged with what the checkpoint left."""
        if not resume:
            self.store.clear_run(self.run_id)
        attempt = uuid.uuid4().hex[:8]
        self.budget_key = f"{self.run_id}@{attempt}"
        self.trial = self.task.build(
            self.spec,
            self.seed,
            self.oracle,
            self.data,
            budget_key=self.budget_key,
            eval_key=f"{self.run_id}@{attempt}:eval",
        )
        self.started_at, self.elapsed_before, self.flushed = _now(), 0.0, 0
        state = self.checkpointer.load() if resume else None
        if state is not None:
            if (
                state.get("version") != CHECKPOINT_VERSION
                or state.get("config") != self.row["config"]
            ):
                raise ValueError(
                    f"the checkpoint of {self.run_id} was written by another spec; run without "
                    "--resume to start over"
                )
            self.trial.load_state_dict(state["method"])
            self.started_at, self.elapsed_before, self.flushed = (
                state["started_at"],
                state["wall_seconds"],
                state["flushed"],
            )
        if self.budget is not None:
            self.oracle.ledger.set_budget(self.budget_key, self.budget - self.trial.queries_used)
        self.resumed_from = self.trial.generation
        self.failure.trial, self.failure.started_at = self.trial, self.started_at
        self.store.write_run({**self.row, "status": "running", "started_at": self.started_at})
        self.listener.trial_started(
            self.run_id, self.trial.generations, self.budget, self.resumed_from
        )
        self._clock = time.perf_counter()

    # ------------------------------------------------------------------- loop
    @property
    def done(self) -> bool:
        return self.trial.done

    def _wall(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._clock

    def advance(self) -> StepRecord:
        """One generation: its step rows, and a checkpoint every ``eval_every`` and at the end."""
        progress = self.trial.step()
        values = progress.rows()
        wall = self._wall()
        common: dict[str, Any] = {
            "run_id": self.run_id,
            "step": progress.generation,
            "queries_used": progress.queries_used,
            "images_scored": progress.images_scored,
            "wall_seconds": wall,
        }
        due = progress.generation % self.spec.eval_every == 0 or self.trial.done
        if due:
            self.evaluations = self.evaluate()
            recorded = {(split, name) for split, name, _ in values}  # a task may log val each step
            values += [
                (split, name, value)
                for split, metrics in self.evaluations.items()
                for name, value in metrics.items()
                if (split, name) not in recorded
            ]
        self._pending += [{**common, "split": s, "metric": m, "value": v} for s, m, v in values]
        self.listener.generation_done(self.run_id, progress)
        if due:
            self.checkpoint(progress, wall)
        return progress

    def evaluate(self) -> dict[str, Metrics]:
        """The result so far on the task's evaluation splits (evaluation keys: no budget spent)."""
        return {split: self.trial.evaluate(split) for split in self.task.evaluation_splits}

    def checkpoint(self, progress: StepRecord, wall: float) -> None:
        """Flush the steps since the last checkpoint and save the method's state."""
        self.store.write_steps(self.run_id, self.flushed + 1, progress.generation, self._pending)
        self._pending, self.flushed = [], progress.generation
        self.checkpointer.save(
            checkpoint_state(self.row["config"], self.trial, self.started_at, wall, self.flushed),
            {
                "queries_used": progress.queries_used,
                "generation": progress.generation,
                **columns("val", self.task.final_val(self.trial, self.evaluations)),
                **flat(self.evaluations),
            },
        )

    # ----------------------------------------------------------------- finish
    def _columns_only(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics the runs table holds (a resumed or skipped run reads them back)."""
        return {name: value for name, value in metrics.items() if name in self._schema_metrics}

    def outcome(self, evaluations: dict[str, Metrics], **extra: Any) -> TrialOutcome:
        spec, trial, meta = self.spec, self.trial, self.oracle.metadata
        return TrialOutcome(
            run_id=self.run_id,
            seed=self.seed,
            method=spec.method.name,
            backend=meta.backend,
            model=meta.model,
            dataset=spec.data.dataset,
            test=self._columns_only(evaluations.get("test", {})),
            val=self._columns_only(self.task.final_val(trial, evaluations)) if evaluations else {},
            zeroshot_test=self._columns_only(evaluations.get("zeroshot_test", {})),
            queries_used=trial.queries_used,
            budget=self.budget,
            generations=trial.generation,
            artifact=self.store.artifact_dir(self.run_id).native,
            resumed_from=self.resumed_from,
            task=spec.task,
            shots=spec.shots,
            extra=extra,
        )

    def interrupted(self) -> TrialOutcome:
        """Stop here (``stop_after``): the row stays ``running``, for ``resume``."""
        return self.outcome({}, interrupted=True)

    def finish(self) -> TrialOutcome:
        """Score the zero-query references, write the artifact and the ``completed`` row."""
        spec, task, trial, meta = self.spec, self.task, self.trial, self.oracle.metadata
        evaluations = self.evaluations or self.evaluate()  # resumed at the very end: none ran
        zero_shot = {split: trial.reference(split, spec.prompt_phrase) for split in ("test", "val")}
        evaluations = {
            **evaluations,
            "zeroshot_test": zero_shot["test"],
            "zeroshot_val": zero_shot["val"],
        }
        wall = self._wall()
        final = self.outcome(evaluations)
        references = task.extra_references
        metrics = {  # the manifest's: everything evaluated, per-class accuracies included
            **columns("test", evaluations.get("test", {})),
            **columns("val", final.val),
            **columns("zeroshot_test", plain(zero_shot["test"], references)),
            **columns("zeroshot_val", plain(zero_shot["val"], references)),
            **reference_columns("test", zero_shot["test"], references),
            **reference_columns("val", zero_shot["val"], references),
        }
        final.references = {
            reference: {
                name.removeprefix(f"{reference}:"): value
                for name, value in zero_shot["test"].items()
                if name.startswith(f"{reference}:")
            }
            for reference in references
        }
        tensors, facts = task.artifact(trial)
        save_artifact(
            final.artifact,
            tensors,
            {
                "kind": task.name,
                **facts,
                "run_id": self.run_id,
                "backend": meta.backend,
                "model": meta.model,
                "dataset": spec.data.dataset,
                "shots": spec.shots,
                "method": spec.method.name,
                "seed": self.seed,
                "metrics": metrics,
                "spec": spec.model_dump(mode="json"),
            },
            required=task.artifact_tensor,
        )
        self.store.write_run(
            {
                **self.row,
                "status": "completed",
                "started_at": self.started_at,
                "finished_at": _now(),
                "queries_used": trial.queries_used,
                "images_scored": trial.images_scored,
                "wall_seconds": wall,
                "generations": trial.generation,
                "best_generation": trial.best_generation,
                "artifact": str(final.artifact),
                # The runs table holds the registered tasks' metrics; the rest (per-class
                # accuracies, ...) lives in the steps table and the artifact manifest.
                **{
                    column: value
                    for column, value in metrics.items()
                    if column in self._run_columns
                },
            }
        )
        self.listener.trial_finished(final)
        return final


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
        data: the train split and test split (:func:`vlmlab.runner.load_data`).
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
        store = results if isinstance(results, ResultsStore) else results_store(results)
        run = TrialRun(
            spec,
            seed,
            store,
            oracle,
            data,
            run_id=run_id,
            listener=listener,
            checkpointer=checkpointer,
            failure=failure,
        )
        if resume and (done := run.completed()) is not None:
            return done
        run.start(resume=resume)
        while not run.done:
            if stop_after is not None and run.trial.generation >= stop_after:
                return run.interrupted()
            run.advance()
        return run.finish()
    except Exception as error:
        failure.write(error_text(), error)
        raise
