"""Fair admission into SGLang: which request enters its running batch next once the batch is full.

SGLang schedules the requests it holds by its own policy, with no notion of rollwire's clients:
one client that sends more than SGLang's ``max_running_requests`` fills the batch, and everyone
else's requests queue behind all of its own. So the adapter keeps at most that many requests inside
SGLang and, while it is full, holds the rest itself; each freed slot goes to the waiting client
with the fewest requests inside (ties: round robin), as the hf engine's batch share does. And as
there, a waiting client below its share (capacity // clients holding or waiting for slots) gets a
slot by preemption: the engine evicts the newest request of the client most above its share (its
tokens so far are kept; it queues for a slot again and continues from prompt + output), one
eviction at a time (``Slots.rebalance``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from rollwire.engines.sglang.requests import Live

PREEMPT_RETRY_S = 0.05  # a preemption's abort is sent again this often until its request is out


class FairAdmission:
    def __init__(self, capacity: int | None) -> None:
        """``capacity``: SGLang's max_running_requests (None: unknown, no gating)."""
        self.capacity = capacity
        self.inside: Counter[str] = Counter()  # client -> slots held (granted, inside SGLang or about to be)
        self.total = 0
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}  # client -> waiters, in arrival order
        self.held_back = 0  # requests that had to wait for a slot (a counter for info())
        self.preempted = 0  # requests evicted to give a slot to a client below its share

    def neediest(self) -> str | None:
        """The waiting client holding fewest slots (the next a freed slot goes to), or None."""
        return min(self._waiting, key=lambda c: self.inside[c]) if self._waiting else None

    def over_share(self, client: str) -> str | None:
        """Whom to take a slot from for ``client``: the client holding the most slots above the fair
        share (capacity // clients holding or waiting for slots); None if ``client`` holds its share
        already or nobody holds more than theirs."""
        if self.capacity is None:
            return None
        share = max(1, self.capacity // max(1, len(set(self.inside) | set(self._waiting))))
        if self.inside[client] >= share or not self.inside:
            return None
        top = max(self.inside, key=lambda c: self.inside[c])
        return top if self.inside[top] > share else None

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def request(self, client: str) -> asyncio.Future[None]:
        """A future done once ``client`` holds a slot; ``withdraw`` it if it is no longer wanted."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.capacity is None or (self.total < self.capacity and not self._waiting):
            self._take(client)
            fut.set_result(None)
            return fut
        self.held_back += 1
        self._waiting.setdefault(client, deque()).append(fut)
        return fut

    def withdraw(self, client: str, fut: asyncio.Future[None]) -> None:
        """Give up a request: a slot it was granted goes to the next waiter."""
        if fut.done() and not fut.cancelled():
            self.leave(client)
            return
        fut.cancel()
        q = self._waiting.get(client)
        if q is not None:
            with contextlib.suppress(ValueError):  # granted and cancelled at once: no longer queued
                q.remove(fut)
            if not q:
                del self._waiting[client]

    def leave(self, client: str) -> None:
        """A slot held by ``client`` is free again."""
        self.inside[client] -= 1
        if self.inside[client] <= 0:
            del self.inside[client]
        self.total -= 1
        self._grant()

    def _take(self, client: str) -> None:
        self.inside[client] += 1
        self.total += 1

    def _grant(self) -> None:
        while self._waiting and (self.capacity is None or self.total < self.capacity):
            # fewest slots held first; among equals the first in the dict, which is the one served
            # longest ago (a client served goes to the back)
            client = min(self._waiting, key=lambda c: self.inside[c])
            q = self._waiting.pop(client)
            fut = q.popleft()
            if q:
                self._waiting[client] = q
            if fut.cancelled():
                continue
            self._take(client)
            fut.set_result(None)


class Slots:
    """Fair admission as the SGLang engine uses it: a slot per request inside SGLang (``acquire``,
    ``release``), and preemption for a client below its share (``rebalance``). ``live`` is the
    engine's table of requests, ``abort(srid)`` SGLang's abort, ``runnable()`` whether the engine
    runs (nothing is preempted while it is paused)."""

    def __init__(self, live: dict[str, Live], abort: Callable[[str], None], runnable: Callable[[], bool]) -> None:
        self.fair = FairAdmission(None)  # its capacity: SGLang's max_running_requests, set at start
        self._live, self._abort, self._runnable = live, abort, runnable
        self._preempting: tuple[Live, str] | None = None  # the victim and its SGLang rid then, until it is out
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False

    def info(self) -> dict[str, Any]:
        fair = self.fair
        return {"max_running_requests": fair.capacity, "waiting_for_a_slot": fair.waiting(),
                "held_for_a_slot": fair.held_back, "preempted": fair.preempted}

    async def acquire(self, s: Live, changed: Callable[[], asyncio.Event], gone: Callable[[], bool]) -> bool:
        """Wait for a slot for ``s``. False, with nothing held, once ``gone()`` (aborted, the engine
        closed or dead); ``changed()`` is the event the engine sets when such things change."""
        client = s.req.client
        grant = self.fair.request(client)
        if not grant.done():
            self.rebalance()
        try:
            while not grant.done():
                event: asyncio.Future[Any] = asyncio.ensure_future(changed().wait())
                try:
                    await asyncio.wait([grant, event], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    event.cancel()
                if gone():
                    self.fair.withdraw(client, grant)
                    return False
        except BaseException:  # the consumer went away while it waited
            self.fair.withdraw(client, grant)
            raise
        return True

    def release(self, s: Live) -> None:
        self.fair.leave(s.req.client)
        self.rebalance()

    def ended(self, s: Live) -> None:
        """``s`` is over: if it was the request being evicted, the next preemption may start."""
        if self._preempting is not None and self._preempting[0] is s:
            self.rebalance()

    def rebalance(self) -> None:
        """While SGLang's batch is full and a client waits below its share, evict the newest request
        of the client most above its share; one eviction at a time."""
        if self._closed or self.fair.capacity is None:
            return
        if self._preempting is not None:
            victim, srid = self._preempting
            if victim.srid == srid and not victim.done:
                # still inside: SGLang registers a request before it sends it to its scheduler, and an
                # abort that arrives in between is lost, so the abort is sent again until it is out
                self._abort(srid)
                self._retry_later()
                return
            self._preempting = None
        waiting = self.fair.neediest()
        top = self.fair.over_share(waiting) if waiting is not None and self._runnable() else None
        if top is None:
            return
        chosen = next((v for v in reversed(self._live.values()) if v.req.client == top and v.state is not None
                       and not v.done and not v.evicting and not v.abort_requested), None)
        if chosen is None:
            return
        chosen.evicting = True  # its segment ends with its tokens so far; it queues for a slot again
        self._abort(chosen.srid)
        self._preempting = (chosen, chosen.srid)
        self.fair.preempted += 1
        self._retry_later()

    def _retry_later(self) -> None:
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(PREEMPT_RETRY_S, self._again)

    def _again(self) -> None:
        self._retry = None
        self.rebalance()

    def close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
