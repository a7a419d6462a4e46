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

from rollwire.messages.codec import Codec, ProtocolError
from rollwire.transports import sockets

T = TypeVar("T")


class Publisher:
    def __init__(self, endpoint: str) -> None:
        self._sock = sockets.socket(zmq.PUB)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError:
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
    """A SUB reading the union ``T``; undecodable messages are counted and skipped."""

    def __init__(self, union: Any) -> None:
        self._sock: zmq.asyncio.Socket = sockets.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._codec: Codec[T] = Codec(union)
        self.endpoint = ""
        self.bad_messages = 0

    def connect(self, endpoint: str) -> None:
        """(Re)point the subscription at ``endpoint``; a no-op if already connected there."""
        if endpoint == self.endpoint:
            return
        if self.endpoint:
            self._sock.disconnect(self.endpoint)
        self._sock.connect(endpoint)
        self.endpoint = endpoint

    async def recv(self, timeout: float | None = None) -> T | None:
        """The next message, or None after ``timeout`` seconds without one."""
        while True:
            if timeout is not None and not await self._sock.poll(int(timeout * 1000)):
                return None
            frames = await self._sock.recv_multipart()
            try:
                return self._codec.decode(frames)[1]
            except ProtocolError:
                self.bad_messages += 1

    def close(self) -> None:
        self._sock.close(linger=0)
