"""The query ledger: every oracle query reserved, committed or released against a budget.

One account book, three homes for it: :class:`QueryLedger` in memory,
:class:`JournaledLedger` journaled to a SQLite file (survives a restart), and
:class:`PostgresLedger` in a PostgreSQL database (one book for several
services). :func:`open_ledger` picks one from a journal name. The Ray actor
that serves a ledger to a cluster lives with the pool
(:func:`vlmlab.pool.ledger_actor`); this package knows nothing of Ray.
"""

from vlmlab.ledger._book import (
    DEFAULT_BUDGET_KEY,
    Ledger,
    QueryLedger,
    Reservation,
    Usage,
    metered,
)
from vlmlab.ledger._postgres import PostgresLedger, is_postgres_uri, redact_postgres_uri
from vlmlab.ledger._sqlite import JournaledLedger, open_ledger

__all__ = [
    "DEFAULT_BUDGET_KEY",
    "JournaledLedger",
    "Ledger",
    "PostgresLedger",
    "QueryLedger",
    "Reservation",
    "Usage",
    "is_postgres_uri",
    "metered",
    "open_ledger",
    "redact_postgres_uri",
]
