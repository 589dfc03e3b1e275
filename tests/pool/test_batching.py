"""Request batching: several trials' populations in one text-tower pass, each caller exact.

Three levels: the batcher alone (asyncio, no Ray), the oracle's ``logits_many``
against one ``logits`` call per request, and a batching Serve pool under eight
concurrent clients on one budget key.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import threading
import time

import numpy as np
import pytest

from vlmlab.errors import BudgetExceededError
from vlmlab.oracle import ImageSet, LogitsRequest
from vlmlab.pool import MicroBatcher
from vlmlab.testing import random_contexts

BOUND = 1e-5
"""Batched logits equal unbatched ones within this (fp32), on every backend tested."""


def _run(coroutine):
    return asyncio.run(coroutine)


def _batcher(compute_many, *, max_requests: int, wait_s: float):
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    return MicroBatcher(compute_many, executor, max_requests=max_requests, wait_s=wait_s)


def test_concurrent_requests_leave_as_one_batch_and_each_gets_its_own_result():
    seen: list[list[int]] = []

    def square_all(requests: list[int]) -> list[int]:
        seen.append(list(requests))
        return [r * r for r in requests]

    batcher = _batcher(square_all, max_requests=8, wait_s=5.0)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(8)))

    started = time.perf_counter()
    assert _run(main()) == [i * i for i in range(8)]
    assert time.perf_counter() - started < 5.0  # full: it left without waiting its 5 s
    assert seen == [list(range(8))]
    assert batcher.stats.as_dict()["sizes"] == {8: 1}


def test_a_bad_request_fails_alone():
    def invert_all(requests: list[float]) -> list[float]:
        return [1 / r for r in requests]

    batcher = _batcher(invert_all, max_requests=4, wait_s=0.05)

    async def main():
        return await asyncio.gather(
            *(batcher.submit(r) for r in (1.0, 0.0, 4.0)), return_exceptions=True
        )

    first, second, third = _run(main())
    assert (first, third) == (1.0, 0.25) and isinstance(second, ZeroDivisionError)
    assert batcher.stats.fallbacks == 1


def test_a_lone_request_waits_no_longer_than_the_configured_wait():
    """Latency alone, as a ratio to the configured wait (never an absolute time)."""
    wait_s = 0.2

    def identity(requests: list[int]) -> list[int]:
        return list(requests)

    async def alone(batcher) -> float:
        started = time.perf_counter()
        await batcher.submit(1)
        return time.perf_counter() - started

    def median_latency(wait: float) -> float:
        batcher = _batcher(identity, max_requests=8, wait_s=wait)
        return statistics.median(_run(alone(batcher)) for _ in range(5))

    unbatched, batched = median_latency(0.0), median_latency(wait_s)
    added = (batched - unbatched) / wait_s
    assert 0.9 <= added <= 1.5, f"a lone request waited {added:.2f}x the configured wait"


def test_requests_arriving_during_a_batch_gather_for_the_next():
    started_batches: list[int] = []

    def slow(requests: list[int]) -> list[int]:
        started_batches.append(len(requests))
        time.sleep(0.3)
        return list(requests)

    batcher = _batcher(slow, max_requests=8, wait_s=0.0)

    async def main():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first batch (of one) is computing now
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        return await asyncio.gather(first, *rest)

    assert _run(main()) == list(range(6))
    assert started_batches == [1, 5]


def test_bad_batching_settings_are_named():
    from vlmlab.pool import batching_settings

    assert batching_settings(None) is None and batching_settings({"max_requests": 1}) is None
    with pytest.raises(ValueError, match="max_requests"):
        batching_settings({"max_requests": 0})
    with pytest.raises(ValueError, match="wait_ms"):
        batching_settings({"max_requests": 4, "wait_ms": -1})
    with pytest.raises(ValueError, match="unknown batching settings"):
        batching_settings({"max_request": 4})
    from vlmlab.specs import SpecError, load_spec

    with pytest.raises((SpecError, ValueError), match="max_ongoing_requests"):
        load_spec("experiments/quickstart.yaml", ["pool.batch_requests=8"])


# ----------------------------------------------------------------- the oracle
def _requests(oracle, names, ref, *, trials: int = 8, population: int = 20):
    rng = np.random.default_rng(0)
    return [
        LogitsRequest(
            random_contexts(oracle, population, seed=trial),
            names,
            ref,
            indices=rng.choice(ref.size, 12, replace=False),
            budget_key=f"trial-{trial}",
        )
        for trial in range(trials)
    ]


def _check_many_equals_one_by_one(oracle, names, ref) -> float:
    requests = _requests(oracle, names, ref)
    batched = oracle.logits_many(requests)
    worst = 0.0
    for request, together in zip(requests, batched, strict=True):
        alone = oracle.logits(
            request.contexts, names, ref, indices=request.indices, budget_key="alone"
        )
        assert together.shape == alone.shape
        worst = max(worst, float((together - alone).abs().max()))
        assert oracle.ledger.usage(request.budget_key).queries == 20  # each charged its own
    assert worst <= BOUND
    return worst


def test_logits_many_equals_one_call_per_request_on_conse(conse, fashion_test):
    images = fashion_test.subset(np.arange(30))
    ref = conse.register_images(images.image_set())
    _check_many_equals_one_by_one(conse, images.class_names, ref)


def test_logits_many_equals_one_call_per_request_on_a_clip(cache_dir):
    from vlmlab.oracle import create_oracle

    clip = create_oracle("open_clip:vlmlab-tiny-fmnist", cache_dir=cache_dir)
    pixels = np.random.default_rng(3).integers(0, 256, (30, 28, 28, 3), dtype=np.uint8)
    ref = clip.register_images(ImageSet(pixels, {"dataset": "noise-batching"}))
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal"]
    _check_many_equals_one_by_one(clip, names, ref)
    # Requests with other class names or context lengths are computed in their own pass.
    mixed = [
        LogitsRequest(random_contexts(clip, 4, seed=1), names[:3], ref),
        LogitsRequest(random_contexts(clip, 5, seed=2, n_context=2), names, ref),
        LogitsRequest(random_contexts(clip, 6, seed=3), names[:3], ref),
    ]
    out = clip.logits_many(mixed)
    assert [tuple(o.shape) for o in out] == [(4, 30, 3), (5, 30, 6), (6, 30, 3)]
    alone = clip.logits(mixed[1].contexts, names, ref)
    assert float((out[1] - alone).abs().max()) <= BOUND


def test_a_refused_request_refuses_the_batch_before_any_work(conse, fashion_test):
    images = fashion_test.subset(np.arange(30))
    ref = conse.register_images(images.image_set())
    conse.ledger.set_budget("poor", 5)
    requests = _requests(conse, images.class_names, ref, trials=2)
    requests[1] = LogitsRequest(requests[1].contexts, images.class_names, ref, budget_key="poor")
    with pytest.raises(BudgetExceededError):
        conse.logits_many(requests)
    assert conse.ledger.account("trial-0")["reserved"] == 0  # released: nothing held


# ------------------------------------------------------------------- the pool
@pytest.fixture(scope="module")
def batching_pool(ray_session, cache_dir):
    from ray import serve

    from vlmlab.pool import deploy_oracle_pool

    pool = deploy_oracle_pool(
        "conse",
        backend_kwargs={"cache_dir": cache_dir},
        num_replicas=1,
        num_cpus=0.5,
        max_ongoing_requests=8,
        batching={"max_requests": 8, "wait_ms": 50},
        app_name="test-batching-pool",
    )
    yield pool
    serve.delete("test-batching-pool")


@pytest.mark.slow
def test_eight_clients_on_one_key_are_batched_and_charged_exactly(
    batching_pool, conse, fashion_test
):
    from vlmlab.pool import PoolOracle

    images = fashion_test.subset(np.arange(40))
    names = images.class_names
    key, budget, population = "batched-clients", 200, 5
    batching_pool.ledger.set_budget(key, budget)
    local_ref = conse.register_images(images.image_set())
    served: list[int] = []
    worst: list[float] = []
    refusals: list[str] = []
    barrier = threading.Barrier(8)

    def client(seed: int) -> None:
        oracle = PoolOracle("test-batching-pool")
        ref = oracle.register_images(images.image_set())
        contexts = random_contexts(oracle, population, seed=seed)
        expected = conse.logits(contexts, names, local_ref, budget_key="expected")
        barrier.wait()
        while True:
            try:
                out = oracle.logits(contexts, names, ref, budget_key=key)
            except BudgetExceededError as refusal:
                refusals.append(str(refusal))
                return
            served.append(population)
            worst.append(float((out - expected).abs().max()))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sum(served) == budget == batching_pool.ledger.usage(key).queries
    assert len(refusals) == 8 and max(worst) <= BOUND
    batching = batching_pool.replica_stats()["batching"]
    assert batching["largest_batch"] > 1 and batching["mean_batch"] > 1.5, batching


def test_a_specs_batching_fields_reach_the_pool_it_deploys(monkeypatch):
    from vlmlab.drivers import _parallel
    from vlmlab.specs import load_spec

    captured: dict = {}
    monkeypatch.setattr(_parallel, "deploy_oracle_pool", lambda *a, **k: captured.update(k))
    overrides = ["pool.batch_requests=8", "pool.max_ongoing_requests=8", "pool.batch_wait_ms=5"]
    _parallel.deploy_for_spec(load_spec("experiments/quickstart.yaml", overrides))
    assert captured["batching"] == {"max_requests": 8, "wait_ms": 5.0}
    assert captured["max_ongoing_requests"] == 8
    _parallel.deploy_for_spec(load_spec("experiments/quickstart.yaml"))
    assert captured["batching"] is None  # off unless asked: pool = in-process, bit for bit
