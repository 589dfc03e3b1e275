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
from typing import Any

import torch

from vlmlab.methods import Method
from vlmlab.methods.forgetting import BlackBoxForgetting, LatentSearchConfig
from vlmlab.methods.safe_forgetting import (
    SAFE_BBF,
    SafeBlackBoxForgetting,
    SafeForgettingConfig,
)
from vlmlab.oracle import LocalOracle
from vlmlab.results import Artifact
from vlmlab.tasks.forgetting import ForgettingTask

SafeForgettingMethodSpec = SafeForgettingConfig
"""The spec's ``method`` section is the method's own config (the name of earlier versions)."""


class SafeForgettingTask(ForgettingTask):
    """Forget the chosen classes while every kept class stays at least as good as zero-shot."""

    name = "safe_forgetting"
    title = "Safe forgetting"
    method_spec = SafeForgettingConfig
    sweep_metrics = ("val_safe_H", "val_H", "test_H")

    def method_class(self, method: LatentSearchConfig) -> type[BlackBoxForgetting]:
        return SafeBlackBoxForgetting if method.name == SAFE_BBF else BlackBoxForgetting

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
