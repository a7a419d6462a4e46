"""PUB/SUB for announcements, with the codec: what the trainer publishes and receivers read.

A SUB misses everything published before its subscription reached the PUB (zguide's slow
joiner), and a PUB drops at its high-water mark. Neither is relied on here: the trainer counts a
receiver only after that receiver acknowledged a beacon it received on this link (see
``clients/trainer.py``), and announcements are few and small.
"""

from __future__ import annotations

import contextlib
from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio

from rollwire.messages.codec import Codec
from rollwire.transports import sockets
from rollwire.transports.security import CurveClient, CurveServer

T = TypeVar("T")

CONTROL_MAX_FRAME = 1 << 20  # the trainer link's control messages (Register, Welcome, outcomes...), both ways
SUBSCRIPTION_MAX_FRAME = 4 << 10  # what a PUB receives: subscriptions (rollwire subscribes to b"")
ANNOUNCEMENT_MAX_FRAME = sockets.REQUEST_MAX_FRAME  # a WeightsReady names every tensor (MoE: ~100k)


class Publisher:
    """A PUB; with ``curve`` a CURVE server, so only allowed subscribers receive anything."""

    def __init__(self, endpoint: str, *, curve: CurveServer | None = None) -> None:
        self._sock = sockets.socket(zmq.PUB, max_frame_bytes=SUBSCRIPTION_MAX_FRAME)
        try:
            if curve is not None:
                curve.apply(self._sock)  # before bind (STYLE.md)
            sockets.check_bind(endpoint)
            self._sock.bind(endpoint)
        except (zmq.ZMQError, OSError, ValueError):
            self._sock.close(linger=0)
            raise
        self._codec: Codec[Any] = Codec(msgspec.Struct)  # encoding only

    @property
    def endpoint(self) -> str:
        """The bound endpoint, with the real port when bound to port 0 / a wildcard."""
        return self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()  # type: ignore[union-attr]

    async def publish(self, msg: msgspec.Struct) -> None:
        await self._sock.send_multipart(self._codec.encode(0, msg))

    def close(self) -> None:
        """Unbind first, so the port is freed as soon as ZeroMQ's I/O thread gets to it (a successor
        in this process binds through ``sockets.bind_when_free``)."""
        with contextlib.suppress(zmq.ZMQError):
            self._sock.unbind(self.endpoint)
        self._sock.close(linger=0)


class Subscriber(Generic[T]):
    """A SUB reading the union ``T``; undecodable messages are counted and skipped (whatever the
    decoder raises: a peer's bytes never end the reader). With ``curve``, a CURVE client that only
    completes the handshake with the publisher holding ``curve.server_key``: a stranger bound at
    the endpoint is never heard."""

    def __init__(self, union: Any, *, curve: CurveClient | None = None,
                 max_frame_bytes: int = ANNOUNCEMENT_MAX_FRAME) -> None:
        self._curve, self._max_frame_bytes = curve, max_frame_bytes
        self._sock = self._new_socket()
        self._codec: Codec[T] = Codec(union)
        self.endpoint = ""
        self.bad_messages = 0

    def _new_socket(self) -> zmq.asyncio.Socket:
        sock = sockets.socket(zmq.SUB, max_frame_bytes=self._max_frame_bytes)
        if self._curve is not None:
            self._curve.apply(sock)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        return sock

    def connect(self, endpoint: str) -> None:
        """(Re)point the subscription at ``endpoint``; a no-op if already connected there. Another
        endpoint gets a fresh socket: ``disconnect`` on the live one ends the old publisher's pipe
        at some later call into the socket, and when that lands between two frames of a message
        being read, libzmq aborts the process (``Assertion failed: !_more (src/fq.cpp:80)``; a
        Welcome naming another PUB while beacons queue did it)."""
        if endpoint == self.endpoint:
            return
        if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"not a ZeroMQ endpoint: {endpoint[:200]!r}")
        sock = self._new_socket() if self.endpoint else self._sock
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:  # e.g. a malformed address in a peer's message
            if sock is not self._sock:
                sock.close(linger=0)
            raise ValueError(f"cannot connect to {endpoint[:200]!r}: {e}") from None
        if sock is not self._sock:
            self._sock.close(linger=0)
            self._sock = sock
        self.endpoint = endpoint

    async def recv(self, timeout: float | None = None) -> T | None:
        """The next message, or None after ``timeout`` seconds without one."""
        while True:
            if timeout is not None and not await self._sock.poll(int(timeout * 1000)):
                return None
            frames = await self._sock.recv_multipart()
            try:
                return self._codec.decode(frames)[1]
            except Exception:  # ProtocolError, or a decoder that raised something else (RecursionError)
                self.bad_messages += 1

    def close(self) -> None:
        self._sock.close(linger=0)
