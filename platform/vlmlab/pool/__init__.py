"""The oracle's Ray backend: the Serve replica pool, its client, the ledger actor.

Nothing here knows tasks or specs: a :class:`PoolOracle` is one more
:class:`~vlmlab.oracle.Oracle`, so a method runs on the pool unchanged, with
the same numbers as in-process (bit for bit; with batching on, within float
tolerance: ``tests/pool/test_batching.py``). Ray itself is imported only when a function
here first needs it (``import vlmlab.pool`` stays light).
"""

from __future__ import annotations

from vlmlab.pool._batching import BatchStats, MicroBatcher
from vlmlab.pool._ledger import JOURNAL_ENV, LEDGER_NAME, RemoteLedger, ledger_actor
from vlmlab.pool._pool import (
    DEFAULT_APP,
    OracleReplica,
    PoolOracle,
    batching_settings,
    build_app,
    deploy_oracle_pool,
    oracle_deployment,
    replica_failure,
)
from vlmlab.pool._ray import NAMESPACE, ensure_ray

__all__ = [
    "DEFAULT_APP",
    "JOURNAL_ENV",
    "LEDGER_NAME",
    "NAMESPACE",
    "BatchStats",
    "MicroBatcher",
    "OracleReplica",
    "PoolOracle",
    "RemoteLedger",
    "batching_settings",
    "build_app",
    "deploy_oracle_pool",
    "ensure_ray",
    "ledger_actor",
    "oracle_deployment",
    "replica_failure",
]
