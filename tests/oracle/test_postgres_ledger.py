"""The PostgreSQL ledger: one account book for several services, on a real server.

Every test gets a fresh database on the session's loopback PostgreSQL server
(``vlmlab.testing.LoopbackPostgres``); each ``PostgresLedger`` is one service
with its own connection, as two clusters charging the same keys would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from vlmlab.errors import BudgetExceededError
from vlmlab.oracle import PostgresLedger, Reservation, open_ledger, redact_postgres_uri


def test_the_book_survives_a_redeploy_and_is_the_same_for_every_service(postgres_ledger):
    first = PostgresLedger(postgres_ledger, service="eu")
    first.set_budget("api:alice", 100)
    for _ in range(3):
        held = first.reserve("api:alice", 20)
        first.commit(held, images_scored=640, prompts_encoded=200, wall_seconds=0.5)
    open_call = first.reserve("api:alice", 5)
    first.close()  # the service is redeployed

    again, other = PostgresLedger(postgres_ledger), PostgresLedger(postgres_ledger, service="us")
    account = other.account("api:alice")
    assert (account["queries"], account["reserved"], account["budget"]) == (60, 5, 100)
    assert account["calls"] == 3 and account["wall_seconds"] == pytest.approx(1.5)
    assert other.usage("api:alice").images_scored == 1920
    again.commit(open_call, images_scored=1, prompts_encoded=1, wall_seconds=0.0)
    assert other.remaining("api:alice") == 35 and again.remaining("api:alice") == 35
    with pytest.raises(BudgetExceededError):
        other.reserve("api:alice", 36)  # refused whole by the other service
    with pytest.raises(KeyError):
        other.commit(open_call, images_scored=1, prompts_encoded=1, wall_seconds=0.0)
    assert other.keys() == ["api:alice"]
    services = {event["service"] for event in other.events("api:alice")}
    assert "eu" in services and "us" not in services  # the refusal changed nothing


def test_services_reserving_at_once_never_pass_the_budget_together(postgres_ledger):
    services = [PostgresLedger(postgres_ledger, service=f"s{i}") for i in range(4)]
    services[0].set_budget("shared", 100)
    granted = [0] * len(services)
    refused = [0] * len(services)

    def spend(index: int) -> None:
        ledger = services[index]
        for _ in range(30):
            try:
                held = ledger.reserve("shared", 3)
            except BudgetExceededError:
                refused[index] += 1
                continue
            ledger.commit(held, images_scored=3, prompts_encoded=3, wall_seconds=0.0)
            granted[index] += 3

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(len(services))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    account = services[1].account("shared")
    assert sum(granted) == account["queries"] == 99  # 33 calls of 3; the 34th cannot fit
    assert sum(refused) == 4 * 30 - 33 and account["reserved"] == 0
    assert sum(1 for g in granted if g) >= 2  # the services really interleaved
    tickets = [e["ticket"] for e in services[2].events("shared") if e["op"] == "reserve"]
    assert len(tickets) == len(set(tickets)) == 33  # one sequence: unique across services


def test_a_lapsed_lease_is_dropped_on_the_servers_clock_and_counted_as_expired(postgres_ledger):
    ledger = PostgresLedger(postgres_ledger)
    ledger.set_budget("k", 10)
    leased = ledger.reserve("k", 3, ttl=0.3)
    unleased = ledger.reserve("k", 4)  # its connection lives: held however long it takes
    assert ledger.remaining("k") == 3
    time.sleep(0.5)
    account = ledger.account("k")
    assert (account["expired"], account["reserved"]) == (3, 4)
    with pytest.raises(KeyError, match="lease ran out"):
        ledger.commit(leased, images_scored=0, prompts_encoded=0, wall_seconds=0.0)
    ledger.commit(unleased, images_scored=0, prompts_encoded=0, wall_seconds=0.0)
    assert ledger.remaining("k") == 6
    ops = [event["op"] for event in ledger.events("k")]
    assert ops == ["set_budget", "reserve", "reserve", "expire", "commit"]


_SERVICE = textwrap.dedent(
    """
    import sys, time
    from vlmlab.oracle import PostgresLedger
    ledger = PostgresLedger(sys.argv[1], service="doomed")
    ledger.set_budget("k", 100)
    done = ledger.reserve("k", 10)
    ledger.commit(done, images_scored=1, prompts_encoded=1, wall_seconds=0.0)
    held = ledger.reserve("k", 7)
    print(held.ticket, flush=True)
    time.sleep(60)
    """
)


def test_sigkill_between_reserve_and_commit_loses_and_doubles_nothing(postgres_ledger):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = subprocess.Popen(
        [sys.executable, "-c", _SERVICE, postgres_ledger],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ticket = int(worker.stdout.readline())  # acknowledged: committed in the database
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    survivor = PostgresLedger(postgres_ledger, orphan_ttl_s=1.0)
    account = survivor.account("k")
    assert (account["queries"], account["reserved"], account["calls"]) == (10, 7, 1)
    # Its holder is dead: once the grace has passed, the reservation is released.
    deadline = time.monotonic() + 30
    while survivor.account("k")["reserved"] and time.monotonic() < deadline:
        time.sleep(0.2)
    account = survivor.account("k")
    assert (account["queries"], account["reserved"], account["expired"]) == (10, 0, 7)
    assert survivor.remaining("k") == 90
    with pytest.raises(KeyError):  # a late commit of it is not counted
        survivor.commit(
            Reservation("k", 7, ticket), images_scored=0, prompts_encoded=0, wall_seconds=0
        )
    assert survivor.account("k")["queries"] == 10


def test_the_factory_picks_the_book_from_the_journal_name(postgres_ledger, tmp_path):
    from vlmlab.oracle import JournaledLedger, QueryLedger

    assert type(open_ledger(None)) is QueryLedger
    assert isinstance(open_ledger(tmp_path / "book.sqlite"), JournaledLedger)
    assert isinstance(open_ledger(postgres_ledger), PostgresLedger)


def test_bad_input_and_an_unreachable_database_are_named_without_the_password(postgres_server):
    assert (
        redact_postgres_uri("postgresql://ops:s3cret@db:5432/book")
        == "postgresql://ops:***@db:5432/book"
    )
    with pytest.raises(ValueError, match="not a PostgreSQL URI"):
        PostgresLedger("mysql://ops@db/book")
    with pytest.raises(ValueError, match="orphan_ttl_s"):
        PostgresLedger(postgres_server.uri(), orphan_ttl_s=0)
    closed = f"postgresql://ops:s3cret@127.0.0.1:{postgres_server.port + 1}/book"
    with pytest.raises(ConnectionError, match="cannot reach the ledger database") as error:
        PostgresLedger(closed, connect_timeout_s=2)
    assert "s3cret" not in str(error.value) and "ops:***@" in str(error.value)
    ledger = PostgresLedger(postgres_server.uri())
    with pytest.raises(ValueError, match="budget key"):
        ledger.reserve("", 1)
    with pytest.raises(ValueError, match="max_queries"):
        ledger.set_budget("k", -1)
