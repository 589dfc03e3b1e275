"""The Ray layer: the Serve oracle pool and its client, the ledger actor, sweeps.

Importing this package imports Ray; ``vlmlab.methods`` never does.
"""

from __future__ import annotations

from vlmlab.distributed._ledger import LEDGER_NAME, RemoteLedger, ledger_actor
from vlmlab.distributed._local_cluster import LocalCluster
from vlmlab.distributed._parallel import deploy_for_spec, run_experiment_on_pool
from vlmlab.distributed._pool import (
    DEFAULT_APP,
    OracleReplica,
    PoolOracle,
    build_app,
    deploy_oracle_pool,
)
from vlmlab.distributed._ray import NAMESPACE, ensure_ray
from vlmlab.distributed._study import run_budget_study, study_trials
from vlmlab.distributed._sweep import run_sweep

__all__ = [
    "DEFAULT_APP",
    "LEDGER_NAME",
    "NAMESPACE",
    "LocalCluster",
    "OracleReplica",
    "PoolOracle",
    "RemoteLedger",
    "build_app",
    "deploy_for_spec",
    "deploy_oracle_pool",
    "ensure_ray",
    "ledger_actor",
    "run_budget_study",
    "run_experiment_on_pool",
    "run_sweep",
    "study_trials",
]
