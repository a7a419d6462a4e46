"""ZeroMQ sockets configured on purpose.

ZeroMQ drops messages silently in places (ROUTER to an unknown peer or at its high-water mark,
PUB with no subscriber). rollwire sets, for every socket it makes:

* ``LINGER`` finite (``DEFAULT_LINGER_MS``): closing never hangs on an unreachable peer, yet a
  last reply (a terminal error, a dead sentinel) still gets a moment to leave.
* ``SNDHWM``/``RCVHWM`` (``DEFAULT_HWM``): high enough that the application's own flow control
  (in-flight limits, credit windows) binds first; the HWM is a safety net, not backpressure.
* ``ROUTER_MANDATORY`` on every ROUTER: a reply to a peer that is gone raises EHOSTUNREACH
  instead of vanishing, so the sender learns (and counts) it; at the HWM a send raises EAGAIN,
  which the asyncio socket turns into a wait bounded by ``SEND_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket as pysocket
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import zmq
import zmq.asyncio

T = TypeVar("T")

DEFAULT_HWM = 100_000
DEFAULT_LINGER_MS = 500
SEND_TIMEOUT_S = 10.0

_context: zmq.asyncio.Context | None = None


def context() -> zmq.asyncio.Context:
    """The process-wide asyncio context (inproc endpoints only connect within one context)."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


def ipc_endpoint(name: str = "") -> str:
    """A fresh ipc:// endpoint in the temp directory (paths must stay short: 107 bytes max)."""
    return f"ipc://{tempfile.gettempdir()}/rw-{name}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def free_tcp_endpoint(host: str = "127.0.0.1", *, span: int = 2) -> str:
    """A tcp:// endpoint (IPv4 ``host``) on a port P such that P .. P + span - 1 are free now. The default span
    covers a TrainerPublisher given only its ROUTER endpoint, which binds its PUB on P + 1 (a
    port next to one the OS just handed out is often a live connection's: that failed a CI run)."""
    for _ in range(64):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(pysocket.socket())
            first.bind((host, 0))
            port = first.getsockname()[1]
            if port + span - 1 > 65535:
                continue
            try:
                for p in range(port + 1, port + span):
                    stack.enter_context(pysocket.socket()).bind((host, p))
            except OSError:  # in use
                continue
            return f"tcp://{host}:{port}"
    raise OSError(f"no {span} adjacent free tcp ports found on {host}")


def inproc_endpoint(name: str) -> str:
    return f"inproc://rollwire/{name}"


def _configure(sock: zmq.asyncio.Socket, hwm: int) -> None:
    sock.setsockopt(zmq.LINGER, DEFAULT_LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)


_bound: weakref.WeakKeyDictionary[zmq.asyncio.Socket, list[str]] = weakref.WeakKeyDictionary()


def router(binds: Sequence[str], *, hwm: int = DEFAULT_HWM, ctx: zmq.asyncio.Context | None = None,
           ) -> zmq.asyncio.Socket:
    """A ROUTER bound to every endpoint in ``binds`` (one socket can serve inproc and tcp)."""
    sock = (ctx or context()).socket(zmq.ROUTER)
    _configure(sock, hwm)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    bound: list[str] = []
    try:
        for ep in binds:
            sock.bind(ep)
            bound.append(bytes(sock.getsockopt(zmq.LAST_ENDPOINT)).decode())
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    _bound[sock] = bound
    return sock


async def bind_when_free(make: Callable[[], T], within_s: float = 2.0) -> T:
    """``make()`` (which binds), retried while its address is in use, for up to ``within_s``: a
    predecessor in this process (a restarted trainer) that closed its socket there frees the port
    asynchronously, on ZeroMQ's I/O thread, even after an unbind. A port someone else holds still
    fails, ``within_s`` later."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return make()
        except zmq.ZMQError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.02)


def close_router(sock: zmq.asyncio.Socket, linger_ms: int = DEFAULT_LINGER_MS) -> None:
    """Unbind every endpoint at once (a successor may bind the same names at once; a plain close
    keeps them registered while lingering replies drain), then close."""
    for ep in _bound.pop(sock, []):
        with contextlib.suppress(zmq.ZMQError):  # already gone
            sock.unbind(ep)
    sock.close(linger=linger_ms)


def dealer(connect: str, *, identity: bytes | None = None, hwm: int = DEFAULT_HWM,
           ctx: zmq.asyncio.Context | None = None) -> zmq.asyncio.Socket:
    sock = (ctx or context()).socket(zmq.DEALER)
    _configure(sock, hwm)
    sock.setsockopt(zmq.IDENTITY, identity or uuid.uuid4().bytes)
    sock.connect(connect)
    return sock


def socket(kind: int, *, hwm: int = DEFAULT_HWM, ctx: zmq.asyncio.Context | None = None) -> zmq.asyncio.Socket:
    sock = (ctx or context()).socket(kind)
    _configure(sock, hwm)
    return sock


def shadow(sock: zmq.asyncio.Socket) -> zmq.Socket:
    """A plain (blocking-API) view of an asyncio socket, for non-blocking receives that skip
    zmq.asyncio's per-call Future and EVENTS bookkeeping. Only the socket's single receiving task
    may use it, and only to drain with ``NOBLOCK`` until ``zmq.Again`` (or before awaiting the
    asyncio socket again, which re-checks EVENTS), so no edge of the socket's FD is lost."""
    return zmq.Socket.shadow(sock.underlying)


def send_nowait(sock: zmq.asyncio.Socket, frames: Sequence[Any], *, copy: bool = True) -> asyncio.Future[Any] | None:
    """Send now if ZeroMQ takes it (the common case); None when sent, else the pending send.

    Raises ZMQError as ``send`` would see it (EHOSTUNREACH: the peer is gone). A returned future
    is a send waiting at the high-water mark: await it with a timeout, or cancel it.
    """
    fut: Any = sock.send_multipart(frames, copy=copy)
    if not fut.done():
        return fut  # type: ignore[no-any-return]
    fut.result()
    return None


async def send(sock: zmq.asyncio.Socket, frames: Sequence[Any], *, copy: bool = True,
               timeout: float = SEND_TIMEOUT_S) -> bool:
    """Send frames; False when the peer is gone (EHOSTUNREACH) or the send timed out at the HWM.

    zmq.asyncio tries a non-blocking send first, so the common case completes without a wait.
    """
    try:
        fut: Any = sock.send_multipart(frames, copy=copy)
        if not fut.done():
            await asyncio.wait_for(fut, timeout)
        else:
            fut.result()
        return True
    except zmq.ZMQError as e:
        if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            return False
        raise
    except TimeoutError:
        return False
