"""CoOp's settings: the ``coop:`` section a prompt task's spec carries for ``name: coop``.

Apart from :mod:`vlmlab.methods.coop` because the black-box methods' configs hold
them (CoOp is the white-box reference row of their tables) while CoOp's loop
builds on theirs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlmlab.methods._config import Settings

__all__ = ["CoOpConfig", "CoOpSettings"]


class CoOpSettings(Settings):
    """CoOp's optimization (Zhou et al. 2022; its paper's defaults)."""

    epochs: int = Field(50, ge=1)
    """Epochs over the k-shot training images (the trial's generations)."""
    lr: float = Field(0.002, gt=0)
    """SGD's learning rate (momentum 0.9, weight decay 5e-4, cosine decay)."""
    batch_size: int = Field(32, ge=1)
    init: Literal["prompt", "random"] = "prompt"
    """Start from the spec prompt's words, or from N(0, 0.02)."""

    def with_context(self, n_context: int) -> CoOpConfig:
        """These settings for a prompt of ``n_context`` tokens."""
        return CoOpConfig(**self.model_dump(), n_context=n_context)


class CoOpConfig(CoOpSettings):
    """:class:`CoOpSettings` with the prompt's length, which the task knows (m), and
    CoOp's fixed optimizer settings (its paper's; a spec does not change them)."""

    n_context: int = Field(4, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
