"""GenerationActor's control port: what the MemoryGovernor asks of it (inproc only).

Kept apart from the rollout port so a rollout worker can never pause the engine or load weights.
A weight push is one ``SwapWeights``: pause, (wake), load, (wake), resume, in one handler; a
colocated train_start is one ``ReleaseForTraining``: pause, free memory. The governor owns the
state; this side keeps only the admission gate (``_admission``) that makes new requests wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rollwire.engines.base import EngineError, VerifyingLoader
from rollwire.engines.validation import check_version_tensors
from rollwire.messages import (
    Ack,
    ErrorCode,
    ForgetSession,
    ReleaseForTraining,
    ResumeGeneration,
    SwapWeights,
    VersionApplied,
)
from rollwire.messages.weights import PausePolicy
from rollwire.runtime import Origin, RollwireError, handles
from rollwire.weightsync.layout import StagingError
from rollwire.weightsync.memcopy import copy_pool, copy_threads, copy_verified
from rollwire.weightsync.staged import STAGED, StagedVersion

if TYPE_CHECKING:
    import structlog

    from rollwire.actors.flights import InFlight
    from rollwire.engines.base import Engine
    from rollwire.runtime.metrics import Counters


MAX_STALE_RESTARTS = 3


def session_key(peer: bytes, session_id: str | None) -> str | None:
    """The engine's prefix-cache key: per sender, so no client can reach another's cached KV."""
    return None if session_id is None else f"{peer.hex()}:{session_id}"


class GenerationControl:
    """Mixin of GenerationActor: the weight swap, the release for training, session forgetting."""

    # provided by GenerationActor / Actor
    engine: Engine
    pause_policy: str
    max_staleness: int | None
    in_flight: dict[tuple[bytes, int], InFlight]
    counters: Counters
    log: structlog.typing.FilteringBoundLogger
    _admission: asyncio.Event
    _running_samples: int
    _sample_finished: asyncio.Event
    if TYPE_CHECKING:
        async def reply(self, origin: Origin, msg: Any, payload: Sequence[Any] = ()) -> bool: ...
        def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task[Any]: ...
        def notify_version_changed(self) -> None: ...

    async def _pause(self, policy: PausePolicy, drain_deadline_s: float) -> None:
        t0 = time.monotonic()
        self._admission.clear()  # new requests wait in the actor, not in the engine
        if policy == "drain":
            deadline = t0 + drain_deadline_s
            while self._running_samples and time.monotonic() < deadline:
                self._sample_finished.clear()
                await asyncio.wait([asyncio.ensure_future(self._sample_finished.wait())],
                                   timeout=max(0.0, deadline - time.monotonic()))
            await self.engine.pause("abort")  # whatever outlived the deadline is aborted
        else:
            await self.engine.pause(policy)
        self.pause_policy = policy
        self.counters.inc(f"pauses_{policy}")

    async def _resume(self) -> None:
        await self.engine.resume()
        self._admission.set()

    async def _load(self, staged: StagedVersion, version: int) -> None:
        """The engine loads the staged tensors; buckets the receiver left unverified are verified as
        the engine copies them, or here first by an engine that cannot."""
        if not staged.checks:
            await self.engine.update_weights(staged.tensors, version)
        elif isinstance(self.engine, VerifyingLoader):
            await self.engine.update_weights_verified(staged.tensors, version, staged.checks)
        else:
            try:
                bad = await asyncio.get_running_loop().run_in_executor(None, copy_verified, [], staged.checks,
                                                                       copy_pool(), copy_threads())
            except StagingError as e:  # the trainer stopped writing the bytes: nothing is loaded yet
                raise RollwireError(e.code, e.message) from None
            if bad:
                raise RollwireError(ErrorCode.BAD_CHECKSUM, f"version {version}: bucket(s) {bad} do not match "
                                                            "their announced checksums")
            await self.engine.update_weights(staged.tensors, version)

    @handles(SwapWeights)
    async def on_swap_weights(self, origin: Origin, msg: SwapWeights, payload: Sequence[Any]) -> None:
        t0 = time.monotonic()
        staged = STAGED.get(msg.staged)
        released = list(msg.released)
        try:  # before the pause: a version the engine would refuse pauses (aborts, retracts) nothing
            check_version_tensors(self.engine.parameters(), staged.tensors)
        except EngineError as e:
            self.counters.inc("load_failures")
            raise RollwireError(e.code, e.message) from None
        if not released:
            await self._pause(msg.policy, msg.drain_deadline_s)
        try:
            if "weights" in released:  # colocated: weights first, then load, then KV and graphs
                await self.engine.resume_memory(["weights"])
            t_load = time.monotonic()
            try:
                await self._load(staged, msg.version)
            except EngineError as e:
                raise RollwireError(e.code, e.message) from None
            except ValueError as e:
                raise RollwireError(ErrorCode.WEIGHTS_FAILED, str(e)) from None
            load_s = time.monotonic() - t_load
            rest = [t for t in released if t != "weights"]
            if rest:
                await self.engine.resume_memory(rest)
        except BaseException:
            # the engine validated before copying, so the old version is intact: serve it again,
            # unless its weights were released (colocated): give back the memory woken for this load,
            # the trainer may train again, and only a new push helps. (An engine whose load failed
            # after copying part of it, into SGLang or on a checksum found bad as it copied, holds
            # its requests itself until a complete version loads.)
            self.counters.inc("load_failures")
            if not released:
                await self._resume()
            elif "weights" in released:
                try:
                    await self.engine.release_memory(["weights"])
                except Exception as e:
                    self.log.warning("re_release_failed", error=repr(e))
            raise
        self.counters.inc("weight_loads")
        self.counters.inc("load_seconds", load_s)
        self._abort_stale(msg.version)
        self.notify_version_changed()
        if msg.hold:  # barrier mode: paused until ResumeGeneration
            self.counters.inc("barrier_holds")
        else:
            await self._resume()
        pause_s = time.monotonic() - t0
        self.counters.inc("pause_seconds", pause_s)
        await self.reply(origin, VersionApplied(version=msg.version, load_s=load_s, pause_s=pause_s))

    @handles(ResumeGeneration)
    async def on_resume_generation(self, origin: Origin, msg: ResumeGeneration, payload: Sequence[Any]) -> None:
        await self._resume()
        await self.reply(origin, Ack())

    @handles(ReleaseForTraining)
    async def on_release_for_training(self, origin: Origin, msg: ReleaseForTraining, payload: Sequence[Any]) -> None:
        await self._pause(msg.policy, msg.drain_deadline_s)
        try:
            await self.engine.release_memory(msg.tags)
        except BaseException:
            await self._resume()  # nothing released: serve on
            raise
        self.counters.inc("releases")
        await self.reply(origin, Ack())

    @handles(ForgetSession)
    async def on_forget_session(self, origin: Origin, msg: ForgetSession, payload: Sequence[Any]) -> None:
        key = session_key(origin.conn, msg.session_id)
        assert key is not None
        await self.engine.close_session(key)
        await self.reply(origin, Ack())

    def _abort_stale(self, new_version: int) -> None:
        """--max-staleness K: a request started under a version older than new - K is aborted
        (partial output, finish "abort"); under the retract policy a non-streamed one is instead
        restarted from its prompt on the new version (``InFlight.restarts``; a streamed one has
        already sent its tokens, so it is aborted, unless it is ``restartable``: its client is told
        to take them back; so is one restarted MAX_STALE_RESTARTS times,
        which pushes faster than it can finish would otherwise restart for ever). One still waiting
        for its ``min_version`` or for the resume has made nothing yet: it starts on what is live then."""
        if self.max_staleness is None:
            return
        for f in list(self.in_flight.values()):
            if f.started and f.start_version < new_version - self.max_staleness and not f.aborted:
                if self.pause_policy == "retract" and (not f.streamed or f.restartable) \
                        and f.restarts < MAX_STALE_RESTARTS:
                    f.restarts += 1
                    f.start_version = new_version
                    self.counters.inc("stale_retracts")
                else:
                    f.aborted = True
                    self.counters.inc("stale_aborts")
                for erid in f.engine_rids:
                    self.spawn(self.engine.abort(erid))

