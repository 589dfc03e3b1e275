"""A real multi-node Ray cluster on this machine: `ray start --head` and two worker nodes.

The oracle pool and a sweep's trials spread over the nodes (the runs table
records each trial's node); a worker node is SIGKILLed mid-sweep and the
sweep still completes, with one row per trial, no duplicate steps and an
exact ledger. Results, Tune's storage and the ledger audit are on a loopback
S3 server (moto's), as on a cluster with no shared filesystem. Run alone with
`pytest -m cluster`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmlab.results import ResultsStore
from vlmlab.storage import locate
from vlmlab.testing import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

DRIVER = Path(__file__).with_name("sweep_driver.py")
POPSIZE = 6


def _spec(name: str, iterations: int, trials: int) -> dict:
    return {
        "name": name,
        "backend": {"name": "conse"},
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 40, "forget": [0, 1]},
        "method": {"name": "bbf", "popsize": POPSIZE, "iterations": iterations, "batch_size": 10},
        "budget": {"max_queries": POPSIZE * iterations},
        "seeds": [1],
        "eval_every": 1,  # a Tune checkpoint every generation
        "pool": {"replicas": 2, "num_cpus": 0.25},
        "sweep": {
            "metric": "val_H",
            "num_samples": trials,
            "max_concurrent": 3,
            "scheduler": "fifo",
            "trial_cpus": 1.5,  # one trial a node: 2 CPUs each, 0.25 for a replica
            "max_failures": 2,
            "space": {"method.sigma": {"type": "loguniform", "low": 0.5, "high": 2.0}},
        },
    }


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster({"w1": 2, "w2": 2}, head_cpus=2) as running:
        yield running


def _driver(
    cluster, cache_dir, spec, results: str, logs: Path, *, resume: bool = False, env=None
) -> tuple[subprocess.Popen, Path]:
    """A sweep driver process on ``cluster``, results at ``results`` (a URI), logs in ``logs``."""
    attempt = "resume" if resume else "first"
    summary = logs / f"{spec['name']}-{attempt}-summary.json"
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "VLMLAB_CACHE_DIR": cache_dir, **(env or {})}
    log = (logs / f"{spec['name']}-{attempt}-driver.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            str(DRIVER),
            json.dumps(spec),
            results,
            cluster.address,
            str(summary),
            *(["--resume"] if resume else []),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, summary


def _finish(process: subprocess.Popen, summary: Path, timeout: float) -> dict:
    log = summary.with_name(summary.name.replace("-summary.json", "-driver.log"))
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the sweep did not finish:\n{log.read_text()[-5000:]}") from None
    assert code == 0, log.read_text()[-5000:]
    return json.loads(summary.read_text())


def _attempts(audit: dict, run_id: str) -> dict[str, dict]:
    """The ledger accounts of one trial's attempts (its evaluation accounts left out)."""
    return {
        key: account
        for key, account in audit["accounts"].items()
        if key.split("@")[0] == run_id and not key.endswith(":eval")
    }


def _running_trial_past_step_two(
    store: ResultsStore, process: subprocess.Popen, node: str | None = None
) -> str:
    """A running trial (on ``node``, if given) past its second checkpoint, as the store shows."""
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "no trial got going"
        time.sleep(0.2)
        try:
            runs, steps = store.runs(), store.steps()
        except Exception:  # a table read while a file was being replaced: read again
            continue
        running = runs[runs.status == "running"]
        if node is not None:
            running = running[running.ray_node == node]
        for run_id in running.run_id:
            if len(steps) and steps[steps.run_id == run_id].step.max() >= 2:
                return str(run_id)


def test_a_worker_node_lost_mid_sweep(cluster, cache_dir, tmp_path, s3_results):
    victim = cluster.node_id("w2")
    results = s3_results
    iterations = 30
    process, summary = _driver(cluster, cache_dir, _spec("loss", iterations, 4), results, tmp_path)
    store = ResultsStore(results)
    doomed = _running_trial_past_step_two(store, process, node=victim)
    cluster.kill("w2")

    seen = _finish(process, summary, timeout=600)
    assert seen["errors"] == [] and seen["trials"] == 4
    # The replicas answer from live nodes only: the lost node's were replaced.
    nodes = {cluster.node_id(name) for name in cluster.nodes}
    assert seen["replica_nodes"] and set(seen["replica_nodes"]) <= nodes - {victim}
    runs, steps = store.runs(), store.steps()
    # The trials spanned nodes: the doomed one ran on w2, the rest end elsewhere.
    assert set(runs.ray_node) <= nodes - {victim}
    # Every trial completed, one row each, none on the lost node at the end.
    assert len(runs) == 4 and runs.run_id.is_unique and set(runs.status) == {"completed"}
    assert victim not in set(runs.ray_node)
    assert not steps.duplicated(["run_id", "step", "split", "metric"]).any()
    assert (runs.queries_used == POPSIZE * iterations).all()  # the whole budget, not more
    # The ledger is exact: every query served is on an attempt's account. The doomed
    # trial has a second attempt; what the first spent after its last checkpoint was
    # lost work, whole generations. Another trial may also have an attempt the loss
    # cut short (CI saw one that spent 0 queries, likely started as w2 died): the same
    # rule holds for it. A trial with one attempt spent exactly its row's queries.
    audit = json.loads((locate(results) / "ledger.json").read_text())
    for row in runs.itertuples():
        attempts = _attempts(audit, row.run_id)
        spent = sum(a["queries"] for a in attempts.values())
        assert all(a["queries"] % POPSIZE == 0 for a in attempts.values())
        assert spent >= row.queries_used and (spent - row.queries_used) % POPSIZE == 0
        if row.run_id == doomed:
            assert len(attempts) >= 2, attempts
        if len(attempts) == 1:
            assert spent == row.queries_used
            assert all(a["reserved"] == 0 for a in attempts.values())
    assert (locate(results) / "tune" / "loss").is_dir()  # Tune's own state, on S3 too


def test_the_whole_cluster_lost_mid_sweep(cache_dir, tmp_path, s3_results):
    """Head node and all: a fresh cluster's `--resume` finishes from S3 and the journal alone.

    The ledger journals to a file outside either cluster (a volume that survives the
    head node); results and Tune's state are on the loopback S3 server.
    """
    from vlmlab.pool import JOURNAL_ENV

    iterations = 12
    spec = _spec("crash", iterations, 2)
    journal = {JOURNAL_ENV: str(tmp_path / "volume" / "ledger.sqlite")}
    (tmp_path / "volume").mkdir()
    store = ResultsStore(s3_results)
    with LocalCluster({"w1": 2}, head_cpus=2) as first:
        process, _ = _driver(first, cache_dir, spec, s3_results, tmp_path, env=journal)
        doomed = _running_trial_past_step_two(store, process)
        first.crash()  # the head, its GCS, the ledger actor, Tune's driver node: all gone
        process.kill()
        process.wait()

    with LocalCluster({"w1": 2}, head_cpus=2) as second:
        process, summary = _driver(
            second, cache_dir, spec, s3_results, tmp_path, resume=True, env=journal
        )
        seen = _finish(process, summary, timeout=600)
    assert seen["errors"] == []
    everything, steps = store.runs(), store.steps()
    runs = everything[everything.status != "abandoned"]  # started < 1 s before the crash
    assert len(runs) == 2 and everything.run_id.is_unique, everything[["run_id", "status"]]
    assert set(runs.status) == {"completed"} and doomed in set(runs.run_id)
    assert not steps.duplicated(["run_id", "step", "split", "metric"]).any()
    assert (runs.queries_used == POPSIZE * iterations).all()
    # The journal brought the first cluster's accounts to the second: the doomed
    # trial's lost attempt is on the books, and every attempt spent whole generations.
    audit = json.loads((locate(s3_results) / "ledger.json").read_text())
    for row in runs.itertuples():
        attempts = _attempts(audit, row.run_id)
        spent = sum(a["queries"] for a in attempts.values())
        assert all(a["queries"] % POPSIZE == 0 for a in attempts.values()), attempts
        assert spent >= row.queries_used and (spent - row.queries_used) % POPSIZE == 0
        if row.run_id == doomed:
            assert len(attempts) >= 2, attempts
