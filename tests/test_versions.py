"""Version accounting: min_version waits, --max-staleness aborts (or, under retract, restarts) old
requests, --coalesce keeps only the newest waiting version."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rollwire import RolloutClient, RolloutFleet, SamplingParams
from rollwire.messages import ErrorCode, GenerateChunk, GenerateDone, RemoteError
from rollwire.server import RolloutServer, ServerConfig
from tests.test_governor import apply_version
from tests.versioned import check_spans, send_version, version_state

from .conftest import free_tcp_endpoint, until

SP = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)


async def test_a_request_with_min_version_waits_until_that_version_is_live() -> None:
    ep = free_tcp_endpoint()
    async with RolloutServer(ServerConfig(rollout_endpoint=ep)) as srv, RolloutClient(ep, timeout=60) as rc:
        waiting = asyncio.ensure_future(rc.generate([2, 4, 6], SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                              ignore_eos=True), min_version=1))
        await until(lambda: len(srv.generation.in_flight) == 1, "the request admitted (and waiting)")
        assert not waiting.done()  # version 0 is live: it has not started
        await apply_version(1)
        out = await waiting
    assert [s.version for s in out.weight_version_spans] == [1]  # type: ignore[union-attr]
    check_spans([2, 4, 6], out)  # type: ignore[arg-type]


@pytest.mark.parametrize(("max_staleness", "expect"), [(0, "abort"), (1, "length")])
async def test_max_staleness_aborts_requests_started_too_many_versions_ago(max_staleness: int, expect: str) -> None:
    """Streams of chunks of at least 4 tokens: whatever ends them, every token of the done came in
    a chunk first (before, a stale abort ended a run with a delta without tokens, and the tokens
    made since the last chunk were never streamed)."""
    ep = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ep, pause_policy="in_place", max_staleness=max_staleness)
    async with RolloutServer(cfg), RolloutClient(ep, timeout=60) as rc:
        streams = [rc.stream([3, i, 9], SP, chunk_tokens=4) for i in range(4)]
        got = [[await s.__anext__()] for s in streams]  # started under version 0
        await apply_version(1)
        for s, msgs in zip(streams, got, strict=True):
            msgs += [m async for m in s]
    outs = [msgs[-1] for msgs in got]
    # every in-flight request: one terminal reply; stale ones aborted with their partial output
    assert [o.finish_reason for o in outs] == [expect] * 4  # type: ignore[union-attr]
    assert all(o.weight_version_spans[0].version == 0 for o in outs)  # type: ignore[union-attr]
    for msgs in got:
        assert [t for m in msgs[:-1] for t in m.token_ids] == msgs[-1].output_ids  # type: ignore[union-attr]


async def test_max_staleness_under_retract_restarts_stale_requests_on_the_new_version() -> None:
    """Retract policy, --max-staleness 0: each non-streamed request in flight across the push is
    sent back to its prompt and finishes wholly on version 1 (one span, recomputed here); a
    streamed one already sent version-0 tokens, so it is aborted with its partial output."""
    ep = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ep, pause_policy="retract", max_staleness=0)
    long = SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)
    async with RolloutServer(cfg) as srv, RolloutClient(ep, timeout=60) as rc:
        plain = [asyncio.ensure_future(rc.generate([3, i, 9], long)) for i in range(4)]
        stream = rc.stream([3, 7, 7], long)
        await stream.__anext__()  # started under version 0
        await until(lambda: srv.generation._running_samples == 5, "all five requests generating")
        await apply_version(1)
        streamed = [m async for m in stream if isinstance(m, GenerateDone)]
        outs = [await p for p in plain]
        counters = srv.generation.counters.snapshot()
    for i, out in enumerate(outs):
        assert out.finish_reason == "length" and len(out.output_ids) == 1500  # type: ignore[union-attr]
        assert [sp.version for sp in out.weight_version_spans] == [1]  # type: ignore[union-attr]
        check_spans([3, i, 9], out)  # type: ignore[arg-type]
    assert [d.finish_reason for d in streamed] == ["abort"]
    assert streamed[0].weight_version_spans[0].version == 0
    assert counters["stale_retracts"] == 4 and counters["stale_restarts"] == 4 and counters["stale_aborts"] == 1


async def test_a_restartable_stream_and_a_fleets_request_start_again_when_too_stale() -> None:
    """Retract policy, --max-staleness 0, a push while they generate: a ``restartable`` stream gets a
    ``restarted`` chunk, then only version-1 tokens, and a done wholly of version 1; a non-streamed
    request through a ``RolloutFleet`` (which streams it, to know its tokens) finishes wholly on
    version 1 as it would through a plain client (before, the fleet's request was aborted with its
    version-0 tokens: the server saw a streamed request). Every request: one terminal reply."""
    ep = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ep, pause_policy="retract", max_staleness=0)
    long = SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)
    async with RolloutServer(cfg) as srv, RolloutClient(ep, timeout=60) as rc:
        fleet = RolloutFleet([ep], health_interval_s=0.3, timeout=120)
        await fleet.start()
        try:
            await fleet.wait_ready(servers=1, timeout=60)
            via_fleet = [asyncio.ensure_future(fleet.generate([3, i, 9], long)) for i in range(2)]
            stream = rc.stream([3, 7, 7], long, restartable=True, chunk_tokens=4)
            first = await stream.__anext__()  # started under version 0
            assert isinstance(first, GenerateChunk) and first.weight_version == 0
            await until(lambda: srv.generation._running_samples == 3, "all three requests generating")
            await apply_version(1)
            rest = [m async for m in stream]
            outs = [await f for f in via_fleet]
        finally:
            await fleet.close()
        counters = srv.generation.counters.snapshot()
    restarted = [i for i, m in enumerate(rest) if isinstance(m, GenerateChunk) and m.restarted]
    assert len(restarted) == 1 and rest[restarted[0]].token_ids == []  # type: ignore[union-attr]
    after = rest[restarted[0] + 1:]
    done = after[-1]
    assert isinstance(done, GenerateDone) and done.finish_reason == "length" and len(done.output_ids) == 1500
    assert [sp.version for sp in done.weight_version_spans] == [1]
    assert [t for m in after[:-1] for t in m.token_ids] == done.output_ids  # type: ignore[union-attr]
    check_spans([3, 7, 7], done)
    for i, out in enumerate(outs):
        assert out.finish_reason == "length" and len(out.output_ids) == 1500  # type: ignore[union-attr]
        assert [sp.version for sp in out.weight_version_spans] == [1]  # type: ignore[union-attr]
        check_spans([3, i, 9], out)  # type: ignore[arg-type]
    assert counters["stale_restarts"] == 3 and not counters.get("stale_aborts")


async def test_an_abort_while_a_restart_is_announced_stops_the_new_run() -> None:
    """A restartable stream too stale is restarted; its client aborts it while the server is still
    sending the ``restarted`` chunk (fault injection: that send is held until the abort is in).
    Before, the abort went to the old, finished run and the new one generated its 4000 tokens; now
    the request ends ``abort`` with no tokens of the new run."""
    ep = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ep, pause_policy="retract", max_staleness=0)
    long = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)
    async with RolloutServer(cfg) as srv, RolloutClient(ep, timeout=60) as rc:
        gen = srv.generation
        announced, abort_in = asyncio.Event(), asyncio.Event()
        reply = gen.reply

        async def held_reply(origin, msg, payload=()):  # type: ignore[no-untyped-def]
            if isinstance(msg, GenerateChunk) and msg.restarted:
                announced.set()
                await abort_in.wait()
            return await reply(origin, msg, payload)

        gen.reply = held_reply  # type: ignore[method-assign]
        stream = rc.stream([3, 7, 7], long, restartable=True, chunk_tokens=4)
        await stream.__anext__()  # started under version 0
        await apply_version(1)
        await asyncio.wait_for(announced.wait(), 30)
        await stream.abort()
        await until(lambda: all(f.aborted for f in gen.in_flight.values()), "the abort is in")
        abort_in.set()
        rest = [m async for m in stream]
        counters = gen.counters.snapshot()
    done = rest[-1]
    assert isinstance(done, GenerateDone) and done.finish_reason == "abort" and done.output_ids == []
    assert rest[-2].restarted  # type: ignore[union-attr]  # nothing of the new run after it
    assert counters.get("completion_tokens", 0) == 0 and counters["finish_abort"] == 1


async def test_a_request_waiting_for_its_version_is_not_stale_while_it_waits() -> None:
    """Retract policy, --max-staleness 0: a stream sent at version 0 with ``min_version=2`` waits
    through push 1 (before, push 1 took it for stale: a plain stream was aborted before it ran, a
    restartable one used up a restart), starts on version 2 and runs to its end there."""
    ep = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ep, pause_policy="retract", max_staleness=0)
    sp = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    async with RolloutServer(cfg) as srv, RolloutClient(ep, timeout=60) as rc:
        plain = rc.stream([3, 1, 9], sp, min_version=2)
        restartable = rc.stream([3, 2, 9], sp, min_version=2, restartable=True)
        firsts = [asyncio.ensure_future(s.__anext__()) for s in (plain, restartable)]
        await until(lambda: len(srv.generation.in_flight) == 2, "both admitted (and waiting)")
        await apply_version(1)
        await apply_version(2)
        outs = []
        for s, first in zip((plain, restartable), firsts, strict=True):
            outs.append([await first] + [m async for m in s])
        counters = srv.generation.counters.snapshot()
    for i, msgs in enumerate(outs):
        done = msgs[-1]
        assert isinstance(done, GenerateDone) and done.finish_reason == "length" and len(done.output_ids) == 64
        assert [sp.version for sp in done.weight_version_spans] == [2]
        assert not any(isinstance(m, GenerateChunk) and m.restarted for m in msgs)
        check_spans([3, i + 1, 9], done)
    assert not counters.get("stale_aborts") and not counters.get("stale_retracts")


async def test_versions_handed_to_the_governor_during_a_load_wait_and_load_in_order() -> None:
    """The governor runs one load at a time (any coalescing is the receiver's, before it): versions
    2 and 3, handed over while version 1's drain waits for a running request, each load after it."""
    ep = free_tcp_endpoint()
    states = {v: version_state(v) for v in (1, 2, 3)}
    cfg = ServerConfig(rollout_endpoint=ep, pause_policy="drain")
    async with RolloutServer(cfg) as srv, RolloutClient(ep, timeout=60) as rc:
        running = asyncio.ensure_future(rc.generate([1, 2], SamplingParams(max_new_tokens=1000, temperature=0.0,
                                                                           ignore_eos=True)))
        await until(lambda: srv.generation._running_samples == 1, "the request running")
        first = asyncio.ensure_future(send_version(1, states[1]))
        await until(lambda: srv.governor.state == "LOADING", "version 1 loading")
        second, third = await asyncio.gather(send_version(2, states[2]), send_version(3, states[3]))
        applied = [await first, second, third]
        assert [a.version for a in applied] == [1, 2, 3], applied  # type: ignore[attr-defined]
        assert srv.generation.weight_version == 3
        assert (await running).finish_reason == "length"  # type: ignore[union-attr]  # drained, not lost
        loads = [s for _, s in srv.governor.timeline if s == "LOADING"]
        assert len(loads) == 3


async def test_a_request_aborted_while_waiting_for_min_version_ends_with_abort_and_the_actor_keeps_serving() -> None:
    ep = free_tcp_endpoint()
    async with RolloutServer(ServerConfig(rollout_endpoint=ep)) as srv, RolloutClient(ep, timeout=60) as rc:
        stream = rc.stream([2, 4, 6], SamplingParams(max_new_tokens=6), min_version=5)
        pending = asyncio.ensure_future(stream.__anext__())  # sends the request; it waits for version 5
        await until(lambda: len(srv.generation.in_flight) == 1, "the request admitted (and waiting)")
        await stream.abort()
        done = await pending
        assert isinstance(done, GenerateDone) and done.finish_reason == "abort" and done.output_ids == []
        ok = await rc.generate([1, 2], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
        assert ok.finish_reason == "length"  # type: ignore[union-attr]
        assert srv.generation.counters.get("restarts") == 0


async def test_a_version_the_engine_refuses_pauses_nothing() -> None:
    """Abort policy, 4 requests generating: versions naming an unknown tensor, a wrong shape or a
    wrong dtype are refused with their code before any pause; all 4 requests finish with "length"
    on version 0 (before: each refusal came after the pause, which aborted all 4 first), and the
    good version then applies."""
    ep = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ep, pause_policy="abort")
    good = version_state(1)
    name = next(iter(good))
    bad = [({**good, "not.a.parameter": torch.zeros(2)}, ErrorCode.UNKNOWN_TENSOR),
           ({**good, name: torch.zeros(3, 3, dtype=good[name].dtype)}, ErrorCode.SHAPE_MISMATCH),
           ({**good, name: good[name].to(torch.float64)}, ErrorCode.DTYPE_MISMATCH)]
    async with RolloutServer(cfg) as srv, RolloutClient(ep, timeout=60) as rc:
        streams = [rc.stream([3, i, 9], SP) for i in range(4)]
        for s in streams:
            await s.__anext__()  # generating under version 0
        for tensors, code in bad:
            with pytest.raises(RemoteError) as err:
                await send_version(1, tensors)
            assert err.value.code == code, err.value
        assert srv.generation.counters.get("pauses_abort") == 0
        outs = []
        for s in streams:
            outs += [m async for m in s if isinstance(m, GenerateDone)]
        assert [o.finish_reason for o in outs] == ["length"] * 4
        assert all([sp.version for sp in o.weight_version_spans] == [0] for o in outs)
        await apply_version(1)
        assert (await rc.generate([1, 2], SamplingParams(max_new_tokens=2))).weight_version == 1  # type: ignore[union-attr]
