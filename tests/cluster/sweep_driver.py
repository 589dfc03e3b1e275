"""A sweep driver for the multi-node tests: joins the cluster, sweeps, reports what it saw.

    python tests/cluster/sweep_driver.py SPEC_JSON RESULTS ADDRESS SUMMARY_JSON [--resume]

Runs as its own process (a process holds one Ray connection; the test process
has its own). Writes SUMMARY_JSON: the trials' errors and the node of each
oracle replica that answered a stats call.
"""

from __future__ import annotations

import json
import sys


def main(spec_json: str, results: str, address: str, summary: str, resume: bool) -> None:
    from vlmlab.drivers import run_sweep
    from vlmlab.errors import TrialsFailedError
    from vlmlab.pool import DEFAULT_APP, PoolOracle
    from vlmlab.specs import validate_spec

    spec = validate_spec(json.loads(spec_json), "multi-node sweep")
    try:
        grid = run_sweep(spec, results, address=address, resume=resume)
    except TrialsFailedError as failed:  # the summary lists the errors: the test asserts on them
        grid = failed.result
    pool = PoolOracle(DEFAULT_APP)
    replica_nodes = sorted({pool.replica_stats()["node_id"] for _ in range(40)})
    with open(summary, "w") as out:
        json.dump(
            {
                "errors": [str(r.error) for r in grid if r.error],
                "trials": len(grid),
                "replica_nodes": replica_nodes,
            },
            out,
        )


if __name__ == "__main__":
    main(*sys.argv[1:5], resume="--resume" in sys.argv[5:])
