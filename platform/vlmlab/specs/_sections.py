"""The sections of an experiment spec (everything but the method, which its task owns)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from vlmlab.errors import VlmlabError
from vlmlab.tasks import DEFAULT_TASK, get_task
from vlmlab.tasks import StrictModel as _Strict

RANDOM_INIT = "random-init"
"""``backend.pretrained`` for untrained weights, said on purpose."""


class SpecError(VlmlabError, ValueError):
    """A spec file or override is malformed; the message lists every problem."""


class BackendSpec(_Strict):
    """Which black box: a registered backend (``vlmlab backends``), e.g. ``conse`` or
    ``open_clip:<architecture>``."""

    name: str = "conse"
    pretrained: str | None = None
    """open_clip (required): a pretrained tag (``openai``), a local checkpoint path, an
    ``hf-hub:`` name, or ``random-init`` for untrained weights (exactness and latency
    studies); reports name the weights, ``random-init`` included."""
    device: str | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """open_clip: the towers' precision; fp16 and bf16 follow OpenAI's rule (weights of
    linear, convolution and attention layers in it; LayerNorm, embeddings and
    BatchNorm in fp32)."""
    text_precision: Literal["fp32"] | None = None
    """open_clip: the text tower's precision when it differs (None: ``precision``).
    ``precision: fp16, text_precision: fp32`` is the official CraFT code's model: an fp16
    image tower and an fp32 text transformer (``TextEncoder(clip_model).float()``)."""
    cache_dir: str | None = None
    """Image-feature cache folder (default ``$VLMLAB_CACHE_DIR`` or ``~/.cache/vlmlab``);
    a shared filesystem path lets a cluster's workers encode each image set once."""

    @field_validator("name")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from vlmlab.oracle import backend_takes_model

        takes_model, _ = backend_takes_model(value)  # raises, listing the backends
        backend, _, model = value.partition(":")
        if model and not takes_model:
            raise ValueError(f"the {backend} backend takes no model: use {backend!r}")
        return value

    @model_validator(mode="after")
    def _weights_fit_backend(self) -> BackendSpec:
        from vlmlab.oracle import backend_takes_model

        _, takes_weights = backend_takes_model(self.name)
        if self.pretrained is not None and not takes_weights:
            raise ValueError(
                f"backend.pretrained: the {self.name} backend has no pretrained weights to "
                "choose; remove the field"
            )
        if self.text_precision is not None and not self.name.startswith("open_clip"):
            raise ValueError(
                f"backend.text_precision: the {self.name} backend has no text tower "
                "precision to choose; remove the field"
            )
        if self.pretrained is None and takes_weights:
            raise ValueError(
                f"backend.pretrained: the {self.name} backend needs its weights named: a "
                "pretrained tag (openai), a checkpoint file, an hf-hub: name, or "
                f"{RANDOM_INIT} for untrained weights (a CLIP with random weights recognizes "
                "nothing)"
            )
        return self

    def oracle_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``create_oracle(self.name, ...)``."""
        kwargs: dict[str, Any] = {}
        if self.device is not None:
            kwargs["device"] = self.device
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        if self.name.startswith("open_clip"):
            kwargs["precision"] = self.precision
            if self.text_precision is not None:
                kwargs["text_precision"] = self.text_precision
        if self.pretrained is not None and self.pretrained != RANDOM_INIT:
            kwargs["pretrained"] = self.pretrained
        return kwargs


class DataSpec(_Strict):
    """Dataset, few-shot sampling and the forget/memorize partition."""

    dataset: str = "fashion-mnist"
    root: str | None = None
    class_names: str | list[str] | dict[str, str] | None = None
    """Prompt names for the classes: a file (``.txt`` a name a line in class order,
    ``.json``/``.yaml`` a list or a mapping old name or index → name) or the list or
    mapping inline. Default: the dataset's own names (folder names cleaned)."""
    shots: int | list[int] = 16
    """Shots per class; a list runs a few-shot ladder (every K, every seed)."""
    val_shots: int | None = Field(None, ge=0)
    """Validation shots per class (default: same as ``shots``); 0: no validation split
    (CraFT's official protocol; tasks that choose their result on validation refuse it)."""
    test_size: int = Field(0, ge=0)
    """Class-balanced test subset size; 0 means the whole test split."""
    forget: list[int | str] | None = None
    """Classes to forget, by index or class name; default the first ``forget_fraction``."""
    forget_fraction: float = Field(0.4, gt=0, lt=1)
    target: list[int | str] | None = None
    """devsafety: the target classes to improve, by index or class name; default the
    weakest class on the validation images (every other class is protected)."""
    control_cap: int | None = Field(None, ge=1)
    """devsafety: the official ``--control-size``: at most this many training images of
    each *protected* class (all of a shorter class), and every target image; replaces
    ``shots``. Validation (``val_shots``) is drawn first, at most a fifth of a class."""
    control_seed: int | None = Field(None, ge=0)
    """devsafety, with ``control_cap``: the seed of the data split, one for every trial
    (official: 2024, ``np.random.seed(2024)``); default: each trial's seed."""

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
    def _forget_classes(cls, value: list[int | str] | None) -> list[int | str] | None:
        if value is not None:
            if not value:
                raise ValueError("must name at least one class (or be null for the default 40 %)")
            if any(isinstance(c, int) and c < 0 for c in value) or len(set(value)) != len(value):
                raise ValueError("must be distinct class names or non-negative class indices")
        return value


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
    batch_requests: int = Field(1, ge=1)
    """Concurrent requests (trials' populations) a replica computes in one text-tower
    pass; 1 computes each alone (bit-for-bit equal to in-process). Many trials
    sharing a GPU: set it to the trials per replica, and ``max_ongoing_requests``
    at least as high."""
    batch_wait_ms: float = Field(2.0, ge=0)
    """The longest a request waits for company when ``batch_requests`` > 1."""

    @model_validator(mode="after")
    def _batches_can_fill(self) -> PoolSpec:
        if self.batch_requests > self.max_ongoing_requests:
            raise ValueError(
                f"pool.batch_requests={self.batch_requests} needs pool.max_ongoing_requests >= "
                f"{self.batch_requests} (got {self.max_ongoing_requests}): a replica batches "
                "only the requests it holds"
            )
        return self

    def batching(self) -> dict[str, Any] | None:
        """The replica's batching settings (None: off)."""
        if self.batch_requests == 1:
            return None
        return {"max_requests": self.batch_requests, "wait_ms": self.batch_wait_ms}


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

    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` of a range (validated present for every type but ``choice``)."""
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter has no range")
        return self.low, self.high

    def choices(self) -> list[Any]:
        """The values of a ``choice`` (validated non-empty)."""
        if not self.values:
            raise ValueError(f"a {self.type} parameter has no values")
        return self.values


class TrackingSpec(_Strict):
    """Where each trial's parameters and metrics also go; an absent section sends nothing.

    MLflow: ``true`` is a SQLite store, ``mlflow.db`` in the results folder (in
    the working directory when the results are on an object store, where SQLite
    cannot live); a string is any tracking URI (``http://mlflow:5000``,
    ``sqlite:///path/mlflow.db``). TensorBoard: ``vlmlab run`` writes each
    trial's scalars under ``<results>/tensorboard/<run id>`` (``./tensorboard``
    for remote results); a sweep uses Ray Tune's TensorBoard logger, whose event
    files sit in each trial's folder under ``<results>/tune/<name>/``.
    """

    mlflow: bool | str = False
    tensorboard: bool = False
    experiment: str | None = None
    """The MLflow experiment (default: the spec's name)."""

    @property
    def enabled(self) -> bool:
        return bool(self.mlflow) or self.tensorboard


class SweepSpec(_Strict):
    """A Ray Tune sweep: Optuna search over ``space``, ASHA on queries used."""

    space: dict[str, ParamSpec]
    """Dotted spec paths (``method.sigma``) to search ranges."""
    metric: str = Field(default_factory=lambda: get_task(DEFAULT_TASK).sweep_metrics[0])
    """Default: the task's first sweep metric (val_H for forgetting, val_acc for CraFT,
    val_safe_gain for devsafety: the target gain when DevSafety >= 0, else -1 + DevSafety);
    each task lists what it measures (``vlmlab.tasks``)."""
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
