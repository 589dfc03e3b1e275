"""Methods: plain loops over an :class:`~vlmlab.oracle.Oracle` (no Ray here)."""

from __future__ import annotations

from vlmlab.methods.zeroshot import ZeroShotResult, zero_shot

__all__ = ["ZeroShotResult", "zero_shot"]
