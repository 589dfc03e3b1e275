"""Methods: plain PyTorch/numpy loops over an Oracle, or over a fine-tunable model.

Every method implements :class:`Method` (``step`` / ``evaluate`` /
``reference`` / ``state_dict``); see ``vlmlab.methods._protocol`` for the
lifecycle and the invariants. No Ray here: the same loop runs in-process or
against the Serve pool, because the pool's client is just another oracle.

- ``vlmlab.methods.forgetting``: Black-Box Forgetting (BBF with LCS, BBT, w/o LCS).
- ``vlmlab.methods.safe_forgetting``: BBF under one constraint per kept class (safe_bbf).
- ``vlmlab.methods.craft``: CraFT (prompt module + prediction refinement).
- ``vlmlab.methods.devsafety``: Model Developmental Safety (white-box).
- :func:`zero_shot`: the hand-written prompt every method is compared against.
"""

from __future__ import annotations

from vlmlab.methods._config import MethodConfig, PopulationSearch, Settings, config_changes
from vlmlab.methods._finetune import TRAINABLE, FineTunableModel, Trainable
from vlmlab.methods._protocol import Method, Metrics, StepRecord
from vlmlab.methods.zeroshot import ZeroShotResult, zero_shot

__all__ = [
    "TRAINABLE",
    "FineTunableModel",
    "Method",
    "MethodConfig",
    "Metrics",
    "PopulationSearch",
    "Settings",
    "StepRecord",
    "Trainable",
    "ZeroShotResult",
    "config_changes",
    "zero_shot",
]
