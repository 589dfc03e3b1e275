"""The contract every method implements, so one runner drives them all.

Lifecycle, as the runner (``vlmlab.runner``) sees a method:

1. A task module builds the method from its spec (``vlmlab.tasks``): the
   oracle (or, for a white-box method, a fine-tunable model), the task's data
   registered with it, its config (:class:`~vlmlab.methods.MethodConfig`, the
   spec's ``method`` section), a seed, and the ledger keys of its optimization
   queries (``budget_key``) and of its evaluations (``eval_key``).
2. ``load_state_dict`` may restore a checkpoint before the first step. The
   harness (:class:`vlmlab.runner.TrialRun`) then arms the ledger: a new
   ``budget_key`` per attempt, capped at what the trial's budget leaves after
   the checkpoint's ``queries_used``. A method only spends; it never sets a budget.
3. ``step`` runs one generation (one CMA-ES generation, or one epoch of a
   white-box method) until ``done``. Every ``eval_every`` generations, and
   after the last, the runner calls ``evaluate`` on each split the task
   reports and saves ``state_dict``.
4. ``reference`` scores the hand-written zero-shot prompt (or, for a method
   that trains the model, the model before training): every result sits
   beside its reference in the ``runs`` table.

Invariants every implementation keeps:

- **One oracle call per generation.** A black-box method scores its whole
  population (its validation images too, where it selects on them) in a
  single ``logits`` call, charged to ``budget_key``; ``queries_used`` counts
  exactly what the ledger charged.
- **What evaluation may spend.** ``evaluate`` and ``reference`` charge
  ``eval_key`` only, never the budget, and change no state: calling them at
  any point leaves later steps bit for bit the same.
- **State is data.** ``state_dict()`` holds everything that shapes later
  steps (search distributions with their random generators, optimizers,
  counters, the best result so far); ``load_state_dict(state_dict())`` in a
  fresh process continues bit for bit like an uninterrupted run.
- **Same seed, same numbers**, in-process or on the Serve pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Metrics = dict[str, float]
"""Named values of one split (``{"H": 0.91, "err_fgt": 0.95, ...}``)."""


@dataclass(frozen=True)
class StepRecord:
    """What one generation produced: the steps table's rows and the progress line.

    ``metrics`` maps a split (``train``, ``val``) to its values; every entry
    becomes one row of the ``steps`` table, in this order.
    """

    generation: int
    """Generations done, this one included (1-based)."""
    queries_used: int
    images_scored: int
    metrics: dict[str, Metrics] = field(default_factory=dict)
    summary: str = ""
    """The method's headline so far, e.g. ``best val H 0.512``."""

    def rows(self) -> list[tuple[str, str, float]]:
        """``(split, metric, value)`` rows, in the record's order."""
        return [
            (split, name, value)
            for split, values in self.metrics.items()
            for name, value in values.items()
        ]


@runtime_checkable
class Method(Protocol):
    """A method's run: ask/tell or epochs behind ``step``, its state as data.

    See the module docstring for the lifecycle and the invariants.
    """

    @property
    def generation(self) -> int:
        """Generations done so far (epochs for a white-box method)."""
        ...

    @property
    def generations(self) -> int:
        """Generations the run will take (the budget's cut, or its iterations or epochs)."""
        ...

    @property
    def done(self) -> bool: ...

    @property
    def queries_used(self) -> int:
        """Optimization queries spent (0 for a method that trains the model)."""
        ...

    @property
    def images_scored(self) -> int:
        """Images scored by those queries (images seen in training, white-box)."""
        ...

    @property
    def best_generation(self) -> int | None:
        """The generation whose result is reported, where the method selects one; None
        where the final state is the result."""
        ...

    def step(self) -> StepRecord:
        """One generation; raises ``RuntimeError`` once ``done``."""
        ...

    def evaluate(self, split: str) -> Metrics:
        """Metrics of the current result on ``split`` (``test`` or ``val``), at evaluation cost."""
        ...

    def reference(self, split: str, prompt: str) -> Metrics:
        """The same metrics for the reference: the zero-shot ``prompt``, or the model before
        training (a white-box method ignores ``prompt``)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
