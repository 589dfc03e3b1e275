"""Shared by the serving tests: three small adapters of three kinds, trained once."""

from __future__ import annotations

import shutil

import pytest

from vlmlab.runner import run_experiment
from vlmlab.specs import validate_spec

COMMON = {"backend": {"name": "conse"}, "seeds": [1], "eval_every": 2}
SPECS = {
    "forget": {
        **COMMON,
        "name": "forget",
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 60, "forget": [0, 1, 2, 3]},
        "method": {"name": "bbf", "popsize": 8, "iterations": 2, "batch_size": 20},
    },
    "craft": {
        **COMMON,
        "name": "craft",
        "task": "craft",
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 60},
        "method": {"popsize": 8},
        "budget": {"max_queries": 18},
    },
    "dev": {
        **COMMON,
        "name": "dev",
        "task": "devsafety",
        "data": {"dataset": "fashion-mnist", "shots": 10, "val_shots": 5, "test_size": 60},
        "method": {"trainable": "target_heads", "epochs": 2, "base_epochs": 2},
    },
}


@pytest.fixture(scope="session")
def adapters(conse, tmp_path_factory):
    """Three adapters of three kinds, trained briefly, in one artifact root."""
    root = tmp_path_factory.mktemp("adapters")
    for key, tree in SPECS.items():
        results = tmp_path_factory.mktemp(key)
        (outcome,) = run_experiment(validate_spec(tree, key), results, oracle=conse)
        shutil.copytree(outcome.artifact, root / outcome.run_id)
    return root
