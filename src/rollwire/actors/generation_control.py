"""GenerationActor's control port: what the MemoryGovernor asks of it (inproc only).

Kept apart from the rollout port so a rollout worker can never pause the engine or load weights.
Every handler answers ``Ack`` (or ``VersionApplied``) once the engine has done it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rollwire.engines.base import EngineError
from rollwire.messages import (
    Ack,
    ApplyVersion,
    ErrorCode,
    ForgetSession,
    Pause,
    ReleaseMemory,
    Resume,
    ResumeMemory,
    VersionApplied,
)
from rollwire.runtime import Origin, RollwireError, handles
from rollwire.weightsync.staged import tensors_from_apply

if TYPE_CHECKING:
    from rollwire.actors.generation import InFlight
    from rollwire.engines.base import Engine
    from rollwire.runtime.metrics import Counters


MAX_STALE_RESTARTS = 3


def session_key(peer: bytes, session_id: str | None) -> str | None:
    """The engine's prefix-cache key: per sender, so no client can reach another's cached KV."""
    return None if session_id is None else f"{peer.hex()}:{session_id}"


class GenerationControl:
    """Mixin of GenerationActor: pause policies, weight loads, memory release."""

    # provided by GenerationActor / Actor
    engine: Engine
    state: str
    pause_policy: str
    max_staleness: int | None
    in_flight: dict[tuple[bytes, int], InFlight]
    counters: Counters
    _admission: asyncio.Event
    _running_samples: int
    _sample_finished: asyncio.Event
    if TYPE_CHECKING:
        async def reply(self, origin: Origin, msg: Any, payload: Sequence[Any] = ()) -> bool: ...
        def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task[Any]: ...
        def notify_version_changed(self) -> None: ...

    @handles(Pause)
    async def on_pause(self, origin: Origin, msg: Pause, payload: Sequence[Any]) -> None:
        t0 = time.monotonic()
        self.state = "PAUSING"
        self._admission.clear()  # new requests wait in the actor, not in the engine
        if msg.policy == "drain":
            deadline = t0 + msg.drain_deadline_s
            while self._running_samples and time.monotonic() < deadline:
                self._sample_finished.clear()
                await asyncio.wait([asyncio.ensure_future(self._sample_finished.wait())],
                                   timeout=max(0.0, deadline - time.monotonic()))
            await self.engine.pause("abort")  # whatever outlived the deadline is aborted
        else:
            await self.engine.pause(msg.policy)
        self.state = "PAUSED"
        self.pause_policy = msg.policy
        self.counters.inc(f"pauses_{msg.policy}")
        self.counters.inc("pause_seconds", time.monotonic() - t0)
        await self.reply(origin, Ack())

    @handles(Resume)
    async def on_resume(self, origin: Origin, msg: Resume, payload: Sequence[Any]) -> None:
        await self.engine.resume()
        self.state = "SERVING"
        self._admission.set()
        await self.reply(origin, Ack())

    @handles(ApplyVersion)
    async def on_apply_version(self, origin: Origin, msg: ApplyVersion, payload: Sequence[Any]) -> None:
        if self.state not in ("PAUSED", "RELEASED"):
            raise RollwireError(ErrorCode.NOT_PAUSED, f"cannot load weights while {self.state}")
        t0 = time.monotonic()
        self.state = "LOADING"
        try:
            named = tensors_from_apply(msg, payload)
            await self.engine.update_weights(named, msg.version)
        except EngineError as e:
            raise RollwireError(_code(e.code), e.message) from None
        except ValueError as e:
            raise RollwireError(ErrorCode.WEIGHTS_FAILED, str(e)) from None
        finally:
            self.state = "PAUSED"
        load_s = time.monotonic() - t0
        self.counters.inc("weight_loads")
        self.counters.inc("load_seconds", load_s)
        self._abort_stale(msg.version)
        self.notify_version_changed()
        await self.reply(origin, VersionApplied(version=msg.version, load_s=load_s, pause_s=0.0))

    @handles(ReleaseMemory)
    async def on_release_memory(self, origin: Origin, msg: ReleaseMemory, payload: Sequence[Any]) -> None:
        await self.engine.release_memory(msg.tags)  # type: ignore[arg-type]
        self.state = "RELEASED"
        self.counters.inc("releases")
        await self.reply(origin, Ack())

    @handles(ResumeMemory)
    async def on_resume_memory(self, origin: Origin, msg: ResumeMemory, payload: Sequence[Any]) -> None:
        await self.engine.resume_memory(msg.tags)  # type: ignore[arg-type]
        self.state = "PAUSED"
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
        already sent its tokens, so it is aborted; so is one restarted MAX_STALE_RESTARTS times,
        which pushes faster than it can finish would otherwise restart for ever)."""
        if self.max_staleness is None:
            return
        for f in list(self.in_flight.values()):
            if f.start_version < new_version - self.max_staleness and not f.aborted:
                if self.pause_policy == "retract" and not f.streamed and f.restarts < MAX_STALE_RESTARTS:
                    f.restarts += 1
                    f.start_version = new_version
                    self.counters.inc("stale_retracts")
                else:
                    f.aborted = True
                    self.counters.inc("stale_aborts")
                for erid in f.engine_rids:
                    self.spawn(self.engine.abort(erid))


def _code(code: str) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.WEIGHTS_FAILED
