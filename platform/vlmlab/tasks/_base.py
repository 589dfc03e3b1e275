"""What a task is, and the registry every other layer reads.

A task (forgetting, craft, devsafety, ...) is one :class:`Task` subclass in one
module: its method's config (the spec's ``method`` section, a
:class:`~vlmlab.methods.MethodConfig` declared beside the method), its metrics (and so its ``runs`` columns), which of
them a sweep may optimize, how it builds its method for one trial, what its
artifact holds and how an artifact classifies images, and its report tables,
figures and headline. ``vlmlab.specs``, the runner, the drivers, ``vlmlab
report``, ``vlmlab serve`` and the results schema all read the registry, so a
new task is one module and one :func:`register_task` call::

    class Toy(Task):
        name, title = "toy", "Toy task"
        method_spec = ToyConfig  # a MethodConfig: name, popsize, iterations, ...
        metrics = (("acc", "accuracy"),)
        sweep_metrics = ("val_acc",)

        def build(self, spec, seed, oracle, data, *, budget_key, eval_key):
            return ToyMethod(...)

        def artifact(self, method):
            return {"contexts": method.contexts}, {"class_names": data_names}

    register_task(Toy())
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import torch

from vlmlab.data import ImageDataset
from vlmlab.methods import Method, MethodConfig, Metrics, PopulationSearch, Settings
from vlmlab.oracle import LocalOracle, Oracle
from vlmlab.plugins import TASKS, load_plugins
from vlmlab.results import (
    ReportTable,
    TableGroup,
    completed,
    mean_std,
    metric_columns,
    runs_schema,
    table_groups,
)

if TYPE_CHECKING:  # the spec layer sits above this one: types only
    import pyarrow as pa

    from vlmlab.results import Artifact
    from vlmlab.specs import RunSpec


class StrictModel(Settings):
    """A spec section: unknown keys are refused, values are frozen (the methods' rule)."""


MethodSpec = MethodConfig
"""A task's method section: the method's own config (:class:`~vlmlab.methods.MethodConfig`);
``name`` (a ``Literal`` of the variants) tells them apart."""


class _Named:
    """Stands in for a method spec where only its name is known (a ``runs`` row)."""

    def __init__(self, name: str) -> None:
        self.name = name


class TrialData:
    """The train split and the (subset of the) test split a trial samples from."""

    def __init__(self, train: ImageDataset, test: ImageDataset) -> None:
        self.train, self.test = train, test


class Task:
    """One task: override the class attributes and :meth:`build` / :meth:`artifact`.

    The defaults fit a black-box prompt task whose artifact is a learned prompt
    (``contexts``) and whose report is one table of its metrics by method.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    """Shown in tables and headlines (``Black-Box Forgetting``)."""
    method_spec: ClassVar[type[MethodSpec]]
    metrics: ClassVar[tuple[tuple[str, str], ...]]
    """``(metric, label)``: every final metric, a ``runs`` column ``<split>_<metric>``
    each; the first is the headline."""
    table_metrics: ClassVar[tuple[tuple[str, str], ...] | None] = None
    """The metrics ``vlmlab run`` prints (default: ``metrics``)."""
    sweep_metrics: ClassVar[tuple[str, ...]]
    """What a sweep may optimize; the first is the default."""
    white_box: ClassVar[bool] = False
    """Trains the model: runs on an in-process backend, never on the oracle pool, spends
    no queries (its generations are epochs)."""
    evaluation_splits: ClassVar[tuple[str, ...]] = ("test", "val")
    """The splits evaluated at every checkpoint."""
    validation_optional: ClassVar[bool] = False
    """Whether ``data.val_shots: 0`` (no validation split) is allowed: a task that selects
    its result on validation images refuses it; one that allows it (CraFT) returns no
    validation metrics then, and a sweep on a ``val_`` metric is refused."""
    artifact_tensor: ClassVar[str] = "contexts"
    """The tensor no artifact of this task may lack."""
    extra_references: ClassVar[tuple[str, ...]] = ()
    """References beside the zero-shot one that the method's ``reference()`` returns as
    ``<reference>:<metric>`` (forgetting: ``dropclasses``, the zero-query bound); each
    is a set of ``runs`` columns ``<reference>_<split>_<metric>``."""

    # ---------------------------------------------------------------- results
    def runs_schema(self) -> pa.Schema:
        """This task's ``runs`` table: the fixed columns and its own metric columns only.

        Each run file holds its task's columns, so a metric added to one task changes
        no other task's files; a folder of several tasks reads as their union.
        """
        return runs_schema(*self._metrics_and_references())

    def metric_columns(self) -> tuple[str, ...]:
        """This task's metric columns of the ``runs`` table (``test_H``, ``zeroshot_test_H``, ...)."""
        return metric_columns(*self._metrics_and_references())

    def _metrics_and_references(self) -> tuple[list[str], dict[str, list[str]]]:
        names = [name for name, _ in self.metrics]
        return names, {reference: names for reference in self.extra_references}

    # ------------------------------------------------------------------ specs
    @property
    def variants(self) -> tuple[str, ...]:
        """The method names (``name`` values) this task accepts."""
        annotation = self.method_spec.model_fields["name"].annotation
        return tuple(getattr(annotation, "__args__", ()))

    @property
    def default_variant(self) -> str:
        return str(self.method_spec.model_fields["name"].default)

    def default_budget(self, shots: int) -> int | None:
        """Queries per trial when the spec sets none (None: no cap)."""
        return None

    def is_white_box(self, method: Any) -> bool:
        """Whether ``method`` (a method spec) trains with gradients on an in-process backend:
        every method of a white-box task, or a white-box variant of a black-box task (CoOp)."""
        return self.white_box

    def method_label(self, method: str) -> str:
        """A method's name in report tables: white-box variants of a black-box task say so."""
        if not self.white_box and self.is_white_box(_Named(method)):
            return f"{method} (white-box)"
        return method

    def reference_label(self, reference: str) -> str:
        """How tables name one of :attr:`extra_references`."""
        return reference

    def queries_per_generation(self, method: Any) -> int:
        """What one generation costs (the population, by default)."""
        if self.is_white_box(method):
            return 0
        if not isinstance(method, PopulationSearch):
            raise NotImplementedError(
                f"task {self.name!r}: its method config has no popsize; "
                "override Task.queries_per_generation"
            )
        return method.popsize

    def generations(self, spec: RunSpec) -> int:
        """Generations of one expanded trial: the iterations, cut by the budget."""
        budget = spec.query_budget()
        if not isinstance(spec.method, PopulationSearch):
            raise NotImplementedError(
                f"task {self.name!r}: its method config has no popsize and iterations; "
                "override Task.generations"
            )
        iterations = spec.method.iterations
        per_generation = self.queries_per_generation(spec.method)
        if budget is None or per_generation == 0:
            return iterations
        return min(iterations, budget // per_generation)

    def max_queries(self, spec: RunSpec) -> int:
        """ASHA's clock limit in a sweep: the budget, or every generation's queries."""
        budget = spec.query_budget()
        return (
            budget
            if budget is not None
            else self.generations(spec) * (self.queries_per_generation(spec.method))
        )

    def run_id(self, spec: RunSpec, seed: int) -> str:
        """``<name>-<method>-s<seed>``."""
        return f"{spec.name}-{spec.method.name}-s{seed}"

    def check(self, spec: RunSpec) -> list[str]:
        """Problems across a spec's fields that only this task knows (one message each)."""
        return []

    # ----------------------------------------------------------------- trials
    def build(
        self,
        spec: RunSpec,
        seed: int,
        oracle: Oracle,
        data: TrialData,
        *,
        budget_key: str,
        eval_key: str,
    ) -> Method:
        """The method of one expanded spec (one variant, one shot count) and seed."""
        raise NotImplementedError

    def final_val(self, method: Method, evaluations: dict[str, Metrics]) -> Metrics:
        """The validation metrics of the reported result (default: the last evaluation's)."""
        return evaluations.get("val", {})

    def artifact(self, method: Method) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and manifest facts of a finished trial (``class_names`` at least)."""
        raise NotImplementedError

    def classifier(
        self, artifact: Artifact, oracle: LocalOracle
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
        """Class embeddings ``C x E`` of an artifact, and a function of the logits applied
        after them (None: the logits as they are). Default: the learned prompt's."""
        contexts = artifact.tensors["contexts"].float()
        return oracle.class_embeddings(contexts, artifact.manifest["class_names"])[0], None

    # ----------------------------------------------------------------- report
    table_axes: ClassVar[tuple[str, ...]] = ()
    """Spec fields (dotted) a report table spreads across its columns (CraFT: shots and
    their budget); every other difference in the config splits tables or rows."""

    def table_groups(self, runs: pd.DataFrame) -> list[TableGroup]:
        """The completed runs of this task, one group per report table (one experiment in
        one setting; ``vlmlab.results.table_groups``)."""
        return table_groups(completed(runs, self.name), axes=self.table_axes)

    def tables(self, runs: pd.DataFrame, *, tolerance: float = 1.0) -> list[ReportTable]:
        """One table per experiment and setting: the metrics by method, zero-shot first.

        Args:
            tolerance: DevSafety slack, in points, that a task counting safe seeds allows.
        """
        tables = []
        for group in self.table_groups(runs):
            runs_of = group.runs
            columns = ["method", "seeds", *[label for _, label in self.metrics], "queries"]
            rows = [
                [
                    "zero-shot",
                    str(runs_of.seed.nunique()),
                    *[
                        mean_std(runs_of[f"zeroshot_test_{key}"].drop_duplicates())
                        for key, _ in self.metrics
                    ],
                    "0",
                ]
            ]
            for row in group.rows(self.method_label):
                rows.append(
                    [
                        row.label,
                        str(len(row.runs)),
                        *[mean_std(row.runs[f"test_{key}"]) for key, _ in self.metrics],
                        f"{int(row.runs.queries_used.median())}",
                    ]
                )
            title = f"{self.title} — {group.where} (test, %)"
            tables.append(ReportTable(title, columns, rows))
        return tables

    def figures(self, runs: pd.DataFrame, steps: pd.DataFrame, folder: Path) -> list[Path]:
        """PNG figures written into ``folder`` (none by default)."""
        return []

    def headline(self, outcomes: list[Any], backend: str, dataset: str) -> list[str]:
        """One line per (method, shots): the headline metric in percent, zero-shot -> mean ± std
        over seeds."""
        key, label = self.metrics[0]
        lines = []
        finished = [o for o in outcomes if o.test]
        for method, shots in dict.fromkeys((o.method, o.shots) for o in finished):
            group = [o for o in finished if o.method == method and o.shots == shots]
            values = [o.test[key] * 100 for o in group]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            zero_shot = statistics.mean(o.zeroshot_test[key] for o in group) * 100
            lines.append(
                f"{label} on the test split, {shots}-shot: zero-shot {zero_shot:.2f} -> {method} "
                f"{statistics.mean(values):.2f}{spread} (%, mean over {len(values)} "
                f"seed{'s' if len(values) > 1 else ''}; {backend}, {dataset})"
            )
        return lines


# ------------------------------------------------------------------ registry
_TASKS: dict[str, Task] = {}

DEFAULT_TASK = "forgetting"
"""The task of a spec that names none."""


def _tasks() -> dict[str, Task]:
    """The registry, with the tasks of installed plugins (entry points ``vlmlab.tasks``)."""
    load_plugins(TASKS)
    return _TASKS


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Make ``task`` known to specs, runs, sweeps, studies, reports and serving."""
    if not replace and task.name in _TASKS:
        raise ValueError(f"a task named {task.name!r} is registered already (replace=True)")
    metric_names = [name for name, _ in task.metrics]
    for sweep_metric in task.sweep_metrics:
        split, _, name = sweep_metric.partition("_")
        if split not in ("val", "test") or name not in metric_names:
            raise ValueError(
                f"task {task.name!r}: sweep metric {sweep_metric!r} is not val_/test_ "
                f"of one of its metrics ({', '.join(metric_names)})"
            )
    _TASKS[task.name] = task
    return task


def ensure_registered(task: Task) -> None:
    """Register ``task`` where it is unknown: drivers ship the task object to Ray workers,
    so a task registered in the driver alone (a plugin, a test's toy task) runs there too."""
    if task.name not in _TASKS:
        register_task(task)


def unregister_task(name: str) -> None:
    """Forget a task (tests register toy tasks and remove them)."""
    _TASKS.pop(name, None)


def get_task(name: str) -> Task:
    """The registered task ``name``.

    Raises:
        ValueError: no such task (the message lists the registered ones).
    """
    task = _tasks().get(name)
    if task is None:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(_TASKS)}")
    return task


def list_tasks() -> dict[str, str]:
    """Registered task names and their titles."""
    return {name: task.title for name, task in _tasks().items()}


def iter_tasks() -> Iterator[Task]:
    return iter(list(_tasks().values()))


def metric_names() -> list[str]:
    """Every registered task's metric names, in registration order, each once."""
    return list(dict.fromkeys(name for task in _tasks().values() for name, _ in task.metrics))


def reference_metrics() -> dict[str, list[str]]:
    """Each extra reference (``dropclasses``) and the metrics of the tasks that report it."""
    references: dict[str, list[str]] = {}
    for task in _tasks().values():
        for reference in task.extra_references:
            known = references.setdefault(reference, [])
            known += [name for name, _ in task.metrics if name not in known]
    return references


def runs_schema_of_tasks() -> pa.Schema:
    """The ``runs`` schema with the metric columns of every registered task (their union)."""
    return runs_schema(metric_names(), reference_metrics())


def runs_schema_of_task(name: object) -> pa.Schema:
    """The ``runs`` schema of the task ``name`` (:meth:`Task.runs_schema`); the union of
    every registered task's for a row of no registered task (a plugin not loaded here)."""
    task = _tasks().get(name) if isinstance(name, str) else None
    return task.runs_schema() if task is not None else runs_schema_of_tasks()


def metric_columns_of_tasks() -> tuple[str, ...]:
    return metric_columns(metric_names(), reference_metrics())


def reference_labels() -> dict[str, str]:
    """Each extra reference's row label in tables (``dropclasses`` -> its task's label)."""
    return {
        reference: task.reference_label(reference)
        for task in _tasks().values()
        for reference in task.extra_references
    }


def study_metrics() -> dict[str, tuple[tuple[str, str], ...]]:
    """The test metrics a budget study reports, by black-box task."""
    return {
        task.name: task.table_metrics or task.metrics
        for task in _tasks().values()
        if not task.white_box
    }
