"""The Serve oracle pool, through real handles: equality, budgets, replica death."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from vlmlab.data import partition_classes, stratified_subset
from vlmlab.errors import BudgetExceededError
from vlmlab.methods.forgetting import BlackBoxForgetting, ForgettingConfig, make_forgetting_data
from vlmlab.testing import OracleConformance, random_contexts

pytestmark = pytest.mark.slow


class TestPoolConformance(OracleConformance):
    @pytest.fixture
    def oracle(self, conse_pool):
        return conse_pool

    @pytest.fixture
    def image_set(self, conse_pool, fashion_test):
        return conse_pool.register_images(fashion_test.subset(np.arange(8)).image_set())


@pytest.fixture(scope="module")
def small_test(fashion_test):
    return fashion_test.subset(stratified_subset(fashion_test.labels, 60, seed=0))


def test_pool_logits_equal_in_process(conse_pool, conse, small_test):
    ctx = random_contexts(conse, 20, seed=11)
    pooled = conse_pool.logits(
        ctx, small_test.class_names, conse_pool.register_images(small_test.image_set())
    )
    local = conse.logits(ctx, small_test.class_names, conse.register_images(small_test.image_set()))
    assert torch.equal(pooled, local)


def test_large_population_is_sharded_across_replicas(conse_pool, conse, small_test):
    from vlmlab.pool import PoolOracle

    sharded = PoolOracle("test-pool", shard_size=8)
    ctx = random_contexts(conse, 24, seed=12)
    key = "sharded"
    out = sharded.logits(
        ctx, small_test.class_names, sharded.register_images(small_test.image_set()), budget_key=key
    )
    local = conse.logits(ctx, small_test.class_names, conse.register_images(small_test.image_set()))
    assert torch.allclose(out, local, atol=1e-5)
    assert sharded.ledger.usage(key).queries == 24 and sharded.ledger.usage(key).calls == 1


def test_eight_clients_on_one_budget_get_exactly_the_budget(conse_pool, small_test):
    from vlmlab.pool import PoolOracle

    key, budget, population = "eight-clients", 100, 4
    conse_pool.ledger.set_budget(key, budget)
    served, refusals = [], []
    barrier = threading.Barrier(8)

    def client() -> None:
        oracle = PoolOracle("test-pool")
        ref = oracle.register_images(small_test.image_set())
        ctx = random_contexts(oracle, population, seed=1)
        barrier.wait()
        while True:
            try:
                oracle.logits(
                    ctx, small_test.class_names, ref, indices=np.arange(10), budget_key=key
                )
            except BudgetExceededError as refusal:
                refusals.append(str(refusal))
                return
            served.append(population)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sum(served) == budget == conse_pool.ledger.usage(key).queries
    assert len(refusals) == 8 and all("requested 4 queries, 0 left of 100" in r for r in refusals)


def _replica_names(ray) -> list[str]:
    from ray.util import list_named_actors

    return [
        actor["name"]
        for actor in list_named_actors(all_namespaces=True)
        if "test-pool" in actor["name"] and "OracleReplica" in actor["name"]
    ]


def test_replica_killed_mid_run_changes_nothing(
    ray_session, conse_pool, conse, fashion_train, small_test
):
    def method(oracle, key):
        task = make_forgetting_data(
            oracle, fashion_train, small_test, shots=2, seed=3, partition=partition_classes(10)
        )
        config = ForgettingConfig(popsize=8, iterations=30, batch_size=20)
        return BlackBoxForgetting(oracle, task, config, seed=3, max_queries=240, budget_key=key)

    reference = method(conse, "unkilled")
    reference.run()

    victim = method(conse_pool, "killed")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            victim.run()
        except BaseException as error:  # surfaced below
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    while victim.generation < 5 and worker.is_alive():
        time.sleep(0.02)
    names = _replica_names(ray_session)
    assert len(names) == 2
    ray_session.kill(ray_session.get_actor(names[0], namespace="serve"), no_restart=True)
    worker.join(timeout=300)
    assert not errors, errors
    assert victim.generation == 30
    assert conse_pool.ledger.usage("killed").queries == 240  # exact: nothing counted twice or lost
    assert torch.equal(victim.best_contexts, reference.best_contexts)
    assert victim.best_val == reference.best_val


def test_seeds_and_variants_run_concurrently_on_the_pool(conse_pool, conse, tmp_path):
    from vlmlab.drivers import run_experiment_on_pool
    from vlmlab.runner import run_experiment
    from vlmlab.specs import validate_spec

    tree = {
        "name": "par",
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 60, "forget": [0, 1, 2, 3]},
        "method": {"popsize": 8, "iterations": 6, "batch_size": 20},
        "budget": {"max_queries": 48},
        "seeds": [7, 8],
        # coop, the white-box reference, trains in an actor of its own beside the pool.
        "variants": [{"name": "bbf"}, {"name": "wo_lcs"}, {"name": "coop", "coop": {"epochs": 3}}],
        "pool": {"num_cpus": 0.5},
        "eval_every": 3,
    }
    spec = validate_spec(tree, "test")
    pooled = run_experiment_on_pool(spec, tmp_path / "pool", pool=conse_pool)
    assert [(o.method, o.seed) for o in pooled] == [
        ("bbf", 7),
        ("bbf", 8),
        ("wo_lcs", 7),
        ("wo_lcs", 8),
        ("coop", 7),
        ("coop", 8),
    ]
    local = run_experiment(spec, tmp_path / "local", oracle=conse)
    for a, b in zip(pooled, local, strict=True):
        assert (
            a.run_id == b.run_id and a.test == b.test and a.val == b.val
        )  # same seed, same numbers
    import pandas as pd

    runs = pd.read_parquet(tmp_path / "pool" / "runs")
    assert sorted(runs.run_id) == [
        "par-bbf-s7",
        "par-bbf-s8",
        "par-coop-s7",
        "par-coop-s8",
        "par-wo_lcs-s7",
        "par-wo_lcs-s8",
    ]
    assert (runs.status == "completed").all()
    coop = runs.method == "coop"
    assert (runs[~coop].queries_used == 48).all()
    assert (runs[coop].queries_used == 0).all() and runs[coop].budget.isna().all()
    assert (runs[coop].generations == 3).all()
