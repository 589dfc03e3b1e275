"""Queries per second against 1, 2 and 4 oracle replicas: how close to linear the pool scales.

Two backends, each measured at 1 / 2 / 4 replicas in this one run:

- ``latency:<ms>``: no model, a fixed sleep per call (a remote API's shape).
  Replicas cost no CPU, so any shortfall from linear is the platform's own
  orchestration: Serve routing and queues, the ledger actor, the client.
  Goal: >= 0.8 of linear at 4 replicas. Its ideal is known exactly (each
  replica serves P queries per delay), so ``latency_of_ideal_<r>`` is the
  share of r replicas' ceiling reached, beside the speedup over 1 replica.
- ``conse``: the real stand-in model, CPU-bound; on a machine with fewer cores
  than replicas it cannot scale, and the figure says so.

CLIENTS threads each send populations of P candidates through one PoolOracle
for SECONDS; throughput is queries (candidates scored) per second. The last
line holds ``name=value`` pairs.

    .venv/bin/python benchmarks/scaling.py [SECONDS] [LATENCY_MS]
"""

from __future__ import annotations

import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

REPLICAS = (1, 2, 4)
CLIENTS = 8  # enough requests in flight to keep four replicas busy
POPULATION = 8


def _throughput(oracle, names, ref, contexts, seconds: float) -> float:
    oracle.logits(contexts, names, ref)  # warm-up: every replica path is ready
    stop = time.perf_counter() + seconds
    served = [0] * CLIENTS

    def client(i: int) -> None:
        while time.perf_counter() < stop:
            oracle.logits(contexts, names, ref)
            served[i] += len(contexts)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(served) / (time.perf_counter() - started)


def _measure(backend: str, cpus: float, images, names, seconds: float) -> dict[int, float]:
    from ray import serve

    from vlmlab.pool import deploy_oracle_pool
    from vlmlab.testing import random_contexts

    rates = {}
    for replicas in REPLICAS:
        app = f"scaling-{backend.replace(':', '-')}-{replicas}"
        pool = deploy_oracle_pool(
            backend,
            num_replicas=replicas,
            num_cpus=cpus,
            max_ongoing_requests=2,
            app_name=app,
            torch_threads=1,
        )
        ref = pool.register_images(images)
        contexts = random_contexts(pool, POPULATION)
        rates[replicas] = _throughput(pool, names, ref, contexts, seconds)
        serve.delete(app)
        print(f"{backend:<12} replicas={replicas}  {rates[replicas]:8.1f} queries/s", flush=True)
    return rates


def main(seconds: float = 8.0, latency_ms: float = 50.0) -> None:
    from vlmlab.data import load_dataset
    from vlmlab.oracle import ImageSet
    from vlmlab.pool import ensure_ray

    test = load_dataset("fashion-mnist", "test")
    images = ImageSet(test.images[:64], {"dataset": "fashion-mnist", "split": "test"})
    names = list(test.class_names)
    ensure_ray(num_cpus=8)  # logical CPUs: replicas of the latency backend only sleep
    cores = os.cpu_count()
    print(f"{CLIENTS} clients, P={POPULATION} a call, C=10, 64 images, {seconds:g} s a point")
    print(f"machine: {cores} cores")
    fixed = _measure(f"latency:{latency_ms:g}", 0.1, images, names, seconds)
    model = _measure("conse", 0.5, images, names, seconds)
    pairs = {}
    for label, rates in (("latency", fixed), ("conse", model)):
        for replicas in REPLICAS[1:]:
            speedup = rates[replicas] / rates[1]
            pairs[f"{label}_speedup_{replicas}"] = speedup
            pairs[f"{label}_efficiency_{replicas}"] = speedup / replicas
    # The latency backend's ceiling is exact: each replica serves P queries per delay.
    ceiling = POPULATION / (latency_ms / 1000.0)
    for replicas in REPLICAS:
        pairs[f"latency_of_ideal_{replicas}"] = fixed[replicas] / (replicas * ceiling)
    pairs["latency_qps_1"] = fixed[1]
    pairs["conse_qps_1"] = model[1]
    print(" ".join(f"{name}={value:.2f}" for name, value in pairs.items()))


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[1:3]]
    main(*args)
