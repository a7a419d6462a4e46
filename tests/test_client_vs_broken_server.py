"""The client side of the rollout link against a broken server (fault injection: a raw ROUTER that
answers what a test tells it to), and a RolloutFleet whose health loop meets such a server beside
a real one. Each test says what became of every call: one result per sample, a typed error, or an
abort the server received; never a hang, a duplicate or a crashed background task."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import zmq
import zmq.asyncio

from rollwire import RolloutClient, SamplingParams
from rollwire.clients.rollout import RolloutError
from rollwire.fleet.client import RolloutFleet
from rollwire.messages import (
    AbortRequest,
    Codec,
    ErrorCode,
    GenerateChunk,
    GenerateDone,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    Heartbeat,
    RolloutRequest,
)
from rollwire.messages.generate import Timings, Usage
from rollwire.transports.rpc import RequestTimeout
from tests.weights.hostile import header

from .conftest import free_tcp_endpoint, until

Answer = Callable[[int, Any], list[Any]]  # (rid, request) -> replies to send back at once


def done(index: int, ids: list[int]) -> GenerateDone:
    return GenerateDone(index=index, output_ids=ids, finish_reason="length", weight_version=0,
                        usage=Usage(prompt_tokens=1, completion_tokens=len(ids)),
                        timings=Timings(queued_s=0.0, first_token_s=0.0, total_s=0.0))


class BrokenServer:
    """A ROUTER that records every request and answers with ``answer(rid, msg)``'s replies."""

    def __init__(self, answer: Answer) -> None:
        self.endpoint = free_tcp_endpoint()
        self.answer = answer
        self.received: list[Any] = []
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        self._codec: Codec[Any] = Codec(RolloutRequest)
        self._task: asyncio.Task[None] | None = None
        self.extra: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> BrokenServer:
        self._task = asyncio.ensure_future(self._serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in [self._task, *self.extra]:
            if t is not None:
                t.cancel()
        await asyncio.gather(*[t for t in [self._task, *self.extra] if t is not None], return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()

    async def send(self, peer: bytes, rid: int, msg: Any) -> None:
        await self._sock.send_multipart([peer, *self._codec.encode(rid, msg)])

    async def _serve(self) -> None:
        while True:
            peer, *frames = await self._sock.recv_multipart()
            rid, msg, _ = self._codec.decode(frames)
            if isinstance(msg, Heartbeat):
                await self.send(peer, 0, Heartbeat())
                continue
            self.received.append((peer, rid, msg))
            for reply in self.answer(rid, msg):
                await self.send(peer, rid, reply)

    def aborted(self) -> list[int]:
        return [m.target_rid for _, _, m in self.received if isinstance(m, AbortRequest)]


def health_ok(rid: int, msg: Any) -> list[Any]:
    return [HealthReply(weight_version=0, governor_state="SERVING", protocol=1)] if isinstance(msg, HealthRequest) \
        else []


async def test_duplicated_and_out_of_range_samples_are_dropped_so_each_sample_ends_exactly_once() -> None:
    """n=2: the server sends sample 0's done twice, dones for samples 5 and -1, a health_ok on the
    request's rid, then sample 1's done. The call returns the two real samples, in order, and
    counts the four replies it dropped."""
    def answer(rid: int, msg: Any) -> list[Any]:
        if isinstance(msg, GenerateRequest):
            return [done(0, [7]), done(0, [8]), done(5, [9]), done(-1, [10]),
                    HealthReply(weight_version=0, governor_state="SERVING", protocol=1), done(1, [11])]
        return health_ok(rid, msg)

    async with BrokenServer(answer) as srv, RolloutClient(srv.endpoint) as rc:
        await rc.wait_ready(timeout=30)
        outs = await asyncio.wait_for(rc.generate([1, 2], SamplingParams(n=2)), 30)  # a hang guard only
        assert isinstance(outs, list)
        assert [(o.index, o.output_ids) for o in outs] == [(0, [7]), (1, [11])]
        assert rc._rpc.bad_replies == 4


async def test_a_restarted_chunk_counts_only_on_a_request_that_asked_for_restarts() -> None:
    """A stream that did not ask ``restartable`` gets a chunk, a ``restarted`` chunk, another chunk
    and its done: the restarted one is a bad reply, dropped (the others arrive); one that asked
    gets all four."""
    def answer(rid: int, msg: Any) -> list[Any]:
        if isinstance(msg, GenerateRequest):
            return [GenerateChunk(token_ids=[7]), GenerateChunk(token_ids=[], restarted=True),
                    GenerateChunk(token_ids=[8]), done(0, [8])]
        return health_ok(rid, msg)

    async with BrokenServer(answer) as srv, RolloutClient(srv.endpoint) as rc:
        await rc.wait_ready(timeout=30)
        plain = [m async for m in rc.stream([1, 2], SamplingParams())]
        assert [getattr(m, "restarted", None) for m in plain] == [False, False, None]
        assert rc._rpc.bad_replies == 1
        asked = [m async for m in rc.stream([1, 2], SamplingParams(), restartable=True)]
        assert [getattr(m, "restarted", None) for m in asked] == [False, True, False, None]
        assert rc._rpc.bad_replies == 1


async def test_timeout_bounds_the_whole_request_even_while_chunks_keep_coming() -> None:
    """The server sends a chunk every 50 ms and never a done: ``timeout=1`` ends the call with
    RequestTimeout (before, each chunk restarted the clock and the call never ended) and the
    request is aborted on the server."""
    async with BrokenServer(health_ok) as srv, RolloutClient(srv.endpoint) as rc:
        await rc.wait_ready(timeout=30)

        async def trickle() -> None:
            while True:
                await asyncio.sleep(0.05)
                for peer, rid, msg in list(srv.received):
                    if isinstance(msg, GenerateRequest) and rid not in srv.aborted():
                        await srv.send(peer, rid, GenerateChunk(token_ids=[3]))

        srv.extra.append(asyncio.ensure_future(trickle()))
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(rc.generate([1, 2], SamplingParams(max_new_tokens=10**6), timeout=1.0), 60)
        rids = [rid for _, rid, m in srv.received if isinstance(m, GenerateRequest)]
        await until(lambda: srv.aborted() == rids, "the timed-out request's abort at the server", 30)


async def test_a_cancelled_generate_aborts_its_request_on_the_server() -> None:
    """A caller that gives up (its task cancelled, as a gateway does for the other prompts of a
    refused batch) leaves nothing running: the server receives the request's abort."""
    async with BrokenServer(health_ok) as srv, RolloutClient(srv.endpoint) as rc:
        await rc.wait_ready(timeout=30)
        call = asyncio.ensure_future(rc.generate([1, 2], SamplingParams(max_new_tokens=100)))
        await until(lambda: any(isinstance(m, GenerateRequest) for _, _, m in srv.received), "the request sent", 30)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        rid = next(rid for _, rid, m in srv.received if isinstance(m, GenerateRequest))
        await until(lambda: srv.aborted() == [rid], "the abort of the cancelled request", 30)


async def test_a_health_reply_of_the_wrong_kind_is_a_typed_error_and_the_fleet_evicts_that_server_only(
        ) -> None:
    """One server answers health with a chunk. The client raises a typed bad_frame (before, the
    chunk came back as if it were the health reply, and the fleet's health loop died on it, so a
    server that stopped answering later stayed routable forever). The fleet evicts that server,
    keeps checking (the broken server sees more health requests after its eviction), and still
    serves from the real server beside it."""
    def answer(rid: int, msg: Any) -> list[Any]:
        return [GenerateChunk(token_ids=[1])] if isinstance(msg, HealthRequest) else []

    real = free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                             "--rollout-endpoint", real], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with BrokenServer(answer) as srv:
            async with RolloutClient(srv.endpoint) as rc:
                with pytest.raises(RolloutError) as err:
                    await rc.health(timeout=10)
                assert err.value.code == ErrorCode.BAD_FRAME
            async with RolloutFleet([srv.endpoint, real], health_interval_s=0.1) as fleet:
                await fleet.wait_ready(servers=1, timeout=120)
                broken = next(s for s in fleet.servers if s.endpoint == srv.endpoint)
                await until(lambda: "bad_frame" in broken.why_out, "the broken server evicted", 30)
                seen = len(srv.received)
                await until(lambda: len(srv.received) >= seen + 3, "health checks going on after the eviction", 30)
                assert fleet._health_task is not None and not fleet._health_task.done()
                out = await fleet.generate([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0.0))
                assert out.finish_reason == "length" and len(out.output_ids) == 4  # type: ignore[union-attr]
                assert not broken.alive
    finally:
        proc.kill()
        proc.wait()


async def test_an_abort_before_the_first_read_goes_out_right_behind_its_request() -> None:
    """``stream.abort()`` before iterating: the request is sent with its abort right behind it, so
    the server ends it (before, the abort named a request not sent yet, was dropped there, and the
    request then ran to its end, or hung while the server held requests)."""
    async with BrokenServer(health_ok) as srv, RolloutClient(srv.endpoint) as rc:
        await rc.wait_ready(timeout=30)
        stream = rc.stream([1, 2], SamplingParams(max_new_tokens=64))
        await stream.abort()
        reading = asyncio.ensure_future(_all(stream))
        await until(lambda: stream.rid in srv.aborted(), "the abort at the server", 30)
        peer = srv.received[-1][0]
        await srv.send(peer, stream.rid, done(0, []))  # the server's answer to an abort: the done
        items = await asyncio.wait_for(reading, 30)  # a hang guard only
        assert [type(m) for m in items] == [GenerateDone]
        kinds = [(type(m).__name__, getattr(m, "target_rid", rid)) for _, rid, m in srv.received[-2:]]
        assert kinds == [("GenerateRequest", stream.rid), ("AbortRequest", stream.rid)]


async def _all(stream: Any) -> list[Any]:
    return [m async for m in stream]


async def test_a_server_answering_requests_with_garbage_is_evicted_and_the_requests_run_on_the_real_one() -> None:
    """Beside a real server, a broken one answers health well but every generate with an
    undecodable reply (then, once, with a reply of the wrong kind). Each request sent to it moves to
    the real server and completes (before: the caller got bad_frame and the server stayed
    admitted); the broken one is evicted for the garbage, and again at the next health check for the
    wrong-kind reply its client dropped."""
    real = free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                             "--rollout-endpoint", real], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with BrokenServer(health_ok) as srv:
            answered: set[int] = set()
            wrong_kind = asyncio.Event()

            async def garbage() -> None:
                while True:
                    await asyncio.sleep(0.01)
                    for peer, rid, msg in list(srv.received):
                        if isinstance(msg, GenerateRequest) and rid not in answered:
                            answered.add(rid)
                            if wrong_kind.is_set():
                                await srv.send(peer, rid, HealthReply(weight_version=0, governor_state="SERVING",
                                                                      protocol=1))
                            else:
                                await srv._sock.send_multipart([peer, header(rid), b"\xc1 not msgpack"])

            srv.extra.append(asyncio.ensure_future(garbage()))
            async with RolloutFleet([srv.endpoint, real], health_interval_s=0.1) as fleet:
                await fleet.wait_ready(servers=2, timeout=120)
                broken = next(s for s in fleet.servers if s.endpoint == srv.endpoint)
                outs = await asyncio.wait_for(asyncio.gather(*(
                    fleet.generate([1, i, 3], SamplingParams(max_new_tokens=4, temperature=0.0)) for i in range(6))),
                    60)  # (a hang guard)
                assert all(o.finish_reason == "length" and len(o.output_ids) == 4 for o in outs)  # type: ignore[union-attr]
                assert answered and broken.evictions >= 1 and broken.failures >= 1, fleet.stats()
                await until(lambda: broken.alive, "re-admitted: its health is fine", 30)
                wrong_kind.set()
                sent = len(answered)
                broken.in_flight -= 100  # route the next request to it (least loaded of two)
                try:
                    late = asyncio.ensure_future(fleet.generate([9, 9], SamplingParams(max_new_tokens=2), timeout=3))
                    await until(lambda: len(answered) > sent, "a request answered with the wrong kind", 30)
                    await until(lambda: not broken.alive and "no request can have" in broken.why_out,
                                "evicted for the wrong-kind reply", 30)
                finally:
                    broken.in_flight += 100
                with pytest.raises(RequestTimeout):  # that one request still ends by its own timeout
                    await late
    finally:
        proc.kill()
        proc.wait()
