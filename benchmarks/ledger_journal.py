"""What journaling the query ledger adds to a call: reserve + commit, side by side in one run.

Times N reserve + commit pairs on one key, interleaved in rounds so the machine's
other load weighs on every ledger alike:

- ``memory``: :class:`~vlmlab.oracle.QueryLedger` (the account book lives as
  long as its process);
- ``journal (normal)``: :class:`~vlmlab.oracle.JournaledLedger` on a local
  file, SQLite's ``synchronous=NORMAL`` (survives a killed process);
- ``journal (full)``: the same with an fsync a transaction (survives an OS crash).
- ``postgres``: :class:`~vlmlab.oracle.PostgresLedger`, the book shared by several
  services: a PostgreSQL server on loopback (``--postgres URI``, else one
  started here with ``vlmlab.testing.LoopbackPostgres``, fsync on, PostgreSQL's
  defaults otherwise). Every call is a transaction over TCP.

Prints each one's median and p99 per pair, and the journal's added latency
(median difference to memory). The goal (issue 18): at most 2 ms added per
reserve + commit, median. The pool adds one Ray actor round trip per call on
top, with or without the journal.

    .venv/bin/python benchmarks/ledger_journal.py [--pairs 2000] [--folder DIR] [--postgres URI]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from vlmlab.oracle import JournaledLedger, PostgresLedger, QueryLedger


def _pair(ledger: Any) -> float:
    started = time.perf_counter()
    held = ledger.reserve("bench", 20)
    ledger.commit(held, images_scored=320, prompts_encoded=200, wall_seconds=0.01)
    return time.perf_counter() - started


def main(pairs: int, folder: str | None, postgres: str | None, stack: ExitStack) -> None:
    work = Path(folder or tempfile.mkdtemp(prefix="vlmlab-ledger-bench-"))
    if postgres is None:
        from vlmlab.testing import LoopbackPostgres

        server = stack.enter_context(LoopbackPostgres(fsync=True))
        postgres = server.create_database("bench")
    ledgers: dict[str, Any] = {
        "memory": QueryLedger(),
        "journal (normal)": JournaledLedger(work / "normal.sqlite", synchronous="normal"),
        "journal (full)": JournaledLedger(work / "full.sqlite", synchronous="full"),
        "postgres": PostgresLedger(postgres),
    }
    for ledger in ledgers.values():
        ledger.set_budget("bench", None)
        for _ in range(50):  # warm up: first pages, the WAL file
            _pair(ledger)
    times: dict[str, list[float]] = {name: [] for name in ledgers}
    rounds = 20
    for _ in range(rounds):
        for name, ledger in ledgers.items():
            times[name].extend(_pair(ledger) for _ in range(pairs // rounds))
    print(f"{pairs} reserve + commit pairs each, in {rounds} interleaved rounds; files in {work}")
    medians = {}
    for name, values in times.items():
        values.sort()
        medians[name] = statistics.median(values)
        p99 = values[int(0.99 * (len(values) - 1))]
        print(f"{name:18s} median {medians[name] * 1e3:8.3f} ms   p99 {p99 * 1e3:8.3f} ms")
    for name in ("journal (normal)", "journal (full)", "postgres"):
        added = (medians[name] - medians["memory"]) * 1e3
        print(f"added by {name}: {added:.3f} ms per reserve + commit (median; goal <= 2 ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--folder", default=None, help="where the journals go (default: /tmp)")
    parser.add_argument(
        "--postgres", default=None, help="a database URI (default: a loopback server started here)"
    )
    arguments = parser.parse_args()
    with ExitStack() as resources:
        main(arguments.pairs, arguments.folder, arguments.postgres, resources)
