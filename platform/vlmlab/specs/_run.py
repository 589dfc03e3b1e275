"""The experiment spec: a task's method on a backend and dataset, over seeds.

Field-level checks live on the fields; checks across fields are collected by
:meth:`RunSpec.problems` (each a message naming its field) so that loading a
spec reports every problem at once. The task (``vlmlab.tasks``) owns the
method section, its budget rule and its own cross-field checks.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from vlmlab.results import fingerprint
from vlmlab.specs._sections import (
    BackendSpec,
    BudgetSpec,
    DataSpec,
    PoolSpec,
    StudySpec,
    SweepSpec,
    TrackingSpec,
)
from vlmlab.tasks import DEFAULT_TASK, MethodSpec, StrictModel, Task, get_task, list_tasks

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def method_with_default_name(task: Task, method: Any) -> Any:
    """A method section with the task's main variant filled in where ``name`` is missing."""
    if method is None:
        return {"name": task.default_variant}
    if isinstance(method, dict) and "name" not in method:
        return {"name": task.default_variant, **method}
    return method


class RunSpec(StrictModel):
    """One experiment: a method on a backend and dataset, over one or more seeds."""

    name: str
    description: str | None = None
    task: str = DEFAULT_TASK
    """A registered task (``vlmlab tasks``): forgetting, craft, devsafety, ..."""
    backend: BackendSpec = BackendSpec()
    data: DataSpec = DataSpec()
    method: SerializeAsAny[MethodSpec] = Field(default=None, validate_default=False)  # type: ignore[assignment]
    """The task's method: bbf / bbt / wo_lcs (forgetting); craft / prompt_only /
    refine_only / no_consistency (craft); constrained / finetune / weighted (devsafety).
    ``name`` defaults to the task's main method."""
    budget: BudgetSpec = BudgetSpec()
    pool: PoolSpec = PoolSpec()
    sweep: SweepSpec | None = None
    study: StudySpec | None = None
    """``vlmlab study budget``: the budgets to compare (each replaces ``budget``)."""
    tracking: TrackingSpec | None = None
    """MLflow / TensorBoard for every trial (``--track``); not part of a trial's identity."""
    variants: list[dict[str, Any]] | None = None
    """Method variants run side by side: each entry overrides fields of ``method``
    (e.g. ``[{name: bbf}, {name: bbt}, {name: wo_lcs}]``); every variant runs every seed."""
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1)
    eval_every: int = Field(10, ge=1)
    """Test the best prompt so far, and checkpoint, every this many generations."""
    prompt: str = "a photo of a {}."
    """The class prompt template, ``{}`` the class name, for every task: soft-prompt tasks
    (forgetting, craft) learn contexts in place of the words before ``{}`` (those words
    are their zero-shot reference and CraFT's initial context) and need the template to
    end in ``{}.``; white-box tasks (devsafety) encode it as it is
    (e.g. ``the weather is {}.``)."""
    expected: dict[str, Any] | None = None
    """The paper's numbers for this setting, as a note; never used in computation."""
    experiment: str | None = None
    """Set by :meth:`expand_trials` when variants sharing a method name rename their
    trials (``<name>-v<i>``): the experiment they belong to. Not written in specs."""

    @model_validator(mode="before")
    @classmethod
    def _task_method(cls, data: Any) -> Any:
        """The method section becomes the task's method spec (its main variant by default),
        and the sweep metric defaults to the task's first."""
        if not isinstance(data, dict):
            return data
        name = data.get("task", DEFAULT_TASK)
        if name not in list_tasks():
            return data  # the task field reports it
        task = get_task(name)
        data = dict(data)
        method = method_with_default_name(task, data.get("method"))
        if isinstance(method, dict):
            if method.get("name") not in task.variants:
                raise ValueError(
                    f"method.name: got {method.get('name')!r}; allowed for task {name}: "
                    f"{', '.join(task.variants)}"
                )
            method = task.method_spec.model_validate(method)
        elif not isinstance(method, task.method_spec):
            raise ValueError(
                f"method: a {type(method).__name__} is not a {name} method; "
                f"allowed: {', '.join(task.variants)}"
            )
        data["method"] = method
        sweep = data.get("sweep")
        if isinstance(sweep, dict) and "metric" not in sweep:
            data["sweep"] = {**sweep, "metric": task.sweep_metrics[0]}
        return data

    @field_validator("task")
    @classmethod
    def _registered_task(cls, value: str) -> str:
        if value not in list_tasks():
            raise ValueError(f"unknown task; registered: {', '.join(list_tasks())}")
        return value

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names result files)")
        return value

    @field_validator("prompt")
    @classmethod
    def _template(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError("must contain '{}' exactly once, where the class name goes")
        return value

    @property
    def experiment_name(self) -> str:
        """The experiment a trial belongs to (the spec's ``name``)."""
        return self.experiment or self.name

    def fingerprint(self) -> str:
        """A digest of everything that can change an expanded trial's result: equal for
        trials that differ only by seed (``vlmlab.results.fingerprint``)."""
        return fingerprint(self.model_dump(mode="json"))

    @property
    def prompt_phrase(self) -> str:
        """The template's words before the class name (``a photo of a``)."""
        return self.prompt.split("{}")[0].strip()

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
        if any(seed < 0 for seed in value):
            raise ValueError("seeds must be non-negative")
        return value

    # ------------------------------------------------------ across fields
    def problems(self) -> list[str]:
        """Every problem across fields (each message names its field); [] for a sound spec."""
        task = self.task_entry
        found: list[str] = []
        if self.sweep is not None and self.sweep.metric not in task.sweep_metrics:
            found.append(
                f"sweep.metric: {self.sweep.metric!r} is not measured by the {self.task} task; "
                f"allowed: {', '.join(task.sweep_metrics)}"
            )
        if self.sweep is not None and len(self.data.shot_ladder) > 1:
            found.append("data.shots: a sweep tunes one shot count; give one K, not a ladder")
        if self.data.val_shots == 0 and not task.validation_optional:
            found.append(
                f"data.val_shots: 0 (no validation split) is not allowed by the {self.task} "
                "task: it chooses its result on validation images; give a count >= 1"
            )
        elif (
            self.data.val_shots == 0 and self.sweep is not None and self.sweep.metric[:4] == "val_"
        ):
            found.append(
                f"sweep.metric: {self.sweep.metric!r} needs validation images, but "
                "data.val_shots is 0 (none); give data.val_shots >= 1 (a sweep never tunes "
                "on the test split)"
            )
        per_generation = task.queries_per_generation(self.method)
        if self.study is not None:
            try:
                white = [m.name for m in self.variant_methods() if task.is_white_box(m)]
            except ValidationError:  # the variants' own messages come below
                white = []
            if self.white_box:
                found.append(
                    f"study: the {self.task} task spends no oracle queries; "
                    "a query-budget study does not apply"
                )
            elif white:
                found.append(
                    f"variants: {', '.join(white)} spend no oracle queries (white-box); a "
                    "query-budget study does not apply to them: leave them out of the study"
                )
            elif len(self.data.shot_ladder) > 1:
                found.append("data.shots: a budget study runs one shot count, not a ladder")
            else:
                small = [b for b in self.study.budgets if b < per_generation]
                if small:
                    found.append(
                        f"study.budgets: {small} cannot pay for one generation "
                        f"({per_generation} queries{self._at_popsize()})"
                    )
        by_shots = self.budget.by_shots
        missing = [k for k in self.data.shot_ladder if by_shots is not None and k not in by_shots]
        if missing:
            found.append(f"budget.by_shots: no budget for shots {missing}")
        if not task.white_box:
            for shots in self.data.shot_ladder:
                if shots in missing:
                    continue
                budget = self.query_budget(shots)
                if budget is not None and budget < per_generation:
                    field = "budget.max_queries" if self.budget.max_queries else "budget.by_shots"
                    found.append(
                        f"{field}: {budget} queries ({shots}-shot) cannot pay for one generation "
                        f"({per_generation} queries{self._at_popsize()})"
                    )
        if not task.white_box and (not self.prompt.endswith("{}.") or not self.prompt_phrase):
            found.append(
                f"prompt: the {self.task} task learns the words before the class name and "
                f"the black box adds '.': the template must read '<words> {{}}.', got "
                f"{self.prompt!r}"
            )
        for i, overrides in enumerate(self.variants or []):
            if not isinstance(overrides, dict) or not overrides:
                found.append(f"variants[{i}] must be a non-empty mapping of method fields")
                continue
            try:
                task.method_spec.model_validate({**self.method.model_dump(), **overrides})
            except ValidationError as error:
                for item in error.errors():
                    field = ".".join(str(p) for p in item["loc"])
                    found.append(f"variants[{i}].{field}: got {item.get('input')!r}; {item['msg']}")
        return found + task.check(self)

    # ------------------------------------------------------------- trials
    @property
    def task_entry(self) -> Task:
        """This spec's task, from the registry."""
        return get_task(self.task)

    def expand_trials(self) -> list[RunSpec]:
        """One spec per (method variant, shot count): each has one method and one K.

        Each keeps the experiment name, so run ids read ``<name>-<method>-s<seed>``
        (CraFT: ``<name>-<method>-k<K>-s<seed>``); variants sharing a method name
        get ``<name>-v<i>`` instead. Every expanded spec carries its budget.
        """
        methods = self.variant_methods()
        names = [m.name for m in methods]
        unique = len(set(names)) == len(names)
        return [
            self.model_copy(
                update={
                    "method": method,
                    "variants": None,
                    "name": self.name if unique else f"{self.name}-v{i}",
                    "experiment": self.experiment_name,
                    "data": self.data.model_copy(update={"shots": shots}),
                    "budget": BudgetSpec(max_queries=self.query_budget(shots)),
                }
            )
            for i, method in enumerate(methods)
            for shots in self.data.shot_ladder
        ]

    @property
    def shots(self) -> int:
        """The one shot count of an expanded spec."""
        if not isinstance(self.data.shots, int):
            raise ValueError(f"{self.name}: a shot ladder {self.data.shots}; expand_trials() first")
        return self.data.shots

    def _at_popsize(self) -> str:
        """`` at method.popsize=P`` where the method has a population (for messages)."""
        popsize = getattr(self.method, "popsize", None)
        return "" if popsize is None else f" at method.popsize={popsize}"

    def query_budget(self, shots: int | None = None) -> int | None:
        """Optimization queries of one trial at ``shots`` (default: this spec's one K)."""
        shots = self.shots if shots is None else shots
        if self.budget.max_queries is not None:
            return self.budget.max_queries
        if self.budget.by_shots is not None:
            return self.budget.by_shots.get(shots)
        return self.task_entry.default_budget(shots)

    def variant_methods(self) -> list[Any]:
        """The method spec of every variant (``[method]`` without variants)."""
        method_cls = self.task_entry.method_spec
        return [
            method_cls.model_validate({**self.method.model_dump(), **overrides})
            for overrides in (self.variants or [{}])
        ]

    @property
    def white_box(self) -> bool:
        """True when every variant trains with gradients on an in-process backend (a
        white-box task, or only white-box variants such as CoOp): no oracle pool is needed."""
        task = self.task_entry
        try:
            methods = self.variant_methods()
        except ValidationError:  # check() names the bad variant; judge the method alone
            methods = [self.method]
        return all(task.is_white_box(method) for method in methods)

    @property
    def generations(self) -> int:
        """Generations of one expanded trial (epochs for a white-box task)."""
        return self.task_entry.generations(self)
