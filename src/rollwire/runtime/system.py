"""ActorSystem: spawn actors on their ports, address them, stop them, restart the ones that crash.

Supervision (one-for-one, as in Erlang/pykka): when an actor crashes, every request it held
gets ``ACTOR_RESTARTED``, the actor is closed (``on_stop``), and a fresh instance from the same
factory is bound to the same endpoints and started, after a back-off that doubles with each crash
in the window (``restart_backoff_s`` up to ``max_backoff_s``), so a crash loop does not spin.
More than ``max_restarts`` crashes within ``restart_window_s`` stop the system with the reason in
``failed``: a crash loop is a bug to surface, not to hide (the server then exits non-zero).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rollwire.messages.errors import ErrorCode
from rollwire.runtime.actor import Actor
from rollwire.runtime.logging import get_logger
from rollwire.transports import sockets
from rollwire.transports.security import CurveServer

log = get_logger("rollwire.system")


def address(actor: str, port: str) -> str:
    """The inproc address of an actor's port: how co-located actors reach each other."""
    return sockets.inproc_endpoint(f"{actor}/{port}")


@dataclass
class _Slot:
    factory: Callable[[], Actor]
    binds: dict[str, list[str]]
    actor: Actor
    task: asyncio.Task[None] | None = None
    crashes: list[float] = field(default_factory=list)
    public: dict[str, list[str]] = field(default_factory=dict)
    curve: CurveServer | None = None


class SupervisionGaveUp(Exception):
    """An actor crashed more than ``max_restarts`` times within the window."""


class ActorSystem:
    def __init__(self, *, max_restarts: int = 5, restart_window_s: float = 60.0, restart_backoff_s: float = 0.1,
                 max_backoff_s: float = 5.0) -> None:
        self._slots: dict[str, _Slot] = {}
        self._max_restarts = max_restarts
        self._window = restart_window_s
        self._backoff = restart_backoff_s
        self._max_backoff = max_backoff_s
        self._stopping = False
        self.failed: asyncio.Future[BaseException] | None = None  # set when supervision gives up

    def actor(self, name: str) -> Actor:
        return self._slots[name].actor

    def names(self) -> list[str]:
        return list(self._slots)

    async def spawn(self, factory: Callable[[], Actor], *, public: dict[str, Sequence[str]] | None = None,
                    curve: CurveServer | None = None) -> Actor:
        """Create the actor, bind each port to its inproc address (its internal socket) and to the
        ``public`` endpoints (a socket each, CURVE-guarded when ``curve`` is given), start it."""
        if self.failed is None:
            self.failed = asyncio.get_running_loop().create_future()
        actor = factory()
        binds = {p: [address(actor.name, p)] for p in actor.ports}
        slot = _Slot(factory, binds, actor, public={p: list(eps) for p, eps in (public or {}).items()}, curve=curve)
        self._slots[actor.name] = slot
        await self._start(slot)
        return actor

    async def _start(self, slot: _Slot, predecessor: Actor | None = None) -> None:
        if predecessor is not None:
            slot.actor._adopt(predecessor)
        else:
            slot.actor._bind(slot.binds, slot.public, slot.curve)
        await slot.actor.on_start()
        slot.task = asyncio.get_running_loop().create_task(self._supervise(slot), name=f"supervise:{slot.actor.name}")

    async def _supervise(self, slot: _Slot) -> None:
        exc = await slot.actor._run()
        if self._stopping:
            return
        actor = slot.actor
        log.error("actor_crashed", actor=actor.name, error=repr(exc))
        await actor._stop_intake()
        for origin in actor.take_held_requests():
            why = f"{actor.name} crashed ({exc!r}) and was restarted"
            actor.send_error_soon(origin, ErrorCode.ACTOR_RESTARTED, why)
        await self._close(actor, close_sockets=False)
        now = time.monotonic()
        slot.crashes = [t for t in slot.crashes if now - t < self._window] + [now]
        if len(slot.crashes) > self._max_restarts:
            why = (f"{actor.name} crashed {len(slot.crashes)} times within {self._window:.0f}s "
                   f"(max_restarts={self._max_restarts}); last error: {exc!r}")
            log.error("actor_gave_up", actor=actor.name, crashes=len(slot.crashes), reason=why)
            await actor._close()
            if self.failed is not None and not self.failed.done():
                self.failed.set_result(SupervisionGaveUp(why))
            return
        delay = min(self._max_backoff, self._backoff * 2 ** (len(slot.crashes) - 1))
        await asyncio.sleep(delay)  # back off: a crash loop must not spin the loop (nor flood the log)
        slot.actor = slot.factory()
        slot.actor.counters.set("restarts", len(slot.crashes))
        await self._start(slot, predecessor=actor)
        log.info("actor_restarted", actor=actor.name, restarts=len(slot.crashes))

    async def _close(self, actor: Actor, close_sockets: bool = True) -> None:
        try:
            await actor.on_stop()
        finally:
            await actor._close(close_sockets)

    async def stop(self) -> None:
        """Stop actors in reverse spawn order; each answers what it held before its sockets close."""
        self._stopping = True
        for slot in reversed(list(self._slots.values())):
            if slot.task is not None:
                slot.task.cancel()
                await asyncio.gather(slot.task, return_exceptions=True)
            await self._close(slot.actor)
        self._slots.clear()
