"""Where a spec's trials run, as one parameter: in this process, or on Ray.

``vlmlab run`` (and any script) picks an executor with :func:`executor_for` and
does the same three things with each: ``prepare`` (load the backend, or start Ray
and deploy the oracle pool), say ``where`` in its banner, and ``run``. The trial
loop is the runner's in every case (:func:`vlmlab.runner.run_trial`), so a seed
gives the same numbers wherever it runs. Sweeps and budget studies run their
trials under Ray Tune (:func:`~vlmlab.drivers.run_sweep`,
:func:`~vlmlab.drivers.run_budget_study`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

from vlmlab.oracle import Oracle
from vlmlab.specs import RunSpec
from vlmlab.storage import Location

Where = Literal["in-process", "ray"]
"""``in-process``: seeds one after another, no Ray; ``ray``: seeds concurrently as Ray
actors, sharing the spec's oracle pool (white-box trials: each actor its own backend)."""


class Executor(Protocol):
    """Runs a spec's trials somewhere; see the module docstring."""

    spec: RunSpec

    @property
    def where(self) -> str:
        """Where the trials run, in words (for a banner)."""
        ...

    def prepare(self) -> Oracle | None:
        """Load the backend or deploy the pool; the oracle trials query (None: each builds its own)."""
        ...

    def run(
        self, results: str | Path | Location, *, resume: bool = False, listener: Any = None
    ) -> list[Any]:
        """Every trial of the spec; raises :class:`~vlmlab.errors.TrialsFailedError` after
        the others ran when any trial failed."""
        ...


class InProcess:
    """Every trial in this process, one after another, on one in-process backend."""

    where = "in-process"

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.oracle: Oracle | None = None

    def prepare(self) -> Oracle:
        from vlmlab.runner import build_oracle

        if self.oracle is None:
            self.oracle = build_oracle(self.spec)
        return self.oracle

    def run(
        self, results: str | Path | Location, *, resume: bool = False, listener: Any = None
    ) -> list[Any]:
        from vlmlab.runner import run_experiment

        return run_experiment(
            self.spec, results, resume=resume, oracle=self.prepare(), listener=listener
        )


class OnRay:
    """Every trial at once as a Ray actor: black-box trials share the spec's oracle pool,
    white-box ones train on their own backend (the spec's ``pool`` resources each)."""

    def __init__(self, spec: RunSpec, *, address: str | None = None) -> None:
        self.spec, self.address = spec, address
        self.pool: Any = None

    @property
    def where(self) -> str:
        pool = self.spec.pool
        if self.spec.white_box:
            return f"Ray actors ({pool.num_cpus:g} CPU, {pool.num_gpus:g} GPU each)"
        return f"oracle pool ({pool.replicas} replica(s))"

    def prepare(self) -> Oracle | None:
        from vlmlab.drivers._parallel import deploy_for_spec

        if self.spec.white_box:  # trains the model: each trial builds its backend on an actor
            return None
        if self.pool is None:
            self.pool = deploy_for_spec(self.spec, address=self.address)
        oracle: Oracle = self.pool
        return oracle

    def run(
        self, results: str | Path | Location, *, resume: bool = False, listener: Any = None
    ) -> list[Any]:
        from vlmlab.drivers._parallel import run_experiment_on_pool

        return run_experiment_on_pool(
            self.spec,
            results,
            resume=resume,
            address=self.address,
            pool=self.pool,
            listener=listener,
        )


def executor_for(spec: RunSpec, where: Where = "ray", *, address: str | None = None) -> Executor:
    """The executor that runs ``spec``'s trials ``where`` (``address``: a Ray cluster)."""
    if where == "in-process":
        return InProcess(spec)
    if where == "ray":
        return OnRay(spec, address=address)
    raise ValueError(f"where must be 'in-process' or 'ray', got {where!r}")
