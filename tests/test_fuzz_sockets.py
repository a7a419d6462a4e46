"""Hypothesis fuzz of a real `rollwire serve` process's public sockets: the rollout socket
(GenerationActor) and the session socket (SessionActor).

Each example sends one hostile message from a DEALER with a drawn routing identity (the internal
actors' names among them: "sessions", "generation", "governor"; the public sockets have their
own identity spaces): random frames, truncated frames of good messages, deeply nested msgpack
(100,000 levels included), wrong-type fields under every known tag, unknown tags, bad headers.
A Heartbeat fence follows on the same connection; every reply before it must decode as the
socket's reply union (typed errors), and the fence must be answered: the message was handled and
the socket still serves that peer. Frames above the 64 MiB limit make ZeroMQ drop the sender's
connection; the server serves everyone else, and the sender after it reconnects.

Afterwards a session opened before the fuzz still holds its history (the SessionActor was never
restarted: a restart empties the table), a plain request and a session turn are served, the
status counters show no restart and the fuzz's counted drops, the process never exited, and a
good weight push from a trainer applies: the next request is generated on its version.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rollwire import RolloutClient, SamplingParams
from rollwire.messages import (
    AbortRequest,
    AppendTokens,
    Codec,
    ErrorReply,
    GenerateRequest,
    Heartbeat,
    OpenSession,
    RolloutReply,
    RolloutRequest,
    SessionGenerate,
    SessionReply,
    SessionRequest,
    StatusRequest,
)
from rollwire.weightsync.publisher import TrainerPublisher

from .conftest import free_tcp_endpoint
from .test_engine_faults import stop
from .test_session_fairness import serve_sessions
from .versioned import version_state

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
LIMIT = 64 << 20  # sockets.REQUEST_MAX_FRAME: the rollout and session sockets' frame limit
enc = msgspec.msgpack.Encoder()
fence_rids = itertools.count(1 << 40)
versions = itertools.count(1)  # each check after a fuzz pushes the next version
RECEIVER_ID = "fuzzed"

SOCKETS: dict[str, tuple[Any, Any, list[Any]]] = {  # name -> (request union, reply union, good messages)
    "rollout": (RolloutRequest, RolloutReply, [
        GenerateRequest(input_ids=[1, 2, 3], sampling_params=GREEDY), StatusRequest(), AbortRequest(target_rid=9)]),
    "sessions": (SessionRequest, SessionReply, [
        OpenSession(), AppendTokens(session_id="s", token_ids=[1, 2]),
        SessionGenerate(session_id="s", input_ids=[4, 5], sampling_params=GREEDY), AbortRequest(target_rid=9)]),
}


def _tags(union: Any) -> list[str]:
    return [m.__struct_config__.tag for m in union.__args__]


identities = st.one_of(
    st.sampled_from([b"sessions", b"generation", b"governor", b"weight_receiver", b"generation\x00rollout"]),
    st.binary(min_size=1, max_size=255).filter(lambda b: b[0] != 0),  # ZeroMQ reserves a leading zero byte
)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
headers = st.one_of(
    st.just(b"\x92\x01\x07"),  # protocol 1, rid 7
    st.builds(lambda p, r: enc.encode([p, r]), st.integers(-5, 5), st.integers(-(2**63), 2**64 - 1)),
    st.binary(max_size=12),
)


def _truncate(frames: list[bytes], cut: int, how: int) -> list[bytes]:
    """A good message cut short: its header (0), its body (1), or the body frame missing (2)."""
    header, body = frames
    return [header[:cut], body] if how == 0 else [header, body[:cut]] if how == 1 else [header]


def _nested(tag: str, depth: int, where: int) -> list[bytes]:
    """``depth`` nested arrays as the whole body (0) or as the first field under a known tag (1),
    or ``depth`` nested maps there (2)."""
    body = (b"\x91" * depth + b"\x00" if where == 0
            else b"\x92" + enc.encode(tag) + (b"\x91" if where == 1 else b"\x81\xa1k") * depth + b"\x00")
    return [b"\x92\x01\x07", body]


def hostile(name: str) -> st.SearchStrategy[list[bytes]]:
    union, _, good = SOCKETS[name]
    tags = _tags(union)
    good_frames = [[enc.encode([1, 5]), enc.encode(m)] for m in good]
    truncated = st.builds(_truncate, st.sampled_from(good_frames), st.integers(0, 64), st.integers(0, 2))
    nested = st.builds(_nested, st.sampled_from(tags), st.integers(1, 100_000), st.integers(0, 2))
    wrong_fields = st.builds(lambda h, tag, fields: [h, enc.encode([tag, *fields])],
                             headers, st.sampled_from(tags), st.lists(msgpack_values, max_size=6))
    unknown_tag = st.builds(lambda tag, fields: [b"\x92\x01\x07", enc.encode([tag, *fields])],
                            st.text(max_size=20).filter(lambda t: t not in tags), st.lists(msgpack_values, max_size=3))
    as_map = st.builds(lambda h, v: [h, enc.encode(v)], headers, msgpack_values)
    random_frames = st.lists(st.binary(max_size=300), min_size=1, max_size=5)
    extra_frames = st.builds(lambda fr, more: [*fr, *more], st.sampled_from(good_frames),
                             st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    return st.one_of(random_frames, truncated, nested, wrong_fields, unknown_tag, as_map, extra_frames)


class Peers:
    """One DEALER per (socket, identity), kept for the whole fuzz: a fresh connection reusing a
    routing id still bound to the old one would be refused by the ROUTER (no handover)."""

    def __init__(self, endpoints: dict[str, str]) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.endpoints = endpoints
        self.socks: dict[tuple[str, bytes], zmq.Socket[Any]] = {}
        self.codecs = {name: Codec(SOCKETS[name][1]) for name in SOCKETS}

    def sock(self, name: str, identity: bytes) -> zmq.Socket[Any]:
        key = (name, identity)
        if key not in self.socks:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, identity)
            s.connect(self.endpoints[name])
            self.socks[key] = s
        return self.socks[key]

    def exchange(self, name: str, identity: bytes, frames: list[bytes], within_s: float = 30.0) -> list[Any]:
        """Send ``frames``, then a Heartbeat fence; every reply up to the fence's must decode."""
        s = self.sock(name, identity)
        s.send_multipart(frames)
        return self.fence(name, s, within_s)

    def fence(self, name: str, s: zmq.Socket[Any], within_s: float = 30.0, resend_s: float | None = None) -> list[Any]:
        codec = self.codecs[name]
        rid = next(fence_rids)
        s.send_multipart(codec.encode(rid, Heartbeat()))
        got: list[Any] = []
        deadline = time.monotonic() + within_s
        sent_at = time.monotonic()
        while True:
            assert time.monotonic() < deadline, f"{name}: no answer to the fence within {within_s}s; before it: {got}"
            if not s.poll(50):
                if resend_s is not None and time.monotonic() - sent_at > resend_s:  # the connection was dropped
                    s.send_multipart(codec.encode(rid, Heartbeat()))
                    sent_at = time.monotonic()
                continue
            r, msg, _ = codec.decode(s.recv_multipart())  # raises if the server sent anything undecodable
            if r == rid and isinstance(msg, Heartbeat):
                return got
            got.append(msg)

    def close(self) -> None:
        for s in self.socks.values():
            s.close()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Any, dict[str, str]]]:
    ep, trainer = free_tcp_endpoint(), free_tcp_endpoint()
    proc = serve_sessions(ep, "--trainer-endpoint", trainer, "--receiver-id", RECEIVER_ID)
    try:
        session_ep = asyncio.run(_session_endpoint(ep))
        yield proc, {"rollout": ep, "sessions": session_ep, "trainer": trainer}
    finally:
        stop(proc)


async def _session_endpoint(ep: str) -> str:
    async with RolloutClient(ep, timeout=120) as rc:
        await rc.wait_ready(timeout=120)
        return (await rc._sessions()).endpoint


def _check(name: str, replies: list[Any]) -> None:
    for msg in replies:  # decoded already; a refusal must be typed and say why
        if isinstance(msg, ErrorReply):
            assert msg.code and msg.message, msg


@pytest.mark.parametrize("name", ["rollout", "sessions"])
def test_hostile_messages_on_a_public_socket_get_typed_errors_and_the_server_serves_on(
        served: tuple[Any, dict[str, str]], name: str) -> None:
    proc, endpoints = served
    peers = Peers(endpoints)
    before = asyncio.run(_open_a_session(endpoints["rollout"]))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(identity=identities, frames=hostile(name))
    @example(identity=b"sessions", frames=[b"\x92\x01\x07", b"\x91" * 100_000 + b"\x00"])
    @example(identity=b"generation", frames=[b"\x92\x01\x07", b"\x92" + enc.encode(_tags(SOCKETS[name][0])[0])
                                             + b"\x91" * 100_000 + b"\x00"])
    def fuzz(identity: bytes, frames: list[bytes]) -> None:
        _check(name, peers.exchange(name, identity, frames))

    try:
        fuzz()
    finally:
        peers.close()
    assert proc.poll() is None, "the server exited"
    counters = asyncio.run(_still_serving(endpoints, *before))
    if name == "rollout":
        assert counters["bad_messages"] > 0  # the drawn messages reached the GenerationActor, counted as drops


def test_frames_above_the_limit_drop_only_their_sender_who_is_served_after_reconnecting(
        served: tuple[Any, dict[str, str]]) -> None:
    proc, endpoints = served
    peers = Peers(endpoints)
    before = asyncio.run(_open_a_session(endpoints["rollout"]))
    try:
        for name in SOCKETS:
            for identity in (b"sessions", b"big-sender"):
                s = peers.sock(name, identity)
                peers.fence(name, s)  # connected and answered
                s.send_multipart([b"\x92\x01\x07", b"\x00" * (LIMIT + 1)])  # refused by ZeroMQ, unread
                s.send_multipart([b"\x92\x01\x08", b"\x00" * 8, b"\x00" * (LIMIT + 1)])  # a large extra frame too
                other = peers.sock(name, b"bystander-" + identity)
                peers.fence(name, other)  # everyone else: served meanwhile
                # the sender: served again (its DEALER reconnects if ZeroMQ dropped it); the oversize
                # messages were refused unread, so nothing answers them
                assert peers.fence(name, s, within_s=60, resend_s=1.0) == []
    finally:
        peers.close()
    assert proc.poll() is None, "the server exited"
    asyncio.run(_still_serving(endpoints, *before))


async def _open_a_session(ep: str) -> tuple[str, list[int]]:
    """A session that must survive the fuzz: its owner is this (heartbeat-free) DEALER identity."""
    async with RolloutClient(ep, timeout=120, heartbeat_s=None) as rc:
        s = rc.session(ttl_s=3600)
        await s.open()
        await s.generate([7, 8, 9], GREEDY)
        rpc = await rc._sessions()
        return s.id, [*s.trajectory().token_ids, rpc.identity]  # type: ignore[list-item]


async def _still_serving(endpoints: dict[str, str], session_id: str, history_and_identity: list[Any],
                         ) -> dict[str, float]:
    *history, identity = history_and_identity
    from rollwire.transports.rpc import RpcClient

    async with RolloutClient(endpoints["rollout"], timeout=120) as rc:
        out = await rc.generate([1, 2, 3], GREEDY)
        assert out.finish_reason == "length" and len(out.output_ids) == 4  # type: ignore[union-attr]
        async with rc.session() as s:
            assert (await s.generate([5, 6], GREEDY)).finish_reason == "length"
        st = await rc.status()
        assert st.counters.get("restarts", 0) == 0, st.counters
        assert st.counters.get("engine_dead", 0) == 0, st  # (a drawn message may be a valid request still running)
        # the session opened before the fuzz: still there, with its history (no SessionActor restart)
        owner: RpcClient[Any] = RpcClient((await rc._sessions()).endpoint, SessionReply, identity=identity)
        try:
            reply = (await owner.call(SessionGenerate(session_id=session_id, sampling_params=GREEDY), timeout=60)).msg
        finally:
            await owner.close()
        assert not isinstance(reply, ErrorReply), reply
        assert reply.usage.prompt_tokens == len(history) and reply.usage.cached_tokens == len(history) - 1
        # a good push applies (after the session check: a new version drops the session's cached KV)
        version = next(versions)
        async with TrainerPublisher(endpoints["trainer"], min_receivers=1, timeout_s=120) as tp:
            report = await tp.push_weights(version, version_state(version), transport="inline")
        assert report.receivers == [RECEIVER_ID] and not report.failed, report
        after = await rc.generate([1, 2, 3], GREEDY)
        assert [span.version for span in after.weight_version_spans] == [version], after  # type: ignore[union-attr]
        return st.counters


@pytest.mark.parametrize("name", ["rollout", "sessions"])
def test_deeply_nested_msgpack_gets_a_typed_error_naming_its_request(served: tuple[Any, dict[str, str]],
                                                                      name: str) -> None:
    """100,000 nested arrays under a known tag: msgspec's RecursionError must become the codec's
    typed error with the request's rid (9ab9bce), not the actor's catch-all answer to rid 0."""
    _, endpoints = served
    peers = Peers(endpoints)
    try:
        s = peers.sock(name, b"nested")
        tag = _tags(SOCKETS[name][0])[0]
        s.send_multipart([b"\x92\x01\x07", b"\x92" + enc.encode(tag) + b"\x91" * 100_000 + b"\x00"])
        assert s.poll(30_000), "no reply"
        rid, msg, _ = peers.codecs[name].decode(s.recv_multipart())
        assert isinstance(msg, ErrorReply), msg
        assert rid == 7 and "Recursion" not in msg.message, (rid, msg)
    finally:
        peers.close()
