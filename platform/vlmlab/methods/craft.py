"""CraFT (Wang et al., ICML 2024): collaborative black-box fine-tuning.

Two modules learn together, through prompts and outputs only:

- the **prompt module**: ``ctx = p0 + reshape(A z)`` with p0 the token
  embeddings of "a photo of a" (m = 4), ``A`` a fixed random ``(m*D) x 512``
  matrix with entries ~ N(0, s), and ``z`` searched by CMA-ES (popsize 40);
- the **prediction-refinement module**: ``refined = logits + MLP(logits)``,
  an MLP C -> 256 -> C trained with Adam on the oracle's logits.

Per generation (:meth:`Craft.step`), as the official ``main_craft.py`` does by
default (``head_data="views"``):

1. one oracle call scores the P candidates on the k-shot training set, seen
   through one fixed augmented view (``fitness_images="augmented"``); each
   candidate's fitness is ``CE(logits, y) + w KL(softmax(refined) || softmax(logits))``;
   P queries are charged to the budget, so a budget B runs B // P generations;
2. the **head prompt** is chosen: the mean of a fresh, unscored ``ask()``
   sample (``head_prompt="sample_mean"``, ``main_craft.py``), the best candidate
   so far (``"xbest"``, the ImageNet script) or the ES mean (``"mean"``);
3. one refinement epoch (batches of ``refine_batch``) trains the MLP on that
   prompt's logits over a freshly augmented view of the training images
   (RandomResizedCrop(scale) + flip, cut from the full-resolution originals where
   the dataset keeps them: ``augment_source="original"``), with
   ``CE(refined, y) + w KL(softmax(logits) || softmax(refined))``. Its query is
   counted under ``<budget key>:head``, outside the budget, as the official
   code does not charge it. ``views`` = K registers K views (each once, lazily)
   and cycles them; None draws a new one every generation, as the official code.

The consistency term of the refinement loss is on while the budget queries
spent, this generation's included, are at most ``budget // consistency_cutoff``
(official: ``steps += popsize`` comes before the check); the fitness keeps its
weight throughout. The result is the head prompt, refined, at the final step.

``head_data="prompts"`` is vlmlab's earlier black-box reading, kept as a named
option: the ES mean is scored with its population (P + 1 budget queries a
generation), and the refinement epoch runs over the logits of all P + 1
prompts on the un-augmented training images (the prompts act as augmented
views: 41x the rows, needs no image augmentation from the oracle), and the
result is the ES mean prompt.

Variants (ablations): ``craft``, ``prompt_only`` (no refinement module),
``refine_only`` (the fixed initial prompt, refinement only) and
``no_consistency`` (w = 0).
"""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.data import augmented_view
from vlmlab.methods._cma import CmaStrategy
from vlmlab.methods._config import config_changes
from vlmlab.methods._craft_config import (
    VARIANTS,
    AugmentSource,
    CraftConfig,
    Variant,
)
from vlmlab.methods._craft_data import FITNESS_VIEW, CraftData, make_craft_data
from vlmlab.methods._protocol import Metrics, StepRecord
from vlmlab.oracle import ImageSetRef, Oracle

__all__ = [
    "FITNESS_VIEW",
    "HEAD_PREFIX",
    "VARIANTS",
    "AugmentSource",
    "Craft",
    "CraftConfig",
    "CraftData",
    "RefinementHead",
    "Variant",
    "make_craft_data",
]


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


class Craft:
    """CraFT over any :class:`~vlmlab.oracle.Oracle`; state round-trips bit for bit."""

    def __init__(
        self,
        oracle: Oracle,
        task: CraftData,
        config: CraftConfig,
        *,
        budget: int,
        seed: int,
        init_phrase: str = "a photo of a",
        budget_key: str = "craft",
        eval_key: str = "craft:eval",
    ) -> None:
        if config.name not in VARIANTS:
            raise ValueError(f"Craft runs the variants {VARIANTS}, got {config.name!r}")
        if budget < config.queries_per_generation:
            raise ValueError(
                f"budget {budget} cannot pay for one generation "
                f"({config.queries_per_generation} queries)"
            )
        self.oracle, self.task, self.config, self.seed = oracle, task, config, seed
        self.budget, self.init_phrase = budget, init_phrase
        self.budget_key, self.eval_key = budget_key, eval_key
        meta = oracle.metadata
        self.p0 = oracle.phrase_embeddings(init_phrase)
        self.n_context = self.p0.shape[0]
        seeds = np.random.SeedSequence(seed).spawn(3)
        rng = np.random.default_rng(seeds[0])
        shape = (self.n_context * meta.token_dim, config.latent_dim)
        if config.projection_init == "uniform":
            bound = 1.0 / math.sqrt(config.latent_dim)
            projection = rng.uniform(-bound, bound, shape)
        else:
            projection = rng.normal(0.0, config.projection_std, shape)
        self.projection = torch.from_numpy(projection.astype(np.float32))
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
        if config.head_data == "views" and task.train_images is None:
            raise ValueError("head_data='views' needs the training pixels (CraftData.train_images)")
        # Every mode runs as many generations (refinement epochs) as CraFT affords.
        self.generations = config.generations(budget)
        self.head_key = f"{budget_key}:head"
        self.generation = 0
        self.queries_used = 0
        self.images_scored = 0
        self.head_queries = 0
        self._head_latent: np.ndarray | None = None  # views mode: the head (and result) prompt
        self._view_refs: dict[int, ImageSetRef] = {}
        self._fixed_logits: torch.Tensor | None = None  # prompts-mode refine_only's one query

    # ---------------------------------------------------------------- prompts
    def contexts(self, latents: np.ndarray) -> torch.Tensor:
        z = torch.from_numpy(np.asarray(latents, dtype=np.float32))
        return self.p0 + (z @ self.projection.T).view(len(z), self.n_context, -1)

    def mean_contexts(self) -> torch.Tensor:
        """The result prompt: the head prompt (views) or the ES mean (prompts); p0 at first."""
        if self.config.name == "refine_only":
            return self.p0.unsqueeze(0)
        if self.config.head_data == "views":
            if self._head_latent is None:
                return self.p0.unsqueeze(0)
            return self.contexts(self._head_latent[None])
        return self.contexts(self.strategy.mean[None])

    def _consistency_on(self) -> bool:
        config = self.config
        if config.name == "no_consistency":
            return False
        return self.queries_used <= self.budget // config.consistency_cutoff

    @property
    def done(self) -> bool:
        return self.generation >= self.generations

    # ------------------------------------------------------------------- loop
    def step(self) -> StepRecord:
        """One generation: one oracle call, an ES update, one refinement epoch."""
        if self.done:
            raise RuntimeError(f"all {self.generations} generations have run")
        views = self.config.head_data == "views"
        record = self._step_views() if views else self._step_prompts()
        self.generation += 1
        return StepRecord(
            generation=self.generation,
            queries_used=self.queries_used,
            images_scored=self.images_scored,
            metrics={"train": record},
            summary=f"train acc {record['train_acc'] * 100:.2f} %",
        )

    def _fitness(self, candidates: torch.Tensor) -> torch.Tensor:
        """CE on the training labels (+ w KL(refined || logits) unless prompt-only or w = 0)."""
        config = self.config
        ce = (
            F.cross_entropy(
                candidates.reshape(-1, candidates.shape[-1]),
                self.labels.repeat(len(candidates)),
                reduction="none",
            )
            .view(len(candidates), -1)
            .mean(1)
        )
        weight = 0.0 if config.name == "no_consistency" else config.consistency_weight
        if config.name == "prompt_only" or weight == 0:
            return ce
        with torch.no_grad():
            refined = self.head(candidates)
        return ce + weight * _kl(refined, candidates)

    def _search(
        self, extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Score the population (plus ``extra`` prompts) in one call; tell the ES."""
        latents = self.strategy.ask()
        population = self.contexts(latents)
        if extra is not None:
            population = torch.cat([population, extra])
        logits = self._query(population)
        self.queries_used += len(population)
        self.images_scored += len(population) * len(self.labels)
        fitness = self._fitness(logits[: len(latents)])
        self.strategy.tell(latents, fitness.double().numpy())
        return logits, fitness, {"fitness_best": float(fitness.min())}

    def _step_views(self) -> dict[str, float]:
        config = self.config
        record: dict[str, float] = {}
        if config.name != "refine_only":
            candidates, fitness, record = self._search()
            self._head_latent = self._choose_head_latent()
        if config.name == "prompt_only":  # no head query: the best candidate's accuracy
            predictions = candidates[int(fitness.argmin())].argmax(-1)
        else:
            logits = self._head_logits()
            weight = config.consistency_weight if self._consistency_on() else 0.0
            record["refine_loss"] = self._refine_epoch(logits[None], weight)
            predictions = self.predict_logits(logits).argmax(-1)
        record["train_acc"] = float((predictions == self.labels).float().mean())
        return record

    def _choose_head_latent(self) -> np.ndarray:
        choice = self.config.head_prompt
        if choice == "sample_mean":  # main_craft.py: a fresh, unscored sample's mean
            return np.asarray(self.strategy.ask().mean(0))
        if choice == "xbest":  # main_craft_imagenet.py
            best = self.strategy.best
            assert best is not None  # a generation has been told
            return best
        return self.strategy.mean

    def _head_logits(self) -> torch.Tensor:
        """The result prompt's logits on this generation's augmented view (one head query)."""
        view = self.generation if self.config.views is None else self.generation % self.config.views
        ref = self._view_refs.get(view)
        if ref is None:
            assert self.task.train_images is not None
            images = augmented_view(
                self.task.train_images,
                seed=self.seed,
                view=view,
                scale=self.config.augment_scale,
                source=self.config.augment_source,
            )
            ref = self.oracle.register_images(images.image_set())
            if self.config.views is not None:  # a cycled view is registered once
                self._view_refs[view] = ref
        logits = self.oracle.logits(
            self.mean_contexts(), self.task.class_names, ref, budget_key=self.head_key
        )[0]
        self.head_queries += 1
        self.images_scored += len(self.labels)
        return logits

    def _step_prompts(self) -> dict[str, float]:
        config = self.config
        record: dict[str, float] = {}
        if config.name == "refine_only":
            if self._fixed_logits is None:
                self._fixed_logits = self._query(self.p0.unsqueeze(0))
                self.queries_used += 1
                self.images_scored += len(self.labels)
            views, mean_logits = self._fixed_logits, self._fixed_logits[0]
        else:
            views, _, record = self._search(extra=self.mean_contexts())
            mean_logits = views[-1]
        if config.name != "prompt_only":
            # As in the views mode: the cutoff counts this generation's queries too.
            weight = config.consistency_weight if self._consistency_on() else 0.0
            record["refine_loss"] = self._refine_epoch(views, weight)
        # The mean's logits came with this call: its training accuracy costs no query.
        predictions = self.predict_logits(mean_logits).argmax(-1)
        record["train_acc"] = float((predictions == self.labels).float().mean())
        return record

    def _query(self, contexts: torch.Tensor) -> torch.Tensor:
        task = self.task
        return self.oracle.logits(
            contexts, task.class_names, task.train, budget_key=self.budget_key
        )

    def _refine_epoch(self, views: torch.Tensor, weight: float) -> float:
        """One epoch, in shuffled batches, over every (prompt, image) logit row of ``views``."""
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
        if self.config.name == "prompt_only":
            return logits
        with torch.no_grad():
            refined: torch.Tensor = self.head(logits)
        return refined

    @property
    def best_generation(self) -> None:
        return None  # the final step is the result (the paper's protocol)

    def evaluate(self, split: str = "test") -> Metrics:
        """Accuracy of the ES mean prompt (refined unless prompt-only): one evaluation query;
        no metrics (and no query) for a validation split the task does not have."""
        if split == "val" and not self.task.has_split(split):
            return {}
        return {"acc": self.accuracy(split)}

    def reference(self, split: str, prompt: str) -> Metrics:
        """Accuracy of the hand-written ``prompt``, unrefined: one evaluation query
        (none, and no metrics, for an absent validation split)."""
        if split == "val" and not self.task.has_split(split):
            return {}
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
            "config": self._record(),
            "seed": self.seed,
            "generation": self.generation,
            "queries_used": self.queries_used,
            "images_scored": self.images_scored,
            "strategy": self.strategy.state_bytes(),
            "head": copy.deepcopy(self.head.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "torch_rng": self._torch_rng.get_state(),
            "fixed_logits": self._fixed_logits,
            "head_latent": self._head_latent,
            "head_queries": self.head_queries,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if config_changes(state["config"], self._record()) or state["seed"] != self.seed:
            raise ValueError("checkpoint was written by a run with another config or seed")
        self.generation = state["generation"]
        self.queries_used = state["queries_used"]
        self.images_scored = state["images_scored"]
        self.strategy.load_state_bytes(state["strategy"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._torch_rng.set_state(state["torch_rng"])
        self._fixed_logits = state["fixed_logits"]
        self._head_latent = state["head_latent"]
        self.head_queries = state["head_queries"]

    def _record(self) -> dict[str, Any]:
        """The settings a checkpoint must match: the config's, the budget and the words."""
        return {**self.config.record(), "budget": self.budget, "init_phrase": self.init_phrase}

    def state_bytes(self) -> bytes:
        return pickle.dumps(self.state_dict(), protocol=pickle.HIGHEST_PROTOCOL)

    def load_state_bytes(self, blob: bytes) -> None:
        self.load_state_dict(pickle.loads(blob))
