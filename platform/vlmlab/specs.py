"""Experiment specs: pydantic models loaded from YAML, with command-line overrides.

A spec is validated whole before a single query is spent. Every problem is
reported at once, each with the file, the field path, the bad value and what
is allowed::

    experiments/quickstart.yaml: 2 problems
      - method.popsize: got 1; Input should be greater than or equal to 2
      - data.sots: unknown field; allowed: dataset, root, shots, ...

Overrides use dotted paths and YAML values: ``--set method.popsize=30``,
``--set seeds=[1,2,3]``, ``--set backend.pretrained=null``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmlab.errors import VlmlabError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SpecError(VlmlabError, ValueError):
    """A spec file or override is malformed; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendSpec(_Strict):
    """Which black box: ``conse`` (offline stand-in) or ``open_clip:<architecture>``."""

    name: str = "conse"
    pretrained: str | None = None
    """open_clip: a pretrained tag (e.g. ``openai``) or a local checkpoint path."""
    device: str | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    cache_dir: str | None = None
    """Image-feature cache folder (default ``$VLMLAB_CACHE_DIR`` or ``~/.cache/vlmlab``);
    a shared filesystem path lets a cluster's workers encode each image set once."""

    @field_validator("name")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        backend = value.partition(":")[0]
        if backend not in ("conse", "open_clip"):
            raise ValueError("must be 'conse' or 'open_clip:<architecture>'")
        if backend == "conse" and value != "conse":
            raise ValueError("the ConSE backend takes no model: use 'conse'")
        return value

    def oracle_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.device is not None:
            kwargs["device"] = self.device
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        if self.name.startswith("open_clip"):
            kwargs["precision"] = self.precision
            if self.pretrained is not None:
                kwargs["pretrained"] = self.pretrained
        elif self.pretrained is not None:
            raise SpecError(
                "backend.pretrained: the ConSE backend has no pretrained weights to choose"
            )
        return kwargs


class DataSpec(_Strict):
    """Dataset, few-shot sampling and the forget/memorize partition."""

    dataset: str = "fashion-mnist"
    root: str | None = None
    shots: int | list[int] = 16
    """Shots per class; a list runs a few-shot ladder (every K, every seed)."""
    val_shots: int | None = Field(None, ge=1)
    """Validation shots per class (default: same as ``shots``)."""
    test_size: int = Field(0, ge=0)
    """Class-balanced test subset size; 0 means the whole test split."""
    forget: list[int] | None = None
    """Classes to forget; default the first ``forget_fraction`` of classes."""
    forget_fraction: float = Field(0.4, gt=0, lt=1)
    target: list[int | str] | None = None
    """devsafety: the target classes to improve, by index or class name; default the
    weakest class on the validation images (every other class is protected)."""

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from vlmlab.data import list_datasets

        known = list(list_datasets())
        if value not in known:
            raise ValueError(f"unknown dataset; allowed: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _folder_needs_root(self) -> DataSpec:
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError(
                "data.root is required for the imagefolder dataset (root/<split>/<class>/*.jpg)"
            )
        return self

    @field_validator("shots")
    @classmethod
    def _shot_counts(cls, value: int | list[int]) -> int | list[int]:
        ladder = [value] if isinstance(value, int) else value
        if not ladder or any(k < 1 for k in ladder) or len(set(ladder)) != len(ladder):
            raise ValueError("shots must be a positive integer or a list of distinct ones")
        return value

    @property
    def shot_ladder(self) -> list[int]:
        return [self.shots] if isinstance(self.shots, int) else list(self.shots)

    @field_validator("target")
    @classmethod
    def _target_classes(cls, value: list[int | str] | None) -> list[int | str] | None:
        if value is not None and (
            not value
            or any(isinstance(c, int) and c < 0 for c in value)
            or len(set(value)) != len(value)
        ):
            raise ValueError(
                "must be distinct non-negative class indices (or null for the weakest)"
            )
        return value

    @field_validator("forget")
    @classmethod
    def _forget_classes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("must name at least one class (or be null for the default 40 %)")
            if any(c < 0 for c in value) or len(set(value)) != len(value):
                raise ValueError("must be distinct non-negative class indices")
        return value


class ForgettingMethodSpec(_Strict):
    """Black-Box Forgetting and its baselines (see ``vlmlab.methods.forgetting``)."""

    name: Literal["bbf", "bbt", "wo_lcs"] = "bbf"
    n_context: int = Field(4, ge=1, le=64)
    shared_dim: int = Field(20, ge=1)
    unique_dim: int = Field(5, ge=1)
    popsize: int = Field(20, ge=2)
    sigma: float = Field(1.0, gt=0)
    sep_cma: bool = False
    batch_size: int = Field(160, ge=1)
    iterations: int = Field(400, ge=1)
    projection_std: float | None = Field(None, gt=0)

    def to_config(self):
        from vlmlab.methods.forgetting import ForgettingConfig

        return ForgettingConfig(
            variant=self.name,
            n_context=self.n_context,
            shared_dim=self.shared_dim,
            unique_dim=self.unique_dim,
            popsize=self.popsize,
            sigma=self.sigma,
            sep_cma=self.sep_cma,
            batch_size=self.batch_size,
            iterations=self.iterations,
            projection_std=self.projection_std,
        )


class CraftMethodSpec(_Strict):
    """CraFT and its ablations (see ``vlmlab.methods.craft``); defaults are the paper's."""

    name: Literal["craft", "prompt_only", "refine_only", "no_consistency"] = "craft"
    init_phrase: str = Field("a photo of a", min_length=1)
    latent_dim: int = Field(512, ge=1)
    projection_std: float = Field(0.2, gt=0)
    popsize: int = Field(40, ge=2)
    sigma: float = Field(1.0, gt=0)
    bounds: float | None = Field(5.0, gt=0)
    hidden: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    consistency_weight: float = Field(0.1, ge=0)
    consistency_cutoff: int = Field(1, ge=1)
    refine_batch: int = Field(256, ge=1)

    def to_config(self, budget: int):
        from vlmlab.methods.craft import CraftConfig

        return CraftConfig(
            mode=self.name,
            budget=budget,
            **self.model_dump(exclude={"name"}),
        )


class DevSafetyMethodSpec(_Strict):
    """Model Developmental Safety and its baselines (see ``vlmlab.methods.devsafety``).

    A white-box task: ``data.shots`` is the training images per class (target
    and control set), ``data.val_shots`` the held-out validation images per class.
    """

    name: Literal["constrained", "finetune", "weighted"] = "constrained"
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    tower_lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1)
    rank: int = Field(32, ge=1)
    trainable: Literal["target_heads", "heads", "projection", "all"] = "all"
    beta: float = Field(300.0, ge=0)
    gamma: float = Field(0.8, gt=0, le=1)
    tau: float = Field(0.05, ge=0)
    weight: float = Field(1.0, ge=0)
    base_epochs: int = Field(0, ge=0)
    base_lr: float = Field(1e-3, gt=0)
    prompt: str = "a photo of a {}."
    safety_tolerance: float = Field(0.0, ge=0, lt=1)
    """What ``safe_gain`` (the sweep metric) counts as safe: DevSafety(acc) >= -tolerance.
    0 is the paper's definition; a small slack suits validation sets where one image
    moves a class's accuracy by more than that. Never used in training."""

    @field_validator("prompt")
    @classmethod
    def _has_slot(cls, value: str) -> str:
        if "{}" not in value:
            raise ValueError("must contain '{}' where the class name goes")
        return value

    def to_config(self):
        from vlmlab.methods.devsafety import DevSafetyConfig

        return DevSafetyConfig(
            mode=self.name, **self.model_dump(exclude={"name", "safety_tolerance"})
        )


METHOD_SPECS: dict[str, type[BaseModel]] = {
    "forgetting": ForgettingMethodSpec,
    "craft": CraftMethodSpec,
    "devsafety": DevSafetyMethodSpec,
}
"""The method spec of each task; its ``name`` field tells the variants apart."""

_METHOD_OWNER = {
    name: spec_cls
    for spec_cls in METHOD_SPECS.values()
    for name in spec_cls.model_fields["name"].annotation.__args__  # type: ignore[union-attr]
}

MethodSpec = Annotated[
    ForgettingMethodSpec | CraftMethodSpec | DevSafetyMethodSpec, Field(discriminator="name")
]

SWEEP_METRICS = {
    "forgetting": ("val_H", "test_H"),
    "craft": ("val_acc", "test_acc"),
    "devsafety": ("val_safe_gain", "val_target_gain", "val_devsafety"),
}

WHITE_BOX_TASKS = frozenset({"devsafety"})
"""Tasks that train the model: they run on an in-process backend, never on the oracle pool."""

CRAFT_BUDGET_BY_SHOTS = {1: 2000, 2: 4000, 4: 4000, 8: 8000, 16: 8000}
"""CraFT's query budgets by shots (methods.md): 2,000 for 1 shot, 4,000 for 2-4, 8,000 for 8+."""


def craft_budget(shots: int) -> int:
    """The paper's budget for ``shots``, extended to any K by the same steps."""
    return 2000 if shots <= 1 else 4000 if shots <= 4 else 8000


class PoolSpec(_Strict):
    """The Serve oracle pool a run uses (ignored with ``--in-process``)."""

    replicas: int = Field(1, ge=1)
    autoscaling: dict[str, Any] | None = None
    """A Serve autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4}; overrides ``replicas``."""
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(4, ge=1)
    shard_size: int = Field(64, ge=1)
    """Populations larger than this are split across replicas."""
    max_parallel_trials: int | None = Field(None, ge=1)
    """Seeds run concurrently as Ray actors; None runs them all at once."""


class ParamSpec(_Strict):
    """One searched hyperparameter."""

    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> ParamSpec:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty `values` list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} range needs low < high")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("a loguniform range needs low > 0")
        return self


class SweepSpec(_Strict):
    """A Ray Tune sweep: Optuna search over ``space``, ASHA on queries used."""

    space: dict[str, ParamSpec]
    """Dotted spec paths (``method.sigma``) to search ranges."""
    metric: Literal[
        "val_H",
        "test_H",
        "val_acc",
        "test_acc",
        "val_safe_gain",
        "val_target_gain",
        "val_devsafety",
    ] = "val_H"
    """Default: the task's validation metric (val_H for forgetting, val_acc for CraFT,
    val_safe_gain for devsafety: the target gain when DevSafety >= 0, else -1 + DevSafety)."""
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    sampler: Literal["tpe", "cmaes"] = "tpe"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_queries: int = Field(200, ge=1)
    """ASHA stops no trial before it has spent this many queries."""
    grace_epochs: int = Field(10, ge=1)
    """White-box tasks (devsafety): ASHA counts epochs and stops no trial before this many."""
    reduction_factor: int = Field(2, ge=2)
    max_failures: int = Field(2, ge=0)
    seed: int = Field(0, ge=0)
    """Seed of the search (the trials use the spec's first seed)."""
    trial_cpus: float = Field(0.5, gt=0)
    trial_gpus: float = Field(0.0, ge=0)
    """GPUs per trial (a cluster's GPU workers); white-box trials put their model there."""

    @field_validator("space")
    @classmethod
    def _searchable_paths(cls, value: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not value:
            raise ValueError("the search space is empty")
        for path in value:
            head = path.split(".")[0]
            if head not in ("method", "data", "budget") or "." not in path:
                raise ValueError(
                    f"{path!r}: search paths look like method.<field> (or data., budget.)"
                )
        return value


class StudySpec(_Strict):
    """A query-budget scaling study: every budget x method variant x seed, as a Tune grid."""

    budgets: list[int] = Field(min_length=1)
    """Optimization queries per trial, one trial per budget (each variant, each seed)."""
    max_concurrent: int = Field(2, ge=1)
    trial_cpus: float = Field(0.5, gt=0)

    @field_validator("budgets")
    @classmethod
    def _distinct_positive(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value) or len(set(value)) != len(value):
            raise ValueError("budgets must be distinct positive query counts")
        return sorted(value)


class BudgetSpec(_Strict):
    max_queries: int | None = Field(None, ge=1)
    """Optimization queries per run (one query = one candidate on one batch)."""
    by_shots: dict[int, int] | None = None
    """Queries per run by shot count, for a ladder (e.g. {1: 2000, 2: 4000, 16: 8000}).
    CraFT defaults to the paper's budgets by shots when neither field is set."""

    @field_validator("by_shots")
    @classmethod
    def _positive(cls, value: dict[int, int] | None) -> dict[int, int] | None:
        if value is not None and (not value or any(k < 1 or q < 1 for k, q in value.items())):
            raise ValueError("must map shot counts >= 1 to query budgets >= 1")
        return value

    @model_validator(mode="after")
    def _one_way(self) -> BudgetSpec:
        if self.max_queries is not None and self.by_shots is not None:
            raise ValueError("set max_queries or by_shots, not both")
        return self


class RunSpec(_Strict):
    """One experiment: a method on a backend and dataset, over one or more seeds."""

    name: str
    description: str | None = None
    task: Literal["forgetting", "craft", "devsafety"] = "forgetting"
    backend: BackendSpec = BackendSpec()
    data: DataSpec = DataSpec()
    method: MethodSpec = ForgettingMethodSpec()
    """The task's method: bbf / bbt / wo_lcs (forgetting); craft / prompt_only /
    refine_only / no_consistency (craft); constrained / finetune / weighted (devsafety).
    ``name`` defaults to the task's main method."""
    budget: BudgetSpec = BudgetSpec()
    pool: PoolSpec = PoolSpec()
    sweep: SweepSpec | None = None
    study: StudySpec | None = None
    """``vlmlab study budget``: the budgets to compare (each replaces ``budget``)."""
    variants: list[dict[str, Any]] | None = None
    """Method variants run side by side: each entry overrides fields of ``method``
    (e.g. ``[{name: bbf}, {name: bbt}, {name: wo_lcs}]``); every variant runs every seed."""
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1)
    eval_every: int = Field(10, ge=1)
    """Test the best prompt so far, and checkpoint, every this many generations."""
    zeroshot_prompt: str = Field("a photo of a", min_length=1)
    expected: dict[str, Any] | None = None
    """The paper's numbers for this setting, as a note; never used in computation."""

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """The method name and sweep metric default to the task's (bbf / val_H, craft / val_acc)."""
        if not isinstance(data, dict) or data.get("task", "forgetting") not in METHOD_SPECS:
            return data
        task = data.get("task", "forgetting")
        data = dict(data)
        method = data.get("method")
        default_name = METHOD_SPECS[task].model_fields["name"].default
        if method is None:
            data["method"] = {"name": default_name}
        elif isinstance(method, dict) and "name" not in method:
            data["method"] = {"name": default_name, **method}
        sweep = data.get("sweep")
        if isinstance(sweep, dict) and "metric" not in sweep:
            data["sweep"] = {**sweep, "metric": SWEEP_METRICS[task][0]}
        return data

    @model_validator(mode="after")
    def _method_fits_task(self) -> RunSpec:
        expected = METHOD_SPECS[self.task]
        if not isinstance(self.method, expected):
            allowed = ", ".join(expected.model_fields["name"].annotation.__args__)  # type: ignore[union-attr]
            raise ValueError(
                f"method.name: {self.method.name!r} is not a {self.task} method; allowed: {allowed}"
            )
        if self.sweep is not None and self.sweep.metric not in SWEEP_METRICS[self.task]:
            raise ValueError(
                f"sweep.metric: {self.sweep.metric!r} is not measured by the {self.task} task; "
                f"allowed: {', '.join(SWEEP_METRICS[self.task])}"
            )
        if self.sweep is not None and len(self.data.shot_ladder) > 1:
            raise ValueError("data.shots: a sweep tunes one shot count; give one K, not a ladder")
        if self.study is not None:
            if self.white_box:
                raise ValueError(
                    f"study: the {self.task} task spends no oracle queries; "
                    "a query-budget study does not apply"
                )
            if len(self.data.shot_ladder) > 1:
                raise ValueError("data.shots: a budget study runs one shot count, not a ladder")
            per_generation = self.method.popsize + (1 if self.task == "craft" else 0)
            small = [b for b in self.study.budgets if b < per_generation]
            if small:
                raise ValueError(
                    f"study.budgets: {small} cannot pay for one generation "
                    f"({per_generation} queries at method.popsize={self.method.popsize})"
                )
        if self.white_box and (self.budget.max_queries or self.budget.by_shots):
            raise ValueError(
                f"budget: the {self.task} task trains the model and spends no oracle queries; "
                "remove the budget section (method.epochs sets its length)"
            )
        by_shots = self.budget.by_shots
        if by_shots is not None:
            missing = [k for k in self.data.shot_ladder if k not in by_shots]
            if missing:
                raise ValueError(f"budget.by_shots: no budget for shots {missing}")
        return self

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names result files)")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
        if any(seed < 0 for seed in value):
            raise ValueError("seeds must be non-negative")
        return value

    @model_validator(mode="after")
    def _budget_pays_for_a_generation(self) -> RunSpec:
        if not isinstance(self.method, METHOD_SPECS[self.task]) or self.white_box:
            return self  # reported by _method_fits_task; white-box tasks spend no queries
        # CraFT scores the ES mean with its population: P + 1 queries a generation.
        per_generation = self.method.popsize + (1 if self.task == "craft" else 0)
        for shots in self.data.shot_ladder:
            budget = self.query_budget(shots)
            if budget is not None and budget < per_generation:
                field = "budget.max_queries" if self.budget.max_queries else "budget.by_shots"
                raise ValueError(
                    f"{field}: {budget} queries ({shots}-shot) cannot pay for one generation "
                    f"({per_generation} queries at method.popsize={self.method.popsize})"
                )
        return self

    @model_validator(mode="after")
    def _variants_are_methods(self) -> RunSpec:
        method_cls = METHOD_SPECS[self.task]
        for i, overrides in enumerate(self.variants or []):
            if not isinstance(overrides, dict) or not overrides:
                raise ValueError(f"variants[{i}] must be a non-empty mapping of method fields")
            try:
                method_cls.model_validate({**self.method.model_dump(), **overrides})
            except ValidationError as error:
                first = error.errors()[0]
                field = ".".join(str(p) for p in first["loc"])
                raise ValueError(
                    f"variants[{i}].{field}: got {first.get('input')!r}; {first['msg']}"
                ) from None
        return self

    def expand_trials(self) -> list[RunSpec]:
        """One spec per (method variant, shot count): each has one method and one K.

        Each keeps the experiment name, so run ids read ``<name>-<method>-s<seed>``
        (CraFT: ``<name>-<method>-k<K>-s<seed>``); variants sharing a method name
        get ``<name>-v<i>`` instead. Every expanded spec carries its budget.
        """
        method_cls = METHOD_SPECS[self.task]
        methods = [
            method_cls.model_validate({**self.method.model_dump(), **overrides})
            for overrides in (self.variants or [{}])
        ]
        names = [m.name for m in methods]
        unique = len(set(names)) == len(names)
        return [
            self.model_copy(
                update={
                    "method": method,
                    "variants": None,
                    "name": self.name if unique else f"{self.name}-v{i}",
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

    def query_budget(self, shots: int | None = None) -> int | None:
        """Optimization queries of one trial at ``shots`` (default: this spec's one K)."""
        shots = self.shots if shots is None else shots
        if self.budget.max_queries is not None:
            return self.budget.max_queries
        if self.budget.by_shots is not None:
            return self.budget.by_shots.get(shots)
        return craft_budget(shots) if self.task == "craft" else None

    @property
    def white_box(self) -> bool:
        """True for tasks that train the model (run on an in-process backend)."""
        return self.task in WHITE_BOX_TASKS

    @property
    def generations(self) -> int:
        """Generations of one expanded trial (the budget's cut, or the iteration count;
        epochs for devsafety)."""
        if isinstance(self.method, DevSafetyMethodSpec):
            return self.method.epochs
        budget = self.query_budget()
        if isinstance(self.method, CraftMethodSpec):
            return (budget or 0) // (self.method.popsize + 1)
        iterations = self.method.iterations
        return iterations if budget is None else min(iterations, budget // self.method.popsize)


# --------------------------------------------------------------------- loading
def _set_path(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise SpecError(f"{source}: malformed override path {dotted!r}")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(
                f"{source}: cannot set {dotted!r}: {'.'.join(parts[: i + 1])} is not a section"
            )
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``path.to.field=value`` overrides (values parsed as YAML)."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip():
            raise SpecError(f"override {item!r}: expected PATH=VALUE, e.g. method.popsize=30")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise SpecError(f"override {item!r}: value is not valid YAML ({error})") from error
        _set_path(tree, path.strip(), value, f"override {item!r}")
    return tree


def _describe(error: dict[str, Any], model: type[BaseModel], task: Any = "forgetting") -> str:
    loc = tuple(error["loc"])
    method_owner = None
    if len(loc) > 1 and loc[0] == "method" and loc[1] in _METHOD_OWNER:
        # Errors inside the method carry pydantic's union tag (the method name): drop it.
        method_owner, loc = _METHOD_OWNER[str(loc[1])], ("method", *loc[2:])
    if error["type"] == "union_tag_invalid":
        owner = METHOD_SPECS.get(str(task))
        names = owner.model_fields["name"].annotation.__args__ if owner else tuple(_METHOD_OWNER)  # type: ignore[union-attr]
        return (
            f"method.name: got {error.get('input', {}).get('name')!r}; "
            f"allowed for task {task}: {', '.join(names)}"
        )
    location = ".".join(str(part) for part in loc) or "(spec)"
    if error["type"] == "extra_forbidden":
        owner: Any = model
        for part in loc[:-1]:
            if part == "method" and method_owner is not None:
                owner = method_owner
                continue
            field = owner.model_fields.get(str(part)) if isinstance(owner, type) else None
            owner = field.annotation if field is not None else None
        allowed = (
            ", ".join(owner.model_fields)
            if isinstance(owner, type) and issubclass(owner, BaseModel)
            else "?"
        )
        return f"{location}: unknown field; allowed: {allowed}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{location}: required field is missing"
    if not loc:  # a check across fields: the message names them
        return message
    if isinstance(error.get("input"), dict):  # a check across a section's fields
        return f"{location}: {message}"
    return f"{location}: got {error.get('input')!r}; {message}"


def validate_spec(tree: Any, source: str) -> RunSpec:
    """Validate a parsed spec; raise one :class:`SpecError` listing every problem."""
    if not isinstance(tree, dict):
        raise SpecError(
            f"{source}: a spec must be a YAML mapping of fields, got {type(tree).__name__}"
        )
    try:
        return RunSpec.model_validate(tree)
    except ValidationError as error:
        task = tree.get("task", "forgetting")
        problems = [_describe(e, RunSpec, task) for e in error.errors()]
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        raise SpecError(f"{source}: {len(problems)} {noun}\n{lines}") from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Read a YAML spec, apply ``--set`` overrides and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {str(path)!r}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from error
    if tree is None:
        tree = {}
    if isinstance(tree, dict) and overrides:
        tree = apply_overrides(tree, overrides)
    return validate_spec(tree, str(path))
