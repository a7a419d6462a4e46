"""Request/reply with streaming over one DEALER: many concurrent requests, one socket.

Each request gets a fresh ``rid``; every reply carries it in the envelope. A single receiving
task per socket (STYLE.md: one waiter per socket under asyncio) routes each reply to the
request's future (one reply expected) or queue (a stream). Late replies for a request that was
given up are dropped and counted. When the client closes, every waiter gets ``ConnectionClosed``.

Liveness (``heartbeat_s``, on client sockets to a server's public ports): the client sends a
``Heartbeat`` whenever it has sent nothing for ``heartbeat_s``, and the server answers each; any
reply counts as a beat. With calls pending and nothing heard for ``liveness_s``, the server is
taken for dead: every pending call fails with ``ServerUnavailable`` (whatever a healthy generation's
length: beats flow while it runs), and the client drops its socket for a fresh one, which
reconnects by itself when the server is back (ZeroMQ retries the connect; nothing queued for the
dead server is replayed to its successor).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import msgspec
import zmq

from rollwire.messages.codec import Buffer, Codec, ProtocolError
from rollwire.messages.control import Heartbeat
from rollwire.messages.errors import ErrorCode, ErrorReply, RemoteError, RollwireError
from rollwire.transports import sockets
from rollwire.transports.receive import receive_loop
from rollwire.transports.security import CurveClient

R = TypeVar("R")


class ConnectionClosed(RollwireError):
    """The client was closed (or its receive loop died) while a request was waiting."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.SHUTTING_DOWN) -> None:
        super().__init__(code, message)


class ServerUnavailable(ConnectionClosed):
    """Nothing was heard from the server within the liveness bound while calls were pending."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.SERVER_UNAVAILABLE)


class RequestTimeout(RollwireError):
    """The caller's own deadline passed before the reply came."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TIMEOUT, message)


DEFAULT_HEARTBEAT_S = 1.0
DEFAULT_LIVENESS_S = 3.0  # three missed beats (zguide's ppworker): a dead server is noticed within ~3-4 s
_HEARTBEAT = Heartbeat()


class Reply(Generic[R]):
    __slots__ = ("msg", "payload")

    def __init__(self, msg: R, payload: Sequence[Buffer]) -> None:
        self.msg = msg
        self.payload = payload  # zmq frames' buffers; alive as long as this object or views of it


def unwrap(item: Reply[R] | BaseException) -> R:
    """A reply (or a stream item) as its message; an exception a waiter was failed with is raised
    as it is (each one is a ``RollwireError`` with its code, except a bug's)."""
    if isinstance(item, BaseException):
        raise item
    return _checked(item).msg


def _checked(reply: Reply[R]) -> Reply[R]:
    """The one place an ``ErrorReply`` becomes a ``RemoteError``."""
    if isinstance(reply.msg, ErrorReply):
        raise RemoteError.of(reply.msg)
    return reply


class RpcClient(Generic[R]):
    """A DEALER multiplexing requests to one ROUTER endpoint."""

    def __init__(self, endpoint: str, reply_union: Any, *, identity: bytes | None = None,
                 copy_threshold: int | None = None, curve: CurveClient | None = None,
                 max_frame_bytes: int | None = sockets.REQUEST_MAX_FRAME, heartbeat_s: float | None = None,
                 liveness_s: float = DEFAULT_LIVENESS_S, zmtp_heartbeat: bool = True) -> None:
        self.endpoint = endpoint
        self._codec: Codec[R] = Codec(reply_union, max_body_bytes=max_frame_bytes or sockets.BUCKET_MAX_FRAME)
        self._curve = curve
        self._max_frame = max_frame_bytes
        self._zmtp_heartbeat = zmtp_heartbeat
        # without CURVE, one identity for the client's life: a fresh socket after a false "server
        # dead" keeps its sessions (a session belongs to the connection's identity) and public
        # ROUTERs let the new connection take the identity over (ROUTER_HANDOVER). Under CURVE the
        # client is its key: each socket takes a fresh routing id (servers hand none over)
        self._fixed_identity = identity or (None if curve is not None else uuid.uuid4().bytes)
        self._sock = self._new_socket()
        self.heartbeat_s = heartbeat_s  # None: no heartbeats (internal links: the peer shares our process)
        self.liveness_s = liveness_s
        self._last_rx = self._watch_from = time.monotonic()
        self._last_tx = float("-inf")  # the first liveness tick beats at once: the server learns we beat
        self._liveness_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None  # liveness on: the connection's drops
        self.server_deaths = 0  # times the liveness bound passed with calls pending
        self.given_up: set[int] = set()  # rids of streams failed by a server death (see _server_died)
        self._rids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Reply[R]] | asyncio.Queue[Reply[R] | BaseException]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop it runs on (set at start)
        self._recv_task: asyncio.Task[None] | None = None
        self._closed = False
        self._zero_copy = copy_threshold is not None
        self.dropped_replies = 0
        self.bad_replies = 0
        # rid 0 messages that are not heartbeats (a peer's notice about no request of ours) go here
        self.unsolicited: Callable[[Any], None] | None = None

    @property
    def identity(self) -> bytes:
        return self._sock.getsockopt(zmq.IDENTITY)  # type: ignore[return-value]

    def _new_socket(self) -> Any:
        return sockets.dealer(self.endpoint, identity=self._fixed_identity, curve=self._curve,
                              max_frame_bytes=self._max_frame, zmtp_heartbeat=self._zmtp_heartbeat)

    def start(self) -> None:
        if self._recv_task is None:
            loop = self.loop = asyncio.get_running_loop()
            self._recv_task = loop.create_task(self._recv_loop(), name="rpc-recv")
            if self.heartbeat_s is not None and self._liveness_task is None:
                self._liveness_task = loop.create_task(self._liveness_loop(), name="rpc-liveness")
                self._watch_task = loop.create_task(self._watch_connection(self._sock), name="rpc-watch")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._liveness_task, self._watch_task, self._recv_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fail_all(ConnectionClosed(f"client to {self.endpoint} closed"))
        self._sock.close()

    def next_rid(self) -> int:
        return next(self._rids)

    async def call(self, msg: msgspec.Struct, payload: Sequence[Buffer] = (), *,
                   timeout: float | None = None) -> Reply[R]:
        """Send ``msg`` and wait for exactly one reply; an ``ErrorReply`` raises ``RemoteError``."""
        rid = next(self._rids)
        fut: asyncio.Future[Reply[R]] = asyncio.get_running_loop().create_future()
        self._watch(rid, fut)
        try:
            try:
                await self.send(rid, msg, payload)
            except ServerUnavailable:
                if fut.done():  # the liveness check failed the call while its send waited
                    return _checked(fut.result())  # raises that typed error (and marks it retrieved)
                raise
            async with asyncio.timeout(timeout):
                reply = await fut
            return _checked(reply)
        finally:
            self._waiters.pop(rid, None)

    def open_stream(self, rid: int) -> asyncio.Queue[Reply[R] | BaseException]:
        """Register ``rid`` for many replies; the caller must ``close_stream`` when done."""
        q: asyncio.Queue[Reply[R] | BaseException] = asyncio.Queue()
        self._watch(rid, q)
        return q

    def _watch(self, rid: int, waiter: asyncio.Future[Reply[R]] | asyncio.Queue[Reply[R] | BaseException]) -> None:
        if not self._waiters:  # liveness is judged from the first pending call on
            self._watch_from = time.monotonic()
        self._waiters[rid] = waiter

    def close_stream(self, rid: int) -> None:
        self._waiters.pop(rid, None)

    def open_streams(self) -> list[int]:
        """The rids registered with ``open_stream`` and not closed yet (requests still answering)."""
        return [rid for rid, w in self._waiters.items() if isinstance(w, asyncio.Queue)]

    async def send(self, rid: int, msg: msgspec.Struct, payload: Sequence[Buffer] = ()) -> None:
        if self.loop is not None and asyncio.get_running_loop() is not self.loop:
            # its receive loop runs on that loop: a reply would be delivered to a future of this one
            # from the wrong thread, or never (a second asyncio.run after the first one ended)
            raise RuntimeError(f"the client to {self.endpoint} belongs to another event loop: use one client "
                               "per event loop (thread)")
        if self._closed:
            raise ConnectionClosed(f"client to {self.endpoint} is closed")
        if self._recv_task is not None and self._recv_task.done():  # nobody would deliver a reply
            raise ConnectionClosed(f"receive loop for {self.endpoint} has stopped")
        self.start()
        frames = self._codec.encode(rid, msg, payload)
        sock = self._sock
        try:
            sent = await sockets.send(sock, frames, copy=not payload)
        except zmq.ZMQError as e:  # the socket was replaced under us (server taken for dead) or closed
            raise ServerUnavailable(f"send to {self.endpoint} failed: {e}") from None
        except asyncio.CancelledError:
            # a send still waiting for a connection (none ever came: a server that refuses our
            # CURVE handshake, or none there) is cancelled by zmq when the liveness check retires
            # the socket; that is the server's unavailability, not our caller's cancellation
            task = asyncio.current_task()
            if sock.closed and sock is not self._sock and not (task and task.cancelling()):
                raise ServerUnavailable(f"send to {self.endpoint} abandoned: no connection within the "
                                        f"liveness bound ({self.liveness_s}s)") from None
            raise
        if not sent:
            raise ConnectionClosed(f"send to {self.endpoint} timed out at the high-water mark")
        self._last_tx = time.monotonic()

    async def _liveness_loop(self) -> None:
        assert self.heartbeat_s is not None
        while True:
            now = time.monotonic()
            if now - self._last_tx >= self.heartbeat_s:
                with contextlib.suppress(zmq.ZMQError):
                    sockets.send_nowait(self._sock, self._codec.encode(0, _HEARTBEAT))
                self._last_tx = now
            if self._waiters and now - max(self._last_rx, self._watch_from) > self.liveness_s:
                await self._server_died(now - max(self._last_rx, self._watch_from))
            await asyncio.sleep(self.heartbeat_s / 2)

    async def _server_died(self, silent_s: float, why: str = "") -> None:
        """Fail every pending call, then start over on a fresh socket (nothing stale is replayed)."""
        self.server_deaths += 1
        # a server that only stalled still runs what its streams asked: the owner may abort those
        # once it answers again (``RolloutClient.health``, ``close``)
        self.given_up.update(rid for rid, w in self._waiters.items() if isinstance(w, asyncio.Queue))
        self._fail_all(ServerUnavailable(why or f"no reply or heartbeat from {self.endpoint} for {silent_s:.1f}s "
                                                f"(liveness bound {self.liveness_s}s)"))
        # swap first, then retire the old pair: a send meanwhile goes to the fresh socket
        old_tasks, old_sock = (self._recv_task, self._watch_task), self._sock
        self._sock = self._new_socket()
        self._last_rx, self._last_tx = time.monotonic(), float("-inf")
        loop = asyncio.get_running_loop()
        self._recv_task = loop.create_task(self._recv_loop(), name="rpc-recv")
        self._watch_task = loop.create_task(self._watch_connection(self._sock), name="rpc-watch")
        this = asyncio.current_task()
        for task in old_tasks:
            if task is not None and task is not this:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        old_sock.close(linger=0)

    async def _watch_connection(self, sock: Any) -> None:
        """The server's connection dropped (its process died: TCP reset) while calls wait: they can
        never be answered on it, so they fail now instead of at the liveness bound. A drop with
        nothing pending costs nothing (ZeroMQ reconnects)."""
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                await monitor.recv_multipart()
                if sock is self._sock and self._waiters and not self._closed:
                    await self._server_died(0.0, f"connection to {self.endpoint} lost with calls pending")
                    return
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)

    async def _recv_loop(self) -> None:
        copy = not self._zero_copy
        sock = self._sock  # this task's socket, even after _server_died swaps in a fresh one

        def on_frames(frames: list[Any]) -> None:
            self._last_rx = time.monotonic()
            self._dispatch(frames if copy else [f.buffer for f in frames])

        try:
            await receive_loop(sock, on_frames, copy=copy)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket died: nobody may wait forever
            self._fail_all(ConnectionClosed(f"receive loop for {self.endpoint} died: {e!r}"))
            raise

    def _dispatch(self, frames: list[Any]) -> None:
        try:
            rid, msg, payload = self._codec.decode(frames)
        except ProtocolError as e:
            self._bad_reply(e)
            return
        except Exception as e:  # a decoder bug (or a hostile server) costs one reply, never the loop
            self._bad_reply(ProtocolError(ErrorCode.BAD_FRAME, f"undecodable reply: {e!r}"))
            return
        self._deliver(rid, msg, payload)

    def _bad_reply(self, e: ProtocolError) -> None:
        """Counted; the request it names (if any is waiting) gets the typed error."""
        self.bad_replies += 1
        waiter = self._waiters.get(e.rid)
        if waiter is None:
            return
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(e)
        elif not waiter.done():
            waiter.set_exception(e)

    def _deliver(self, rid: int, msg: Any, payload: Sequence[Buffer]) -> None:
        waiter = self._waiters.get(rid)
        if waiter is None:
            if rid == 0 and self.unsolicited is not None and type(msg) is not Heartbeat:
                self.unsolicited(msg)
            elif rid != 0 or type(msg) is not Heartbeat:
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
