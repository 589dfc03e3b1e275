"""The black box: the Oracle contract, the query ledger and the backends.

>>> from vlmlab.oracle import create_oracle
>>> oracle = create_oracle("conse")                      # offline stand-in
>>> oracle = create_oracle("open_clip:ViT-B-16", pretrained="openai")
"""

from __future__ import annotations

from vlmlab.errors import BudgetExceededError
from vlmlab.oracle._base import LocalOracle
from vlmlab.oracle._ledger import DEFAULT_BUDGET_KEY, QueryLedger, Reservation, Usage
from vlmlab.oracle._protocol import ImageSet, ImageSetRef, Oracle, OracleMetadata
from vlmlab.oracle._registry import create_oracle, list_backends

__all__ = [
    "DEFAULT_BUDGET_KEY",
    "BudgetExceededError",
    "ImageSet",
    "ImageSetRef",
    "LocalOracle",
    "Oracle",
    "OracleMetadata",
    "QueryLedger",
    "Reservation",
    "Usage",
    "create_oracle",
    "list_backends",
]
