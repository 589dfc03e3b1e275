"""A real multi-node Ray cluster on one machine, for tests, benchmarks and rehearsals.

:class:`LocalCluster` runs ``ray start --head --block`` and one ``ray start
--address ... --block`` per worker, each its own process group with its own
raylet, CPUs and a resource named after the node (``vlmlab_node_<name>``), all
under a private temp dir and a private auth token: a cluster exactly like a
launched one, minus the network. Drivers join it as subprocesses with
``cluster.env`` and ``--address cluster.address`` (a process holds one Ray
connection, so a test process with its own Ray cannot also drive this one).

``kill(name)`` is a node crash: SIGKILL to the node's whole process group
(raylet, object store, workers), no draining; ``crash()`` is every node's at
once, the head's included (a lost head node, a spot reclaim of the cluster).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from vlmlab.testing._loopback import LoopbackServer, free_port

NODE_RESOURCE = "vlmlab_node_{}"


@dataclass
class _Node:
    name: str
    process: subprocess.Popen
    log: Path
    node_id: str = ""


@dataclass
class LocalCluster(LoopbackServer):
    """A head and ``workers`` (name -> CPUs) as separate Ray nodes on this machine."""

    workers: dict[str, int]
    head_cpus: int = 1
    timeout: float = 120.0
    nodes: dict[str, _Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Short: Ray's Unix socket paths must fit in 107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="vlc-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",  # what `ray start --head` defaults to; one token for all
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # A test harness, not the product: several Ray nodes share one small test
            # machine, where Ray's OOM killer would kill the tests' workers at random.
            "RAY_memory_monitor_refresh_ms": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # A crashed node is declared dead in ~3 s instead of ~30 s (tests wait less).
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.env.pop("RAY_ADDRESS", None)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        try:
            self._start_node("head", self.head_cpus, ["--head", f"--port={self.port}"])
            self._await_started("head")
            # One at a time: nodes that share an IP and register at once can time out.
            for name, cpus in self.workers.items():
                self._start_node(name, cpus, [f"--address={self.address}"])
                self._await_started(name)
            self._read_node_ids()
        except BaseException:
            self.stop()
            raise
        return self

    def _ray(self) -> str:
        return str(Path(sys.executable).with_name("ray"))

    def _start_node(self, name: str, cpus: int, extra: list[str]) -> None:
        log = self.temp_dir / f"{name}.log"
        command = [self._ray(), "start", "--block", *extra, f"--num-cpus={cpus}"]
        command += [f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        command += ["--resources", json.dumps({NODE_RESOURCE.format(name): 1})]
        if name == "head":
            command.append("--include-dashboard=false")
        with log.open("w") as sink:
            process = subprocess.Popen(
                command,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() takes the whole node
            )
        self.nodes[name] = _Node(name, process, log)

    def _await_started(self, name: str) -> None:
        node = self.nodes[name]
        deadline = time.monotonic() + self.timeout
        while "Ray runtime started" not in node.log.read_text():
            if node.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name!r} did not start:\n{node.log.read_text()}")
            time.sleep(0.2)

    def _read_node_ids(self) -> None:
        """Ray's node id of each named node, once all are registered."""
        script = (
            "import json, time, ray\n"
            f"ray.init(address={self.address!r}, logging_level='ERROR')\n"
            f"deadline = time.monotonic() + {self.timeout}\n"
            "while True:\n"
            "    nodes = [n for n in ray.nodes() if n['Alive']]\n"
            f"    if len(nodes) >= {len(self.nodes)} or time.monotonic() > deadline: break\n"
            "    time.sleep(0.2)\n"
            "print(json.dumps({k: n['NodeID'] for n in nodes for k in n['Resources']}))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=self.timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"could not read the cluster's nodes:\n{out.stderr[-3000:]}")
        by_resource = json.loads(out.stdout.strip().splitlines()[-1])
        for name, node in self.nodes.items():
            node.node_id = by_resource.get(NODE_RESOURCE.format(name), "")
        missing = [name for name, node in self.nodes.items() if not node.node_id]
        if missing:
            raise RuntimeError(f"nodes {missing} did not register with the head")

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def kill(self, name: str) -> None:
        """Crash a worker node: SIGKILL to its raylet, object store and workers at once."""
        if name == "head":
            raise ValueError("losing the head loses the cluster: crash() is that case")
        self._sigkill(self.nodes[name])

    def crash(self) -> None:
        """Lose the whole cluster, head included: every node SIGKILLed, nothing drained.

        What the cluster held (the GCS, actors, the object store, its temp dir) is
        gone; only what was written outside it (an object store, a journal on a
        volume) is left for the next cluster.
        """
        for node in self.nodes.values():
            self._sigkill(node)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    @staticmethod
    def _sigkill(node: _Node) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=30)

    def stop(self, grace: float = 8.0) -> None:
        """SIGTERM every node (Ray drains it), SIGKILL what is left after ``grace`` seconds.

        A throwaway cluster need not wait out Ray's full drain (up to 30 s a node).
        """
        for node in reversed(list(self.nodes.values())):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)  # stragglers of the group
        shutil.rmtree(self.temp_dir, ignore_errors=True)
