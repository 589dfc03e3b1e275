"""The safe-forgetting task: forgetting that may not cost any kept class.

Registered like any task (:func:`~vlmlab.tasks.register_task`), it reuses the
forgetting task's data, metrics, artifact and report, and adds the variant
``safe_bbf`` (:mod:`vlmlab.methods.safe_forgetting`: one constraint per kept
class, from the same oracle call) beside plain ``bbf``, ``bbt`` and ``wo_lcs``,
so one spec compares them on the same seeds. Its default sweep metric is
``val_safe_H``: H of a safe result, else ``-1 + DevSafety``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from vlmlab.methods import Method
from vlmlab.methods.forgetting import BlackBoxForgetting, ForgettingConfig
from vlmlab.methods.safe_forgetting import SafeBlackBoxForgetting, SafeForgettingConfig
from vlmlab.oracle import LocalOracle
from vlmlab.results import Artifact
from vlmlab.tasks.forgetting import ForgettingMethodSpec, ForgettingTask


class SafeForgettingMethodSpec(ForgettingMethodSpec):
    """Forgetting's method section plus the constraints of ``safe_bbf``."""

    name: Literal["safe_bbf", "bbf", "bbt", "wo_lcs", "coop"] = "safe_bbf"  # type: ignore[assignment]
    constraint: Literal["al", "penalty"] = "al"
    """al: pycma's augmented Lagrangian; penalty: MDS's moving-average penalty."""
    tolerance: float = 0.0
    """epsilon: how much each kept class's training loss may exceed the zero-shot prompt's
    (negative: a margin it must stay below it by)."""
    selection_tolerance: float = Field(0.0, gt=-1, lt=1)
    """How much accuracy a kept class may lose in the prompt that is the result
    (negative: a margin every kept class must gain)."""
    beta: float = Field(100.0, gt=0)
    gamma: float = Field(0.8, gt=0, le=1)
    start: Literal["prompt", "table_mean"] = "prompt"
    """prompt: search around the zero-shot prompt (feasible at the start); table_mean: BBF's."""
    prompted: Literal["forget", "all"] = "forget"
    """forget: the searched prompt on the forget classes' names, the kept ones keep the
    zero-shot prompt; all: BBF's one prompt for every class."""
    selection_images: Literal["val", "train_val"] = "train_val"
    """Whose accuracy decides that a candidate is safe: validation, or training + validation."""

    def to_config(self) -> ForgettingConfig:
        if self.name != "safe_bbf":
            return super().to_config()
        fields = set(SafeForgettingConfig.__dataclass_fields__) - {"variant"}
        return SafeForgettingConfig(variant="bbf", **self.model_dump(include=fields))


class SafeForgettingTask(ForgettingTask):
    """Forget the chosen classes while every kept class stays at least as good as zero-shot."""

    name = "safe_forgetting"
    title = "Safe forgetting"
    method_spec = SafeForgettingMethodSpec
    sweep_metrics = ("val_safe_H", "val_H", "test_H")

    def method_class(self, method: ForgettingMethodSpec) -> type[BlackBoxForgetting]:
        return SafeBlackBoxForgetting if str(method.name) == "safe_bbf" else BlackBoxForgetting

    def artifact(self, method: Method) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Forgetting's artifact; with ``prompted: forget``, also the reference prompt the
        kept classes keep and which classes the learned prompt is for."""
        tensors, facts = super().artifact(method)
        if isinstance(method, SafeBlackBoxForgetting) and method.config.prompted == "forget":
            tensors["reference_contexts"] = method.reference_contexts
            facts["prompted_classes"] = list(method.forget)
        return tensors, facts

    def classifier(
        self, artifact: Artifact, oracle: LocalOracle
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
        """The kept classes under the reference prompt, the prompted ones under the learned one."""
        prompted = artifact.manifest.get("prompted_classes")
        if prompted is None:
            return super().classifier(artifact, oracle)
        names = artifact.manifest["class_names"]
        embeddings = oracle.class_embeddings(artifact.tensors["reference_contexts"].float(), names)[
            0
        ].clone()
        learned = oracle.class_embeddings(
            artifact.tensors["contexts"].float(), [names[c] for c in prompted]
        )[0]
        embeddings[prompted] = learned
        return embeddings, None
