"""Fair turns on a few slots among API keys: start-time fair queuing, in the gateway's loop.

The oracle replicas compute one chunk at a time each, and the image registrar
decodes a couple of sets at a time. Handed out first come, first served, a key that sends
many big calls would make every other key wait behind all of them (before
this module, a P = 1 call waited 578 s behind another key's abandoned call).
Here each piece of work asks for a turn with its cost (prompts for an oracle
chunk, bytes for an upload); turns go to the waiting piece with the smallest
start tag, where a key's next tag is ``max(now, the end of its last piece)`` in
virtual time. Consequences:

- a key that has been idle goes next (its tag is "now"), ahead of the backlog
  of keys that keep the slots busy: it waits for the pieces in flight only;
- keys that are all busy share the slots in proportion to their turns' costs,
  however many requests each sends at once (a key's pieces are tagged one
  after another).

Everything runs on one event loop (the gateway's), so no lock is needed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class FairScheduler:
    """``slots`` turns at once, shared among keys by start-time fair queuing."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a scheduler needs at least one slot, got {slots}")
        self.slots = slots
        self._busy = 0
        self._virtual = 0.0  # the start tag of the piece that got the latest turn
        self._finish: dict[str, float] = {}  # key -> end tag of its latest piece
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def busy(self) -> int:
        """Turns in progress."""
        return self._busy

    @property
    def waiting(self) -> int:
        """Pieces waiting for a turn."""
        return sum(1 for _, _, future in self._waiting if not future.done())

    @asynccontextmanager
    async def turn(self, key: str, cost: float) -> AsyncIterator[None]:
        """Hold one slot for one piece of ``key``'s work costing ``cost``.

        Cancelled while waiting, the piece gives up its place (and a slot
        granted in that same instant is passed on).
        """
        await self._acquire(key, max(float(cost), 1e-9))
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, key: str, cost: float) -> None:
        tag = max(self._virtual, self._finish.get(key, 0.0))
        self._finish[key] = tag + cost
        if self._busy < self.slots and not self.waiting:
            self._busy += 1
            self._virtual = tag
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (tag, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as it was cancelled
                self._release()
            raise

    def _release(self) -> None:
        self._busy -= 1
        while self._waiting and self._busy < self.slots:
            tag, _, future = heapq.heappop(self._waiting)
            if future.done():  # its waiter was cancelled
                continue
            self._busy += 1
            self._virtual = tag
            future.set_result(None)
