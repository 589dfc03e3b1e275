"""The black box over HTTP against the same oracle in-process, one generation a call.

One BBF-sized generation (P = 20 candidates, m = 4 context tokens, C = 10
classes, 320 Fashion-MNIST images) is scored, in this one run and side by side:

- in-process: ``ConseOracle.logits``;
- ``HttpOracle.logits`` (base64 float32 both ways) against ``vlmlab serve --keys``;
- the same call with nested JSON lists (what ``curl`` users send).

Prints the median per call and the HTTP/in-process ratios. Loopback only.

    .venv/bin/python benchmarks/oracle_http.py [CALLS]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")


def _median_seconds(call, repeats: int) -> float:
    call()  # warm-up: features encoded, connections open
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(calls: int = 15) -> None:
    import numpy as np
    import requests
    import torch

    from vlmlab.data import load_dataset
    from vlmlab.oracle import ImageSet, create_oracle
    from vlmlab.pool import ensure_ray
    from vlmlab.serving import HttpOracle, add_key, serve_adapters
    from vlmlab.testing import random_contexts

    test = load_dataset("fashion-mnist", "test")
    images = ImageSet(test.images[:320], {"dataset": "fashion-mnist", "split": "test"})
    names = list(test.class_names)
    local = create_oracle("conse")
    local_set = local.register_images(images)
    contexts = random_contexts(local, 20)

    keys = Path(tempfile.mkdtemp(prefix="vlmlab-oracle-bench-")) / "keys.yaml"
    token = add_key(keys, "bench")
    ensure_ray(num_cpus=4)
    url = serve_adapters(
        None, port=8788, keys=str(keys), oracle_cpus=1, oracle_torch_threads=torch.get_num_threads()
    )
    remote = HttpOracle(url, token)
    remote_set = remote.register_images(images)
    assert torch.equal(
        remote.logits(contexts, names, remote_set), local.logits(contexts, names, local_set)
    )

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    as_lists = {"contexts": contexts.tolist(), "class_names": names, "image_set": remote_set.id}

    def json_call() -> None:
        response = session.post(f"{url}/v1/oracle/logits", json=as_lists, timeout=300)
        response.raise_for_status()
        np.asarray(response.json()["logits"], dtype=np.float32)

    in_process = _median_seconds(lambda: local.logits(contexts, names, local_set), calls)
    over_http = _median_seconds(lambda: remote.logits(contexts, names, remote_set), calls)
    json_lists = _median_seconds(json_call, calls)
    print("ConSE, P=20 x m=4 contexts, C=10 classes, 320 images; median of", calls, "calls")
    print(f"in-process           {in_process * 1000:8.1f} ms")
    print(f"HttpOracle (base64)  {over_http * 1000:8.1f} ms")
    print(f"JSON nested lists    {json_lists * 1000:8.1f} ms")
    print(
        f"http_base64_over_in_process={over_http / in_process:.2f} "
        f"http_json_over_in_process={json_lists / in_process:.2f}"
    )


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:2]])
