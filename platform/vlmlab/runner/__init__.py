"""The runner: one trial, or a whole spec, in-process.

The public API is :func:`run_trial` (one seed of one expanded spec, the loop
every driver calls: in-process, on Ray actors, in Tune trials; its steps are
:class:`TrialRun`'s, in ``_trial``) and :func:`run_experiment` (every trial of a
spec, one after another). The loop is the same for every task; the task
(``vlmlab.tasks``) builds the method and says what its artifact holds, and the
harness owns the rest, the query budget on the ledger included.

One trial per seed. Each trial writes its ``runs`` row when it starts
(status ``running``) and when it ends (``completed``, or ``failed`` with its
traceback in ``error`` when it raised); every ``eval_every``
generations it tests the best prompt so far, writes the steps since the last
flush as one Parquet file and checkpoints the method, so ``resume=True``
continues from the last checkpoint and ends with the same numbers as an
uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

from vlmlab.data import load_dataset, read_class_names, rename_classes, stratified_subset
from vlmlab.errors import TrialsFailedError
from vlmlab.oracle import Oracle, create_oracle
from vlmlab.runner._rows import CHECKPOINT_VERSION, TrialOutcome
from vlmlab.runner._trial import (
    ERROR_CHARS,
    Checkpointer,
    FileCheckpointer,
    ProgressListener,
    SilentListener,
    TrialRun,
    error_text,
    results_store,
    run_id_for,
    run_trial,
)
from vlmlab.specs import RunSpec
from vlmlab.storage import Location
from vlmlab.tasks import TrialData
from vlmlab.tracking import with_tracking

__all__ = [
    "CHECKPOINT_VERSION",
    "ERROR_CHARS",
    "Checkpointer",
    "FileCheckpointer",
    "ProgressListener",
    "SilentListener",
    "TrialOutcome",
    "TrialRun",
    "build_oracle",
    "error_text",
    "load_data",
    "results_store",
    "run_experiment",
    "run_id_for",
    "run_trial",
]


def build_oracle(spec: RunSpec) -> Oracle:
    """The spec's backend, in this process."""
    return create_oracle(spec.backend.name, **spec.backend.oracle_kwargs())


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
