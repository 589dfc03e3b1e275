"""Runs an experiment spec in-process: data, oracle, method loop, results, artifact.

One trial per seed. Each trial writes its ``runs`` row when it starts
(status ``running``) and when it ends (``completed``); every ``eval_every``
generations it tests the best prompt so far, writes the steps since the last
flush as one Parquet file and checkpoints the method, so ``resume=True``
continues from the last checkpoint and ends with the same numbers as an
uninterrupted run.
"""

from __future__ import annotations

import pickle
import platform
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import vlmlab
from vlmlab._io import atomic_write_bytes
from vlmlab.data import ImageDataset, load_dataset, partition_classes, stratified_subset
from vlmlab.methods.forgetting import BlackBoxForgetting, GenerationRecord, make_forgetting_task
from vlmlab.oracle import Oracle, create_oracle
from vlmlab.results import ResultsStore
from vlmlab.serving import save_prompt_artifact
from vlmlab.specs import RunSpec

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
    artifact: Path
    resumed_from: int = 0
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class ProgressListener(Protocol):
    """Receives progress; the CLI draws it, tests may ignore it."""

    def trial_started(
        self, run_id: str, generations: int, budget: int | None, start: int
    ) -> None: ...

    def generation_done(self, run_id: str, record: GenerationRecord) -> None: ...

    def trial_finished(self, outcome: TrialOutcome) -> None: ...


class _Silent:
    def trial_started(self, run_id: str, generations: int, budget: int | None, start: int) -> None:
        pass

    def generation_done(self, run_id: str, record: GenerationRecord) -> None:
        pass

    def trial_finished(self, outcome: TrialOutcome) -> None:
        pass


def build_oracle(spec: RunSpec) -> Oracle:
    return create_oracle(spec.backend.name, **spec.backend.oracle_kwargs())


def _now() -> datetime:
    return datetime.now(UTC)


def run_id_for(spec: RunSpec, seed: int) -> str:
    return f"{spec.name}-{spec.method.name}-s{seed}"


@dataclass
class _Data:
    train: ImageDataset
    test: ImageDataset


def load_data(spec: RunSpec) -> _Data:
    """The spec's train split and (subset of the) test split."""
    options = {"root": spec.data.root} if spec.data.root else {}
    train = load_dataset(spec.data.dataset, "train", **options)
    test = load_dataset(spec.data.dataset, "test", **options)
    if spec.data.test_size:
        # The same test subset for every seed: seeds vary the shots and the search only.
        test = test.subset(stratified_subset(test.labels, spec.data.test_size, seed=0))
    return _Data(train, test)


def run_trial(
    spec: RunSpec,
    seed: int,
    results_dir: str | Path,
    oracle: Oracle,
    data: _Data,
    *,
    resume: bool = False,
    listener: ProgressListener | None = None,
) -> TrialOutcome:
    """One seed of ``spec`` (what :func:`run_experiment` does per seed; Ray workers call it)."""
    store = ResultsStore(results_dir)
    return _run_trial(
        spec,
        seed,
        store,
        oracle,
        data,
        resume=resume,
        listener=listener or _Silent(),
        stop_after=None,
    )


def run_experiment(
    spec: RunSpec,
    results_dir: str | Path,
    *,
    resume: bool = False,
    oracle: Oracle | None = None,
    listener: ProgressListener | None = None,
    stop_after: int | None = None,
) -> list[TrialOutcome]:
    """Run every (variant, seed) trial of ``spec``, one after another, into ``results_dir``.

    Args:
        resume: continue trials from their checkpoints and skip completed ones;
            otherwise each trial starts over (its earlier steps are replaced).
        oracle: reuse an oracle (default: build the spec's backend).
        stop_after: stop each trial after this many generations in total
            (tests use it to simulate an interruption); the trial stays ``running``.
    """
    store = ResultsStore(results_dir)
    oracle = oracle if oracle is not None else build_oracle(spec)
    data = load_data(spec)
    listener = listener or _Silent()
    return [
        _run_trial(
            variant,
            seed,
            store,
            oracle,
            data,
            resume=resume,
            listener=listener,
            stop_after=stop_after,
        )
        for variant in spec.expand_variants()
        for seed in spec.seeds
    ]


def _metric_columns(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


class Checkpointer(Protocol):
    """Where a trial keeps its method state (a file here; Tune's checkpoints in a sweep)."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None: ...


class FileCheckpointer:
    """One pickle file, replaced atomically at every save."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        return pickle.loads(self.path.read_bytes())

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        atomic_write_bytes(self.path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def _run_trial(
    spec: RunSpec,
    seed: int,
    store: ResultsStore,
    oracle: Oracle,
    data: _Data,
    *,
    resume: bool,
    listener: ProgressListener,
    stop_after: int | None,
    run_id: str | None = None,
    checkpointer: Checkpointer | None = None,
) -> TrialOutcome:
    run_id = run_id or run_id_for(spec, seed)
    meta = oracle.metadata
    budget = spec.budget.max_queries
    base_row: dict[str, Any] = {
        "run_id": run_id,
        "experiment": spec.name,
        "task": spec.task,
        "method": spec.method.name,
        "backend": meta.backend,
        "model": meta.model,
        "dataset": spec.data.dataset,
        "seed": seed,
        "config": spec.model_dump_json(),
        "budget": budget,
        "vlmlab_version": vlmlab.__version__,
        "node": platform.node(),
    }
    if resume:
        previous = store.runs()
        done = previous[(previous.run_id == run_id) & (previous.status == "completed")]
        if len(done):
            return _outcome_from_row(done.iloc[0].to_dict())
    else:
        store.clear_run(run_id)

    partition = partition_classes(
        data.train.num_classes, forget=spec.data.forget, forget_fraction=spec.data.forget_fraction
    )
    task = make_forgetting_task(
        oracle,
        data.train,
        data.test,
        shots=spec.data.shots,
        val_shots=spec.data.val_shots,
        seed=seed,
        partition=partition,
    )
    attempt = uuid.uuid4().hex[:8]
    method = BlackBoxForgetting(
        oracle,
        task,
        spec.method.to_config(),
        seed=seed,
        max_queries=budget,
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
        method.load_state_dict(state["method"])
        started_at, elapsed_before, flushed = (
            state["started_at"],
            state["wall_seconds"],
            state["flushed"],
        )

    resumed_from = method.generation
    store.write_run({**base_row, "status": "running", "started_at": started_at})
    listener.trial_started(run_id, method.generations, budget, resumed_from)

    clock = time.perf_counter()
    pending: list[dict[str, Any]] = []
    test_metrics: dict[str, float] = {}
    while not method.done:
        if stop_after is not None and method.generation >= stop_after:
            return _outcome(
                run_id,
                spec,
                seed,
                meta,
                method,
                store,
                resumed_from,
                test={},
                zeroshot_test={},
                extra={"interrupted": True},
            )
        record = method.step()
        wall = elapsed_before + time.perf_counter() - clock
        common = {
            "run_id": run_id,
            "step": record.generation,
            "queries_used": record.queries_used,
            "images_scored": record.images_scored,
            "wall_seconds": wall,
        }
        values = [
            ("train", "loss_best", record.loss_best),
            ("train", "loss_mean", record.loss_mean),
            ("val", "H", record.val_H),
            ("val", "best_H", record.best_val_H),
            ("val", "best_err_fgt", record.best_val_err_fgt),
            ("val", "best_acc_mem", record.best_val_acc_mem),
        ]
        if record.generation % spec.eval_every == 0 or method.done:
            test_metrics = method.evaluate(method.best_contexts, "test")
            values += [("test", name, value) for name, value in test_metrics.items()]
        pending += [{**common, "split": s, "metric": m, "value": v} for s, m, v in values]
        listener.generation_done(run_id, record)
        if record.generation % spec.eval_every == 0 or method.done:
            store.write_steps(run_id, flushed + 1, record.generation, pending)
            pending, flushed = [], record.generation
            checkpointer.save(
                _checkpoint_state(base_row["config"], method, started_at, wall, flushed),
                {
                    "queries_used": record.queries_used,
                    "generation": record.generation,
                    "val_H": record.best_val_H,
                    **_metric_columns("test", test_metrics),
                },
            )

    if not test_metrics:  # resumed at the very end: nothing ran in this process
        test_metrics = method.evaluate(method.best_contexts, "test")
    zs_contexts = oracle.phrase_embeddings(spec.zeroshot_prompt).unsqueeze(0)
    zeroshot_test = method.evaluate(zs_contexts, "test")
    zeroshot_val = method.evaluate(zs_contexts, "val")
    wall = elapsed_before + time.perf_counter() - clock
    artifact = store.artifact_dir(run_id)
    save_prompt_artifact(
        artifact,
        {"contexts": method.best_contexts},
        {
            "kind": "forgetting",
            "run_id": run_id,
            "backend": meta.backend,
            "model": meta.model,
            "dataset": spec.data.dataset,
            "class_names": task.class_names,
            "forget": list(task.partition.forget),
            "memorize": list(task.partition.memorize),
            "method": spec.method.name,
            "seed": seed,
            "metrics": {
                **_metric_columns("test", test_metrics),
                **_metric_columns("val", method.best_val),
                **_metric_columns("zeroshot_test", zeroshot_test),
            },
            "spec": spec.model_dump(mode="json"),
        },
    )
    outcome = _outcome(
        run_id,
        spec,
        seed,
        meta,
        method,
        store,
        resumed_from,
        test=test_metrics,
        zeroshot_test=zeroshot_test,
    )
    store.write_run(
        {
            **base_row,
            "status": "completed",
            "started_at": started_at,
            "finished_at": _now(),
            "queries_used": method.queries_used,
            "images_scored": method.images_scored,
            "wall_seconds": wall,
            "generations": method.generation,
            "best_generation": method.best_generation,
            "artifact": str(artifact),
            **_metric_columns("test", test_metrics),
            **_metric_columns("val", method.best_val),
            **_metric_columns("zeroshot_test", zeroshot_test),
            **_metric_columns("zeroshot_val", zeroshot_val),
        }
    )
    listener.trial_finished(outcome)
    return outcome


def _checkpoint_state(
    config: str,
    method: BlackBoxForgetting,
    started_at: datetime,
    wall: float,
    flushed: int,
) -> dict[str, Any]:
    return {
        "version": CHECKPOINT_VERSION,
        "config": config,
        "method": method.state_dict(),
        "started_at": started_at,
        "wall_seconds": wall,
        "flushed": flushed,
    }


def _outcome(
    run_id: str,
    spec: RunSpec,
    seed: int,
    meta: Any,
    method: BlackBoxForgetting,
    store: ResultsStore,
    resumed_from: int,
    *,
    test: dict[str, float],
    zeroshot_test: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> TrialOutcome:
    return TrialOutcome(
        run_id=run_id,
        seed=seed,
        method=spec.method.name,
        backend=meta.backend,
        model=meta.model,
        dataset=spec.data.dataset,
        test=test,
        val=method.best_val,
        zeroshot_test=zeroshot_test,
        queries_used=method.queries_used,
        budget=spec.budget.max_queries,
        generations=method.generation,
        artifact=store.artifact_dir(run_id),
        resumed_from=resumed_from,
        extra=extra or {},
    )


def _outcome_from_row(row: dict[str, Any]) -> TrialOutcome:
    def pick(prefix: str) -> dict[str, float]:
        return {
            key.removeprefix(prefix): float(value)
            for key, value in row.items()
            if key.startswith(prefix) and value is not None and not np.isnan(value)
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
        budget=None if row["budget"] is None or np.isnan(row["budget"]) else int(row["budget"]),
        generations=int(row["generations"]),
        artifact=Path(row["artifact"]),
        skipped=True,
    )
