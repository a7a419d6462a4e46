"""Hostile peers of the trainer link, and the messages they send (hypothesis strategies).

``hostile_frames(union)`` draws what a broken or malicious peer puts on a socket whose honest
messages are of ``union``: random frames, a valid header with random or deeply nested msgpack, a
truncated honest message, an honest message of another socket's union (wrong kind), a known tag
with fields of the wrong type, or a frame above the socket's size limit.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from hypothesis import strategies as st

from rollwire.messages import Codec
from rollwire.messages.envelope import PROTOCOL_VERSION, Header
from rollwire.messages.weights import (
    Beacon,
    BeaconSeen,
    BucketData,
    InlinePayload,
    Leaving,
    PullBucket,
    Register,
    StepDone,
    StepMessage,
    VersionOutcome,
    WeightsReady,
    Welcome,
)

_enc = msgspec.msgpack.Encoder()
HONEST: list[msgspec.Struct] = [
    Register(receiver_id="r1", host_id="h", transports=["inline"], live_version=0, checksums=["xxh3-64/1MiB"]),
    BeaconSeen(receiver_id="r1", trainer_id="t", seq=1),
    PullBucket(version=1, index=0),
    VersionOutcome(receiver_id="r1", version=1, ok=True),
    StepDone(receiver_id="r1", step=1, phase="train_start", ok=True),
    Leaving(receiver_id="r1"),
    Welcome(trainer_id="t", pub_endpoint="tcp://127.0.0.1:1", checksum="xxh3-64/1MiB"),
    BucketData(version=1, index=0, checksum=5),
    Beacon(trainer_id="t", seq=1),
    StepMessage(step=1, phase="train_start"),
    WeightsReady(trainer_id="t", version=1, step=1, n_buckets=0, total_bytes=0, buckets=[],
                 payload=InlinePayload()),
]
TAGS = ["register", "beacon_seen", "pull", "outcome", "step_done", "leaving", "welcome", "bucket", "beacon", "step",
        "weights_ready", "error", "ack"]


def header(rid: int = 0) -> bytes:
    return _enc.encode(Header(PROTOCOL_VERSION, rid))


def nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]


@st.composite
def hostile_frames(draw: Any, rid: int = 0, oversize: int | None = None) -> list[bytes]:
    kind = draw(st.sampled_from(["random", "body", "nested", "truncated", "wrong_kind", "wrong_fields",
                                 "header_only", "extra_frames"] + (["oversize"] if oversize else [])))
    if kind == "random":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
    if kind == "body":
        return [header(rid), draw(st.binary(max_size=256))]
    if kind == "nested":
        depth = draw(st.sampled_from([600, 2_000, 100_000]))
        prefix = draw(st.sampled_from([b"", b"\x92\xa7welcome", b"\x92\xa6beacon", b"\x81\xa4type"]))
        return [header(rid), prefix + nested(depth)]
    if kind == "truncated":
        body = _enc.encode(draw(st.sampled_from(HONEST)))
        return [header(rid), body[:draw(st.integers(0, max(0, len(body) - 1)))]]
    if kind == "wrong_kind":
        return [header(rid), _enc.encode(draw(st.sampled_from(HONEST)))]
    if kind == "wrong_fields":
        tag = draw(st.sampled_from(TAGS))
        fields = draw(st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=8), st.none(),
                                         st.booleans(), st.lists(st.integers(-2**63, 2**64 - 1), max_size=3),
                                         st.floats(allow_nan=True)), max_size=12))
        return [header(rid), _enc.encode([tag, *fields])]
    if kind == "header_only":
        return [header(rid)]
    if kind == "extra_frames":
        return [header(rid), _enc.encode(draw(st.sampled_from(HONEST))), *draw(st.lists(st.binary(max_size=32),
                                                                                         min_size=1, max_size=3))]
    assert oversize is not None
    return [header(rid), b"\x00" * (oversize + 1)]


def dealer(endpoint: str, curve: Any = None) -> zmq.asyncio.Socket:
    """A raw DEALER (no rollwire client code in between)."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    return sock


async def call(sock: zmq.asyncio.Socket, msg: msgspec.Struct, union: Any, rid: int, timeout: float = 20.0) -> Any:
    """Send ``msg`` and wait for the reply that carries ``rid`` (others are skipped)."""
    codec: Codec[Any] = Codec(union)
    await sock.send_multipart(codec.encode(rid, msg))
    async with asyncio.timeout(timeout):
        while True:
            frames = await sock.recv_multipart()
            got, reply, _ = codec.decode(frames)
            if got == rid:
                return reply


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class HandshakeWatch:
    """Counts failed handshakes on a socket (its monitor): start it before the peer connects.
    A CURVE client refused by the server's allow-list sees HANDSHAKE_FAILED_AUTH, one without
    CURVE NO_DETAIL; a server whose key the client does not expect sees PROTOCOL."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.mon: Any = sock.get_monitor_socket(HANDSHAKE_FAILED)

    async def wait(self, n: int = 1, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            for _ in range(n):
                await self.mon.recv_multipart()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.mon.close(linger=0)
