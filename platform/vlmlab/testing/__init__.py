"""Test harnesses shipped with vlmlab, for its own tests and for new backends.

- :class:`OracleConformance`: the Oracle contract as a pytest test case; a new
  oracle passes it or is not an oracle.
- :class:`LocalCluster`: a real multi-node Ray cluster on one machine (one
  ``ray start`` process group a node) for node-loss tests and rehearsals.
- :class:`LoopbackS3`: a real S3-compatible server (moto's) on loopback, for
  results on an object store without a cloud.
- :class:`LoopbackGCS`: a real GCS-compatible server (fake-gcs-server) on
  loopback, reached through Google's usual credential chain.
- :class:`LoopbackPostgres`: a real PostgreSQL server (pgserver's binaries) on
  loopback, for the ledger shared by several services.

Importing this package needs pytest (the ``dev`` extra).
"""

from __future__ import annotations

from vlmlab.testing._conformance import CLASS_NAMES, OracleConformance, random_contexts
from vlmlab.testing._gcs import LoopbackGCS
from vlmlab.testing._local_cluster import LocalCluster
from vlmlab.testing._postgres import LoopbackPostgres
from vlmlab.testing._s3 import LoopbackS3

__all__ = [
    "CLASS_NAMES",
    "LocalCluster",
    "LoopbackGCS",
    "LoopbackPostgres",
    "LoopbackS3",
    "OracleConformance",
    "random_contexts",
]
