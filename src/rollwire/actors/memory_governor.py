"""MemoryGovernor: the one state machine around weight pushes (``GovernorState``).

* disaggregated: SERVING -> LOADING -> SERVING. A staged version (``LoadVersion`` from the
  WeightReceiverActor) becomes one ``SwapWeights`` to the GenerationActor, whose one handler
  pauses under the pause policy, loads and resumes.
* colocated: ``train_start`` (SERVING -> RELEASING -> RELEASED) pauses and frees weights, KV cache
  and graphs in one ``ReleaseForTraining`` so the trainer gets the memory; the next version
  (RELEASED -> LOADING -> SERVING) wakes the weights, loads, then wakes KV and graphs and resumes.
  A failed load there goes back to RELEASED (its weights released again): only a new push helps.
* barrier mode (``LoadVersion.hold``, from a trainer's barrier push): LOADING -> HELD: loaded,
  still paused, until ``StepMessage(barrier_release)`` (every server loaded it) or
  ``barrier_timeout_s`` (a trainer that died must not leave the fleet paused) -> SERVING.

One operation runs at a time (versions come one at a time from the receiver, which also does any
coalescing; step messages may arrive during a load and wait). Every transition is logged, counted
and kept in ``timeline`` (time, state) for plots; the GenerationActor's health and status report
``state`` (``GovernorQuery``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Literal

from rollwire.messages import (
    Ack,
    ControlReply,
    GovernorQuery,
    GovernorRequest,
    GovernorStatus,
    LoadVersion,
    ReleaseForTraining,
    ResumeGeneration,
    StepMessage,
    SwapWeights,
    VersionApplied,
)
from rollwire.messages.weights import ALL_MEMORY_TAGS, PausePolicy
from rollwire.runtime import Actor, Origin, Port, address, handles

GOVERNOR = "governor"
Mode = Literal["colocated", "disaggregated"]


class GovernorState(StrEnum):
    SERVING = "SERVING"
    RELEASING = "RELEASING"  # colocated train_start: pausing, then freeing memory
    RELEASED = "RELEASED"  # weights, KV cache and graphs freed for the trainer; requests wait
    LOADING = "LOADING"  # pause, load, resume (one SwapWeights)
    HELD = "HELD"  # barrier mode: loaded, paused until the trainer releases every server at once


class MemoryGovernor(Actor):
    ports = {"weights": Port(GovernorRequest)}

    def __init__(self, *, generation: str, mode: Mode = "disaggregated", pause_policy: PausePolicy = "retract",
                 drain_deadline_s: float = 30.0, barrier_timeout_s: float = 60.0, name: str = GOVERNOR) -> None:
        super().__init__(name)
        self.generation_control = address(generation, "control")
        self.mode = mode
        self.pause_policy = pause_policy
        self.drain_deadline_s = drain_deadline_s
        self.barrier_timeout_s = barrier_timeout_s
        self._held: asyncio.Task[None] | None = None  # resumes a HELD version at the barrier timeout
        self.state = GovernorState.SERVING
        self.timeline: list[tuple[float, str]] = [(time.time(), self.state.value)]
        self._lock = asyncio.Lock()

    def _transition(self, state: GovernorState, **detail: Any) -> None:
        self.log.info("governor_transition", frm=self.state.value, to=state.value, **detail)
        self.state = state
        self.timeline.append((time.time(), state.value))
        self.counters.inc(f"enter_{state.value}")

    async def _ask_generation(self, msg: Any) -> Any:
        """One control message to the GenerationActor; its ErrorReply raises (RemoteError)."""
        return (await self.peer(self.generation_control, ControlReply).call(msg)).msg

    @handles(GovernorQuery)
    def on_query(self, origin: Origin, msg: GovernorQuery, payload: Sequence[Any]) -> None:
        self.reply_nowait(origin, GovernorStatus(state=self.state.value))

    @handles(StepMessage)
    async def on_step(self, origin: Origin, msg: StepMessage, payload: Sequence[Any]) -> None:
        self.counters.inc(f"step_{msg.phase}")
        if msg.phase == "barrier_release":
            await self._release_barrier("released by the trainer")
        elif self.mode == "colocated" and msg.phase == "train_start":
            async with self._lock:
                if self.state is GovernorState.SERVING:
                    self._transition(GovernorState.RELEASING, step=msg.step)
                    try:
                        await self._ask_generation(ReleaseForTraining(
                            tags=list(ALL_MEMORY_TAGS), policy=self.pause_policy,
                            drain_deadline_s=self.drain_deadline_s))
                    except BaseException:
                        self._transition(GovernorState.SERVING)  # the GenerationActor resumed on failure
                        raise
                    self._transition(GovernorState.RELEASED, step=msg.step)
        await self.reply(origin, Ack())

    async def _release_barrier(self, why: str) -> None:
        async with self._lock:
            if self.state is not GovernorState.HELD:
                return
            if self._held is not None and self._held is not asyncio.current_task():
                self._held.cancel()
            self._held = None
            await self._ask_generation(ResumeGeneration())
            self._transition(GovernorState.SERVING, why=why)

    async def _barrier_timeout(self) -> None:
        await asyncio.sleep(self.barrier_timeout_s)
        self.counters.inc("barrier_timeouts")
        self.log.warning("barrier_timeout", seconds=self.barrier_timeout_s)
        await self._release_barrier(f"no barrier_release within {self.barrier_timeout_s}s")

    @handles(LoadVersion)
    async def on_load_version(self, origin: Origin, msg: LoadVersion, payload: Sequence[Any]) -> None:
        if self.state is GovernorState.HELD:  # a newer version before the release: it ends the barrier
            await self._release_barrier(f"version {msg.version} arrived")
        async with self._lock:
            released = self.state is GovernorState.RELEASED
            t0 = time.monotonic()
            self._transition(GovernorState.LOADING, version=msg.version)
            swap = SwapWeights(version=msg.version, staged=msg.staged, policy=self.pause_policy,
                               drain_deadline_s=self.drain_deadline_s,
                               released=list(ALL_MEMORY_TAGS) if released else [], hold=msg.hold)
            try:
                applied: VersionApplied = await self._ask_generation(swap)
            except BaseException:
                self.counters.inc("load_failures")
                self._transition(GovernorState.RELEASED if released else GovernorState.SERVING)
                raise
            if msg.hold:
                self._transition(GovernorState.HELD, version=msg.version)
                self._held = self.spawn(self._barrier_timeout(), name=f"{self.name}:barrier")
            else:
                self._transition(GovernorState.SERVING, version=msg.version)
        self.counters.inc("versions_applied")
        self.counters.set("live_version", msg.version)
        self.counters.inc("pause_seconds", applied.pause_s)
        self.log.info("version_loaded", version=msg.version, load_s=round(applied.load_s, 4),
                      pause_s=round(applied.pause_s, 4), governor_s=round(time.monotonic() - t0, 4))
        await self.reply(origin, applied)
