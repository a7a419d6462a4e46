"""Actor base class: ports, a handler per message type, a default that refuses.

An actor owns one ROUTER per *port* (each port accepts one tagged union and may be bound to
several endpoints: its inproc address plus, e.g., a public tcp endpoint). One receiving task per
socket decodes a message and hands it straight to the handler registered for its type: a sync
handler runs inline (no extra hop) and answers with ``reply_nowait`` (no task either); an async
handler becomes a task, bounded by ``max_pending`` (the mailbox bound: beyond it the sender gets
OVERLOADED, and the receive loop keeps reading so aborts and health checks still get through).
The receiving task is the shared ``receive_loop`` (transports/receive.py).

Handler outcomes: a ``RollwireError`` becomes that request's ``ErrorReply`` and the actor goes on;
any other exception also answers the sender (``internal``) and then crashes the actor, which the
``ActorSystem`` restarts after failing every request it held (``held_requests``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
import zmq.asyncio

from rollwire.messages.codec import Buffer, Codec, ProtocolError
from rollwire.messages.control import Heartbeat
from rollwire.messages.errors import ErrorCode, ErrorReply
from rollwire.runtime.dispatch import handler_table
from rollwire.runtime.errors import RollwireError
from rollwire.runtime.logging import get_logger
from rollwire.runtime.metrics import Counters
from rollwire.runtime.tasks import BackgroundTasks
from rollwire.transports import sockets
from rollwire.transports.receive import receive_loop
from rollwire.transports.rpc import RpcClient
from rollwire.transports.security import CurveServer, client_of

_HEARTBEAT = Heartbeat()


@dataclass(frozen=True, slots=True)
class Origin:
    """Who sent a request and how to answer: the socket it came in on, the peer, the rid.

    ``client`` names the sender for ownership and per-client limits: its CURVE public key (z85)
    when the socket authenticates, ``internal:<hex id>`` on an actor's internal (inproc) socket,
    else ``peer:<hex routing id>`` (one connection: without keys, identity is only that)."""

    port: str  # the logical port (which union)
    sock: str  # the socket it arrived on: the port's internal one, or one of its public ones
    peer: bytes  # ZeroMQ routing id on that socket
    rid: int
    client: str = ""

    @property
    def conn(self) -> bytes:
        """A key for this connection that no peer of another socket can take (routing ids are
        chosen by peers; two sockets' identity spaces are separate). Internal sockets share one
        space: the co-located actors that use them have fixed names across all ports."""
        return (b"internal" if self.internal else self.sock.encode()) + b"\x00" + self.peer

    @property
    def internal(self) -> bool:
        return self.sock == self.port


@dataclass(frozen=True)
class Port:
    union: Any  # tagged union this port accepts
    zero_copy: bool = False  # receive frames without copying (ports that carry tensors)
    max_frame_bytes: int = sockets.REQUEST_MAX_FRAME  # larger frames are refused by ZeroMQ unread


class ActorCrashed(Exception):
    pass


class Actor:
    ports: ClassVar[dict[str, Port]] = {}
    max_pending: ClassVar[int] = 4096
    client_timeout_s: float = 15.0  # public peers silent this long are gone (0: never); see Heartbeat
    _handlers: ClassVar[dict[type, str]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls._handlers = handler_table(cls)

    def __init__(self, name: str) -> None:
        self.name = name
        self.counters = Counters()
        self.log = get_logger(f"rollwire.{name}")
        self._socks: dict[str, zmq.asyncio.Socket] = {}  # socket key -> ROUTER (key: port, or port@endpoint)
        self._sock_port: dict[str, str] = {}  # socket key -> its port
        self._codecs: dict[str, Codec[Any]] = {}
        self._reply_codec: Codec[Any] = Codec(ErrorReply)  # encoding only: any struct encodes
        self._tasks: set[asyncio.Task[Any]] = set()
        self._replies = BackgroundTasks()  # replies waiting at the high-water mark: flushed, not cancelled, on close
        self._peers: dict[str, RpcClient[Any]] = {}
        self._authenticated: set[str] = set()  # socket keys that run CURVE
        self._last_seen: dict[tuple[str, bytes], tuple[float, str]] = {}  # public (sock, peer) -> (time, client)
        # public peers that spoke but never beat -> (when last heard or probed, client): see _sweep_clients
        self._unbeaten: dict[tuple[str, bytes], tuple[float, str]] = {}
        self._crash: asyncio.Future[BaseException] | None = None
        self._serving: list[asyncio.Task[None]] = []
        self._dispatch = {t: getattr(self, attr) for t, attr in self._handlers.items()}

    # -- lifecycle hooks (override) -------------------------------------------------------
    async def on_start(self) -> None:
        """Called once the ports are bound."""

    async def on_stop(self) -> None:
        """Called on stop and before a restart; release what the actor owns."""

    def on_client_gone(self, sock: str, peer: bytes, client: str) -> None:
        """A public peer (connection ``sock``/``peer``, identity ``client``) sent nothing for
        ``client_timeout_s``: abort its requests, free its waiting requests and sessions."""

    def has_live_connection(self, client: str) -> bool:
        """Whether any public connection of ``client`` is still there: a beating one still heard
        from, or a raw one not yet found closed."""
        return any(seen[1] == client for seen in (*self._last_seen.values(), *self._unbeaten.values()))

    def take_held_requests(self) -> list[Origin]:
        """Requests the actor is answering right now, which it must no longer answer: on a crash
        the supervisor sends each one ACTOR_RESTARTED (exactly one terminal reply per request)."""
        return []

    # -- used by the ActorSystem --------------------------------------------------------
    def _bind(self, binds: Mapping[str, Sequence[str]], public: Mapping[str, Sequence[str]] | None = None,
              curve: CurveServer | None = None) -> None:
        """Each port gets an internal ROUTER (its inproc address, for co-located actors) and one
        ROUTER per public endpoint, so no outside peer shares an identity space with an actor's
        link; ``curve`` (if any) guards the public ones."""
        for port, spec in self.ports.items():
            self._codecs[port] = Codec(spec.union)
            self._add_sock(port, port, sockets.router(binds[port], max_frame_bytes=spec.max_frame_bytes))
            for ep in (public or {}).get(port, ()):
                sock = sockets.router([ep], curve=curve, max_frame_bytes=spec.max_frame_bytes)
                self._add_sock(f"{port}@{ep}", port, sock, curve is not None)

    def _add_sock(self, key: str, port: str, sock: zmq.asyncio.Socket, authenticated: bool = False) -> None:
        self._socks[key] = sock
        self._sock_port[key] = port
        if authenticated:
            self._authenticated.add(key)

    def _adopt(self, old: Actor) -> None:
        """Take over a crashed predecessor's sockets: messages queued in them are not lost."""
        self._codecs, self._socks, self._sock_port = old._codecs, old._socks, old._sock_port
        self._authenticated, self._last_seen, self._unbeaten = old._authenticated, old._last_seen, old._unbeaten

    async def _run(self) -> BaseException:
        """Serve every port until cancelled; returns the exception that crashed the actor."""
        loop = asyncio.get_running_loop()
        self._crash = loop.create_future()
        self._serving = [self.spawn(self._serve(key), name=f"{self.name}:{key}") for key in self._socks]
        if self.client_timeout_s > 0 and len(self._socks) > len(self.ports):  # has public sockets
            self._serving.append(self.spawn(self._sweep_clients(), name=f"{self.name}:liveness"))
        return await self._crash

    async def _stop_intake(self) -> None:
        """Stop reading the ports; unread messages stay queued in the sockets for a successor."""
        for t in self._serving:
            t.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)

    async def _close(self, close_sockets: bool = True) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._replies.drain(timeout=1.0)
        for peer in self._peers.values():
            await peer.close()
        if close_sockets:
            for sock in self._socks.values():
                sockets.close_router(sock)

    # -- for subclasses ---------------------------------------------------------------------
    def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task[Any]:
        """A task owned by the actor: cancelled on stop; an unexpected exception crashes the actor."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    async def reply(self, origin: Origin, msg: msgspec.Struct, payload: Sequence[Buffer] = ()) -> bool:
        """Send ``msg`` to whoever sent ``origin``; False if that peer is gone."""
        frames = self._reply_codec.encode(origin.rid, msg, payload)
        ok = await sockets.send(self._socks[origin.sock], [origin.peer, *frames], copy=not payload)
        if not ok:
            self.counters.inc("replies_undeliverable")
        return ok

    def reply_nowait(self, origin: Origin, msg: msgspec.Struct, payload: Sequence[Buffer] = ()) -> bool:
        """``reply`` from sync code, without a task when ZeroMQ takes the frames at once (the common
        case). At the high-water mark the send waits in a reply task, bounded by SEND_TIMEOUT_S and
        flushed (not cancelled) on close. False if the peer is gone. With ``payload``, the buffers
        must stay unchanged until the send completes (as for ``reply``)."""
        frames = self._reply_codec.encode(origin.rid, msg, payload)
        try:
            pending = sockets.send_nowait(self._socks[origin.sock], [origin.peer, *frames], copy=not payload)
        except zmq.ZMQError:  # EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY); ENOTSOCK: closed
            self.counters.inc("replies_undeliverable")
            return False
        if pending is not None:
            self._replies.spawn(self._finish_send(pending))
        return True

    async def _finish_send(self, pending: asyncio.Future[Any]) -> None:
        try:
            async with asyncio.timeout(sockets.SEND_TIMEOUT_S):
                await pending
        except (TimeoutError, zmq.ZMQError):
            self.counters.inc("replies_undeliverable")

    async def reply_error(self, origin: Origin, code: ErrorCode, message: str) -> bool:
        return await self.reply(origin, ErrorReply(code=code, message=message, origin=self.name))

    def send_error_soon(self, origin: Origin, code: ErrorCode, message: str) -> None:
        """Send an error reply from sync code; one still waiting at the HWM is flushed even if the
        actor is stopping."""
        self.reply_nowait(origin, ErrorReply(code=code, message=message, origin=self.name))

    def bound_endpoint(self, port: str) -> str:
        """The endpoint ``port`` was bound to last (its last public one; a tcp ``*`` port resolved)."""
        key = [k for k, p in self._sock_port.items() if p == port][-1]
        return bytes(self._socks[key].getsockopt(zmq.LAST_ENDPOINT)).decode()

    def peer(self, endpoint: str, reply_union: Any) -> RpcClient[Any]:
        """A cached DEALER to another actor's port (inproc, ipc or tcp: the same code)."""
        client = self._peers.get(endpoint)
        if client is None:
            client = self._peers[endpoint] = RpcClient(endpoint, reply_union, identity=self.name.encode())
        return client

    # -- internals ------------------------------------------------------------------------
    async def _serve(self, key: str) -> None:
        """The socket's one receiving task (the shared receive loop)."""
        sock, port = self._socks[key], self._sock_port[key]
        codec = self._codecs[port]
        authenticated = key in self._authenticated
        copy = not (self.ports[port].zero_copy or authenticated)  # the sender's key rides on a Frame
        await receive_loop(sock, lambda frames: self._receive(port, key, codec, frames, copy, authenticated),
                           copy=copy)

    def _receive(self, port: str, key: str, codec: Codec[Any], frames: list[Any], copy: bool,
                 authenticated: bool) -> None:
        if copy:
            peer = frames[0]
            client = f"internal:{peer.hex()}" if key == port else f"peer:{peer.hex()}"
        else:
            client = (client_of(frames[-1]) or "") if authenticated else ""
            frames = [f.bytes if i == 0 else f.buffer for i, f in enumerate(frames)]
            peer = frames[0]
            if not client:
                client = f"internal:{peer.hex()}" if key == port else f"peer:{peer.hex()}"
        if key != port:
            if (key, peer) in self._last_seen:
                self._last_seen[(key, peer)] = (time.monotonic(), client)
            else:
                self._unbeaten[(key, peer)] = (time.monotonic(), client)
        try:
            rid, msg, payload = codec.decode(frames[1:])
        except Exception as e:  # a decoder bug must cost one message, never the port
            code, text, rid = ((e.code, e.message, e.rid) if isinstance(e, ProtocolError)
                               else (ErrorCode.BAD_FRAME, f"undecodable: {e!r}", 0))
            self.counters.inc("bad_messages")
            self.send_error_soon(Origin(port, key, peer, rid, client), code, text)
            return
        origin = Origin(port, key, peer, rid, client)
        if type(msg) is Heartbeat:  # the peer speaks liveness: from now on, silence means it is gone
            if key != port:
                self._last_seen[(key, peer)] = (time.monotonic(), client)
                self._unbeaten.pop((key, peer), None)
            self.reply_nowait(origin, _HEARTBEAT)
            return
        self._handle(origin, msg, payload)

    async def _sweep_clients(self) -> None:
        """Liveness of public peers. One that beats (RolloutClient does, every second while
        connected) is gone once silent for ``client_timeout_s``. One that never sent a Heartbeat (a
        raw pyzmq client) is not judged by silence, but by its connection: silent that long, it is
        probed with a Heartbeat (rid 0), and a probe ROUTER_MANDATORY cannot deliver (the peer's
        connection is closed, or ZMTP heartbeats timed it out) makes it gone. Either way
        ``on_client_gone`` frees what it held; a connected raw peer keeps its requests to their end."""
        period = max(0.05, self.client_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            cutoff = now - self.client_timeout_s
            gone = [(k, v[1]) for k, v in self._last_seen.items() if v[0] < cutoff]
            for k, _ in gone:
                del self._last_seen[k]
            for k, (heard, client) in list(self._unbeaten.items()):
                if heard < cutoff:
                    if self._probe(*k):
                        self._unbeaten[k] = (now, client)
                    else:
                        del self._unbeaten[k]
                        gone.append((k, client))
            for k, client in gone:
                self.counters.inc("clients_gone")
                self.log.info("client_gone", client=client, silent_s=self.client_timeout_s)
                self.on_client_gone(k[0], k[1], client)

    def _probe(self, key: str, peer: bytes) -> bool:
        """Whether a Heartbeat can be handed to ``peer``'s connection (False: it is closed)."""
        try:
            pending = sockets.send_nowait(self._socks[key], [peer, *self._reply_codec.encode(0, _HEARTBEAT)])
        except zmq.ZMQError:  # EHOSTUNREACH: no connection with that routing id any more
            return False
        if pending is not None:  # its queue is full: connected, but not reading; not a reason to drop it
            pending.cancel()
        return True

    def _handle(self, origin: Origin, msg: Any, payload: Sequence[Buffer]) -> None:
        handler = self._dispatch.get(type(msg))
        if handler is None:
            self.send_error_soon(origin, ErrorCode.UNKNOWN_KIND, f"{self.name} does not handle {type(msg).__name__}")
            return
        try:
            result = handler(origin, msg, payload)
        except BaseException as e:
            self._handler_failed(origin, e)
            return
        if result is not None and inspect.isawaitable(result):
            if len(self._tasks) >= self.max_pending:
                self.counters.inc("overloaded")
                self.send_error_soon(origin, ErrorCode.OVERLOADED, f"{self.name} has {self.max_pending} pending")
                getattr(result, "close", lambda: None)()  # never started: close the coroutine
                self.on_refused(origin, msg)
                return
            task = self.spawn(result)
            task.remove_done_callback(self._task_done)
            task.add_done_callback(lambda t: self._handler_task_done(origin, t))

    def on_refused(self, origin: Origin, msg: Any) -> None:
        """A handler's awaitable was refused (``overloaded``) and will never run: undo here what the
        handler did before returning it (its ``finally`` never runs)."""

    def _handler_task_done(self, origin: Origin, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._handler_failed(origin, task.exception())  # type: ignore[arg-type]

    def _handler_failed(self, origin: Origin, exc: BaseException) -> None:
        if isinstance(exc, RollwireError):
            self.send_error_soon(origin, exc.code, exc.message)
            return
        self.log.error("handler_crashed", error=repr(exc), exc_info=exc)
        self.send_error_soon(origin, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        self._crashed(exc)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._crashed(task.exception())  # type: ignore[arg-type]

    def _crashed(self, exc: BaseException) -> None:
        if self._crash is not None and not self._crash.done():
            self._crash.set_result(exc)
            for t in self._serving:  # read no further: queued requests wait for the successor
                t.cancel()
