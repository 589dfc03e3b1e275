"""Bounded load test of the adapted-model HTTP app, on loopback only.

Trains one small adapter (ConSE, Fashion-MNIST developmental safety, 2 epochs),
serves it with `vlmlab.serving.serve_adapters`, then measures side by side
in this one run:

- in-process: ``AdaptedModel.classify`` on the same image (the model's own cost);
- over HTTP: ``POST /v1/classify`` (base64 JSON) from CLIENTS threads, REQUESTS each.

Prints p50 / p99 latency and throughput for both and the HTTP/in-process ratio
of the medians. Nothing leaves the machine (127.0.0.1).

    .venv/bin/python benchmarks/serving_load.py [CLIENTS] [REQUESTS]
"""

from __future__ import annotations

import base64
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(clients: int = 4, per_client: int = 50) -> None:
    from vlmlab.oracle import create_oracle
    from vlmlab.pool import ensure_ray
    from vlmlab.runner import run_experiment
    from vlmlab.serving import AdaptedModel, AdapterStore, serve_adapters
    from vlmlab.specs import validate_spec

    work = Path(tempfile.mkdtemp(prefix="vlmlab-serving-bench-"))
    oracle = create_oracle("conse")
    spec = validate_spec(
        {
            "name": "bench",
            "task": "devsafety",
            "data": {"dataset": "fashion-mnist", "shots": 10, "val_shots": 5, "test_size": 60},
            "method": {"trainable": "target_heads", "epochs": 2},
            "seeds": [1],
        },
        "benchmark",
    )
    (outcome,) = run_experiment(spec, work / "results", oracle=oracle)
    root = work / "adapters"
    root.mkdir()
    import shutil

    shutil.copytree(outcome.artifact, root / outcome.run_id)
    from vlmlab.data import load_dataset

    pixels = load_dataset("fashion-mnist", "test").images[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    body = {"adapter": outcome.run_id, "image": base64.b64encode(buffer.getvalue()).decode()}

    model = AdaptedModel.load(AdapterStore(root), outcome.run_id, oracle)
    model.classify(pixels)  # warm-up
    local = []
    for _ in range(50):
        start = time.perf_counter()
        model.classify(pixels)
        local.append(time.perf_counter() - start)

    ensure_ray(num_cpus=4)
    url = serve_adapters(str(root), port=8787, num_cpus=1)
    for _ in range(5):  # warm-up: the replica loads the backend and the adapter
        requests.post(f"{url}/v1/classify", json=body, timeout=300).raise_for_status()
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            for _ in range(per_client):
                start = time.perf_counter()
                session.post(f"{url}/v1/classify", json=body, timeout=300).raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall

    def line(name: str, values: list[float], seconds: float) -> str:
        return (
            f"{name:<22} p50 {_percentile(values, 50) * 1000:7.1f} ms  "
            f"p99 {_percentile(values, 99) * 1000:7.1f} ms  "
            f"{len(values) / seconds:6.1f} req/s"
        )

    print(
        f"ConSE adapter {outcome.run_id}, one 28x28 image; {clients} clients x {per_client} requests"
    )
    print(line("in-process classify", local, sum(local)))
    print(line("HTTP /v1/classify", latencies, wall))
    ratio = statistics.median(latencies) / statistics.median(local)
    print(f"http_over_in_process_p50={ratio:.2f} requests={len(latencies)}")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*args)
