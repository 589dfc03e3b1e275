"""CoOp as a variant of a prompt task (``name: coop``).

CoOp is the white-box reference row of the forgetting and CraFT tables
(:mod:`vlmlab.methods.coop`): a method config that offers it adds ``"coop"`` to its
variants and a ``coop:`` field (:class:`~vlmlab.methods.coop.CoOpSettings`), and its
task answers :meth:`~vlmlab.tasks.Task.is_white_box` for it, so the drivers train it
in its own actor on an in-process backend instead of querying the pool.
"""

from __future__ import annotations

from typing import Any

from vlmlab.methods.coop import CoOpSettings

COOP = "coop"
"""The variant name of the white-box reference."""

__all__ = ["COOP", "CoOpSettings", "is_coop"]


def is_coop(method: Any) -> bool:
    return str(getattr(method, "name", "")) == COOP
