"""MemoryGovernor: pause, release, load and resume around each weight push, in the right order.

States: SERVING -> PAUSING -> PAUSED -> RELEASED(tags) -> LOADING(version) -> RESUMING -> SERVING.

* disaggregated: a verified version pauses generation (by policy), loads, resumes.
* colocated: ``train_start`` pauses and releases weights, KV cache and graphs so the trainer
  gets the memory; the next version wakes weights first, loads, then wakes KV and graphs.

One operation runs at a time. A version that arrives while another loads waits; with
``coalesce`` only the newest waiting version is kept (the others get SUPERSEDED). Every
transition is logged, counted and kept in ``timeline`` (time, state) for plots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Literal

from rollwire.messages import (
    Ack,
    ApplyVersion,
    ControlReply,
    ErrorCode,
    ErrorReply,
    GovernorRequest,
    Pause,
    ReleaseMemory,
    Resume,
    ResumeMemory,
    StepMessage,
    VersionApplied,
)
from rollwire.messages.weights import ALL_MEMORY_TAGS, PausePolicy
from rollwire.runtime import Actor, Origin, Port, RollwireError, address, handles

GOVERNOR = "governor"
Mode = Literal["colocated", "disaggregated"]
ALL_TAGS = list(ALL_MEMORY_TAGS)


class MemoryGovernor(Actor):
    ports = {"weights": Port(GovernorRequest, zero_copy=True)}

    def __init__(self, *, generation: str, mode: Mode = "disaggregated", pause_policy: PausePolicy = "retract",
                 coalesce: bool = False, drain_deadline_s: float = 30.0, name: str = GOVERNOR) -> None:
        super().__init__(name)
        self.generation_control = address(generation, "control")
        self.mode = mode
        self.pause_policy = pause_policy
        self.coalesce = coalesce
        self.drain_deadline_s = drain_deadline_s
        self.state = "SERVING"
        self.timeline: list[tuple[float, str]] = [(time.time(), "SERVING")]
        self._lock = asyncio.Lock()
        self._waiting: list[int] = []  # versions queued behind the running operation

    def _transition(self, state: str, **detail: Any) -> None:
        self.log.info("governor_transition", frm=self.state, to=state, **detail)
        self.state = state
        self.timeline.append((time.time(), state))
        self.counters.inc(f"enter_{state.split('(')[0]}")

    async def _control(self, msg: Any, payload: Sequence[Any] = ()) -> Any:
        peer = self.peer(self.generation_control, ControlReply)
        reply = await peer.call(msg, payload)
        if isinstance(reply.msg, ErrorReply):
            raise RollwireError(reply.msg.code, reply.msg.message)
        return reply.msg

    async def _pause(self) -> float:
        t0 = time.monotonic()
        self._transition("PAUSING", policy=self.pause_policy)
        await self._control(Pause(policy=self.pause_policy, drain_deadline_s=self.drain_deadline_s))
        self._transition("PAUSED")
        return t0

    @handles(StepMessage)
    async def on_step(self, origin: Origin, msg: StepMessage, payload: Sequence[Any]) -> None:
        self.counters.inc(f"step_{msg.phase}")
        if self.mode == "colocated" and msg.phase == "train_start":
            async with self._lock:
                if self.state == "SERVING":
                    await self._pause()
                if not self.state.startswith("RELEASED"):
                    await self._control(ReleaseMemory(tags=ALL_TAGS))
                    self._transition(f"RELEASED({','.join(ALL_TAGS)})", step=msg.step)
        await self.reply(origin, Ack())

    @handles(ApplyVersion)
    async def on_apply_version(self, origin: Origin, msg: ApplyVersion, payload: Sequence[Any]) -> None:
        if self.coalesce:
            self._waiting.append(msg.version)
        async with self._lock:
            if self.coalesce:
                self._waiting.remove(msg.version)
                if self._waiting and max(self._waiting) > msg.version:
                    self.counters.inc("superseded")
                    newest = max(self._waiting)
                    raise RollwireError(ErrorCode.SUPERSEDED, f"version {msg.version} superseded by {newest}")
            applied = await self._load(msg, payload)
        await self.reply(origin, applied)

    async def _load(self, msg: ApplyVersion, payload: Sequence[Any]) -> VersionApplied:
        released = self.state.startswith("RELEASED")
        t_pause = time.monotonic() if released else await self._pause()
        try:
            if released:  # colocated: weights first, then load, then KV and graphs
                await self._control(ResumeMemory(tags=["weights"]))
            self._transition(f"LOADING({msg.version})")
            t_load = time.monotonic()
            await self._control(msg, payload)
            load_s = time.monotonic() - t_load
            if released:
                await self._control(ResumeMemory(tags=["kv_cache", "cuda_graph"]))
        except BaseException:
            # the engine validated before copying, so the old version is intact: serve it again,
            # unless its weights were released (colocated), in which case only a new push helps. (An
            # engine whose load failed after reaching SGLang holds its requests itself until a
            # complete version loads.)
            self.counters.inc("load_failures")
            if not released:
                await self._resume()
            else:  # give back the weights' memory woken for this load: the trainer may train again
                try:
                    await self._control(ReleaseMemory(tags=["weights"]))
                except Exception as e:
                    self.log.warning("re_release_failed", error=repr(e))
                self._transition(f"RELEASED({','.join(ALL_TAGS)})")
            raise
        await self._resume()
        pause_s = time.monotonic() - t_pause
        self.counters.inc("versions_applied")
        self.counters.set("live_version", msg.version)
        self.counters.inc("pause_seconds", pause_s)
        return VersionApplied(version=msg.version, load_s=load_s, pause_s=pause_s)

    async def _resume(self) -> None:
        self._transition("RESUMING")
        await self._control(Resume())
        self._transition("SERVING")
