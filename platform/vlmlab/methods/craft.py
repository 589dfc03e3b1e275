"""CraFT (Wang et al., ICML 2024): collaborative black-box fine-tuning.

Two modules learn together, through prompts and outputs only:

- the **prompt module**: ``ctx = p0 + reshape(A z)`` with p0 the token
  embeddings of "a photo of a" (m = 4), ``A`` a fixed random ``(m*D) x 512``
  matrix with entries ~ N(0, s), and ``z`` searched by CMA-ES (popsize 40);
- the **prediction-refinement module**: ``refined = logits + MLP(logits)``,
  an MLP C -> 256 -> C trained with Adam on the oracle's logits.

Per generation (:meth:`Craft.step`): one oracle call scores the population
and the ES mean together on the k-shot training set (P + 1 queries); each
candidate's fitness is ``CE(logits, y) + w KL(softmax(refined) || softmax(logits))``;
then one refinement epoch trains the MLP on the mean's logits with
``CE(refined, y) + w KL(softmax(logits) || softmax(refined))``. The
refinement loss's consistency term is active while the queries spent are at
most ``budget / consistency_cutoff``; the fitness keeps its weight throughout
(the official ``main_craft.py``). The test prediction is the refined logits of
the ES mean prompt.

Black-box note: the paper trains the refinement on augmented image features;
an oracle returns only logits, so here each refinement epoch runs over the
logits of every prompt of the generation (the population and the mean) on the
training images: the prompts act as augmented views (our choice).

Variants (ablations): ``craft``, ``prompt_only`` (no refinement module),
``refine_only`` (the fixed initial prompt, refinement only) and
``no_consistency`` (w = 0).
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.data import ImageDataset, few_shot_split
from vlmlab.methods._cma import CmaStrategy
from vlmlab.methods._protocol import Metrics, StepRecord
from vlmlab.oracle import ImageSetRef, Oracle

Variant = Literal["craft", "prompt_only", "refine_only", "no_consistency"]
VARIANTS: tuple[str, ...] = ("craft", "prompt_only", "refine_only", "no_consistency")


@dataclass(frozen=True)
class CraftConfig:
    """Hyperparameters (Wang et al. 2024 and the official craft_configs); defaults are the paper's."""

    variant: Variant = "craft"
    init_phrase: str = "a photo of a"
    latent_dim: int = 512
    projection_std: float = 0.2
    popsize: int = 40
    sigma: float = 1.0
    bounds: float | None = 5.0
    hidden: int = 256
    lr: float = 1e-3
    consistency_weight: float = 0.1
    consistency_cutoff: int = 1
    """n: the refinement loss's consistency term stays on while queries used <= budget / n
    (the fitness keeps its term throughout)."""
    refine_batch: int = 256
    budget: int = 8000

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.popsize < 2 or self.latent_dim < 1 or self.hidden < 1:
            raise ValueError("popsize >= 2, latent_dim >= 1 and hidden >= 1 are required")
        if self.budget < self.popsize + 1:
            raise ValueError(
                f"budget {self.budget} cannot pay for one generation ({self.popsize + 1} queries)"
            )
        if self.consistency_weight < 0 or self.consistency_cutoff < 1:
            raise ValueError("consistency_weight must be >= 0 and consistency_cutoff >= 1")


HEAD_PREFIX = "refinement."


class RefinementHead(nn.Module):
    """``logits + MLP(logits)``: a residual correction of the black box's outputs."""

    def __init__(self, n_classes: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(n_classes, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        correction: torch.Tensor = self.mlp(logits)
        return logits + correction

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RefinementHead:
        """Rebuild a trained head from an artifact's ``refinement.*`` tensors."""
        weights = {
            name.removeprefix(HEAD_PREFIX): value
            for name, value in tensors.items()
            if name.startswith(HEAD_PREFIX)
        }
        if "mlp.0.weight" not in weights:
            raise ValueError("no refinement head in these tensors (a prompt-only artifact?)")
        hidden, n_classes = weights["mlp.0.weight"].shape
        head = cls(n_classes, hidden)
        head.load_state_dict(weights)
        return head.eval().requires_grad_(False)


def _kl(target_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(other)), mean over samples (last dim: classes)."""
    target = torch.log_softmax(target_logits, dim=-1)
    other = torch.log_softmax(other_logits, dim=-1)
    return (target.exp() * (target - other)).sum(-1).mean(-1)


@dataclass(frozen=True)
class CraftData:
    """Registered k-shot training images, an optional k-shot validation set and the test set.

    Validation images never train anything: they score a run for sweeps (tuning on
    the test split would leak), at evaluation queries outside the budget.
    """

    class_names: list[str]
    train: ImageSetRef
    train_labels: np.ndarray
    test: ImageSetRef
    test_labels: np.ndarray
    val: ImageSetRef | None = None
    val_labels: np.ndarray | None = None

    def split(self, name: str) -> tuple[ImageSetRef, np.ndarray]:
        if name == "test":
            return self.test, self.test_labels
        if name == "val" and self.val is not None and self.val_labels is not None:
            return self.val, self.val_labels
        if name == "train":
            return self.train, self.train_labels
        raise ValueError(
            f"no {name!r} split in this task (train, test{', val' if self.val else ''})"
        )


def make_craft_data(
    oracle: Oracle,
    train: ImageDataset,
    test: ImageDataset,
    *,
    shots: int,
    seed: int,
    val_shots: int | None = None,
) -> CraftData:
    """Sample k-shot train and validation sets from ``train``; register every split."""
    if train.class_names != test.class_names:
        raise ValueError("train and test splits disagree on class names")
    split = few_shot_split(train.labels, shots, seed, val_shots=val_shots)
    train_set, val_set = train.subset(split.train), train.subset(split.val)
    return CraftData(
        class_names=list(train.class_names),
        train=oracle.register_images(train_set.image_set()),
        train_labels=train_set.labels,
        test=oracle.register_images(test.image_set()),
        test_labels=test.labels,
        val=oracle.register_images(val_set.image_set()),
        val_labels=val_set.labels,
    )


class Craft:
    """CraFT over any :class:`~vlmlab.oracle.Oracle`; state round-trips bit for bit."""

    def __init__(
        self,
        oracle: Oracle,
        task: CraftData,
        config: CraftConfig,
        *,
        seed: int,
        budget_key: str = "craft",
        eval_key: str = "craft:eval",
    ) -> None:
        self.oracle, self.task, self.config, self.seed = oracle, task, config, seed
        self.budget_key, self.eval_key = budget_key, eval_key
        meta = oracle.metadata
        self.p0 = oracle.phrase_embeddings(config.init_phrase)
        self.n_context = self.p0.shape[0]
        seeds = np.random.SeedSequence(seed).spawn(3)
        rng = np.random.default_rng(seeds[0])
        self.projection = torch.from_numpy(
            rng.normal(
                0.0, config.projection_std, (self.n_context * meta.token_dim, config.latent_dim)
            ).astype(np.float32)
        )
        self.strategy = CmaStrategy(
            config.latent_dim,
            popsize=config.popsize,
            sigma=config.sigma,
            seed=seeds[1],
            bounds=config.bounds,
        )
        torch_seed = int(np.random.default_rng(seeds[2]).integers(2**31))
        self._torch_rng = torch.Generator().manual_seed(torch_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            self.head = RefinementHead(len(task.class_names), config.hidden)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=config.lr)
        self.labels = torch.from_numpy(task.train_labels.astype(np.int64))
        # Every mode runs as many generations (refinement epochs) as CraFT affords;
        # refine_only spends a single query on the fixed prompt's logits.
        self.generations = config.budget // (config.popsize + 1)
        oracle.ledger.set_budget(budget_key, config.budget)
        self.generation = 0
        self.queries_used = 0
        self.images_scored = 0
        self._fixed_logits: torch.Tensor | None = None  # refine_only: the one query's logits

    # ---------------------------------------------------------------- prompts
    def contexts(self, latents: np.ndarray) -> torch.Tensor:
        z = torch.from_numpy(np.asarray(latents, dtype=np.float32))
        return self.p0 + (z @ self.projection.T).view(len(z), self.n_context, -1)

    def mean_contexts(self) -> torch.Tensor:
        if self.config.variant == "refine_only":
            return self.p0.unsqueeze(0)
        return self.contexts(self.strategy.mean[None])

    def _consistency_on(self) -> bool:
        config = self.config
        if config.variant == "no_consistency":
            return False
        return self.queries_used <= config.budget / config.consistency_cutoff

    @property
    def done(self) -> bool:
        return self.generation >= self.generations

    # ------------------------------------------------------------------- loop
    def step(self) -> StepRecord:
        """One generation: one oracle call, an ES update, one refinement epoch."""
        if self.done:
            raise RuntimeError(f"all {self.generations} generations have run")
        config = self.config
        # The cutoff (budget / n) ends the refinement loss's consistency term only.
        fitness_weight = 0.0 if config.variant == "no_consistency" else config.consistency_weight
        weight = config.consistency_weight if self._consistency_on() else 0.0
        record: dict[str, float] = {}
        if config.variant == "refine_only":
            if self._fixed_logits is None:
                self._fixed_logits = self._query(self.p0.unsqueeze(0))
                self.queries_used += 1
                self.images_scored += len(self.labels)
            views, mean_logits = self._fixed_logits, self._fixed_logits[0]
        else:
            latents = self.strategy.ask()
            population = torch.cat([self.contexts(latents), self.mean_contexts()])
            logits = self._query(population)
            self.queries_used += len(population)
            self.images_scored += len(population) * len(self.labels)
            candidates, views, mean_logits = logits[:-1], logits, logits[-1]
            ce = (
                F.cross_entropy(
                    candidates.reshape(-1, candidates.shape[-1]),
                    self.labels.repeat(len(candidates)),
                    reduction="none",
                )
                .view(len(candidates), -1)
                .mean(1)
            )
            fitness = ce
            if config.variant != "prompt_only" and fitness_weight > 0:
                with torch.no_grad():
                    refined = self.head(candidates)
                fitness = ce + fitness_weight * _kl(refined, candidates)
            self.strategy.tell(latents, fitness.double().numpy())
            record["fitness_best"] = float(fitness.min())
        if config.variant != "prompt_only":
            record["refine_loss"] = self._refine_epoch(views, weight)
        # The mean's logits came with this call: its training accuracy costs no query.
        predictions = self.predict_logits(mean_logits).argmax(-1)
        record["train_acc"] = float((predictions == self.labels).float().mean())
        self.generation += 1
        return StepRecord(
            generation=self.generation,
            queries_used=self.queries_used,
            images_scored=self.images_scored,
            metrics={"train": record},
            summary=f"train acc {record['train_acc']:.3f}",
        )

    def _query(self, contexts: torch.Tensor) -> torch.Tensor:
        task = self.task
        return self.oracle.logits(
            contexts, task.class_names, task.train, budget_key=self.budget_key
        )

    def _refine_epoch(self, views: torch.Tensor, weight: float) -> float:
        """One epoch over every (prompt, image) logit row of this generation's call.

        The population's prompts act as augmented views of each image: an oracle
        gives no image features to augment, only logits.
        """
        logits = views.reshape(-1, views.shape[-1])
        all_labels = self.labels.repeat(len(views))
        order = torch.randperm(len(logits), generator=self._torch_rng)
        total = 0.0
        for start in range(0, len(order), self.config.refine_batch):
            batch = order[start : start + self.config.refine_batch]
            inputs, labels = logits[batch], all_labels[batch]
            refined = self.head(inputs)
            loss = F.cross_entropy(refined, labels)
            if weight > 0:
                loss = loss + weight * _kl(inputs, refined)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(batch)
        return total / len(order)

    def run(self) -> None:
        while not self.done:
            self.step()

    # ------------------------------------------------------------- evaluation
    def predict_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.config.variant == "prompt_only":
            return logits
        with torch.no_grad():
            refined: torch.Tensor = self.head(logits)
        return refined

    @property
    def best_generation(self) -> None:
        return None  # the final step is the result (the paper's protocol)

    def evaluate(self, split: str = "test") -> Metrics:
        """Accuracy of the ES mean prompt (refined unless prompt-only): one evaluation query."""
        return {"acc": self.accuracy(split)}

    def reference(self, split: str, prompt: str) -> Metrics:
        """Accuracy of the hand-written ``prompt``, unrefined: one evaluation query."""
        return {"acc": self.zero_shot(split, prompt)}

    def accuracy(self, split: str = "test") -> float:
        """Accuracy of the ES mean prompt (refined unless prompt-only): one evaluation query."""
        images, labels = self.task.split(split)
        logits = self.oracle.logits(
            self.mean_contexts(), self.task.class_names, images, budget_key=self.eval_key
        )[0]
        predictions = self.predict_logits(logits).argmax(-1).numpy()
        return float((predictions == labels).mean())

    def zero_shot(self, split: str = "test", phrase: str | None = None) -> float:
        """Accuracy of a hand-written prompt (default: the initial phrase), unrefined."""
        images, labels = self.task.split(split)
        contexts = self.p0 if phrase is None else self.oracle.phrase_embeddings(phrase)
        logits = self.oracle.logits(
            contexts.unsqueeze(0), self.task.class_names, images, budget_key=self.eval_key
        )[0]
        return float((logits.argmax(-1).numpy() == labels).mean())

    # --------------------------------------------------------------- artifact
    def head_tensors(self) -> dict[str, torch.Tensor]:
        """The refinement head's weights, named for an artifact (``refinement.*``)."""
        return {
            f"{HEAD_PREFIX}{name}": value.detach().clone()
            for name, value in self.head.state_dict().items()
        }

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "seed": self.seed,
            "generation": self.generation,
            "queries_used": self.queries_used,
            "images_scored": self.images_scored,
            "strategy": self.strategy.state_bytes(),
            "head": copy.deepcopy(self.head.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "torch_rng": self._torch_rng.get_state(),
            "fixed_logits": self._fixed_logits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != asdict(self.config) or state["seed"] != self.seed:
            raise ValueError("checkpoint was written by a run with another config or seed")
        self.generation = state["generation"]
        self.queries_used = state["queries_used"]
        self.images_scored = state["images_scored"]
        self.strategy.load_state_bytes(state["strategy"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._torch_rng.set_state(state["torch_rng"])
        self._fixed_logits = state["fixed_logits"]
        if self.oracle.ledger.usage(self.budget_key).queries == 0:
            self.oracle.ledger.set_budget(self.budget_key, self.config.budget - self.queries_used)

    def state_bytes(self) -> bytes:
        return pickle.dumps(self.state_dict(), protocol=pickle.HIGHEST_PROTOCOL)

    def load_state_bytes(self, blob: bytes) -> None:
        self.load_state_dict(pickle.loads(blob))
