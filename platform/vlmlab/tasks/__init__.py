"""Tasks: one module per task, and the registry every upper layer reads.

- ``vlmlab.tasks.forgetting``: Black-Box Forgetting (bbf, bbt, wo_lcs).
- ``vlmlab.tasks.craft``: CraFT (craft, prompt_only, refine_only, no_consistency).
- ``vlmlab.tasks.devsafety``: Model Developmental Safety (constrained, finetune, weighted).
- ``vlmlab.tasks.safe_forgetting``: forgetting under one constraint per kept class
  (safe_bbf, beside bbf, bbt, wo_lcs).

A task module holds its method spec, metrics (and so its ``runs`` columns),
sweepable metrics, how it builds a method for one trial, its artifact and
classifier, and its report. Adding a task is one module and one
:func:`register_task` call (see :class:`Task`); nothing else changes.
"""

from __future__ import annotations

from vlmlab.tasks._base import (
    DEFAULT_TASK,
    MethodSpec,
    StrictModel,
    Task,
    TrialData,
    ensure_registered,
    get_task,
    iter_tasks,
    list_tasks,
    metric_columns_of_tasks,
    metric_names,
    reference_labels,
    reference_metrics,
    register_task,
    runs_schema_of_task,
    runs_schema_of_tasks,
    study_metrics,
    unregister_task,
)
from vlmlab.tasks.craft import CraftMethodSpec, CraftTask, craft_budget
from vlmlab.tasks.devsafety import DevSafetyMethodSpec, DevSafetyTask
from vlmlab.tasks.forgetting import ForgettingMethodSpec, ForgettingTask
from vlmlab.tasks.safe_forgetting import SafeForgettingMethodSpec, SafeForgettingTask

for _task in (ForgettingTask(), CraftTask(), DevSafetyTask(), SafeForgettingTask()):
    register_task(_task, replace=True)

__all__ = [
    "DEFAULT_TASK",
    "CraftMethodSpec",
    "CraftTask",
    "DevSafetyMethodSpec",
    "DevSafetyTask",
    "ForgettingMethodSpec",
    "ForgettingTask",
    "MethodSpec",
    "SafeForgettingMethodSpec",
    "SafeForgettingTask",
    "StrictModel",
    "Task",
    "TrialData",
    "craft_budget",
    "ensure_registered",
    "get_task",
    "iter_tasks",
    "list_tasks",
    "metric_columns_of_tasks",
    "metric_names",
    "reference_labels",
    "reference_metrics",
    "register_task",
    "runs_schema_of_task",
    "runs_schema_of_tasks",
    "study_metrics",
    "unregister_task",
]
