from __future__ import annotations

import threading

import pytest

from vlmlab.errors import BudgetExceededError
from vlmlab.oracle import QueryLedger


def test_commit_counts_exactly():
    ledger = QueryLedger()
    r = ledger.reserve("k", 20)
    ledger.commit(r, images_scored=20 * 160, prompts_encoded=20 * 10, wall_seconds=0.5)
    r = ledger.reserve("k", 4)
    ledger.commit(r, images_scored=4 * 10, prompts_encoded=4 * 100, wall_seconds=0.25)
    usage = ledger.usage("k")
    assert (usage.queries, usage.images_scored, usage.prompts_encoded, usage.calls) == (
        24,
        3240,
        600,
        2,
    )
    assert usage.wall_seconds == pytest.approx(0.75)
    assert ledger.usage("other").queries == 0


def test_refusal_is_whole_and_says_what_is_left():
    ledger = QueryLedger()
    ledger.set_budget("trial-3", 50)
    ledger.commit(ledger.reserve("trial-3", 40), images_scored=1, prompts_encoded=1, wall_seconds=0)
    with pytest.raises(BudgetExceededError, match=r"requested 20 queries, 10 left of 50") as info:
        ledger.reserve("trial-3", 20)
    assert info.value.remaining == 10 and info.value.key == "trial-3"
    assert ledger.usage("trial-3").queries == 40
    assert ledger.remaining("trial-3") == 10
    ledger.commit(ledger.reserve("trial-3", 10), images_scored=1, prompts_encoded=1, wall_seconds=0)
    assert ledger.remaining("trial-3") == 0


def test_release_counts_nothing_and_frees_the_budget():
    ledger = QueryLedger()
    ledger.set_budget("k", 10)
    held = ledger.reserve("k", 10)
    with pytest.raises(BudgetExceededError):
        ledger.reserve("k", 1)  # reserved queries count against the budget
    ledger.release(held)
    assert ledger.usage("k").queries == 0 and ledger.remaining("k") == 10


def test_double_commit_is_an_error():
    ledger = QueryLedger()
    r = ledger.reserve("k", 1)
    ledger.commit(r, images_scored=1, prompts_encoded=1, wall_seconds=0)
    with pytest.raises(KeyError):
        ledger.commit(r, images_scored=1, prompts_encoded=1, wall_seconds=0)


def test_bad_budget_arguments():
    ledger = QueryLedger()
    with pytest.raises(ValueError, match="max_queries"):
        ledger.set_budget("k", -1)
    with pytest.raises(ValueError, match="budget key"):
        ledger.reserve("", 1)
    with pytest.raises(ValueError, match="at least one query"):
        ledger.reserve("k", 0)


def test_threads_on_one_key_never_exceed_the_budget():
    ledger = QueryLedger()
    budget, per_call, threads, attempts = 1000, 7, 8, 40
    ledger.set_budget("shared", budget)
    served = [0] * threads
    refused = [0] * threads
    barrier = threading.Barrier(threads)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(attempts):
            try:
                r = ledger.reserve("shared", per_call)
            except BudgetExceededError:
                refused[i] += 1
                continue
            ledger.commit(r, images_scored=per_call, prompts_encoded=per_call, wall_seconds=0)
            served[i] += per_call

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    usage = ledger.usage("shared")
    assert usage.queries == sum(served) == (budget // per_call) * per_call
    assert usage.images_scored == usage.queries
    assert sum(refused) == threads * attempts - budget // per_call


def test_a_lapsed_lease_frees_its_queries_and_is_counted():
    """A reservation with a ttl cannot outlive its call, even if its caller dies."""
    now = [100.0]
    ledger = QueryLedger(clock=lambda: now[0])
    ledger.set_budget("k", 10)
    leased = ledger.reserve("k", 6, ttl=30.0)
    held = ledger.reserve("k", 3)  # no lease: held until commit or release
    assert ledger.account("k")["reserved"] == 9 and ledger.remaining("k") == 1
    now[0] += 29.9
    assert ledger.account("k")["reserved"] == 9  # not yet
    now[0] += 0.2
    account = ledger.account("k")
    assert (account["reserved"], account["expired"], account["queries"]) == (3, 6, 0)
    assert ledger.remaining("k") == 7
    with pytest.raises(KeyError, match="lease ran out"):  # too late to charge it
        ledger.commit(leased, images_scored=1, prompts_encoded=1, wall_seconds=0)
    now[0] += 1e6
    ledger.commit(held, images_scored=1, prompts_encoded=1, wall_seconds=0)
    assert ledger.usage("k").queries == 3 and ledger.account("k")["reserved"] == 0


def test_a_lease_released_or_committed_in_time_is_not_expired():
    now = [0.0]
    ledger = QueryLedger(clock=lambda: now[0])
    ledger.commit(ledger.reserve("k", 2, ttl=5), images_scored=0, prompts_encoded=0, wall_seconds=0)
    ledger.release(ledger.reserve("k", 4, ttl=5))
    now[0] += 10
    account = ledger.account("k")
    assert (account["queries"], account["reserved"], account["expired"]) == (2, 0, 0)
    with pytest.raises(ValueError, match="ttl must be positive"):
        ledger.reserve("k", 1, ttl=0)
