"""The CoOp settings a prompt task's method section shares (``name: coop``).

CoOp is the white-box reference row of the forgetting and CraFT tables
(:mod:`vlmlab.methods.coop`): a task that offers it adds ``"coop"`` to its
variants, a ``coop:`` field (:class:`CoOpSettings`) to its method spec, and answers
:meth:`~vlmlab.tasks.Task.is_white_box` for it, so the drivers train it in its
own actor on an in-process backend instead of querying the pool.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from vlmlab.methods.coop import CoOpConfig
from vlmlab.tasks._base import StrictModel

COOP = "coop"
"""The variant name of the white-box reference."""


class CoOpSettings(StrictModel):
    """A method section's ``coop:`` settings (its paper's defaults), used by ``name: coop``."""

    epochs: int = Field(50, ge=1)
    """Epochs over the k-shot training images (the trial's generations)."""
    lr: float = Field(0.002, gt=0)
    """SGD's learning rate (momentum 0.9, weight decay 5e-4, cosine decay)."""
    batch_size: int = Field(32, ge=1)
    init: Literal["prompt", "random"] = "prompt"
    """Start from the spec prompt's words, or from N(0, 0.02)."""

    def config(self, n_context: int) -> CoOpConfig:
        return CoOpConfig(
            n_context=n_context,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            init=self.init,
        )


def is_coop(method: Any) -> bool:
    return str(getattr(method, "name", "")) == COOP
