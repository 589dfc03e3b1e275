"""What each task brings to a trial: its method, step rows, evaluations and artifact.

The runner's loop (``vlmlab.runner``) is the same for every task: step,
record, evaluate and checkpoint every ``eval_every`` generations, write the
final row and the artifact. A :class:`TaskTrial` adapts one method to that
loop, so adding a task means adding one adapter here, not a second runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vlmlab.data import ImageDataset, partition_classes
from vlmlab.oracle import Oracle
from vlmlab.specs import RunSpec


@dataclass(frozen=True)
class StepProgress:
    """One generation, as the progress display shows it."""

    generation: int
    queries_used: int
    summary: str
    """The task's headline so far, e.g. ``best val H 0.512``."""


Row = tuple[str, str, float]
"""(split, metric, value): one row of the steps table."""


class TaskTrial(Protocol):
    """One method on one task, driven by the runner."""

    @property
    def generation(self) -> int: ...

    @property
    def generations(self) -> int: ...

    @property
    def done(self) -> bool: ...

    @property
    def queries_used(self) -> int: ...

    @property
    def images_scored(self) -> int: ...

    @property
    def best_generation(self) -> int | None: ...

    def step(self) -> tuple[StepProgress, list[Row]]: ...

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics of the current result by split (evaluation queries, outside the budget)."""
        ...

    def tune_metrics(self) -> dict[str, float]:
        """Metrics every checkpoint reports (a sweep's metric must be in each report)."""
        ...

    def final_val(self, evaluations: dict[str, dict[str, float]]) -> dict[str, float]: ...

    def zero_shot(self, prompt: str) -> dict[str, dict[str, float]]: ...

    def artifact(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _Delegating:
    """Counters and checkpoints come straight from the wrapped method."""

    method: Any

    @property
    def generation(self) -> int:
        return self.method.generation

    @property
    def generations(self) -> int:
        return self.method.generations

    @property
    def done(self) -> bool:
        return self.method.done

    @property
    def queries_used(self) -> int:
        return self.method.queries_used

    @property
    def images_scored(self) -> int:
        return self.method.images_scored

    def state_dict(self) -> dict:
        return self.method.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state)


class ForgettingTrial(_Delegating):
    """Black-Box Forgetting: the best-validation-H prompt is the result."""

    def __init__(
        self,
        spec: RunSpec,
        seed: int,
        oracle: Oracle,
        train: ImageDataset,
        test: ImageDataset,
        *,
        budget_key: str,
        eval_key: str,
    ) -> None:
        from vlmlab.methods.forgetting import BlackBoxForgetting, make_forgetting_task

        partition = partition_classes(
            train.num_classes, forget=spec.data.forget, forget_fraction=spec.data.forget_fraction
        )
        self.task = make_forgetting_task(
            oracle,
            train,
            test,
            shots=spec.shots,
            val_shots=spec.data.val_shots,
            seed=seed,
            partition=partition,
        )
        self.oracle, self.spec, self.seed = oracle, spec, seed
        self.method = BlackBoxForgetting(
            oracle,
            self.task,
            spec.method.to_config(),
            seed=seed,
            max_queries=spec.query_budget(),
            budget_key=budget_key,
            eval_key=eval_key,
        )

    @property
    def best_generation(self) -> int | None:
        return self.method.best_generation

    def step(self) -> tuple[StepProgress, list[Row]]:
        record = self.method.step()
        rows = [
            ("train", "loss_best", record.loss_best),
            ("train", "loss_mean", record.loss_mean),
            ("val", "H", record.val_H),
            ("val", "best_H", record.best_val_H),
            ("val", "best_err_fgt", record.best_val_err_fgt),
            ("val", "best_acc_mem", record.best_val_acc_mem),
        ]
        progress = StepProgress(
            record.generation, record.queries_used, f"best val H {record.best_val_H:.3f}"
        )
        return progress, rows

    def evaluate(self) -> dict[str, dict[str, float]]:
        return {"test": self.method.evaluate(self.method.best_contexts, "test")}

    def tune_metrics(self) -> dict[str, float]:
        return {"val_H": self.method.best_val["H"]}

    def final_val(self, evaluations: dict[str, dict[str, float]]) -> dict[str, float]:
        return self.method.best_val

    def zero_shot(self, prompt: str) -> dict[str, dict[str, float]]:
        contexts = self.oracle.phrase_embeddings(prompt).unsqueeze(0)
        return {split: self.method.evaluate(contexts, split) for split in ("test", "val")}

    def artifact(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"contexts": self.method.best_contexts}, {
            "kind": "forgetting",
            "class_names": self.task.class_names,
            "forget": list(self.task.partition.forget),
            "memorize": list(self.task.partition.memorize),
        }


class CraftTrial(_Delegating):
    """CraFT: the ES mean prompt and the refinement head at the final step are the result."""

    def __init__(
        self,
        spec: RunSpec,
        seed: int,
        oracle: Oracle,
        train: ImageDataset,
        test: ImageDataset,
        *,
        budget_key: str,
        eval_key: str,
    ) -> None:
        from vlmlab.methods.craft import Craft, make_craft_task

        budget = spec.query_budget()
        assert budget is not None  # CraFT specs always resolve a budget
        self.task = make_craft_task(
            oracle, train, test, shots=spec.shots, val_shots=spec.data.val_shots, seed=seed
        )
        self.oracle = oracle
        self.method = Craft(
            oracle,
            self.task,
            spec.method.to_config(budget),
            seed=seed,
            budget_key=budget_key,
            eval_key=eval_key,
        )
        self._last_val: float | None = None

    @property
    def best_generation(self) -> int | None:
        return None  # the final step is the result (the paper's protocol)

    def step(self) -> tuple[StepProgress, list[Row]]:
        record = self.method.step()
        rows = [("train", name, value) for name, value in record.items() if name != "queries_used"]
        progress = StepProgress(
            self.method.generation,
            self.method.queries_used,
            f"train acc {record['train_acc']:.3f}",
        )
        return progress, rows

    def evaluate(self) -> dict[str, dict[str, float]]:
        self._last_val = self.method.evaluate("val")
        return {"test": {"acc": self.method.evaluate("test")}, "val": {"acc": self._last_val}}

    def tune_metrics(self) -> dict[str, float]:
        return {} if self._last_val is None else {"val_acc": self._last_val}

    def final_val(self, evaluations: dict[str, dict[str, float]]) -> dict[str, float]:
        return evaluations["val"]

    def zero_shot(self, prompt: str) -> dict[str, dict[str, float]]:
        return {split: {"acc": self.method.zero_shot(split, prompt)} for split in ("test", "val")}

    def artifact(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        method = self.method
        tensors = {"contexts": method.mean_contexts()}
        if method.config.mode != "prompt_only":
            tensors.update(method.head_tensors())
        return tensors, {
            "kind": "craft",
            "class_names": self.task.class_names,
            "mode": method.config.mode,
            "refinement": method.config.mode != "prompt_only",
            "train_images": len(self.task.train_labels),
        }


def safe_gain(metrics: dict[str, float], tolerance: float = 0.0) -> float:
    """One number for a sweep to maximize: the target gain of a safe run
    (DevSafety >= -tolerance), else ``-1 + DevSafety`` (below every safe run,
    closer to safe scores higher)."""
    devsafety = metrics["devsafety"]
    return metrics["target_gain"] if devsafety >= -tolerance else -1.0 + devsafety


class DevSafetyTrial(_Delegating):
    """Model Developmental Safety: one epoch a step; the final model is the result.

    White-box: the oracle must be an in-process backend, whose parts the
    fine-tunable model copies. It spends no oracle queries (``queries_used`` is
    0); ``images_scored`` counts training images seen. The ``zeroshot_``
    reference is ``w_old``, the model before development.
    """

    def __init__(
        self,
        spec: RunSpec,
        seed: int,
        oracle: Oracle,
        train: ImageDataset,
        test: ImageDataset,
        *,
        budget_key: str,
        eval_key: str,
    ) -> None:
        from vlmlab.finetune import FineTunableModel
        from vlmlab.methods.devsafety import DevSafety, make_devsafety_task
        from vlmlab.oracle import LocalOracle

        if not isinstance(oracle, LocalOracle):
            raise TypeError(
                f"the {spec.task} task trains the model: it needs an in-process backend, "
                f"not {type(oracle).__name__}"
            )
        config = spec.method.to_config()
        self.safety_tolerance = spec.method.safety_tolerance
        self.model = FineTunableModel(
            oracle, train.class_names, rank=config.rank, prompt=config.prompt, seed=seed
        )
        self.task = make_devsafety_task(
            self.model,
            train,
            test,
            per_class=spec.shots,
            val_per_class=spec.data.val_shots or spec.shots,
            seed=seed,
            target=spec.data.target,
        )
        self.method = DevSafety(self.model, self.task, config, seed=seed)
        self._last_val: dict[str, float] = {}

    @property
    def best_generation(self) -> int | None:
        return None

    def step(self) -> tuple[StepProgress, list[Row]]:
        record = self.method.step()  # its train rows carry every constraint value
        val, changes = self.method.evaluate_with_changes("val")
        rows: list[Row] = [("train", name, value) for name, value in record.items()]
        rows += [("val", name, val[name]) for name in ("target_acc", "target_gain", "devsafety")]
        rows += [("val", f"acc_change_{c}", change) for c, change in changes.items()]
        progress = StepProgress(
            self.method.epoch,
            0,
            f"val gain {val['target_gain']:+.3f} DevSafety {val['devsafety']:+.3f}",
        )
        return progress, rows

    def _with_score(self, metrics: dict[str, float]) -> dict[str, float]:
        return {**metrics, "safe_gain": safe_gain(metrics, self.safety_tolerance)}

    def evaluate(self) -> dict[str, dict[str, float]]:
        self._last_val = self._with_score(self.method.evaluate("val"))
        return {"test": self._with_score(self.method.evaluate("test")), "val": self._last_val}

    def tune_metrics(self) -> dict[str, float]:
        return {f"val_{name}": value for name, value in self._last_val.items()}

    def final_val(self, evaluations: dict[str, dict[str, float]]) -> dict[str, float]:
        return evaluations["val"]

    def zero_shot(self, prompt: str) -> dict[str, dict[str, float]]:
        return {
            split: self._with_score(self.method.evaluate_old(split)) for split in ("test", "val")
        }

    def artifact(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        with torch.no_grad():
            embeddings = self.model.class_embeddings().detach().cpu().clone()
        tensors = {
            **self.model.trainable_state(),
            "class_embeddings": embeddings,
            "old_class_embeddings": self.method.old_embeddings.detach().cpu().clone(),
        }
        config = self.method.config
        return tensors, {
            "kind": "devsafety",
            "class_names": self.task.class_names,
            "target": list(self.task.target),
            "protected": list(self.task.protected),
            "trainable": config.trainable,
            "rank": config.rank,
            "prompt": config.prompt,
            "logit_scale": self.model.logit_scale,
            "logit_bias": self.model.logit_bias,
        }


TRIALS: dict[str, type] = {
    "forgetting": ForgettingTrial,
    "craft": CraftTrial,
    "devsafety": DevSafetyTrial,
}


def make_trial(
    spec: RunSpec,
    seed: int,
    oracle: Oracle,
    train: ImageDataset,
    test: ImageDataset,
    *,
    budget_key: str,
    eval_key: str,
) -> TaskTrial:
    """The adapter of ``spec.task`` (an expanded spec: one method, one shot count)."""
    return TRIALS[spec.task](
        spec, seed, oracle, train, test, budget_key=budget_key, eval_key=eval_key
    )
