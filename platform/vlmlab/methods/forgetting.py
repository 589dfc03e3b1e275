"""Black-Box Forgetting (Kuwana et al., NeurIPS 2024), with its baselines.

CLIP is made to stop recognizing chosen classes (the forget set) while still
recognizing the rest (the memorize set), through its prompt alone. Each of the
m context tokens is ``ctx_i = A z_i + p0``: a latent ``z_i`` projected by a
fixed random matrix ``A`` (entries ~ N(0, sigma_hat), sigma_hat the std of the
token-embedding table) around ``p0``, the table's mean. CMA-ES searches the
latents; the oracle only scores prompts.

Variants (``ForgettingConfig.name``):

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlmlab.methods._config import config_changes
from vlmlab.methods._forgetting_config import (
    VARIANTS,
    ForgettingConfig,
    LatentSearchConfig,
    Variant,
)
from vlmlab.methods._forgetting_data import ForgettingData, make_forgetting_data
from vlmlab.methods._forgetting_loss import (
    FP16_EPS,
    LossPrecision,
    forgetting_loss,
    forgetting_metrics,
    per_class_accuracy,
)
from vlmlab.methods._latent_search import LatentContextSearch
from vlmlab.methods._protocol import Metrics, StepRecord
from vlmlab.oracle import ImageSetRef, Oracle

__all__ = [
    "DROP_CLASSES",
    "FP16_EPS",
    "VARIANTS",
    "BlackBoxForgetting",
    "ForgettingConfig",
    "ForgettingData",
    "LatentContextSearch",
    "LatentSearchConfig",
    "LossPrecision",
    "Variant",
    "forgetting_loss",
    "forgetting_metrics",
    "make_forgetting_data",
    "per_class_accuracy",
]

DROP_CLASSES = "dropclasses"
"""The zero-query reference of :meth:`BlackBoxForgetting.reference`: the forget classes
removed from the candidate list (its metrics are ``dropclasses:<metric>``)."""


# -------------------------------------------------------------------- the task
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
            max_queries // popsize). The ledger's cap on ``budget_key`` is the harness's.
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
        config: LatentSearchConfig,
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
            "config": self.config.record(),
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
        differ = config_changes(state.get("config") or {}, self.config.record())
        if differ or state.get("seed") != self.seed:
            raise ValueError(
                "checkpoint was written by a run with another config or seed "
                f"(differing: {differ or ['seed']}; checkpoints written before batch_order, "
                "loss_precision, context_rounding and csa existed cannot be resumed)"
            )
        self.generation = int(state["generation"])
        self.queries_used = int(state["queries_used"])
        self.images_scored = int(state["images_scored"])
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
