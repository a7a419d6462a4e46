"""Supervision: an actor that raises is restarted, and the requests it held get a typed error.

Uses FaultyEngine (fault injection only): a prompt starting with 99 makes the engine raise.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from rollwire import ErrorCode, RolloutClient, RolloutError, SamplingParams
from rollwire.runtime import Actor, ActorSystem
from rollwire.runtime.system import SupervisionGaveUp
from rollwire.server import RolloutServer, ServerConfig
from tests.fakes import FaultyEngine

from .conftest import free_tcp_endpoint, until


async def test_a_crashing_generation_actor_is_restarted_and_its_held_requests_get_actor_restarted() -> None:
    ep = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ep)
    async with RolloutServer(cfg, engine_factory=lambda: FaultyEngine()) as srv, RolloutClient(ep, timeout=30) as rc:
        held = [asyncio.ensure_future(rc.generate([3], SamplingParams(max_new_tokens=500))) for _ in range(3)]
        await until(lambda: len(srv.generation.in_flight) == 3, "all three held by the actor", 30)
        with pytest.raises(RolloutError) as crash:
            await rc.generate([99], SamplingParams(max_new_tokens=5))
        assert crash.value.code == ErrorCode.INTERNAL
        for h in held:  # each in-flight request: exactly one terminal reply, a typed error
            with pytest.raises(RolloutError) as err:
                await h
            assert err.value.code == ErrorCode.ACTOR_RESTARTED
        after = await rc.generate([1, 2], SamplingParams(max_new_tokens=4))
        assert after.output_ids == [3, 4, 5, 6]  # type: ignore[union-attr]
        assert srv.generation.counters.get("restarts") == 1


async def test_a_generation_crash_fails_the_running_session_turns_and_the_sessions_go_on() -> None:
    """Session turns are requests like any other: a turn held by the crashed GenerationActor gets
    actor_restarted (relayed by the SessionActor), its session's history is unchanged, and the
    next turn of that session runs on the restarted actor."""
    ep = free_tcp_endpoint()
    sp = SamplingParams(max_new_tokens=4)
    async with RolloutServer(ServerConfig(rollout_endpoint=ep), engine_factory=lambda: FaultyEngine()) as srv, \
            RolloutClient(ep, timeout=30) as rc, rc.session() as victim, rc.session() as culprit:
        await victim.generate([3], sp)
        held = asyncio.ensure_future(victim.generate([10], SamplingParams(max_new_tokens=500)))
        await until(lambda: len(srv.generation.in_flight) == 1, "the turn reached the GenerationActor", 30)
        with pytest.raises(RolloutError) as crash:
            await culprit.generate([99], sp)  # the fault: its prompt crashes the engine
        assert crash.value.code == ErrorCode.INTERNAL
        with pytest.raises(RolloutError) as err:
            await held
        assert err.value.code == ErrorCode.ACTOR_RESTARTED
        assert victim.trajectory().token_ids == [3, 4, 5, 6, 7]  # the failed turn left nothing
        nxt = await victim.generate([20], sp)
        assert nxt.output_ids == [21, 22, 23, 24]
        assert victim.trajectory().token_ids == [3, 4, 5, 6, 7, 20, 21, 22, 23, 24]


async def test_a_crashing_session_actor_stops_its_orphaned_turns_and_frees_their_kv() -> None:
    """Fault injection: the SessionActor raises an unexpected error. Its running turn gets
    actor_restarted; the restarted actor starts with an empty table, so the engine work and the
    cached KV of the old sessions are released rather than left behind."""
    from rollwire.clients.session import Session

    ep = free_tcp_endpoint()
    async with RolloutServer(ServerConfig(rollout_endpoint=ep)) as srv, RolloutClient(ep, timeout=30) as rc:
        idle, victim, culprit = rc.session(), rc.session(), rc.session()
        for s in (idle, victim, culprit):
            await s.open()
        await idle.generate(list(range(10, 60)), SamplingParams(max_new_tokens=4, temperature=0.0))
        held = asyncio.ensure_future(victim.generate([5, 6], SamplingParams(max_new_tokens=3000, ignore_eos=True)))
        await until(lambda: srv.generation.engine.info().extra["running"] == 1, "the turn runs in the engine", 30)

        def bug(*args: object) -> None:
            raise RuntimeError("injected session-actor bug")

        srv.sessions._check_room = bug  # type: ignore[method-assign]
        with pytest.raises(RolloutError) as crash:
            await culprit.append([7])
        assert crash.value.code == ErrorCode.INTERNAL
        with pytest.raises(RolloutError) as err:
            await held
        assert err.value.code == ErrorCode.ACTOR_RESTARTED
        for _ in range(600):  # up to 30 s: a loaded machine is slow to drain (was 5 s)
            st = await rc.status()
            restarted = srv.sessions.counters.get("restarts") == 1  # after the restart back-off
            if st.in_flight == 0 and st.counters["engine.prefix_sessions"] == 0 and restarted:
                break
            await asyncio.sleep(0.05)
        assert st.in_flight == 0 and st.counters["engine.prefix_sessions"] == 0
        assert srv.sessions.counters.get("restarts") == 1 and srv.sessions.sessions == {}
        with pytest.raises(RolloutError) as gone:
            await Session.append(idle, [5])
        assert gone.value.code == ErrorCode.UNKNOWN_SESSION
        async with rc.session() as fresh:
            assert (await fresh.generate([5], SamplingParams(max_new_tokens=3))).finish_reason == "length"


class _CrashLoop(Actor):
    """Crashes as soon as it runs, every incarnation: a crash loop. Each one records in the shared
    ``starts`` its supervisor-set ``restarts`` counter and when it started, and in ``crashed_at``
    when it raised (monotonic clock, as the supervisor's)."""

    def __init__(self, starts: list[tuple[float, float]], crashed_at: list[float]) -> None:
        super().__init__("crash-loop")
        self.starts, self.crashed_at = starts, crashed_at

    async def on_start(self) -> None:
        self.starts.append((self.counters.get("restarts"), time.monotonic()))

    async def _run(self) -> BaseException:
        # spawned before the base _run creates the crash future; it runs once _run awaits it, so
        # the crash is never lost and no wait is needed
        self.spawn(self._boom())
        return await super()._run()

    async def _boom(self) -> None:
        self.crashed_at.append(time.monotonic())
        raise RuntimeError(f"crash {len(self.crashed_at)}")


async def test_restarts_back_off_doubling_and_a_crash_loop_gives_up_with_its_reason() -> None:
    """Each restart waits at least its back-off after the crash before it (base, doubling per crash
    in the window, capped): a back-off is a minimum wait, so only lower bounds are asserted. The
    crash after ``max_restarts`` restarts stops supervision, and ``failed`` carries the reason."""
    base, cap, max_restarts = 0.02, 0.05, 4
    system = ActorSystem(max_restarts=max_restarts, restart_window_s=60.0, restart_backoff_s=base,
                         max_backoff_s=cap)
    starts: list[tuple[float, float]] = []
    crashed_at: list[float] = []
    try:
        await system.spawn(lambda: _CrashLoop(starts, crashed_at))
        await until(lambda: system.failed is not None and system.failed.done(), "supervision gave up", 30)
        assert system.failed is not None
        gave_up = system.failed.result()
        assert isinstance(gave_up, SupervisionGaveUp)
        why = str(gave_up)
        assert why.startswith("crash-loop crashed 5 times within 60s"), why
        assert f"(max_restarts={max_restarts})" in why and "last error: RuntimeError('crash 5')" in why, why

        # the first instance plus max_restarts restarts, each numbered by the supervisor; no restart
        # after the give-up
        assert [int(n) for n, _ in starts] == list(range(max_restarts + 1))
        assert len(crashed_at) == max_restarts + 1
        assert system.actor("crash-loop").counters.get("restarts") == max_restarts
        tick = 1e-3  # an event-loop timer may fire up to a clock tick early
        for k in range(1, max_restarts + 1):  # restart k follows crash k
            backoff = min(cap, base * 2 ** (k - 1))  # 0.02, 0.04, then capped: 0.05, 0.05
            waited = starts[k][1] - crashed_at[k - 1]
            assert waited >= backoff - tick, (k, waited, backoff)
    finally:
        await system.stop()
