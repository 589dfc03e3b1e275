"""A keyed client's latency alone and under 20 hostile clients, side by side in one run.

Serves one small ConSE adapter and the oracle (``vlmlab serve ROOT --keys``,
default limits, one oracle replica with 1 CPU) on loopback. A keyed client
sends BBF-sized generations one after another (P = 20 candidates x m = 4
context tokens, C = 10 classes, 320 Fashion-MNIST images, base64 arrays as
``HttpOracle`` sends them), in rounds: a block of calls alone, then a block
while 20 hostile clients run (full: 5 rounds of 12 calls each way; quick: 2 of
8). Interleaved, so load from outside the benchmark weighs on both alike. The
hostile clients:

   - 10 slow bodies: announce a body and send a byte every 2 s (4 to the
     key-less ``/v1/classify``, 3 to the oracle with a key, 3 with no key),
     reconnecting whenever the server drops them;
   - 6 maximal logits calls: 20 candidates x 1,000 classes (max_prompts) on
     200 images (max_logits), base64;
   - 2 maximal nested-JSON calls: 160 x 4 x 384 contexts as JSON lists (just
     under max_json_values) x 100 classes on 64 images (max_json_logits);
   - 1 maximal registrar: sets of 16 images of 2048 x 2048 (64 Mpx,
     max_set_pixels; 192 MB decoded) registered and deleted in a loop;
   - 1 idle holder: 50 connections that never send a byte.

The 8 clients that make maximal logits calls share one hostile key
(``--attackers N``: N keys; keys that all want the whole oracle share it
equally, so a keyed client's latency under N busy keys is about N + 1 times
its time alone, however the turns are taken); the 3 slow bodies with a key
and the registrar share another (the registrar has its fourth slot). The
hostile calls still running when a phase ends are abandoned (their sockets
closed), as a client that gives up would.

Prints, for each phase, p50 / p99 of the keyed client (goal: p99 hostile <=
3x alone), the cores each process kept busy ("other": Ray's own processes and
whatever else runs on the machine), the hostile clients' status codes; then
the memory of the gateway, the oracle replica, the image registrar and Serve's
HTTP proxy before
the hostile phase, at its peak and after it (goal: the gateway's within 20 %
of before), as resident size (RSS) and the process's own part of it (RSS less
the object store's shared pages it maps).

Then the front door's two probes (issue 29), each with the proxy's and the
gateway's memory before, at its peak and 5 s after (goal: within 20 % of
before): 10 connections of one key each ask for a 21.3 MB answer (P = 1, 16
classes, 250,000 indices, base64) and never read it; 4 connections each send an
unfinished 64 MB header.

    .venv/bin/python benchmarks/serving_hostile.py [--quick] [--phases slow logits all]
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import http.client
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

MB = 1024 * 1024


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def _memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process: all of it, its own (anonymous) and shared-memory pages.

    Shared pages are mostly Ray's object store, mapped into every process that
    put or got an object: they are the store's (a fixed-size pool), not the process's.
    """
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name = line.split(":", 1)[0]
        if name in fields:
            found[fields[name]] = int(line.split()[1]) / 1024
    return found


def _pids() -> dict[str, int]:
    """The gateway's, oracle replica's, registrar's and Serve proxy's processes (by title)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica:vlmlab-adapters:Gateway" in title:
            found["gateway"] = int(entry.name)
        elif "ServeReplica:vlmlab-adapters:OracleReplica" in title:
            found["oracle"] = int(entry.name)
        elif "ServeReplica:vlmlab-adapters:ImageRegistrar" in title:
            found["registrar"] = int(entry.name)
        elif "ProxyActor" in title and "ray::" in title:
            found["proxy"] = int(entry.name)
    return found


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time used so far: by each of ``pids``, by this process, and by the whole machine."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in {**pids, "clients": os.getpid()}.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    total = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    idle = int(total[3]) + int(total[4])  # idle + iowait
    used["machine"] = (sum(int(v) for v in total[:8]) - idle) / tick
    return used


def _cpu_use(start: dict[str, float], end: dict[str, float], seconds: float) -> str:
    """Cores each process kept busy between two ``_cpu_seconds``; "other": the rest of the machine."""
    busy = {name: (end[name] - start[name]) / seconds for name in start}
    busy["other"] = busy.pop("machine") - sum(busy.values())
    return ", ".join(f"{name} {value:.2f}" for name, value in busy.items())


def _adapter_root(work: Path) -> tuple[Path, str]:
    """One small ConSE adapter (developmental safety, 2 epochs), as serving_load.py trains."""
    from vlmlab.oracle import create_oracle
    from vlmlab.runner import run_experiment
    from vlmlab.specs import validate_spec

    spec = validate_spec(
        {
            "name": "hostile",
            "task": "devsafety",
            "data": {"dataset": "fashion-mnist", "shots": 10, "val_shots": 5, "test_size": 60},
            "method": {"trainable": "target_heads", "epochs": 2},
            "seeds": [1],
        },
        "benchmark",
    )
    (outcome,) = run_experiment(spec, work / "results", oracle=create_oracle("conse"))
    root = work / "adapters"
    root.mkdir()
    shutil.copytree(outcome.artifact, root / outcome.run_id)
    return root, outcome.run_id


def _b64_array(array) -> dict:
    import numpy as np

    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(data).decode()}


def _png(pixels) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Hostiles:
    """The 20 hostile clients, each a thread, until ``stop``."""

    def __init__(self, url: str, tokens: dict[str, str], facts: dict) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.url = url
        self.tokens = tokens
        self.facts = facts
        self.stopping = threading.Event()
        self.statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []

    def _count(self, kind: str, status: object) -> None:
        with self.lock:
            self.statuses[kind][status] += 1

    def _track(self, sock: socket.socket) -> socket.socket:
        with self.lock:
            self.sockets.add(sock)
        return sock

    # ---------------------------------------------------------------- kinds
    def slow_body(self, path: str, token: str | None) -> None:
        head = [f"POST {path} HTTP/1.1", "Host: bench", "Content-Type: application/json"]
        head += ["Content-Length: 8000000"] + ([f"Authorization: Bearer {token}"] if token else [])
        while not self.stopping.is_set():
            try:
                sock = self._track(socket.create_connection(self.address, timeout=2))
                sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
                answer = b""
                while not self.stopping.is_set():
                    sock.sendall(b" ")  # a byte every 2 s: never idle long, never done
                    try:
                        chunk = sock.recv(4096)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    answer += chunk
                status = answer.split(b" ", 2)[1].decode() if answer.count(b" ") >= 2 else "drop"
                self._count(f"slow body {path}{' keyed' if token else ''}", status)
            except OSError:
                self._count(f"slow body {path}{' keyed' if token else ''}", "drop")
            finally:
                time.sleep(0.05)

    def _request(
        self, token: str, method: str, path: str, body: bytes = b""
    ) -> tuple[object, bytes]:
        """One request on its own connection, which ``stop`` can cut (the call is abandoned)."""
        connection = http.client.HTTPConnection(*self.address, timeout=3600)
        try:
            connection.connect()
            self._track(connection.sock)
            connection.request(
                method,
                path,
                body=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            return ("abandoned" if self.stopping.is_set() else "drop"), b""
        finally:
            connection.close()

    def maximal_logits(self, token: str, body: bytes, kind: str) -> None:
        while not self.stopping.is_set():
            status = self._request(token, "POST", "/v1/oracle/logits", body)[0]
            self._count(kind, status)
            if status != 200:
                time.sleep(0.05)  # 429 (the key's slots are taken): straight back

    def registrar(self, token: str) -> None:
        import numpy as np

        images = [_png(np.full((2048, 2048, 3), i, np.uint8)) for i in range(16)]
        body = json.dumps({"images": [base64.b64encode(i).decode() for i in images]}).encode()
        while not self.stopping.is_set():
            status, answer = self._request(token, "POST", "/v1/oracle/image-sets", body)
            self._count("register 64 Mpx, then delete", status)
            if status == 200:  # free the quota: the next round decodes it all again
                set_id = json.loads(answer)["image_set"]
                self._request(token, "DELETE", f"/v1/oracle/image-sets/{set_id}")
            else:
                time.sleep(0.05)

    def idle(self, count: int) -> None:
        held = [self._track(socket.create_connection(self.address)) for _ in range(count)]
        self._count("idle connections", len(held))
        self.stopping.wait()

    # ------------------------------------------------------------------ run
    def start(self, kinds: set[str], attackers: int) -> int:
        """Start the clients of ``kinds`` (all: the 20); returns how many started.

        The 8 clients making maximal logits calls use ``attackers`` keys, round
        robin; the slow bodies with a key and the registrar share a second key.
        """
        t = self.tokens
        attacker = [t[f"attacker-{i % attackers}"] for i in range(8)]
        work = [
            *[("slow", self.slow_body, ("/v1/classify", None))] * 4,
            *[("slow", self.slow_body, ("/v1/oracle/logits", t["slow"]))] * 3,
            *[("slow", self.slow_body, ("/v1/oracle/image-sets", None))] * 3,
            *[
                ("logits", self.maximal_logits, (attacker[i], self.facts["max_body"], "max logits"))
                for i in range(6)
            ],
            *[
                ("json", self.maximal_logits, (attacker[i], self.facts["json_body"], "max JSON"))
                for i in (6, 7)
            ],
            ("register", self.registrar, (t["slow"],)),  # the slot its slow bodies leave
            ("idle", self.idle, (50,)),
        ]
        assert len(work) == 20
        started = 0
        for kind, target, args in work:
            if "all" in kinds or kind in kinds:
                thread = threading.Thread(target=target, args=args, daemon=True)
                thread.start()
                self.threads.append(thread)
                started += 1
        return started

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            for sock in self.sockets:  # abandon whatever is in flight
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in self.threads:
            thread.join(timeout=30)


def _front_door_probes(url: str, token: str, image_set: str, dim: int, pids: dict) -> dict:
    """The unread-response and big-header probes; the proxy's and gateway's memory, MB."""
    import numpy as np

    parts = urlsplit(url)
    body = json.dumps(
        {
            "contexts": _b64_array(np.full((1, 1, dim), 0.01, np.float32)),  # base64 answers
            "class_names": [f"class {i}" for i in range(16)],
            "image_set": image_set,
            "indices": [i % 320 for i in range(250_000)],  # under max_json_values
        }
    ).encode()
    watched = {name: pids[name] for name in ("proxy", "gateway")}
    ratios = {}

    def probe(name: str, run) -> None:
        before = {n: _memory_mb(pid) for n, pid in watched.items()}
        peak = {n: dict(memory) for n, memory in before.items()}
        sockets: list[socket.socket] = []
        try:
            statuses = run(peak, sockets)
        finally:
            for sock in sockets:
                sock.close()
        time.sleep(5)  # closed: freed, and handed back to the OS
        after = {n: _memory_mb(pid) for n, pid in watched.items()}
        print(f"front door, {name}: statuses {dict(collections.Counter(statuses))}")
        for n in watched:
            print(
                f"  {n} memory, MB: "
                + "; ".join(
                    f"{field} before {before[n][field]:.0f}, peak {peak[n][field]:.0f}, after "
                    f"{after[n][field]:.0f} ({after[n][field] / before[n][field] - 1:+.1%})"
                    for field in ("rss", "anon")
                )
            )
            for field in ("rss", "anon"):
                ratio = after[n][field] / before[n][field]
                ratios[f"{n}_{field}_after_{name.split()[0]}_over_before"] = ratio

    def sample(peak: dict) -> None:
        for n, pid in watched.items():
            for field, value in _memory_mb(pid).items():
                peak[n][field] = max(peak[n][field], value)

    def unread(peak: dict, sockets: list) -> list:
        statuses = []
        for _ in range(10):
            sock = socket.socket()
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read
            sock.connect((parts.hostname, parts.port))
            head = (
                f"POST /v1/oracle/logits HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer "
                f"{token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
            time.sleep(3)  # answered (or about to be), and waiting in the proxy
            sample(peak)
            sock.settimeout(0.5)
            try:
                statuses.append(sock.recv(64, socket.MSG_PEEK).split(b" ")[1].decode())
            except (TimeoutError, IndexError):
                statuses.append("none")
        return statuses

    def headers(peak: dict, sockets: list) -> list:
        statuses = []
        for _ in range(4):
            sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
            sockets.append(sock)
            try:
                sock.sendall(b"GET /v1/oracle/usage HTTP/1.1\r\nHost: b\r\nX-Big: ")
                for _ in range(64):
                    sock.sendall(b"a" * MB)
            except OSError:  # the proxy closed it: what it should do
                pass
            sample(peak)
            try:
                statuses.append(sock.recv(64).split(b" ")[1].decode())
            except (OSError, IndexError):
                statuses.append("closed")
        return statuses

    probe("unread responses, 10 x 21.3 MB", unread)
    probe("big headers, 4 x 64 MB unfinished", headers)
    return ratios


def main(quick: bool, phases: list[str], attackers: int, chunk_prompts: int | None = None) -> None:
    import numpy as np
    import requests
    from ray import serve

    from vlmlab.data import load_dataset
    from vlmlab.pool import ensure_ray
    from vlmlab.serving import APP_NAME, add_key, serve_adapters

    rounds, per_round = (2, 8) if quick else (5, 12)
    work = Path(tempfile.mkdtemp(prefix="vlmlab-hostile-bench-"))
    root, adapter = _adapter_root(work)
    keys = work / "keys.yaml"
    names = ["good", "slow", *[f"attacker-{i}" for i in range(attackers)]]
    tokens = {name: add_key(keys, f"bench-{name}") for name in names}

    ensure_ray(num_cpus=4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limits = {} if chunk_prompts is None else {"chunk_prompts": chunk_prompts}
    url = serve_adapters(
        str(root), port=port, keys=str(keys), num_cpus=0.5, oracle_cpus=1, limits=limits
    )

    test = load_dataset("fashion-mnist", "test")
    pngs = [base64.b64encode(_png(p)).decode() for p in test.images[:320]]
    sets = {}
    for name in ("good", *[f"attacker-{i}" for i in range(attackers)]):
        response = requests.post(
            f"{url}/v1/oracle/image-sets",
            json={"images": pngs},
            headers={"Authorization": f"Bearer {tokens[name]}"},
            timeout=300,
        )
        response.raise_for_status()
        sets[name] = response.json()["image_set"]
    meta = requests.get(
        f"{url}/v1/oracle/metadata",
        headers={"Authorization": f"Bearer {tokens['good']}"},
        timeout=300,
    ).json()
    dim, mean, std = meta["token_dim"], np.asarray(meta["embedding_mean"]), meta["embedding_std"]
    rng = np.random.default_rng(0)

    def contexts(population: int) -> np.ndarray:
        noise = rng.normal(size=(population, 4, dim))
        return (mean + std * noise).astype(np.float32)

    classes = list(test.class_names)
    good_body = {"contexts": _b64_array(contexts(20)), "class_names": classes, "image_set": ""}
    many = [f"class number {i}" for i in range(1000)]
    facts = {
        "max_body": {  # bodies per key: their sets differ only by key, the id is the same
            "contexts": _b64_array(contexts(20)),
            "class_names": many,
            "image_set": sets["attacker-0"],
            "indices": list(range(200)),
        },
        "json_body": {
            "contexts": contexts(160).tolist(),
            "class_names": many[:100],
            "image_set": sets["attacker-0"],
            "indices": list(range(64)),
        },
    }
    facts = {k: json.dumps(v).encode() for k, v in facts.items()}
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {tokens['good']}"

    def generation() -> float:
        started = time.perf_counter()
        response = session.post(
            f"{url}/v1/oracle/logits", json={**good_body, "image_set": sets["good"]}, timeout=600
        )
        response.raise_for_status()
        assert response.json()["shape"] == [20, 320, 10]
        return time.perf_counter() - started

    for _ in range(3):
        generation()  # warm-up: the replica has the set's features, connections are open
    for name in sets:  # each key's features are its own (issue 29): encoded once, before timing
        requests.post(
            f"{url}/v1/oracle/logits",
            json={**good_body, "image_set": sets[name]},
            headers={"Authorization": f"Bearer {tokens[name]}"},
            timeout=600,
        ).raise_for_status()
    requests.post(  # and the adapter replica has loaded its backend and the adapter
        f"{url}/v1/classify", json={"adapter": adapter, "image": pngs[0]}, timeout=300
    ).raise_for_status()
    pids = _pids()
    time.sleep(3)
    before = {name: _memory_mb(pid) for name, pid in pids.items()}
    peak = {name: dict(memory) for name, memory in before.items()}
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.5):
            for name, pid in pids.items():
                for field, value in _memory_mb(pid).items():
                    peak[name][field] = max(peak[name][field], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def line(name: str, values: list[float]) -> str:
        return (
            f"{name:<40} p50 {_percentile(values, 50) * 1000:7.1f} ms  "
            f"p99 {_percentile(values, 99) * 1000:7.1f} ms  ({len(values)} calls)"
        )

    def measured(count: int) -> tuple[list[float], dict[str, float], float]:
        """``count`` generations, the CPU time used meanwhile, and the seconds they took."""
        wall = time.perf_counter()
        values = [generation() for _ in range(count)]
        return values, _cpu_seconds(pids), time.perf_counter() - wall

    print(
        f"ConSE oracle, 1 replica with 1 CPU; keyed client: P=20 x m=4, C=10, 320 images, "
        f"base64; {'quick' if quick else 'full'} mode: {rounds} rounds a phase of {per_round} "
        "calls alone, then as many under attack (interleaved: the machine's other load "
        "weighs on both alike)"
    )
    alone: list[float] = []
    hostile: list[float] = []
    for phase in phases:
        alone, hostile = [], []
        cpu_alone: dict[str, float] = collections.Counter()
        cpu_hostile: dict[str, float] = collections.Counter()
        seconds = {"alone": 0.0, "hostile": 0.0}
        statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        health, classify = [], []
        for _ in range(rounds):
            start = _cpu_seconds(pids)
            values, end, wall = measured(per_round)
            alone += values
            cpu_alone.update({k: end[k] - start[k] for k in start})
            seconds["alone"] += wall
            hostiles = Hostiles(url, tokens, facts)
            count = hostiles.start(set(phase.split(",")), attackers)
            time.sleep(5 if quick else 10)  # the slots fill, the oracle is saturated
            start = _cpu_seconds(pids)
            values, end, wall = measured(per_round)
            hostile += values
            cpu_hostile.update({k: end[k] - start[k] for k in start})
            seconds["hostile"] += wall
            began = time.perf_counter()
            requests.get(f"{url}/healthz", timeout=30).raise_for_status()
            health.append(time.perf_counter() - began)
            began = time.perf_counter()  # a request without a key, beside 4 slow ones
            requests.post(
                f"{url}/v1/classify", json={"adapter": adapter, "image": pngs[0]}, timeout=60
            ).raise_for_status()
            classify.append(time.perf_counter() - began)
            hostiles.stop()
            for kind, counts in hostiles.statuses.items():
                statuses[kind].update(counts)
            time.sleep(10)  # abandoned calls are cancelled, freed memory handed back
        zero = dict.fromkeys(cpu_alone, 0.0)
        print(line("alone", alone))
        print(f"  CPU, cores busy: {_cpu_use(zero, cpu_alone, seconds['alone'])}")
        print(line(f"under {count} hostile clients ({phase})", hostile))
        print(f"  CPU, cores busy: {_cpu_use(zero, cpu_hostile, seconds['hostile'])}")
        print(
            f"  under attack: /healthz at most {max(health) * 1000:.1f} ms, /v1/classify "
            f"at most {max(classify) * 1000:.1f} ms"
        )
        for kind, counts in sorted(statuses.items()):
            print(f"  hostile {kind:<36} {dict(counts)}", flush=True)
    stop_sampling.set()
    after = {name: _memory_mb(pid) for name, pid in pids.items()}
    usage = session.get(f"{url}/v1/oracle/usage", timeout=60).json()
    for name in sorted(before):
        print(
            f"{name} memory, MB (RSS = own + shared): "
            + "; ".join(
                f"{field} before {before[name][field]:.0f}, peak {peak[name][field]:.0f}, "
                f"after {after[name][field]:.0f} ({after[name][field] / before[name][field] - 1:+.1%})"
                for field in ("rss", "anon")
            )
            + f"; shared after {after[name]['shmem']:.0f}"
        )
    print(f"good key's account after: reserved {usage['queries_reserved']}")
    front = _front_door_probes(url, tokens["attacker-0"], sets["attacker-0"], dim, pids)
    print(
        f"p99_hostile_over_alone={_percentile(hostile, 99) / _percentile(alone, 99):.2f} "
        f"p50_hostile_over_alone={_percentile(hostile, 50) / _percentile(alone, 50):.2f} "
        f"gateway_rss_after_over_before={after['gateway']['rss'] / before['gateway']['rss']:.2f} "
        f"gateway_own_after_over_before={after['gateway']['anon'] / before['gateway']['anon']:.2f} "
        + " ".join(f"{name}={ratio:.2f}" for name, ratio in front.items())
    )
    serve.delete(APP_NAME)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds of 8 calls a phase (full: 5 of 12)"
    )
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["all"],
        help="hostile phases, one after another; each a comma list of kinds "
        "(slow, logits, json, register, idle) or all (default: one phase, all 20)",
    )
    parser.add_argument(
        "--attackers",
        type=int,
        default=1,
        help="keys the 9 clients making maximal calls use (default 1: one hostile account)",
    )
    parser.add_argument(
        "--chunk-prompts",
        type=int,
        default=None,
        help="the server's chunk_prompts limit (default: ServerLimits' default)",
    )
    arguments = parser.parse_args()
    main(arguments.quick, arguments.phases, arguments.attackers, arguments.chunk_prompts)
