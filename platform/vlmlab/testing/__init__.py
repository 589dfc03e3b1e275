"""Test harnesses shipped with vlmlab, for its own tests and for new backends.

- :class:`OracleConformance`: the Oracle contract as a pytest test case; a new
  oracle passes it or is not an oracle.
- :class:`LocalCluster`: a real multi-node Ray cluster on one machine (one
  ``ray start`` process group a node) for node-loss tests and rehearsals.

Importing this package needs pytest (the ``dev`` extra).
"""

from __future__ import annotations

from vlmlab.testing._conformance import CLASS_NAMES, OracleConformance, random_contexts
from vlmlab.testing._local_cluster import LocalCluster

__all__ = ["CLASS_NAMES", "LocalCluster", "OracleConformance", "random_contexts"]
