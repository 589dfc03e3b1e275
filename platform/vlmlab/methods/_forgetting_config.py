"""Black-Box Forgetting's settings: :class:`ForgettingConfig` and the base ``safe_bbf`` shares.

Apart from the loop (:mod:`vlmlab.methods.forgetting`) so the settings read as one
page: every field with its default, its check and the official line it follows.
"""

from __future__ import annotations

from typing import Any, Literal, cast, get_args

from pydantic import Field

from vlmlab.methods._cma import Csa
from vlmlab.methods._config import MethodConfig
from vlmlab.methods._coop_config import CoOpSettings

Variant = Literal["bbf", "bbt", "wo_lcs"]
"""How the latents are searched: LCS (``bbf``), one CMA-ES (``bbt``), one per token (``wo_lcs``)."""
VARIANTS: tuple[str, ...] = get_args(Variant)
LossPrecision = Literal["fp16", "fp64"]


class LatentSearchConfig(MethodConfig):
    """The settings of Black-Box Forgetting's latent-context search (Kuwana et al. 2024
    and its official code), shared by its variants and by ``safe_bbf``. Defaults: the
    paper's CIFAR-10 setting. :class:`ForgettingConfig` names the variants."""

    n_context: int = Field(4, ge=1, le=64)
    """m, context tokens."""
    shared_dim: int = Field(20, ge=1)
    """ds, the shared latent's dimension (LCS)."""
    unique_dim: int = Field(5, ge=1)
    """du, each unique latent's dimension (LCS). BBT and w/o LCS use ds + du per token."""
    popsize: int = Field(20, ge=2)
    sigma: float = Field(1.0, gt=0)
    sep_cma: bool = False
    """Sep-CMA-ES (diagonal covariance) instead of full CMA-ES."""
    batch_size: int = Field(160, ge=1)
    """Images per loss batch (the official 160)."""
    fitness: Literal["full", "minibatch"] = "full"
    """``full``: each candidate on the whole k-shot training set, the mean of its batch
    losses (the official protocol); ``minibatch``: one random ``batch_size`` subset a
    generation (vlmlab's earlier default: cheaper on large sets, noisier)."""
    batch_order: Literal["shuffled", "shared", "sorted"] = "shuffled"
    """How ``fitness="full"`` cuts the training set into batches of ``batch_size``.
    ``shuffled`` (official, ``main.py`` L113 ``shuffle=True``, re-iterated for every candidate,
    ``train.py`` L186): a new permutation for each candidate of each generation, so every
    batch mixes forget and kept images; ``shared``: one permutation a generation for the
    whole population (vlmlab's option: the candidates are ranked on the same batches, less
    noise in the ranking); ``sorted``: consecutive chunks of the class-sorted set (vlmlab's
    earlier behaviour: on CIFAR-100 4-shot the first chunk holds only forget classes, which
    weighs the forget term a third of the official). Drawn from the checkpointed batch
    generator: no query more, and a resumed run stays bit for bit."""
    loss_precision: LossPrecision = "fp16"
    """``fp16`` (official, ``train.py`` L194-224 and ``utils.py`` L31-43 on the fp16 CLIP):
    logits rounded to fp16, an fp16 softmax, the forget term ``-(1/C) sum_c log(p_c + 1e-7)``
    and the kept images' cross-entropy rounded as CUDA's half ops round them (a class term
    caps at 15.94 nats, so one confidently recognized forget image weighs at most about 16);
    ``fp64``: the exact loss in float64, no epsilon and no cap (vlmlab's earlier loss: the
    same function without fp16's rounding, kept to study it; a confident forget image can
    then cost 30-50 nats)."""
    context_rounding: Literal["fp16", "none"] = "fp16"
    """``fp16`` (official, ``train.py`` L73 and L154-165): ``fp16(fp16(A z) + fp16(p0))``,
    whatever the oracle's own precision; ``none``: ``A z + p0`` in fp32 (an fp16 oracle
    rounds once more itself)."""
    csa: Csa = "pycma3"
    """CMA-ES step-size constants (see :class:`~vlmlab.methods._cma.CmaStrategy`): ``pycma3``,
    pycma <= 4.4's, as the official runs had them (unpinned ``cma`` in ``requirements.txt``,
    code of 2024-10); ``installed``: the installed pycma's (4.5 changes them below 40
    variables)."""
    baseline_dim: int | None = Field(None, ge=1)
    """BBT / w/o LCS: each token's latent size; None: ``(ds + m du) / m``, rounded (official)."""
    iterations: int = Field(400, ge=1)
    projection_std: float | None = Field(None, gt=0)
    """Std of A's entries; None means sigma_hat, the token-embedding table's std."""
    safety_tolerance: float = Field(0.01, ge=0, lt=1)
    """What ``safe_H`` counts as safe: DevSafety >= -tolerance (reported; never trained on)."""
    coop: CoOpSettings = Field(default_factory=CoOpSettings)
    """``name: coop``'s settings (CoOp, the white-box reference; ``n_context`` its m)."""

    @property
    def search_variant(self) -> Variant:
        """How the latents are searched (``name``, for the variants that are a search)."""
        if self.name not in VARIANTS:
            raise ValueError(f"{self.name!r} is not a latent-context search")
        return cast(Variant, self.name)

    @property
    def latent_dim(self) -> int:
        """d, the latent dimension of one context token: ds + du for LCS; for the
        baselines the same total size as LCS's, ``(ds + m du) / m`` (or ``baseline_dim``)."""
        if self.search_variant == "bbf":
            return self.shared_dim + self.unique_dim
        if self.baseline_dim is not None:
            return self.baseline_dim
        total = self.shared_dim + self.n_context * self.unique_dim
        return max(1, round(total / self.n_context))

    def record(self) -> dict[str, Any]:
        """What a checkpoint compares on resume: the search's settings (not the report's
        ``safety_tolerance`` nor CoOp's, which a CoOp checkpoint records itself)."""
        return self.model_dump(exclude={"safety_tolerance", "coop"})


class ForgettingConfig(LatentSearchConfig):
    """Black-Box Forgetting (``bbf``, with LCS), its baselines ``bbt`` and ``wo_lcs``, and
    CoOp, the white-box reference (``coop``: its ``coop:`` settings)."""

    name: Literal[Variant, "coop"] = "bbf"
