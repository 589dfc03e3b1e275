"""Parallel populations: a spec's seeds run concurrently as Ray actors on one pool.

Each trial is the same loop that runs in-process (``vlmlab.runner.run_trial``)
with a :class:`PoolOracle` as its oracle, so a seed gives the same numbers
either way. White-box tasks (devsafety) train the model, so no pool is
deployed: each actor builds the backend in-process, with ``pool.num_cpus`` and
``pool.num_gpus`` as its resources. The driver polls each actor for its latest
generation to draw progress.

A trial that raises leaves its ``runs`` row ``failed`` with its traceback; the
other trials run on, and the driver raises :class:`vlmlab.errors.TrialsFailedError`
with every failed trial's run id and remote traceback at the end.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlmlab.errors import TrialsFailedError
from vlmlab.oracle import Oracle
from vlmlab.pool import DEFAULT_APP, PoolOracle, deploy_oracle_pool, ensure_ray
from vlmlab.specs import RunSpec
from vlmlab.storage import Location, locate
from vlmlab.tasks import Task, ensure_registered


class _TrialWorker:
    """Runs one trial; answers ``latest()`` while it runs (a threaded actor)."""

    def __init__(self) -> None:
        import logging

        # This actor's output reaches the user's terminal: Serve's handle logs each
        # router it starts at INFO, which is noise there (warnings still show).
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        self._latest: Any = None
        self._started: tuple | None = None

    # ProgressListener, called from the trial loop inside this actor
    def trial_started(self, run_id: str, generations: int, budget: int | None, start: int) -> None:
        self._started = (run_id, generations, budget, start)

    def generation_done(self, run_id: str, record: Any) -> None:
        self._latest = record

    def trial_finished(self, outcome: Any) -> None:
        pass

    def latest(self) -> tuple[Any, Any]:
        return self._started, self._latest

    def run(
        self,
        spec_json: str,
        seed: int,
        results_dir: str,
        app_name: str,
        shard_size: int,
        resume: bool,
        task: Task,
    ):
        from vlmlab.runner import build_oracle, load_data, run_trial

        ensure_registered(task)
        spec = RunSpec.model_validate_json(spec_json)
        oracle: Oracle
        if spec.white_box:
            import torch

            # Train on the CPUs this actor reserved (and only those).
            torch.set_num_threads(max(1, int(spec.pool.num_cpus)))
            oracle = build_oracle(spec)
        else:
            oracle = PoolOracle(app_name, shard_size=shard_size)
        return run_trial(
            spec, seed, results_dir, oracle, load_data(spec), resume=resume, listener=self
        )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def remote_traceback(error: BaseException) -> str:
    """A Ray error as text: a task's remote traceback (Ray's own format), or why its actor died."""
    return _ANSI.sub("", str(error)) or repr(error)


def deploy_for_spec(
    spec: RunSpec, *, address: str | None = None, app_name: str = DEFAULT_APP
) -> PoolOracle:
    """Deploy the oracle pool that ``spec.backend`` and ``spec.pool`` describe."""
    pool = spec.pool
    return deploy_oracle_pool(
        spec.backend.name,
        backend_kwargs=spec.backend.oracle_kwargs(),
        num_replicas=pool.replicas,
        autoscaling=pool.autoscaling,
        max_ongoing_requests=pool.max_ongoing_requests,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        app_name=app_name,
        address=address,
        shard_size=pool.shard_size,
        batching=pool.batching(),
    )


def run_experiment_on_pool(
    spec: RunSpec,
    results_dir: str | Path | Location,
    *,
    resume: bool = False,
    address: str | None = None,
    pool: PoolOracle | None = None,
    listener: Any = None,
    poll_seconds: float = 0.25,
) -> list[Any]:
    """Run every (variant, shots, seed) trial of ``spec`` concurrently, as actors, on one oracle pool.

    Args:
        pool: an already deployed pool to use (default: deploy the spec's pool).
        listener: a :class:`vlmlab.runner.ProgressListener` fed from the driver.

    Raises:
        TrialsFailedError: one or more trials raised (or their actor died); the
            others ran to their end first. ``result``: the completed trials' outcomes.
    """
    import ray
    from ray.exceptions import RayError

    from vlmlab.runner import run_id_for

    ensure_ray(address)
    if spec.white_box:
        app_name, shard_size = "", 0  # no pool: each actor trains its own model
        worker_cls = ray.remote(  # type: ignore[call-overload]  # actor options
            num_cpus=spec.pool.num_cpus, num_gpus=spec.pool.num_gpus, max_concurrency=2
        )(_TrialWorker)
    else:
        pool = pool if pool is not None else deploy_for_spec(spec, address=address)
        app_name, shard_size = pool.app_name, pool.shard_size
        # A white-box variant beside the pool (CoOp) trains in its actor, which asks for
        # what every trial asks for: the pool's replicas hold the CPUs (and GPUs) the spec
        # gives, and an actor asking for them too would wait for them forever.
        worker_cls = ray.remote(num_cpus=0.25, max_concurrency=2)(_TrialWorker)  # type: ignore[call-overload]
    results = locate(results_dir).uri  # what every actor, on any node, can open
    if spec.tracking is not None and spec.tracking.enabled:  # sent from here, the driver
        from vlmlab.runner import SilentListener
        from vlmlab.tracking import with_tracking

        listener = with_tracking(spec, results_dir, listener or SilentListener())
    trials = [
        (variant.model_dump_json(), seed) for variant in spec.expand_trials() for seed in spec.seeds
    ]
    run_ids = [run_id_for(variant, seed) for variant in spec.expand_trials() for seed in spec.seeds]
    failures: dict[int, str] = {}
    limit = spec.pool.max_parallel_trials or len(trials)
    queue = list(range(len(trials)))
    running: dict[Any, tuple[int, Any]] = {}
    outcomes: dict[int, Any] = {}
    announced: set[int] = set()
    seen_generation: dict[int, int] = {}
    polls: dict[Any, int] = {}  # latest() calls not answered yet, by trial index
    while queue or running:
        while queue and len(running) < limit:
            index = queue.pop(0)
            spec_json, seed = trials[index]
            worker = worker_cls.remote()
            ref = worker.run.remote(
                spec_json, seed, results, app_name, shard_size, resume, spec.task_entry
            )
            running[ref] = (index, worker)
        done, _ = ray.wait(list(running), num_returns=1, timeout=poll_seconds)
        if listener is not None:
            # Only actors that answer now: one still waiting for resources (a GPU, a CPU
            # another trial holds) must not block the loop that frees those resources.
            for index, worker in running.values():
                if index not in polls.values():  # one outstanding question per actor
                    polls[worker.latest.remote()] = index
            answered, _ = ray.wait(list(polls), num_returns=len(polls), timeout=poll_seconds)
            for ref in answered:
                index = polls.pop(ref)
                try:
                    started, latest = ray.get(ref)
                except RayError:  # its actor died: the trial's own ref says why, below
                    continue
                if started and index not in announced:
                    announced.add(index)
                    listener.trial_started(*started)
                if latest is not None and latest.generation != seen_generation.get(index):
                    seen_generation[index] = latest.generation
                    listener.generation_done(started[0], latest)
        for ref in done:
            index, worker = running.pop(ref)
            polls = {poll: i for poll, i in polls.items() if i != index}
            try:
                outcomes[index] = ray.get(ref)  # re-raises a trial's error here
            except RayError as error:  # the others run on; all failures are raised at the end
                failures[index] = remote_traceback(error)
            else:
                if listener is not None:
                    listener.trial_finished(outcomes[index])
            ray.kill(worker)
    if failures:
        raise TrialsFailedError(
            [(run_ids[i], failures[i]) for i in sorted(failures)],
            total=len(trials),
            result=[outcomes[i] for i in sorted(outcomes)],
        )
    return [outcomes[i] for i in range(len(trials))]
