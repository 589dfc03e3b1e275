"""The exceptions vlmlab raises for outcomes a caller may want to handle.

Misuse (a wrong shape, an unknown name) raises the built-in ``ValueError``,
``TypeError``, ``KeyError`` or ``FileNotFoundError`` with a message that names
what is wrong; the classes here mark outcomes of correct use.
"""

from __future__ import annotations

from typing import Any


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


class LimitExceededError(VlmlabError, ValueError):
    """A request asks for more work than a limit allows; it was refused before any work.

    ``limit`` is the setting's name (a served key's ``max_classes``, ``max_tokens``,
    ...), so a client can tell which one to stay under. A ``ValueError`` too: it is
    the caller's input that is too big, and code that treats bad input as
    ``ValueError`` keeps working.
    """

    def __init__(self, limit: str, requested: int, allowed: int, what: str) -> None:
        self.limit = limit
        self.requested = requested
        self.allowed = allowed
        self.what = what
        super().__init__(f"{what}: {requested} is over the limit {limit} = {allowed}")

    def __reduce__(self) -> tuple[type, tuple[str, int, int, str]]:
        # Crosses Ray process boundaries intact (Exception pickles only ``args``).
        return (type(self), (self.limit, self.requested, self.allowed, self.what))


class TrialsFailedError(VlmlabError):
    """One or more trials of an experiment raised; the others ran to their end first.

    Attributes:
        failures: ``(run_id, traceback)`` for each failed trial, in trial order; the
            traceback as text, as the trial's process formatted it (its ``runs``
            row is ``failed``, with the traceback in its ``error`` column).
        total: how many trials ran (None: not known).
        result: what the run made despite the failures: ``run_experiment``'s list
            of the completed trials' outcomes, ``run_sweep``'s ResultGrid,
            ``run_budget_study``'s run ids (None: nothing).
    """

    def __init__(
        self, failures: list[tuple[str, str]], *, total: int | None = None, result: Any = None
    ) -> None:
        self.failures = list(failures)
        self.total = total
        self.result = result
        of = f" of {total}" if total is not None else ""
        ids = ", ".join(run_id for run_id, _ in self.failures)
        last = [
            line
            for line in (self.failures[-1][1] if self.failures else "").splitlines()
            if line.strip()
        ]
        super().__init__(
            f"{len(self.failures)}{of} trial(s) failed: {ids}"
            + (f" (last: {last[-1].strip()})" if last else "")
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses process boundaries intact (Exception pickles only ``args``).
        return (_trials_failed, (self.failures, self.total, self.result))


def _trials_failed(
    failures: list[tuple[str, str]], total: int | None, result: Any
) -> TrialsFailedError:
    return TrialsFailedError(failures, total=total, result=result)
