"""Model Developmental Safety's settings: :class:`DevSafetyConfig`, one field per official flag.

Apart from the training loop (:mod:`vlmlab.methods.devsafety`) so the settings read
as one page, each with its default, its check and the official line it follows.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from vlmlab.methods._config import CropArea, MethodConfig
from vlmlab.methods._finetune import Trainable

Variant = Literal["constrained", "finetune", "weighted"]
VARIANTS: tuple[str, ...] = get_args(Variant)


class DevSafetyConfig(MethodConfig):
    """Model Developmental Safety and its baselines (see the module docstring).

    Defaults are the official scripts' values (``GangLii/DevSafety``
    ``train_foggy.sh``; ``tests/fidelity/official_devsafety.py`` lists each source).
    The class prompt template is the trial's (the spec's ``prompt``), not a setting.
    """

    name: Variant = "constrained"
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(256, ge=2)
    """Half target images, half negatives: at least 2."""
    lr: float = Field(1e-6, gt=0)
    tower_lr: float | None = Field(None, gt=0)
    """Learning rate of the text tower when it trains (``trainable: all``); None: ``lr``
    (official: one AdamW group for every parameter, ``train.py`` L143)."""
    weight_decay: float = Field(0.1, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1)
    """Share of all steps spent warming the learning rate up from zero (``warmup_steps`` None)."""
    warmup_steps: int | None = Field(500, ge=0)
    """Warm-up length in steps (official ``--warmup_length`` 500); None: ``warmup``."""
    steps_per_epoch: int | None = Field(None, ge=1)
    """Steps an epoch (official: 600 BDD, 1600 Places); None: training images / batch_size."""
    control_per_class: int = Field(10, ge=1)
    control_classes: int | None = Field(None, ge=1)
    """Protected classes in each control batch (official Places: 240 of 364; None: all)."""
    objective: Literal["contrastive", "ce"] = "contrastive"
    """contrastive: the official SogCLR-style image-caption loss (target vs negatives);
    ce: the target images' cross-entropy over all classes."""
    contrastive_t: float = Field(0.05, gt=0)
    contrastive_gamma: float = Field(0.8, gt=0, le=1)
    penalty: Literal["official", "smoothed"] = "official"
    """official: mean_k max(beta u_k, 0) L_k tau; smoothed: vlmlab's earlier smoothed
    hinge (beta tau softplus(u/tau) sigmoid(u/tau)), summed over classes."""
    constraint_logits: Literal["tau", "model"] = "tau"
    """tau: constraint losses at logit scale 1/tau (official); model: the backend's scale."""
    rank: int = Field(32, ge=1)
    trainable: Trainable = "all"
    """What trains: the target's heads, every head, + the projection, + the text tower
    (``all``), + the image tower (``full``, open_clip only: every parameter, as the
    official runs; each batch is encoded by it, so a step costs image-tower passes).
    The official value is ``full`` (the paper configs set it); the default stays ``all``
    (cached image features, any backend) because ``full`` needs open_clip and costs
    image-tower passes every step."""
    negative_head: bool = True
    """Negative captions through an extra head, so protected heads learn only from the
    constraints (official ``cls_ids=-1``); false: through their own class's head."""
    augment_views: int = Field(0, ge=0)
    """Augmented batches (official): target and control rows are scored on augmented
    images while w_old's losses stay on the clean ones. With a frozen image tower, this
    many cached views of each training image (each row's view drawn per step; costs one
    encoding of the training set per view); with ``trainable: full``, a fresh draw every
    step (any number > 0). 0: clean images only."""
    augment_scale: CropArea = (0.7, 1.0)
    """Random resized crop's area range (official ``clip.py`` L72)."""
    augment_rotation: float = Field(15.0, ge=0)
    """Random rotation's largest angle in degrees (official L73)."""
    augment_flip: bool = True
    """Random horizontal flip (official L74)."""
    beta: float = Field(100.0, ge=0)
    gamma: float = Field(0.8, gt=0, le=1)
    tau: float = Field(0.05, ge=0)
    weight: float | None = Field(None, ge=0)
    """The weighted baseline's weight on the protected losses; None: ``beta * tau`` (official)."""
    weight_reduction: Literal["mean", "sum"] = "mean"
    """mean: over the protected classes in the control batch (official SogCLR_RM); sum:
    vlmlab's earlier reading."""
    base_epochs: int = Field(0, ge=0)
    base_lr: float = Field(1e-3, gt=0)
    safety_tolerance: float = Field(0.0, ge=0, lt=1)
    """What ``safe_gain`` (the sweep metric) counts as safe: DevSafety(acc) >= -tolerance.
    0 is the paper's definition; a small slack suits validation sets where one image
    moves a class's accuracy by more than that. Never used in training."""

    @model_validator(mode="after")
    def _tau_where_divided(self) -> DevSafetyConfig:
        if self.tau == 0 and (self.penalty == "official" or self.constraint_logits == "tau"):
            raise ValueError(
                "tau must be > 0: the official penalty and constraint logits use 1/tau"
            )
        return self

    @property
    def protected_weight(self) -> float:
        """The weighted baseline's weight: ``weight``, or ``beta * tau`` (official ``SogCLR_RM``)."""
        return self.beta * self.tau if self.weight is None else self.weight
