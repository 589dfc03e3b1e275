"""The ledger actor with a journal: it restarts from the file, and only its creator picks one."""

from __future__ import annotations

import pytest

from vlmlab.pool import RemoteLedger, ledger_actor


def test_a_journaled_ledger_actor_restarts_from_its_file(ray_session, tmp_path):
    journal = tmp_path / "ledger.sqlite"
    name = "vlmlab-ledger-journal-test"  # not the session's ledger: the others keep theirs
    first = RemoteLedger(ledger_actor(name, journal=journal))
    assert first.journal() == str(journal.resolve())
    first.set_budget("api:alice", 100)
    held = first.reserve("api:alice", 60)
    first.commit(held, images_scored=10, prompts_encoded=20, wall_seconds=0.1)
    open_call = first.reserve("api:alice", 5)
    ray_session.kill(first._actor)  # the account book's process dies

    second = RemoteLedger(ledger_actor(name, journal=journal))
    account = second.account("api:alice")
    assert (account["queries"], account["reserved"], account["budget"]) == (60, 5, 100)
    second.commit(open_call, images_scored=1, prompts_encoded=1, wall_seconds=0.0)
    assert second.remaining("api:alice") == 35
    assert [e["op"] for e in second.events("api:alice")] == [
        "set_budget",
        "reserve",
        "commit",
        "reserve",
        "commit",
    ]
    with pytest.raises(ValueError, match="journals to"):
        ledger_actor(name, journal=tmp_path / "another.sqlite")
    assert ledger_actor(name)  # asking for nothing gets the one there is
    ray_session.kill(second._actor)


def test_a_ledger_without_a_journal_says_so(ray_session, monkeypatch):
    from vlmlab.pool._ledger import JOURNAL_ENV

    monkeypatch.delenv(JOURNAL_ENV, raising=False)
    name = "vlmlab-ledger-memory-test"
    ledger = RemoteLedger(ledger_actor(name))
    assert ledger.journal() is None
    with pytest.raises(ValueError, match="keeps no journal"):
        ledger.events()
    with pytest.raises(ValueError, match="journals to no file"):
        ledger_actor(name, journal="/tmp/vlmlab-never-opened.sqlite")
    ray_session.kill(ledger._actor)


def test_two_ledger_actors_on_one_postgres_database_keep_one_book(ray_session, postgres_ledger):
    """Two services (two ledger actors, as two clusters would run) charge one key."""
    eu = RemoteLedger(ledger_actor("vlmlab-ledger-pg-eu", journal=postgres_ledger))
    us = RemoteLedger(ledger_actor("vlmlab-ledger-pg-us", journal=postgres_ledger))
    assert eu.journal() == postgres_ledger
    eu.set_budget("api:alice", 100)
    held = eu.reserve("api:alice", 60)
    eu.commit(held, images_scored=10, prompts_encoded=20, wall_seconds=0.1)
    ray_session.kill(eu._actor)  # one service goes down: the book is the database's
    assert us.remaining("api:alice") == 40
    from vlmlab.errors import BudgetExceededError

    with pytest.raises(BudgetExceededError):
        us.reserve("api:alice", 41)
    assert [e["op"] for e in us.events("api:alice")] == ["set_budget", "reserve", "commit"]
    ray_session.kill(us._actor)
