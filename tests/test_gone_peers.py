"""Peers that never beat, and peers that reuse another's routing id, against a real `rollwire serve`
process. Each test says what became of every request: freed when its peer's connection is gone,
kept to its end while the peer stays connected, or served to the one client that sent it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from rollwire import RolloutClient, SamplingParams
from rollwire.clients.rollout import RolloutError
from rollwire.messages import (
    AbortRequest,
    Codec,
    ErrorCode,
    GenerateDone,
    GenerateRequest,
    HealthRequest,
    Heartbeat,
    RolloutReply,
)
from rollwire.transports.rpc import ConnectionClosed
from rollwire.transports.security import CurveClient, KeyPair, create_keys

from .conftest import free_tcp_endpoint, until

CODEC: Codec[object] = Codec(RolloutReply)


def serve(endpoint: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                             "--rollout-endpoint", endpoint, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def server() -> Iterator[str]:
    ep = free_tcp_endpoint()
    proc = serve(ep, "--client-timeout", "1")
    yield ep
    proc.kill()
    proc.wait()


def raw_peer(ctx: zmq.asyncio.Context, endpoint: str, identity: bytes) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


async def test_a_raw_peer_that_never_beats_and_closes_its_socket_frees_its_waiting_requests(server: str) -> None:
    """Two raw peers (no heartbeats) each leave 4 requests waiting for a version that never comes,
    then close their sockets. The server probes them once they have been silent for
    --client-timeout, finds their connections gone, and aborts all 8: nothing stays in flight to
    hold capacity others need (before, requests of a peer that never beat were kept forever)."""
    async with RolloutClient(server) as rc:
        await rc.wait_ready(timeout=120)
        ctx = zmq.asyncio.Context()
        for admitted, who in ((4, b"gone-1"), (8, b"gone-2")):
            peer = raw_peer(ctx, server, who)
            for rid in range(1, 5):
                await peer.send_multipart(CODEC.encode(rid, GenerateRequest(
                    input_ids=[1, 2], sampling_params=SamplingParams(max_new_tokens=4), min_version=10**12)))

            async def waiting(n: int = admitted) -> bool:
                return (await rc.status()).counters.get("requests", 0) >= n

            await until(waiting, "the requests admitted", 60)
            peer.close(linger=0)
        assert (await rc.status()).in_flight == 8

        async def freed() -> bool:
            return (await rc.status()).in_flight == 0

        await until(freed, "the gone peers' requests aborted", 60)
        counters = (await rc.status()).counters
        assert counters["clients_gone"] >= 2 and counters["client_gone_aborts"] == 8
        out = await rc.generate([3, 4], SamplingParams(max_new_tokens=2, temperature=0.0))
        assert out.finish_reason == "length"  # type: ignore[union-attr]
        ctx.term()


async def test_a_raw_peer_that_stays_connected_keeps_its_request_and_gets_probes(server: str) -> None:
    """A raw peer that never beats but stays connected: after two probes (heartbeats with rid 0,
    which it ignores) its waiting request is still there; its own abort then ends it, once."""
    ctx = zmq.asyncio.Context()
    peer = raw_peer(ctx, server, b"quiet-but-here")
    await peer.send_multipart(CODEC.encode(1, GenerateRequest(
        input_ids=[1, 2], sampling_params=SamplingParams(max_new_tokens=4), min_version=10**12)))
    async with RolloutClient(server) as rc:
        await rc.wait_ready(timeout=120)
        probes = 0
        while probes < 2:
            assert await peer.poll(60_000), "no probe within 60 s"
            rid, msg, _ = CODEC.decode(await peer.recv_multipart())
            assert (rid, type(msg)) == (0, Heartbeat)
            probes += 1
        assert (await rc.status()).in_flight == 1
        await peer.send_multipart(CODEC.encode(0, AbortRequest(target_rid=1)))
        while True:
            assert await peer.poll(60_000), "no terminal reply within 60 s"
            rid, msg, _ = CODEC.decode(await peer.recv_multipart())
            if rid == 1:
                break
        assert isinstance(msg, GenerateDone) and msg.finish_reason == "abort"

        async def freed() -> bool:
            return (await rc.status()).in_flight == 0

        await until(freed, "the aborted request gone", 30)
    peer.close(linger=0)
    ctx.term()


async def test_a_session_must_expire_some_day(server: str) -> None:
    async with RolloutClient(server) as rc:
        await rc.wait_ready(timeout=120)
        with pytest.raises(RolloutError) as err:
            async with rc.session(ttl_s=float("inf")):
                pass
        assert err.value.code == ErrorCode.BAD_FIELD


async def test_under_curve_another_key_cannot_take_over_a_clients_routing_id(tmp_path: Path) -> None:
    """Two allow-listed keys. The victim streams a 300-token request; the other key connects with
    the victim's routing id and asks for health. ZeroMQ refuses that connection (no handover under
    CURVE): the victim's request ends with all its tokens, and the other key receives nothing.
    Before, the newcomer took the routing id over, received the victim's replies, and the victim's
    call failed."""
    for name in ("server", "victim", "other"):
        create_keys(tmp_path, name)
    ep = free_tcp_endpoint()
    proc = serve(ep, "--secret-key", str(tmp_path / "server.key_secret"),
                 "--client-keys", str(tmp_path / "victim.key"), "--client-keys", str(tmp_path / "other.key"))
    server_key = KeyPair.load(tmp_path / "server.key_secret").public
    ctx = zmq.asyncio.Context()
    try:
        async with RolloutClient(ep, curve=CurveClient(KeyPair.load(tmp_path / "victim.key_secret"),
                                                       server_key)) as victim:
            await victim.wait_ready(timeout=120)
            stream = victim.stream([1, 2, 3], SamplingParams(max_new_tokens=300, temperature=0.0, ignore_eos=True))
            first = await stream.__anext__()  # the request runs
            squatter = ctx.socket(zmq.DEALER)
            squatter.setsockopt(zmq.IDENTITY, victim._rpc.identity)
            squatter.setsockopt(zmq.LINGER, 0)
            CurveClient(KeyPair.load(tmp_path / "other.key_secret"), server_key).apply(squatter)
            squatter.connect(ep)
            await squatter.send_multipart(CODEC.encode(5, HealthRequest()))
            rest = [m async for m in stream]
            tokens = len(first.token_ids) + sum(len(getattr(m, "token_ids", [])) for m in rest)  # type: ignore[union-attr]
            last = rest[-1]
            assert isinstance(last, GenerateDone) and last.finish_reason == "length"
            assert tokens == len(last.output_ids) == 300
            assert not await squatter.poll(1000)  # a negative check: nothing of the victim's reached it
            squatter.close(linger=0)
    finally:
        proc.kill()
        proc.wait()
        ctx.term()


async def test_a_client_closed_with_a_request_and_a_session_turn_running_aborts_both_on_the_server() -> None:
    """``RolloutClient.close`` with a request and a session turn still generating: each caller gets
    ``shutting_down``, and the client sent the server an abort for each before it closed (the
    server counts two ``abort_requests`` and two ``abort`` finishes, none from taking the client
    for gone). Before, both ran on there until the client's silence passed ``--client-timeout``
    (15 s by default) or to their end."""
    ep = free_tcp_endpoint()
    proc = serve(ep)
    long = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)
    try:
        rc = RolloutClient(ep)
        async with rc:
            await rc.wait_ready(timeout=120)
            request = asyncio.ensure_future(rc.generate([4, 5, 6], long))
            session = rc.session()
            await session.open()
            await session.append([7, 8])
            turn = asyncio.ensure_future(session.generate(sampling_params=long))
            async with RolloutClient(ep) as probe:
                await until(lambda: _running(probe, 2), "the request and the turn are generating")
        ends = await asyncio.wait_for(asyncio.gather(request, turn, return_exceptions=True), 30)
        assert all(isinstance(e, RolloutError) and e.code == ErrorCode.SHUTTING_DOWN for e in ends), ends
        async with RolloutClient(ep) as probe:
            await until(lambda: _running(probe, 0), "nothing runs on the server")
            counters = (await probe.status()).counters
        assert counters.get("abort_requests") == 2 and counters.get("finish_abort") == 2, counters
        assert not counters.get("client_gone_aborts") and not counters.get("finish_length"), counters
    finally:
        proc.kill()
        proc.wait()


async def _running(probe: RolloutClient, samples: int) -> bool:
    return (await probe.status()).counters.get("samples_in_flight", 0) == samples


async def test_a_closed_client_opens_no_session_even_with_its_session_endpoint_given() -> None:
    """A client told its session endpoint (no health call needed) and closed before any session:
    opening one raises ``ConnectionClosed`` as ``generate`` does, and no session link is made (an
    adversarial try found a closed client still opening sessions and running turns on a new link
    that nothing would ever close)."""
    ep, sessions = free_tcp_endpoint(), free_tcp_endpoint()
    proc = serve(ep, "--session-endpoint", sessions)
    try:
        async with RolloutClient(ep) as probe:
            await probe.wait_ready(timeout=120)
        rc = RolloutClient(ep, session_endpoint=sessions)
        async with rc:
            pass
        with pytest.raises(ConnectionClosed):
            await rc.generate([1, 2], SamplingParams(max_new_tokens=2))
        with pytest.raises(ConnectionClosed):
            await rc.session().open()
        assert rc._session_rpc is None
    finally:
        proc.kill()
        proc.wait()
