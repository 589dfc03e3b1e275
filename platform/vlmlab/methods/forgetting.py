"""Black-Box Forgetting (Kuwana et al., NeurIPS 2024), with its baselines.

CLIP is made to stop recognizing chosen classes (the forget set) while still
recognizing the rest (the memorize set), through its prompt alone. Each of the
m context tokens is ``ctx_i = A z_i + p0``: a latent ``z_i`` projected by a
fixed random matrix ``A`` (entries ~ N(0, sigma_hat), sigma_hat the std of the
token-embedding table) around ``p0``, the table's mean. CMA-ES searches the
latents; the oracle only scores prompts.

Variants (``ForgettingConfig.variant``):

- ``"bbf"`` - Latent Context Sharing: ``z_i = [z_s, z_u,i]``, one shared latent
  and one unique latent per token; m + 1 CMA-ES strategies (shared + each
  unique) that all receive the same fitness vector, aligned by candidate index.
- ``"bbt"`` - one CMA-ES over the concatenation of m independent latents.
- ``"wo_lcs"`` - m independent CMA-ES strategies, nothing shared.

The baselines give each token a latent of the same total size as LCS's,
``(ds + m du) / m`` (the official code: 10 dims a token on CIFAR-10, 125
elsewhere), or ``baseline_dim``.

Per generation, :meth:`BlackBoxForgetting.step` makes exactly one oracle call
for the whole population, on the training images and the k-shot validation
split together (P queries). The loss is ``CE(memorize samples) + L_forget``
with ``L_forget`` the cross-entropy to the uniform distribution on forget
samples. ``fitness="full"`` (the official protocol, default) scores every
candidate on the whole k-shot training set: the unweighted mean of the losses
of its batches of ``batch_size``, which ``batch_order`` forms (``"shuffled"``,
official: a new permutation for every candidate, as each candidate re-iterates
a shuffled loader; ``"shared"``: one permutation a generation; ``"sorted"``:
consecutive chunks of the class-sorted set). The oracle call is the same in every
order, only the loss's reduction differs. ``fitness="minibatch"`` scores one
random ``batch_size`` subset a generation (cheaper per call on large sets); the
validation split scores every candidate's H, and the candidate with the best
validation H so far is the prompt that is tested. Test metrics: Err_fgt (error
on forget classes), Acc_mem (accuracy on memorized classes) and their harmonic
mean H.

Numerics as the official fp16 CLIP had them, each a named option: the loss from
fp16 logits and an fp16 softmax with the official ``log(p + 1e-7)``, so a class
term is capped at 15.94 nats (``loss_precision``); contexts rounded to fp16 as
``fp16(fp16(A z) + fp16(p0))`` (``context_rounding``); pycma <= 4.4's CSA step-size
constants (``csa``).

All state (strategies with their random generators, the batch sampler, the
best prompt, the step) round-trips through ``state_dict`` /
``load_state_dict``, so a resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from vlmlab.data import ClassPartition, ImageDataset, few_shot_split
from vlmlab.methods._cma import CSA_CHOICES, CmaStrategy, Csa
from vlmlab.methods._protocol import Metrics, StepRecord
from vlmlab.oracle import ImageSetRef, Oracle, OracleMetadata

DROP_CLASSES = "dropclasses"
"""The zero-query reference of :meth:`BlackBoxForgetting.reference`: the forget classes
removed from the candidate list (its metrics are ``dropclasses:<metric>``)."""

Variant = Literal["bbf", "bbt", "wo_lcs"]
VARIANTS: tuple[str, ...] = ("bbf", "bbt", "wo_lcs")
BatchOrder = Literal["shuffled", "shared", "sorted"]
BATCH_ORDERS: tuple[str, ...] = ("shuffled", "shared", "sorted")
LossPrecision = Literal["fp16", "fp64"]
LOSS_PRECISIONS: tuple[str, ...] = ("fp16", "fp64")
ContextRounding = Literal["fp16", "none"]
CONTEXT_ROUNDINGS: tuple[str, ...] = ("fp16", "none")
FP16_EPS = 1e-7
"""The official forget loss's epsilon, ``log(p + 1e-7)`` (``utils.py`` L34-39); in fp16 it
becomes 2**-23 (1.19e-7), so a class term costs at most ``-log(2**-23)`` = 15.94 nats."""


@dataclass(frozen=True)
class ForgettingConfig:
    """Hyperparameters (Kuwana et al. 2024 and its official code). Defaults: the paper's CIFAR-10 setting."""

    variant: Variant = "bbf"
    n_context: int = 4
    """m, context tokens."""
    shared_dim: int = 20
    """ds, the shared latent's dimension (LCS)."""
    unique_dim: int = 5
    """du, each unique latent's dimension (LCS). BBT and w/o LCS use ds + du per token."""
    popsize: int = 20
    sigma: float = 1.0
    sep_cma: bool = False
    """Sep-CMA-ES (diagonal covariance) instead of full CMA-ES."""
    batch_size: int = 160
    """Images per loss batch (the official 160)."""
    fitness: Literal["full", "minibatch"] = "full"
    """``full``: the whole training set a generation, the mean of its batch losses (official);
    ``minibatch``: one random ``batch_size`` subset a generation."""
    batch_order: BatchOrder = "shuffled"
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
    context_rounding: ContextRounding = "fp16"
    """``fp16`` (official, ``train.py`` L73 and L154-165): ``fp16(fp16(A z) + fp16(p0))``,
    whatever the oracle's own precision; ``none``: ``A z + p0`` in fp32 (an fp16 oracle
    rounds once more itself)."""
    csa: Csa = "pycma3"
    """CMA-ES step-size constants (see :class:`~vlmlab.methods._cma.CmaStrategy`): ``pycma3``,
    pycma <= 4.4's, as the official runs had them (unpinned ``cma`` in ``requirements.txt``,
    code of 2024-10); ``installed``: the installed pycma's (4.5 changes them below 40
    variables)."""
    baseline_dim: int | None = None
    """BBT / w/o LCS: each token's latent size; None: ``(ds + m du) / m``, rounded."""
    iterations: int = 400
    projection_std: float | None = None
    """Std of A's entries; None means sigma_hat, the token-embedding table's std."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("n_context", "shared_dim", "unique_dim", "batch_size", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.popsize < 2:
            raise ValueError(f"popsize must be >= 2, got {self.popsize}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.fitness not in ("full", "minibatch"):
            raise ValueError(f"fitness must be 'full' or 'minibatch', got {self.fitness!r}")
        if self.baseline_dim is not None and self.baseline_dim < 1:
            raise ValueError(f"baseline_dim must be >= 1, got {self.baseline_dim}")
        for name, allowed in (
            ("batch_order", BATCH_ORDERS),
            ("loss_precision", LOSS_PRECISIONS),
            ("context_rounding", CONTEXT_ROUNDINGS),
            ("csa", CSA_CHOICES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def latent_dim(self) -> int:
        """d, the latent dimension of one context token: ds + du for LCS; for the
        baselines the same total size as LCS's, ``(ds + m du) / m`` (or ``baseline_dim``)."""
        if self.variant == "bbf":
            return self.shared_dim + self.unique_dim
        if self.baseline_dim is not None:
            return self.baseline_dim
        total = self.shared_dim + self.n_context * self.unique_dim
        return max(1, round(total / self.n_context))


# --------------------------------------------------------------------- metrics
def forgetting_metrics(
    predictions: np.ndarray, labels: np.ndarray, forget_mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Err_fgt, Acc_mem and H for each row of ``predictions`` (``P x N``)."""
    predictions = np.atleast_2d(predictions)
    correct = predictions == labels[None, :]
    forget, memorize = forget_mask, ~forget_mask
    err_fgt = 1.0 - correct[:, forget].mean(axis=1) if forget.any() else np.ones(len(predictions))
    acc_mem = correct[:, memorize].mean(axis=1) if memorize.any() else np.ones(len(predictions))
    denom = err_fgt + acc_mem
    harmonic = np.where(denom > 0, 2 * err_fgt * acc_mem / np.where(denom > 0, denom, 1), 0.0)
    return {"err_fgt": err_fgt, "acc_mem": acc_mem, "H": harmonic}


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Accuracy of each row of ``predictions`` (``P x N``) on each class: ``P x C``
    (NaN for a class with no sample)."""
    predictions = np.atleast_2d(predictions)
    correct = (predictions == labels[None, :]).astype(np.float64)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    hits = np.stack([np.bincount(labels, weights=row, minlength=n_classes) for row in correct])
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / counts[None, :]


def forgetting_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    forget_mask: torch.Tensor,
    *,
    precision: LossPrecision = "fp64",
) -> torch.Tensor:
    """Per-candidate loss ``CE(memorize) + mean over forget samples of -(1/C) sum_c log p_c``.

    ``logits`` is ``P x N x C``; returns ``P`` losses (float64). ``precision="fp64"``: exact,
    in float64 (differentiable, as CoOp uses it); ``"fp16"``: the official code's fp16
    numerics (:func:`_forgetting_loss_fp16`).
    """
    if precision == "fp16":
        return _forgetting_loss_fp16(logits, labels, forget_mask)
    if precision != "fp64":
        raise ValueError(f"precision must be one of {LOSS_PRECISIONS}, got {precision!r}")
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    loss = torch.zeros(logits.shape[0], dtype=torch.float64)
    memorize = ~forget_mask
    if memorize.any():
        picked = log_probs[:, memorize].gather(
            -1, labels[memorize].view(1, -1, 1).expand(logits.shape[0], -1, 1)
        )
        loss = loss - picked.squeeze(-1).mean(dim=1)
    if forget_mask.any():
        loss = loss - log_probs[:, forget_mask].mean(dim=(1, 2))
    return loss


def _half(values: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and carry on in fp32, as CUDA's half ops compute in fp32 and round once."""
    return values.half().float()


def _forgetting_loss_fp16(
    logits: torch.Tensor, labels: torch.Tensor, forget_mask: torch.Tensor
) -> torch.Tensor:
    """The official loss of one batch with its fp16 roundings (``P`` losses, float64).

    ``train.py`` L194 ``soft_out = softmax(outputs)`` on fp16 logits; L217
    ``ce_loss(outputs[mem], labels[mem])``; L220 ``crossentropyloss_max(soft_out[fgt], 1/C)``,
    which is ``utils.py`` L31-43: ``-sum(sum(t * log(p + 1e-7), 1)) / len``; L221 the sum,
    in fp16. Every elementwise result and every reduction's output is rounded to fp16, the
    arithmetic in between in fp32. Measured against the official chain run on CUDA (an
    H200, torch 2.11; fp16 logits of 10 to 1,000 classes, 1,500 batches): equal bit for
    bit. The official CE of a batch without kept images is NaN; here it is left out
    (only the ``sorted`` order makes such batches).
    """
    z = _half(logits.float())
    n_candidates, _, n_classes = z.shape
    loss = torch.zeros(n_candidates, dtype=torch.float32)
    memorize = ~forget_mask
    if memorize.any():
        log_probs = _half(torch.log_softmax(z[:, memorize], dim=-1))
        index = labels[memorize].view(1, -1, 1).expand(n_candidates, -1, 1)
        loss = _half(-log_probs.gather(-1, index).squeeze(-1).mean(dim=1))
    if forget_mask.any():
        probs = _half(torch.softmax(z[:, forget_mask], dim=-1))
        terms = _half((1.0 / n_classes) * _half(torch.log(_half(probs + FP16_EPS))))
        per_image = _half(terms.sum(dim=-1))
        forget_term = _half(_half(per_image.sum(dim=1)) / int(forget_mask.sum()))
        loss = _half(loss - forget_term)
    return loss.double()


# ---------------------------------------------------------------- the search
class LatentContextSearch:
    """Ask/tell over context tokens: CMA-ES strategies + the fixed projection.

    Knows nothing of oracles or data: ``ask`` gives contexts ``P x m x D``,
    ``tell`` takes their losses.
    """

    def __init__(self, config: ForgettingConfig, metadata: OracleMetadata, seed: int) -> None:
        self.config = config
        seeds = np.random.SeedSequence(seed).spawn(config.n_context + 2)
        projection_rng = np.random.default_rng(seeds[0])
        std = config.projection_std if config.projection_std is not None else metadata.embedding_std
        d, m = config.latent_dim, config.n_context
        # A: D x d, fixed for the whole run (no bias); p0: the table mean.
        self.projection = projection_rng.normal(0.0, std, size=(metadata.token_dim, d)).astype(
            np.float32
        )
        self.center = metadata.embedding_mean.numpy().astype(np.float32)
        common: dict[str, Any] = {
            "popsize": config.popsize,
            "sigma": config.sigma,
            "diagonal": config.sep_cma,
            "csa": config.csa,
        }
        if config.variant == "bbf":
            dims = [config.shared_dim] + [config.unique_dim] * m
        elif config.variant == "bbt":
            dims = [d * m]
        else:
            dims = [d] * m
        self.strategies = [
            CmaStrategy(dim, seed=s, **common) for dim, s in zip(dims, seeds[1:], strict=False)
        ]
        self._pending: list[np.ndarray] | None = None

    def latents(self, samples: Sequence[np.ndarray]) -> np.ndarray:
        """Per-strategy samples -> latents ``P x m x d``."""
        config = self.config
        if config.variant == "bbf":
            shared, uniques = samples[0], samples[1:]
            return np.stack(
                [np.concatenate([shared, unique], axis=1) for unique in uniques], axis=1
            )
        if config.variant == "bbt":
            return samples[0].reshape(config.popsize, config.n_context, config.latent_dim)
        return np.stack(samples, axis=1)

    def to_contexts(self, latents: np.ndarray) -> torch.Tensor:
        """``ctx_i = A z_i + p0`` for latents ``P x m x d`` (fp32; with ``context_rounding``
        ``fp16``, ``fp16(fp16(A z_i) + fp16(p0))``, the official ``train.py`` L154-165)."""
        projected = latents.astype(np.float32) @ self.projection.T
        if self.config.context_rounding == "fp16":
            rounded = torch.from_numpy(projected).half() + torch.from_numpy(self.center).half()
            return rounded.float()
        return torch.from_numpy(projected + self.center)

    def ask(self) -> torch.Tensor:
        if self._pending is not None:
            raise RuntimeError("ask() called twice without tell()")
        self._pending = [strategy.ask() for strategy in self.strategies]
        return self.to_contexts(self.latents(self._pending))

    def tell(self, losses: np.ndarray) -> None:
        if self._pending is None:
            raise RuntimeError("tell() called before ask()")
        # One fitness vector for every strategy, aligned by candidate index.
        for strategy, samples in zip(self.strategies, self._pending, strict=True):
            strategy.tell(samples, losses)
        self._pending = None

    def mean_contexts(self) -> torch.Tensor:
        """The contexts at the strategies' means (``1 x m x D``)."""
        means = [strategy.mean[None, :] for strategy in self.strategies]
        config = self.config
        if config.variant == "bbt":
            latents = means[0].reshape(1, config.n_context, config.latent_dim)
        elif config.variant == "bbf":
            latents = np.stack([np.concatenate([means[0], u], axis=1) for u in means[1:]], axis=1)
        else:
            latents = np.stack(means, axis=1)
        return self.to_contexts(latents)

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategies": [strategy.state_bytes() for strategy in self.strategies],
            "pending": self._pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for strategy, blob in zip(self.strategies, state["strategies"], strict=True):
            strategy.load_state_bytes(blob)
        self._pending = state["pending"]


# -------------------------------------------------------------------- the task
@dataclass(frozen=True)
class ForgettingData:
    """What a forgetting run works on: images registered with the oracle, and labels.

    ``pool`` holds the k-shot training and validation images together, so one
    oracle call per generation scores both; ``train_index`` and ``val_index``
    are positions in it.
    """

    dataset: str
    class_names: list[str]
    partition: ClassPartition
    pool: ImageSetRef
    train_index: np.ndarray
    train_labels: np.ndarray
    val_index: np.ndarray
    val_labels: np.ndarray
    test: ImageSetRef
    test_labels: np.ndarray


@dataclass
class _Best:
    contexts: torch.Tensor | None = None
    val: dict[str, float] = field(
        default_factory=lambda: {"H": -1.0, "err_fgt": 0.0, "acc_mem": 0.0}
    )
    generation: int = -1


class BlackBoxForgetting:
    """Runs a forgetting search over any :class:`~vlmlab.oracle.Oracle`.

    Args:
        oracle: the black box (in-process or a pool client).
        task: registered images and labels (see :class:`ForgettingData`).
        config: hyperparameters.
        seed: seeds the projection, every strategy and the batch sampler.
        max_queries: optimization budget; generations = min(iterations,
            max_queries // popsize). Set on the oracle's ledger for ``budget_key``.
        budget_key: ledger key of the optimization queries.
        eval_key: ledger key of test evaluations (kept apart from the budget).
        reference_prompt: the zero-shot words (``"a photo of a"``) that DevSafety
            compares every kept class against.
        safety_tolerance: what ``safe_H`` counts as safe, DevSafety >= -tolerance
            (reported only; plain BBF never uses it in its search).
    """

    def __init__(
        self,
        oracle: Oracle,
        task: ForgettingData,
        config: ForgettingConfig,
        *,
        seed: int,
        max_queries: int | None = None,
        budget_key: str = "train",
        eval_key: str = "eval",
        reference_prompt: str = "a photo of a",
        safety_tolerance: float = 0.01,
    ) -> None:
        self.oracle = oracle
        self.reference_prompt = reference_prompt
        self.safety_tolerance = safety_tolerance
        self._reference_cache: dict[str, np.ndarray] = {}
        self.task = task
        self.config = config
        self.seed = seed
        self.budget_key = budget_key
        self.eval_key = eval_key
        self.search = LatentContextSearch(config, oracle.metadata, seed)
        self.generations = config.iterations
        if max_queries is not None:
            if max_queries < config.popsize:
                raise ValueError(
                    f"max_queries={max_queries} cannot pay for one generation of popsize {config.popsize}"
                )
            self.generations = min(self.generations, max_queries // config.popsize)
            oracle.ledger.set_budget(budget_key, max_queries)
        self.max_queries = max_queries
        self.generation = 0
        # Counted here as well as by the ledger, so they survive a resume in a new process.
        self.queries_used = 0
        self.images_scored = 0
        self._batch_rng = np.random.default_rng(
            np.random.SeedSequence(seed).spawn(config.n_context + 3)[-1]
        )
        self._best = _Best()
        forget = task.partition.forget
        self._train_forget = torch.from_numpy(np.isin(task.train_labels, forget))
        self._train_labels = torch.from_numpy(task.train_labels.astype(np.int64))
        self._val_forget = np.isin(task.val_labels, forget)
        self._test_forget = np.isin(task.test_labels, forget)

    # ------------------------------------------------------------------ loop
    @property
    def done(self) -> bool:
        return self.generation >= self.generations

    def _sample_batch(self) -> np.ndarray:
        n = len(self.task.train_index)
        if self.config.fitness == "full" or self.config.batch_size >= n:
            return np.arange(n)
        return np.sort(self._batch_rng.choice(n, self.config.batch_size, replace=False))

    def _orders(self, n: int, population: int) -> np.ndarray | None:
        """Each candidate's order of the ``n`` scored images (``population x n``), drawn from
        the batch generator; None: consecutive chunks as given (``sorted``, ``minibatch``, or
        a single batch, whose loss no order changes)."""
        config = self.config
        if config.fitness != "full" or config.batch_order == "sorted" or n <= config.batch_size:
            return None
        if config.batch_order == "shared":
            return np.tile(self._batch_rng.permutation(n), (population, 1))
        return np.stack([self._batch_rng.permutation(n) for _ in range(population)])

    def _chunked_losses(self, logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The unweighted mean of the losses of consecutive ``batch_size`` chunks (official
        ``train.py`` L224: ``losses.sum() / len(losses)``, a short last batch counting fully)."""
        size, precision = self.config.batch_size, self.config.loss_precision
        per_batch = []
        for start in range(0, len(rows), size):
            chunk = torch.from_numpy(rows[start : start + size])
            per_batch.append(
                forgetting_loss(
                    logits[:, start : start + len(chunk)],
                    self._train_labels[chunk],
                    self._train_forget[chunk],
                    precision=precision,
                )
            )
        return torch.stack(per_batch).mean(0)

    def _losses(self, logits: torch.Tensor, batch: np.ndarray) -> np.ndarray:
        """Each candidate's loss on ``batch`` (rows of the training set; ``logits`` in its
        order), in batches as ``batch_order`` cuts them."""
        orders = self._orders(len(batch), logits.shape[0])
        if orders is None:
            return self._chunked_losses(logits, batch).numpy()
        if self.config.batch_order == "shared":
            order = orders[0]
            return self._chunked_losses(logits[:, torch.from_numpy(order)], batch[order]).numpy()
        return torch.cat(
            [
                self._chunked_losses(logits[p : p + 1, torch.from_numpy(order)], batch[order])
                for p, order in enumerate(orders)
            ]
        ).numpy()

    def step(self) -> StepRecord:
        """One generation: ask, one oracle call (batch + validation), tell."""
        if self.done:
            raise RuntimeError(f"all {self.generations} generations have run")
        task = self.task
        batch = self._sample_batch()
        indices = np.concatenate([task.train_index[batch], task.val_index])
        contexts = self.search.ask()
        logits = self._class_logits(contexts, task.pool, indices, self.budget_key)
        train_logits, val_logits = logits[:, : len(batch)], logits[:, len(batch) :]
        losses = self._losses(train_logits, batch)
        fitness, fitness_metrics = self._fitness(losses, train_logits, batch)
        self.search.tell(fitness)

        predictions = val_logits.argmax(-1).numpy()
        val = forgetting_metrics(predictions, task.val_labels, self._val_forget)
        eligible = self._eligible(predictions, train_logits, batch)
        ranked = np.where(eligible, val["H"], -np.inf)
        top = int(np.argmax(ranked))  # first best: ties keep the lower index
        if eligible[top] and val["H"][top] > self._best.val["H"]:
            self._best = _Best(
                contexts=contexts[top : top + 1].clone(),
                val={key: float(values[top]) for key, values in val.items()},
                generation=self.generation,
            )
        self.generation += 1
        self.queries_used += len(contexts)
        self.images_scored += len(contexts) * len(indices)
        best = self._best.val
        return StepRecord(
            generation=self.generation,
            queries_used=self.queries_used,
            images_scored=self.images_scored,
            metrics={
                "train": {
                    "loss_best": float(losses.min()),
                    "loss_mean": float(losses.mean()),
                    **fitness_metrics,
                },
                "val": {
                    "H": float(val["H"][top]),
                    "best_H": best["H"],
                    "best_err_fgt": best["err_fgt"],
                    "best_acc_mem": best["acc_mem"],
                    "eligible": float(eligible.mean()),
                },
            },
            summary=f"best val H {best['H'] * 100:.2f} %",
        )

    def _class_logits(
        self,
        contexts: torch.Tensor,
        image_set: ImageSetRef,
        indices: np.ndarray | None,
        budget_key: str,
    ) -> torch.Tensor:
        """Logits ``P x N x C`` of every class under each candidate prompt: one oracle call.

        Safe forgetting may prompt only the forget classes and override this."""
        return self.oracle.logits(
            contexts, self.task.class_names, image_set, indices=indices, budget_key=budget_key
        )

    def _fitness(
        self, losses: np.ndarray, train_logits: torch.Tensor, batch: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float]]:
        """What CMA-ES ranks (plain BBF: the losses), and metrics about it for the steps table.

        Safe forgetting overrides it with constraint handling on the same logits."""
        return losses, {}

    def _eligible(
        self, val_predictions: np.ndarray, train_logits: torch.Tensor, batch: np.ndarray
    ) -> np.ndarray:
        """Which candidates may become the result (plain BBF: all of them, at no cost)."""
        return np.ones(len(val_predictions), dtype=bool)

    def run(self) -> list[StepRecord]:
        """Run the remaining generations (callers wanting progress call ``step``)."""
        records = []
        while not self.done:
            records.append(self.step())
        return records

    # ------------------------------------------------------------ evaluation
    @property
    def best_contexts(self) -> torch.Tensor:
        """The best-validation-H prompt so far (``1 x m x D``)."""
        if self._best.contexts is None:
            raise RuntimeError("no generation has run yet")
        return self._best.contexts

    @property
    def best_val(self) -> dict[str, float]:
        return dict(self._best.val)

    @property
    def best_generation(self) -> int:
        """1-based generation that produced the best prompt (0: none yet)."""
        return self._best.generation + 1

    def evaluate(self, split: str = "test") -> Metrics:
        """Err_fgt, Acc_mem, H, DevSafety and per-class accuracy of the result on ``split``."""
        return self.evaluate_prompt(self.best_contexts, split)

    def reference(self, split: str, prompt: str) -> Metrics:
        """The same metrics for the hand-written ``prompt`` (its token embeddings as contexts),
        and the zero-query bound beside it, ``dropclasses:<metric>``.

        Dropping the forget classes from the candidate list forgets them completely
        (Err_fgt 1) and can only help every kept class; it needs no prompt and no
        query, and is computed here from the zero-shot logits already scored. A prompt
        on the forget classes alone (safe forgetting's ``prompted: forget``) can at
        best reach it.
        """
        contexts = self.oracle.phrase_embeddings(prompt).unsqueeze(0)
        image_set, _, _, indices = self._split(split)
        logits = self._class_logits(contexts, image_set, indices, self.eval_key)[0]
        predictions: np.ndarray = logits.argmax(-1).numpy()
        if prompt == self.reference_prompt and split not in self._reference_cache:
            self._reference_cache[split] = per_class_accuracy(
                predictions, self._split(split)[1], len(self.task.class_names)
            )[0]
        metrics = self._prompt_metrics(predictions, split)
        kept_only = logits.clone()
        kept_only[:, list(self.task.partition.forget)] = -torch.inf
        dropped = self._prompt_metrics(kept_only.argmax(-1).numpy(), split)
        metrics.update(
            {f"{DROP_CLASSES}:{name}": value for name, value in dropped.items() if ":" not in name}
        )
        return metrics

    def evaluate_prompt(self, contexts: torch.Tensor, split: str = "test") -> Metrics:
        """One prompt's metrics on the test or validation split.

        Beside H, Err_fgt and Acc_mem: ``acc:<class>`` for every class and, against
        the reference prompt (the spec's zero-shot prompt), ``delta:<class>`` for
        every kept class and ``devsafety``, the smallest of those deltas (forgetting
        must not cost a kept class, and H alone would not show it); ``safe_H`` is H
        when DevSafety >= -safety_tolerance, else ``-1 + devsafety``.
        """
        return self._prompt_metrics(self._predictions(contexts, split), split)

    def _prompt_metrics(self, predictions: np.ndarray, split: str) -> Metrics:
        """:meth:`evaluate_prompt`'s metrics of one prompt's predictions on ``split``."""
        _, labels, forget, _ = self._split(split)
        metrics = {
            key: float(values[0])
            for key, values in forgetting_metrics(predictions[None], labels, forget).items()
        }
        accuracy = per_class_accuracy(predictions, labels, len(self.task.class_names))[0]
        reference = self._reference_accuracy(split)
        kept = self.task.partition.memorize
        names = self.task.class_names
        deltas = {f"delta:{names[k]}": float(accuracy[k] - reference[k]) for k in kept}
        metrics["devsafety"] = min(deltas.values()) if deltas else 0.0
        # One number a sweep can maximize: H when safe, else below every safe run.
        safe = metrics["devsafety"] >= -self.safety_tolerance - 1e-12
        metrics["safe_H"] = metrics["H"] if safe else -1.0 + metrics["devsafety"]
        metrics.update({f"acc:{name}": float(accuracy[c]) for c, name in enumerate(names)})
        metrics.update(deltas)
        return metrics

    def _split(self, split: str) -> tuple[ImageSetRef, np.ndarray, np.ndarray, np.ndarray | None]:
        task = self.task
        if split == "test":
            return task.test, task.test_labels, self._test_forget, None
        if split == "val":
            return task.pool, task.val_labels, self._val_forget, task.val_index
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")

    def _predictions(self, contexts: torch.Tensor, split: str) -> np.ndarray:
        image_set, _, _, indices = self._split(split)
        logits = self._class_logits(contexts, image_set, indices, self.eval_key)
        predictions: np.ndarray = logits[0].argmax(-1).numpy()
        return predictions

    def _reference_accuracy(self, split: str) -> np.ndarray:
        """Per-class accuracy of the reference prompt on ``split`` (evaluated once, cached)."""
        if split not in self._reference_cache:
            contexts = self.oracle.phrase_embeddings(self.reference_prompt).unsqueeze(0)
            labels = self._split(split)[1]
            predictions = self._predictions(contexts, split)
            self._reference_cache[split] = per_class_accuracy(
                predictions, labels, len(self.task.class_names)
            )[0]
        return self._reference_cache[split]

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "config": asdict(self.config),
            "seed": self.seed,
            "generation": self.generation,
            "queries_used": self.queries_used,
            "images_scored": self.images_scored,
            "search": self.search.state_dict(),
            "batch_rng": self._batch_rng.bit_generator.state,
            "best": {
                "contexts": None
                if self._best.contexts is None
                else self._best.contexts.numpy().copy(),
                "val": dict(self._best.val),
                "generation": self._best.generation,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, ours = state.get("config") or {}, asdict(self.config)
        if saved != ours or state.get("seed") != self.seed:
            differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
            raise ValueError(
                "checkpoint was written by a run with another config or seed "
                f"(differing: {differ or ['seed']}; checkpoints written before batch_order, "
                "loss_precision, context_rounding and csa existed cannot be resumed)"
            )
        self.generation = int(state["generation"])
        self.queries_used = int(state["queries_used"])
        self.images_scored = int(state["images_scored"])
        if self.max_queries is not None and self.oracle.ledger.usage(self.budget_key).queries == 0:
            # A new process: the ledger has not seen this run's earlier queries.
            self.oracle.ledger.set_budget(self.budget_key, self.max_queries - self.queries_used)
        self.search.load_state_dict(state["search"])
        self._batch_rng.bit_generator.state = state["batch_rng"]
        best = state["best"]
        contexts = best["contexts"]
        self._best = _Best(
            contexts=None if contexts is None else torch.from_numpy(np.array(contexts)),
            val=dict(best["val"]),
            generation=int(best["generation"]),
        )

    def state_bytes(self) -> bytes:
        return pickle.dumps(self.state_dict(), protocol=pickle.HIGHEST_PROTOCOL)

    def load_state_bytes(self, blob: bytes) -> None:
        self.load_state_dict(pickle.loads(blob))


def make_forgetting_data(
    oracle: Oracle,
    train: ImageDataset,
    test: ImageDataset,
    *,
    shots: int,
    seed: int,
    partition: ClassPartition,
    val_shots: int | None = None,
) -> ForgettingData:
    """Sample k-shot train/validation sets from ``train`` and register images with ``oracle``.

    ``test`` is used as given (pass a subset for quick runs).
    """
    if train.class_names != test.class_names:
        raise ValueError("train and test splits disagree on class names")
    split = few_shot_split(train.labels, shots, seed, val_shots=val_shots)
    pool_rows = np.concatenate([split.train, split.val])
    pool = train.subset(pool_rows)
    n_train = len(split.train)
    return ForgettingData(
        dataset=train.name,
        class_names=list(train.class_names),
        partition=partition,
        pool=oracle.register_images(pool.image_set()),
        train_index=np.arange(n_train),
        train_labels=pool.labels[:n_train],
        val_index=np.arange(n_train, len(pool)),
        val_labels=pool.labels[n_train:],
        test=oracle.register_images(test.image_set()),
        test_labels=test.labels,
    )
