"""Experiment specs: pydantic models loaded from YAML, with overrides.

>>> from vlmlab.specs import load_spec
>>> spec = load_spec("experiments/quickstart.yaml", ["method.popsize=30"])

The method section belongs to the spec's task (``vlmlab.tasks``); backend
names come from the backend registry (``vlmlab.oracle.list_backends``),
dataset names from the dataset registry.
"""

from __future__ import annotations

from vlmlab.specs._load import apply_overrides, load_spec, validate_spec
from vlmlab.specs._preflight import Preflight, preflight
from vlmlab.specs._run import RunSpec
from vlmlab.specs._sections import (
    RANDOM_INIT,
    BackendSpec,
    BudgetSpec,
    DataSpec,
    ParamSpec,
    PoolSpec,
    SpecError,
    StudySpec,
    SweepSpec,
    TrackingSpec,
)

__all__ = [
    "RANDOM_INIT",
    "BackendSpec",
    "BudgetSpec",
    "DataSpec",
    "ParamSpec",
    "PoolSpec",
    "Preflight",
    "RunSpec",
    "SpecError",
    "StudySpec",
    "SweepSpec",
    "TrackingSpec",
    "apply_overrides",
    "load_spec",
    "preflight",
    "validate_spec",
]
