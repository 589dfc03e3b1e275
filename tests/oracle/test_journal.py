"""The journaled ledger: every change on disk before it returns; a restart restores it all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vlmlab.errors import BudgetExceededError
from vlmlab.oracle import JournaledLedger


class Clock:
    """Monotonic and wall-clock time that tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _open(path, clock=None, **kwargs) -> JournaledLedger:
    clock = clock or Clock()
    return JournaledLedger(path, clock=clock, wall=clock, **kwargs)


def test_spent_queries_and_budgets_survive_a_restart(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = _open(path)
    ledger.set_budget("api:alice", 100)
    for _ in range(3):
        held = ledger.reserve("api:alice", 20)
        ledger.commit(held, images_scored=640, prompts_encoded=200, wall_seconds=0.5)
    ledger.close()

    again = _open(path)
    assert again.remaining("api:alice") == 40 and again.budget("api:alice") == 100
    account = again.account("api:alice")
    assert account["queries"] == 60 and account["calls"] == 3
    assert account["images_scored"] == 1920 and account["wall_seconds"] == pytest.approx(1.5)
    with pytest.raises(BudgetExceededError):
        again.reserve("api:alice", 41)  # refused whole, as before the restart


def test_a_reservation_open_at_a_restart_is_held_and_can_still_be_committed(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = _open(path)
    ledger.set_budget("trial", 50)
    open_call = ledger.reserve("trial", 20)
    ledger.close()  # the process dies between reserve and commit

    again = _open(path)
    assert again.remaining("trial") == 30  # still held: nothing lost, nothing freed early
    again.commit(open_call, images_scored=1, prompts_encoded=1, wall_seconds=0.0)
    assert again.account("trial")["queries"] == 20 and again.remaining("trial") == 30
    fresh = again.reserve("trial", 5)
    assert fresh.ticket > open_call.ticket  # tickets are never issued twice
    with pytest.raises(KeyError):  # and a commit is never counted twice
        again.commit(open_call, images_scored=1, prompts_encoded=1, wall_seconds=0.0)


def test_an_orphaned_reservation_is_dropped_after_its_grace_and_counted_as_expired(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = _open(path)
    ledger.set_budget("k", 10)
    ledger.reserve("k", 4)  # no lease: its holder may have died with the process
    leased = ledger.reserve("k", 3, ttl=30)
    ledger.close()

    clock = Clock()
    again = _open(path, clock, orphan_ttl_s=60)
    assert again.remaining("k") == 3
    clock.now += 31  # the leased one lapses first, on its own deadline
    assert again.account("k")["expired"] == 3 and again.remaining("k") == 6
    clock.now += 30
    assert again.account("k")["reserved"] == 0
    assert again.account("k")["expired"] == 7 and again.remaining("k") == 10
    with pytest.raises(KeyError):
        again.commit(leased, images_scored=0, prompts_encoded=0, wall_seconds=0.0)
    again.close()
    third = _open(path, clock)  # the expiries were journaled: not counted again
    assert third.account("k")["expired"] == 7 and third.remaining("k") == 10
    ops = [event["op"] for event in third.events("k")]
    assert ops == ["set_budget", "reserve", "reserve", "expire", "expire"]


def test_a_write_that_fails_changes_nothing(tmp_path, monkeypatch):
    ledger = _open(tmp_path / "ledger.sqlite")
    ledger.set_budget("k", 10)

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ledger, "_write", broken)
    with pytest.raises(OSError, match="disk full"):
        ledger.reserve("k", 4)
    with pytest.raises(OSError, match="disk full"):
        ledger.set_budget("k", 2)
    assert ledger.remaining("k") == 10 and ledger.budget("k") == 10


def test_the_audit_is_a_query_over_the_journal(tmp_path):
    ledger = _open(tmp_path / "ledger.sqlite")
    ledger.set_budget("k", 10)
    done = ledger.reserve("k", 2)
    ledger.commit(done, images_scored=5, prompts_encoded=6, wall_seconds=0.25)
    ledger.release(ledger.reserve("k", 3))
    events = ledger.events("k")
    assert [(e["op"], e["queries"]) for e in events] == [
        ("set_budget", 10),
        ("reserve", 2),
        ("commit", 2),
        ("reserve", 3),
        ("release", 3),
    ]
    assert events[2]["detail"] == {"images_scored": 5, "prompts_encoded": 6, "wall_seconds": 0.25}


_WORKER = textwrap.dedent(
    """
    import sys, time
    from vlmlab.oracle import JournaledLedger
    ledger = JournaledLedger(sys.argv[1], synchronous=sys.argv[2])
    ledger.set_budget("k", 100)
    done = ledger.reserve("k", 10)
    ledger.commit(done, images_scored=1, prompts_encoded=1, wall_seconds=0.0)
    held = ledger.reserve("k", 7)
    print(held.ticket, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_sigkill_between_reserve_and_commit_loses_and_doubles_nothing(tmp_path, synchronous):
    path = tmp_path / "ledger.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(path), synchronous],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ticket = int(worker.stdout.readline())  # acknowledged: on disk
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    again = _open(path)
    account = again.account("k")
    assert account["queries"] == 10 and account["reserved"] == 7 and account["calls"] == 1
    from vlmlab.oracle import Reservation

    again.commit(Reservation("k", 7, ticket), images_scored=1, prompts_encoded=1, wall_seconds=0)
    assert again.account("k")["queries"] == 17 and again.remaining("k") == 83


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="synchronous"):
        _open(tmp_path / "a.sqlite", synchronous="off")
    with pytest.raises(ValueError, match="orphan_ttl_s"):
        _open(tmp_path / "b.sqlite", orphan_ttl_s=0)
