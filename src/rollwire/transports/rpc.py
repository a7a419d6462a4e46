"""Request/reply with streaming over one DEALER: many concurrent requests, one socket.

Each request gets a fresh ``rid``; every reply carries it in the envelope. A single receiving
task per socket (STYLE.md: one waiter per socket under asyncio) routes each reply to the
request's future (one reply expected) or queue (a stream). Late replies for a request that was
given up are dropped and counted. When the client closes, every waiter gets ``ConnectionClosed``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec
import zmq

from rollwire.messages.codec import Buffer, Codec, ProtocolError
from rollwire.transports import sockets

R = TypeVar("R")
RECV_BATCH = 256  # replies delivered per wake-up of the receiving task before it yields


class ConnectionClosed(Exception):
    """The client was closed (or its receive loop died) while a request was waiting."""


class Reply(Generic[R]):
    __slots__ = ("msg", "payload")

    def __init__(self, msg: R, payload: Sequence[Buffer]) -> None:
        self.msg = msg
        self.payload = payload  # zmq frames' buffers; alive as long as this object or views of it


class RpcClient(Generic[R]):
    """A DEALER multiplexing requests to one ROUTER endpoint."""

    def __init__(self, endpoint: str, reply_union: Any, *, identity: bytes | None = None,
                 copy_threshold: int | None = None) -> None:
        self.endpoint = endpoint
        self._codec: Codec[R] = Codec(reply_union)
        self._sock = sockets.dealer(endpoint, identity=identity)
        self._rids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Reply[R]] | asyncio.Queue[Reply[R] | BaseException]] = {}
        self._recv_task: asyncio.Task[None] | None = None
        self._closed = False
        self._zero_copy = copy_threshold is not None
        self.dropped_replies = 0
        self.bad_replies = 0

    @property
    def identity(self) -> bytes:
        return self._sock.getsockopt(zmq.IDENTITY)  # type: ignore[return-value]

    def start(self) -> None:
        if self._recv_task is None:
            self._recv_task = asyncio.get_running_loop().create_task(self._recv_loop(), name="rpc-recv")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._recv_task is not None:
            self._recv_task.cancel()
            await asyncio.gather(self._recv_task, return_exceptions=True)
        self._fail_all(ConnectionClosed(f"client to {self.endpoint} closed"))
        self._sock.close()

    def next_rid(self) -> int:
        return next(self._rids)

    async def call(self, msg: msgspec.Struct, payload: Sequence[Buffer] = (), *,
                   timeout: float | None = None) -> Reply[R]:
        """Send ``msg`` and wait for exactly one reply."""
        rid = next(self._rids)
        fut: asyncio.Future[Reply[R]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        try:
            await self.send(rid, msg, payload)
            return await (asyncio.wait_for(fut, timeout) if timeout is not None else fut)
        finally:
            self._waiters.pop(rid, None)

    def open_stream(self, rid: int) -> asyncio.Queue[Reply[R] | BaseException]:
        """Register ``rid`` for many replies; the caller must ``close_stream`` when done."""
        q: asyncio.Queue[Reply[R] | BaseException] = asyncio.Queue()
        self._waiters[rid] = q
        return q

    def close_stream(self, rid: int) -> None:
        self._waiters.pop(rid, None)

    async def send(self, rid: int, msg: msgspec.Struct, payload: Sequence[Buffer] = ()) -> None:
        if self._closed:
            raise ConnectionClosed(f"client to {self.endpoint} is closed")
        if self._recv_task is not None and self._recv_task.done():  # nobody would deliver a reply
            raise ConnectionClosed(f"receive loop for {self.endpoint} has stopped")
        self.start()
        frames = self._codec.encode(rid, msg, payload)
        if not await sockets.send(self._sock, frames, copy=not payload):
            raise ConnectionClosed(f"send to {self.endpoint} timed out at the high-water mark")

    async def _recv_loop(self) -> None:
        copy = not self._zero_copy
        ready = sockets.shadow(self._sock)
        try:
            while True:
                frames: list[Any] = await self._sock.recv_multipart(copy=copy)
                delivered = 0
                while True:  # every reply already queued, without a Future each
                    self._dispatch(frames if copy else [f.buffer for f in frames])
                    delivered += 1
                    if delivered % RECV_BATCH == 0:
                        await asyncio.sleep(0)  # let the callers run
                    try:
                        frames = ready.recv_multipart(zmq.NOBLOCK, copy=copy)
                    except zmq.Again:
                        break
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket died: nobody may wait forever
            self._fail_all(ConnectionClosed(f"receive loop for {self.endpoint} died: {e!r}"))
            raise

    def _dispatch(self, frames: list[Any]) -> None:
        try:
            rid, msg, payload = self._codec.decode(frames)
        except ProtocolError as e:
            self.bad_replies += 1
            waiter = self._waiters.get(e.rid)
            if waiter is None:
                return
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(e)
            elif not waiter.done():
                waiter.set_exception(e)
            return
        waiter = self._waiters.get(rid)
        if waiter is None:
            self.dropped_replies += 1
            return
        reply = Reply(msg, payload)
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(reply)
        elif not waiter.done():
            waiter.set_result(reply)

    def _fail_all(self, exc: BaseException) -> None:
        for waiter in self._waiters.values():
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(exc)
            elif not waiter.done():
                waiter.set_exception(exc)
        self._waiters.clear()
