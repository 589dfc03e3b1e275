"""Concurrent requests of one replica computed together: one text-tower pass for many trials.

A sweep's trials each send one small population a generation (BBF: 20
candidates x C classes). Alone, such a request leaves a GPU mostly idle;
several trials' requests stacked along the population axis make one large
pass. :class:`MicroBatcher` gathers the requests a replica holds:

- A request waits at most ``wait_s`` for company, counted from its arrival,
  and a batch leaves as soon as it holds ``max_requests``.
- While a batch computes, new requests gather; when it ends they leave at
  once if they already waited their ``wait_s`` (continuous batching: a busy
  replica batches without adding any wait).
- Each caller gets exactly its own result. When a batch fails as a whole, its
  requests are computed one by one, so one bad request fails alone.

Compute runs on one executor thread (the replica's, where torch's thread
pool stays warm); the event loop only gathers and hands out results.

Why not Ray Serve's ``@serve.batch``: when its batch function raises, every
request of the batch gets the exception (``_assign_func_results`` in
``ray/serve/batching.py`` sets it on all their futures). One trial's bad
request (an unknown image set, an unregistered class list) would then fail
the other trials batched with it, and their generations would be retried or
lost; here it fails alone (``test_a_bad_request_fails_alone``: of three
requests batched, the bad one fails and the two others are answered). On CPU the two would perform alike: on
two cores batching itself saves nothing (BENCHMARKS.md, 0.96x-0.99x).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Result = TypeVar("Result")


@dataclass
class BatchStats:
    """What the batcher did, for ``replica_stats`` and the benchmark."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    fallbacks: int = 0
    """Batches that failed whole and were computed one request at a time."""
    sizes: dict[int, int] = field(default_factory=dict)
    """Batch size -> how many batches had it."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "mean_batch": self.requests / self.batches if self.batches else 0.0,
            "fallbacks": self.fallbacks,
            "sizes": dict(sorted(self.sizes.items())),
        }


@dataclass
class _Pending(Generic[Request, Result]):
    request: Request
    future: asyncio.Future[Result]
    arrived: float


class MicroBatcher(Generic[Request, Result]):
    """Gathers concurrent requests into batches computed by ``compute_many``.

    Args:
        compute_many: results of a list of requests, in order (runs on ``executor``).
        executor: where batches compute (one thread: one batch at a time).
        max_requests: the most requests in one batch.
        wait_s: the longest a request waits for company (0: never waits; a busy
            replica still batches what arrived while it computed).
    """

    def __init__(
        self,
        compute_many: Callable[[list[Request]], Sequence[Result]],
        executor: concurrent.futures.Executor,
        *,
        max_requests: int,
        wait_s: float,
    ) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be non-negative seconds, got {wait_s}")
        self._compute_many = compute_many
        self._executor = executor
        self.max_requests = max_requests
        self.wait_s = wait_s
        self._pending: list[_Pending[Request, Result]] = []
        self._running = False
        self._timer: asyncio.TimerHandle | None = None
        self.stats = BatchStats()

    async def submit(self, request: Request) -> Result:
        """The result of ``request``, computed in some batch."""
        loop = asyncio.get_running_loop()
        pending: _Pending[Request, Result] = _Pending(request, loop.create_future(), loop.time())
        self._pending.append(pending)
        self._schedule(loop)
        return await pending.future

    # ------------------------------------------------------------ scheduling
    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a batch if one is due, else make sure a timer will look again."""
        if self._running or not self._pending:
            return
        oldest = self._pending[0].arrived
        due = oldest + self.wait_s
        if len(self._pending) >= self.max_requests or loop.time() >= due:
            self._start(loop)
        elif self._timer is None:
            self._timer = loop.call_at(due, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._schedule(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._pending[: self.max_requests]
        del self._pending[: self.max_requests]
        batch = [item for item in batch if not item.future.cancelled()]
        if not batch:
            self._schedule(loop)
            return
        self._running = True
        size = len(batch)
        self.stats.requests += size
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, size)
        self.stats.sizes[size] = self.stats.sizes.get(size, 0) + 1
        work = loop.run_in_executor(self._executor, self._compute, [i.request for i in batch])
        work.add_done_callback(lambda done: self._finish(loop, batch, done))

    def _compute(self, requests: list[Request]) -> list[tuple[bool, Any]]:
        """``(ok, result or exception)`` per request; a failed batch is retried one by one."""
        try:
            results = list(self._compute_many(requests))
            if len(results) != len(requests):
                raise RuntimeError(f"{len(results)} results for {len(requests)} requests")
            return [(True, result) for result in results]
        except Exception as error:
            if len(requests) == 1:
                return [(False, error)]
        self.stats.fallbacks += 1
        log.info("a batch of %d requests failed; computing them one by one", len(requests))
        outcomes: list[tuple[bool, Any]] = []
        for request in requests:
            try:
                outcomes.append((True, self._compute_many([request])[0]))
            except Exception as error:
                outcomes.append((False, error))
        return outcomes

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Pending[Request, Result]],
        done: asyncio.Future[list[tuple[bool, Any]]],
    ) -> None:
        self._running = False
        error = done.exception()
        for index, item in enumerate(batch):
            if item.future.done():  # its caller gave up (cancelled)
                continue
            if error is not None:
                item.future.set_exception(error)
                continue
            ok, value = done.result()[index]
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)
        self._schedule(loop)
