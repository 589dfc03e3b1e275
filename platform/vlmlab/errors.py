"""The exceptions vlmlab raises for outcomes a caller may want to handle.

Misuse (a wrong shape, an unknown name) raises the built-in ``ValueError``,
``TypeError``, ``KeyError`` or ``FileNotFoundError`` with a message that names
what is wrong; the classes here mark outcomes of correct use.
"""

from __future__ import annotations


class VlmlabError(Exception):
    """Base class of vlmlab's own outcome exceptions."""


class BudgetExceededError(VlmlabError):
    """A call would spend more queries than its budget key has left.

    The call was refused whole: no work was done and nothing was counted.
    """

    def __init__(self, key: str, requested: int, remaining: int, budget: int) -> None:
        self.key = key
        self.requested = requested
        self.remaining = remaining
        self.budget = budget
        super().__init__(
            f"query budget exceeded on key {key!r}: requested {requested} queries, "
            f"{remaining} left of {budget}"
        )


class DatasetUnavailableError(VlmlabError):
    """A dataset cannot be loaded here (offline, or files missing)."""
