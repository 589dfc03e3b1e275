"""A 1,000-trial ``runs`` table on loopback S3 and GCS servers vs the local disk, side by side.

Writes N ``runs`` rows the way trials do (one Parquet file per run, each an
atomic write: a temporary and a rename locally, one upload on an object store),
then reads the whole table back as ``vlmlab report`` does (one parallel pyarrow
dataset), alternating local, S3 and GCS for ``--rounds`` rounds so the machine's
other load weighs on all alike. Prints the median of each and its ratio to local.

The S3 server is moto's in a thread of this process (``vlmlab.testing.LoopbackS3``),
the GCS server fake-gcs-server in a child process (``vlmlab.testing.LoopbackGCS``):
they measure the protocol's round trips and the client's work, not a cloud
store's network latency (add one RTT per file written; reads overlap).

    .venv/bin/python benchmarks/results_storage.py [--trials 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime

from vlmlab.results import ResultsStore
from vlmlab.tasks import runs_schema_of_tasks
from vlmlab.testing import LoopbackGCS, LoopbackS3


def _row(index: int) -> dict:
    now = datetime.now(UTC)
    return {
        "run_id": f"bench-{index:05d}",
        "task": "forgetting",
        "status": "completed",
        "seed": index % 5,
        "method": "bbf",
        "backend": "open_clip",
        "model": "ViT-B-16/openai",
        "dataset": "cifar10",
        "config": '{"method": {"sigma": 1.0}}',
        "queries_used": 8000,
        "budget": 8000,
        "generations": 400,
        "wall_seconds": 812.5,
        "started_at": now,
        "finished_at": now,
        "test_H": 0.8,
        "test_err_fgt": 0.9,
        "test_acc_mem": 0.7,
        "val_H": 0.81,
        "zeroshot_test_H": 0.5,
    }


def _timed(store: ResultsStore, trials: int) -> tuple[float, float]:
    started = time.perf_counter()
    for index in range(trials):
        store.write_run(_row(index))
    written = time.perf_counter()
    table = store.runs()
    read = time.perf_counter()
    assert len(table) == trials, len(table)
    return written - started, read - written


def main(trials: int, rounds: int) -> None:
    schema = runs_schema_of_tasks()
    places = ("local", "s3", "gcs")
    times: dict[str, dict[str, list[float]]] = {
        where: {"write": [], "read": []} for where in places
    }
    with LoopbackS3() as s3, LoopbackGCS() as gcs, tempfile.TemporaryDirectory() as folder:
        servers = {"s3": s3, "gcs": gcs}
        for round_ in range(rounds):
            for where in places:
                if where == "local":
                    root = f"{folder}/r{round_}"
                else:
                    root = servers[where].create_bucket(f"bench-r{round_}")
                write, read = _timed(ResultsStore(root, schema), trials)
                times[where]["write"].append(write)
                times[where]["read"].append(read)
    print(f"runs table of {trials} trials, median of {rounds} rounds (seconds):")
    print(f"{'':8s} {'write all':>10s} {'per file':>10s} {'read all':>10s}")
    for where, measured in times.items():
        write, read = statistics.median(measured["write"]), statistics.median(measured["read"])
        print(f"{where:8s} {write:10.2f} {1000 * write / trials:8.2f}ms {read:10.2f}")
    pairs = []
    for where in ("s3", "gcs"):
        for step in ("write", "read"):
            local = statistics.median(times["local"][step])
            ratio = statistics.median(times[where][step]) / local
            print(f"{where}/local {step}: {ratio:.2f}x")
            pairs.append(f"{where}_over_local_{step}={ratio:.2f}")
    print(" ".join(pairs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    main(arguments.trials, arguments.rounds)
