"""An API key's spent queries outlive a killed server and the whole Ray cluster, by default.

`vlmlab serve --keys K` (no `--ledger`: the journal goes beside the keys file)
on a fresh one-node cluster; the key spends 60 of its 100 queries through
`HttpOracle`; the server is killed (SIGKILL: no clean stop) and the whole
cluster stopped; a new cluster and a new `vlmlab serve --keys K` tell the key it
has 40 left, and refuse 41. Run alone with `pytest -m cluster`.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from vlmlab.testing import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _serve(cluster: LocalCluster, keys: Path, log: Path) -> tuple[subprocess.Popen, str]:
    journal = keys.with_name("keys.ledger.sqlite")
    vlmlab = str(Path(sys.executable).with_name("vlmlab"))
    command = [vlmlab, "serve", "--keys", str(keys)]  # the default ledger: beside the keys
    command += ["--oracle", "latency:0", "--oracle-cpus", "0.25", "--num-cpus", "0.25"]
    with socket.socket() as probe:  # a free port of our own
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command += ["--address", cluster.address, "--port", str(port)]
    env = {k: v for k, v in cluster.env.items() if k != "VLMLAB_LEDGER_JOURNAL"}
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        found = re.search(r"at (http://\S+) \(API docs", log.read_text())
        if found and f"query ledger: journaled to {journal}" in log.read_text():
            return process, found.group(1)
        time.sleep(0.5)
    process.kill()
    raise AssertionError(log.read_text())


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_keys_spent_queries_survive_a_whole_cluster_restart(tmp_path):
    from vlmlab.oracle import ImageSet
    from vlmlab.serving import HttpOracle, add_key

    keys = tmp_path / "keys.yaml"
    journal = tmp_path / "keys.ledger.sqlite"
    token = add_key(keys, "durable", budget=100)
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)

    with LocalCluster({}, head_cpus=2) as cluster:
        process, url = _serve(cluster, keys, tmp_path / "first.log")
        try:
            oracle = HttpOracle(url, token)
            ref = oracle.register_images(ImageSet(images, {"dataset": "noise"}))
            contexts = oracle.metadata.embedding_mean.expand(20, 4, -1).clone()
            for _ in range(3):  # 3 calls of P = 20: 60 queries
                oracle.logits(contexts, ["cat", "dog"], ref)
            assert oracle.usage()["queries_left"] == 40
        finally:
            process.kill()  # no clean stop: what is journaled is all there is
            process.wait(timeout=60)
    assert journal.exists()

    with LocalCluster({}, head_cpus=2) as cluster:  # a new cluster: nothing of the old runs
        process, url = _serve(cluster, keys, tmp_path / "second.log")
        try:
            usage = requests.get(
                f"{url}/v1/oracle/usage", headers={"Authorization": f"Bearer {token}"}, timeout=60
            ).json()
            assert usage["queries_used"] == 60 and usage["queries_left"] == 40, usage
            oracle = HttpOracle(url, token)
            ref = oracle.register_images(ImageSet(images, {"dataset": "noise"}))
            contexts = oracle.metadata.embedding_mean.expand(41, 4, -1).clone()
            with pytest.raises(Exception, match="budget"):
                oracle.logits(contexts, ["cat", "dog"], ref)  # 41 > 40: refused whole
            assert oracle.usage()["queries_left"] == 40
        finally:
            _stop(process)
