"""ZeroMQ sockets configured on purpose.

ZeroMQ drops messages silently in places (ROUTER to an unknown peer or at its high-water mark,
PUB with no subscriber). rollwire sets, for every socket it makes:

* ``LINGER`` finite (``DEFAULT_LINGER_MS``): closing never hangs on an unreachable peer, yet a
  last reply (a terminal error, a dead sentinel) still gets a moment to leave.
* ``SNDHWM``/``RCVHWM`` (``DEFAULT_HWM``): high enough that the application's own flow control
  (in-flight limits, credit windows) binds first; the HWM is a safety net, not backpressure.
* ``MAXMSGSIZE`` (``max_frame_bytes``): a frame above it is refused by ZeroMQ before it is
  buffered (the peer is disconnected), so no peer makes the server allocate what it sends.
* CURVE (``transports.security``) when keys are given: set before ``bind``/``connect``.
* ipc endpoints live in a directory only this user can enter (``private_ipc_dir``).
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

from rollwire.transports.security import CurveClient, CurveServer, stop_authenticator

T = TypeVar("T")

DEFAULT_HWM = 100_000
DEFAULT_LINGER_MS = 500
SEND_TIMEOUT_S = 10.0
# Per-frame inbound limits (ZMQ_MAXMSGSIZE). Request sockets carry token lists, not tensors.
REQUEST_MAX_FRAME = 64 << 20  # rollout, session, control sockets: a 16M-token prompt still fits
BUCKET_MAX_FRAME = 4 << 30  # the weight-data path: one bucket (slime and verl use 512 MiB)
ZMTP_HEARTBEAT_MS = 1000

_context: zmq.asyncio.Context | None = None


def context() -> zmq.asyncio.Context:
    """The process-wide asyncio context (inproc endpoints only connect within one context)."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


def end_context(linger_ms: int = DEFAULT_LINGER_MS) -> None:
    """Flush what the process's sockets still hold (each for at most ``linger_ms``), then end the
    context. A process that exits right after closing its sockets otherwise drops the frames still
    queued in ZeroMQ's I/O thread: the last error reply before a server gives up among them."""
    global _context
    if _context is not None and not _context.closed:
        stop_authenticator(_context)  # its ZAP socket would hold destroy() forever
        _context.destroy(linger=linger_ms)
    _context = None


def private_ipc_dir() -> str:
    """``$TMPDIR/rollwire-UID``, mode 0700 and owned by this user: other local users cannot reach
    the ipc sockets in it. Refuses a directory someone else owns or others may enter."""
    d = os.path.join(tempfile.gettempdir(), f"rollwire-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(d, 0o700)
    st = os.lstat(d)
    if not os.path.isdir(d) or os.path.islink(d) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{d} must be a directory owned by uid {os.getuid()} with mode 0700")
    return d


def check_bind(endpoint: str) -> None:
    """What a bind must pass before ZeroMQ sees it: a tcp port in range (libzmq wraps a port above
    65535 into another one, silently), and ``check_ipc_bind``."""
    if endpoint.startswith("tcp://"):
        port = endpoint.rpartition(":")[2]
        if port.lstrip("-").isdigit() and not 0 <= int(port) <= 65535:  # libzmq wraps -5 to 65531 too
            raise ValueError(f"{endpoint}: port {port} is not in 0..65535")
    check_ipc_bind(endpoint)


def check_ipc_bind(endpoint: str) -> None:
    """Refuse to bind an ipc socket in a directory that other users may enter, or on a path where
    a socket still listens: ZeroMQ would unlink that file and take its address over silently (a
    second trainer on the first one's endpoint; over tcp the same bind fails EADDRINUSE)."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):  # @: abstract, no file
        return
    path = os.path.abspath(endpoint.removeprefix("ipc://"))
    parent = os.path.dirname(path)
    st = os.stat(parent)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"ipc endpoint {endpoint}: its directory {parent} may be entered by other users "
                              f"(mode {st.st_mode & 0o777:o}); use a directory of mode 0700 (e.g. {private_ipc_dir()})")
    if os.path.exists(path):
        with pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except OSError:
                return  # a stale file (its owner is gone): ZeroMQ replaces it
        raise zmq.ZMQError(errno.EADDRINUSE, f"{endpoint}: a socket already listens there")


def ipc_endpoint(name: str = "") -> str:
    """A fresh ipc:// endpoint in ``private_ipc_dir()`` (paths must stay short: 107 bytes max)."""
    return f"ipc://{private_ipc_dir()}/{name}{os.getpid()}-{uuid.uuid4().hex[:8]}"


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


def zmtp_heartbeats(sock: zmq.Socket, interval_ms: int = ZMTP_HEARTBEAT_MS) -> None:
    """ZeroMQ's own PING/PONG (answered by libzmq's I/O thread, whatever the application does):
    a connection whose peer vanished without a FIN (host down, cable cut) is closed after three
    missed beats, so a ROUTER's reply to it fails (EHOSTUNREACH) and a DEALER reconnects. Not on
    links that carry weight buckets: encrypting a 512 MiB CURVE frame keeps the I/O thread busy
    past the timeout (a push stalled so); the trainer link has its own beacons."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * interval_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * interval_ms)


def _configure(sock: zmq.asyncio.Socket, hwm: int, max_frame_bytes: int | None = None) -> None:
    sock.setsockopt(zmq.LINGER, DEFAULT_LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if max_frame_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)


_bound: weakref.WeakKeyDictionary[zmq.asyncio.Socket, list[str]] = weakref.WeakKeyDictionary()


def router(binds: Sequence[str], *, hwm: int = DEFAULT_HWM, ctx: zmq.asyncio.Context | None = None,
           curve: CurveServer | None = None, max_frame_bytes: int | None = REQUEST_MAX_FRAME,
           zmtp_heartbeat: bool = True) -> zmq.asyncio.Socket:
    """A ROUTER bound to every endpoint in ``binds`` (one identity space: give public endpoints
    their own socket, apart from internal inproc links)."""
    sock = (ctx or context()).socket(zmq.ROUTER)
    _configure(sock, hwm, max_frame_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    bound: list[str] = []
    try:
        if curve is not None:
            curve.apply(sock)
        if zmtp_heartbeat and any(not ep.startswith("inproc://") for ep in binds):
            zmtp_heartbeats(sock)
            if curve is None:
                # a client that reconnects on a fresh socket keeps its (random, 128-bit) identity:
                # the new connection takes it over instead of being refused while the old one
                # lingers. Not under CURVE: there a client is its key, its fresh socket takes a fresh
                # routing id, and a taken one is refused, so no key can take over another's replies
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        for ep in binds:
            check_bind(ep)
            sock.bind(ep)
            bound.append(bytes(sock.getsockopt(zmq.LAST_ENDPOINT)).decode())
    except (zmq.ZMQError, OSError, ValueError):  # refused by check_bind: the socket goes too
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
           ctx: zmq.asyncio.Context | None = None, curve: CurveClient | None = None,
           max_frame_bytes: int | None = REQUEST_MAX_FRAME, zmtp_heartbeat: bool = True) -> zmq.asyncio.Socket:
    sock = (ctx or context()).socket(zmq.DEALER)
    _configure(sock, hwm, max_frame_bytes)
    sock.setsockopt(zmq.IDENTITY, identity or uuid.uuid4().bytes)
    if curve is not None:
        curve.apply(sock)
    if zmtp_heartbeat and not connect.startswith("inproc://"):
        zmtp_heartbeats(sock)
    sock.connect(connect)
    return sock


def socket(kind: int, *, hwm: int = DEFAULT_HWM, ctx: zmq.asyncio.Context | None = None,
           max_frame_bytes: int | None = None) -> zmq.asyncio.Socket:
    """Any other socket type (PUB, SUB, ...); the caller applies CURVE before bind/connect."""
    sock = (ctx or context()).socket(kind)
    _configure(sock, hwm, max_frame_bytes)
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
            async with asyncio.timeout(timeout):
                await fut
        else:
            fut.result()
        return True
    except zmq.ZMQError as e:
        if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            return False
        raise
    except TimeoutError:
        return False
