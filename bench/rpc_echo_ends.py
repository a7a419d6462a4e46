"""The two ends of bench/rpc_echo.py: every server and client kind it pits against each other."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import zmq

from rollwire.messages import PROTOCOL_VERSION, Codec, HealthReply, HealthRequest, RolloutReply, RolloutRequest
from rollwire.transports.sockets import free_tcp_endpoint

HEALTH_REPLY = HealthReply(weight_version=0, governor_state="SERVING", protocol=PROTOCOL_VERSION)
REPLY_BODY = msgspec.msgpack.encode(HEALTH_REPLY)
REQUEST_FRAMES = Codec(RolloutRequest).encode(1, HealthRequest())  # what the raw clients send, verbatim


def _has_reply_nowait() -> bool:
    from rollwire.runtime import Actor

    return hasattr(Actor, "reply_nowait")


def _endpoint(transport: str) -> str:
    if transport == "tcp":
        return free_tcp_endpoint()
    from rollwire.transports.sockets import ipc_endpoint

    return ipc_endpoint("bench")  # in the private (0700) directory rollwire binds ipc sockets in


def _curve_server() -> Any:
    """Options ride on the kind: ``+curve`` (keys from ROLLWIRE_BENCH_KEYS, made by rpc_echo.py)."""
    from rollwire.transports.security import ROLLOUT_DOMAIN, CurveServer, KeyPair

    d = Path(os.environ["ROLLWIRE_BENCH_KEYS"])
    return CurveServer(KeyPair.load(d / "server.key_secret"), ROLLOUT_DOMAIN,
                       frozenset({KeyPair.load(d / "client.key").public}))


def _curve_client() -> Any:
    from rollwire.transports.security import CurveClient, KeyPair

    d = Path(os.environ["ROLLWIRE_BENCH_KEYS"])
    return CurveClient(KeyPair.load(d / "client.key_secret"), KeyPair.load(d / "server.key").public)


def _ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


def _run_on_uvloop(coro: Any) -> Any:
    from rollwire.server import run

    return run(coro)  # uvloop where installed (the GPU image has none: asyncio there, for every row)


# -- servers ----------------------------------------------------------------------------------
def serve_raw_sync(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    _ready()
    while True:
        frames = sock.recv_multipart()
        sock.send_multipart([frames[0], frames[1], REPLY_BODY])


async def serve_raw_async(endpoint: str, curve: bool = False) -> None:
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    if curve:
        _curve_server().apply(sock)
    sock.bind(endpoint)
    _ready()
    while True:
        frames = await sock.recv_multipart()
        await sock.send_multipart([frames[0], frames[1], REPLY_BODY])


async def serve_rollwire(endpoint: str, kind: str, curve: bool = False) -> None:
    from rollwire.runtime import Actor, ActorSystem, Origin, Port, handles
    from rollwire.runtime.logging import configure_logging

    configure_logging(level="warning")

    has_nowait = hasattr(Actor, "reply_nowait")

    class SpawnReply(Actor):
        """A sync handler cannot await, so without reply_nowait it spawns the reply (a task each)."""

        ports = {"rollout": Port(RolloutRequest)}

        @handles(HealthRequest)
        def on_health(self, origin: Origin, msg: HealthRequest, payload: Sequence[Any]) -> None:
            self.spawn(self.reply(origin, HEALTH_REPLY))

    class AsyncHandler(Actor):
        """As GenerationActor.on_health is written: the handler is a coroutine, so a task per message."""

        ports = {"rollout": Port(RolloutRequest)}

        @handles(HealthRequest)
        async def on_health(self, origin: Origin, msg: HealthRequest, payload: Sequence[Any]) -> None:
            await self.reply(origin, HEALTH_REPLY)

    class ReplyNowait(Actor):
        """Sends inline; a task only if ZeroMQ cannot take the frames at once (at the HWM)."""

        ports = {"rollout": Port(RolloutRequest)}

        @handles(HealthRequest)
        def on_health(self, origin: Origin, msg: HealthRequest, payload: Sequence[Any]) -> None:
            if has_nowait:
                self.reply_nowait(origin, HEALTH_REPLY)  # type: ignore[attr-defined]
                return
            # prototype of Actor.reply_nowait on two internals (the reply codec, the port's socket)
            frames = self._reply_codec.encode(origin.rid, HEALTH_REPLY)
            fut = self._socks[origin.port].send_multipart([origin.peer, *frames])
            if not fut.done():  # at the HWM: let the send finish under Actor.reply's bounded wait
                self.spawn(asyncio.wait_for(fut, 10.0))
            elif fut.exception() is not None:
                self.counters.inc("replies_undeliverable")

    kinds = {"rw_sync": ReplyNowait if has_nowait else SpawnReply, "rw_spawn": SpawnReply,
             "rw_async": AsyncHandler, "rw_nowait": ReplyNowait}
    actor_cls = kinds[kind]
    system = ActorSystem()
    await system.spawn(lambda: actor_cls("echo"), public={"rollout": [endpoint]},
                       curve=_curve_server() if curve else None)
    _ready()
    await asyncio.Event().wait()


# -- clients ----------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _server_cpu_s(pid: int) -> float:
    """CPU seconds (all threads, user + system) of the server process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


class Phases:
    """Wall time and the CPU time both processes spent in each phase: on a busy machine CPU per
    message moves far less than latency does, so it is the steadier measure of code cost."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.out: dict[str, float] = {}

    def start(self) -> None:
        self._t = (time.perf_counter(), time.process_time(), _server_cpu_s(self.server_pid))

    def stop(self, name: str, n: int) -> float:
        wall, cpu, srv = time.perf_counter(), time.process_time(), _server_cpu_s(self.server_pid)
        self.out[f"{name}_client_cpu_us"] = (cpu - self._t[1]) / n * 1e6
        self.out[f"{name}_server_cpu_us"] = (srv - self._t[2]) / n * 1e6
        return wall - self._t[0]


def _summary(lat_ns: list[int], n_msgs: int, seconds: float, phases: Phases) -> dict[str, float]:
    lat = sorted(lat_ns)
    return {"p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e3,
            "mean_us": statistics.fmean(lat) / 1e3, "msgs_per_s": n_msgs / seconds, **phases.out}


def client_raw_sync(endpoint: str, a: argparse.Namespace) -> dict[str, float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    for _ in range(a.warmup):
        sock.send_multipart(REQUEST_FRAMES)
        sock.recv_multipart()
    ph = Phases(a.server_pid)
    lat = []
    clock = time.perf_counter_ns
    ph.start()
    for _ in range(a.calls):
        t0 = clock()
        sock.send_multipart(REQUEST_FRAMES)
        sock.recv_multipart()
        lat.append(clock() - t0)
    ph.stop("seq", a.calls)
    ph.start()
    sent = received = 0
    while sent < min(a.window, a.messages):
        sock.send_multipart(REQUEST_FRAMES)
        sent += 1
    while received < a.messages:
        sock.recv_multipart()
        received += 1
        if sent < a.messages:
            sock.send_multipart(REQUEST_FRAMES)
            sent += 1
    return _summary(lat, a.messages, ph.stop("pipe", a.messages), ph)


async def client_raw_async(endpoint: str, a: argparse.Namespace, curve: bool = False) -> dict[str, float]:
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    if curve:
        _curve_client().apply(sock)
    sock.connect(endpoint)
    for _ in range(a.warmup):
        await sock.send_multipart(REQUEST_FRAMES)
        await sock.recv_multipart()
    ph = Phases(a.server_pid)
    lat = []
    clock = time.perf_counter_ns
    ph.start()
    for _ in range(a.calls):
        t0 = clock()
        await sock.send_multipart(REQUEST_FRAMES)
        await sock.recv_multipart()
        lat.append(clock() - t0)
    ph.stop("seq", a.calls)
    ph.start()
    sent = received = 0
    while sent < min(a.window, a.messages):
        await sock.send_multipart(REQUEST_FRAMES)
        sent += 1
    while received < a.messages:
        await sock.recv_multipart()
        received += 1
        if sent < a.messages:
            await sock.send_multipart(REQUEST_FRAMES)
            sent += 1
    return _summary(lat, a.messages, ph.stop("pipe", a.messages), ph)


async def client_rollwire(endpoint: str, a: argparse.Namespace, curve: bool = False,
                          heartbeat: bool = False) -> dict[str, float]:
    from rollwire.transports.rpc import DEFAULT_HEARTBEAT_S, RpcClient

    rpc: RpcClient[Any] = RpcClient(endpoint, RolloutReply, curve=_curve_client() if curve else None,
                                    heartbeat_s=DEFAULT_HEARTBEAT_S if heartbeat else None)
    req = HealthRequest()
    try:
        for _ in range(a.warmup):
            reply = await rpc.call(req)
        assert reply.msg == HEALTH_REPLY, reply.msg
        ph = Phases(a.server_pid)
        lat = []
        clock = time.perf_counter_ns
        ph.start()
        for _ in range(a.calls):
            t0 = clock()
            await rpc.call(req)
            lat.append(clock() - t0)
        ph.stop("seq", a.calls)
        left = a.messages

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await rpc.call(req)

        ph.start()
        await asyncio.gather(*(caller() for _ in range(min(a.window, a.messages))))
        seconds = ph.stop("pipe", a.messages)
        assert rpc.dropped_replies == 0 and rpc.bad_replies == 0
        return _summary(lat, a.messages, seconds, ph)
    finally:
        await rpc.close()


def run_server(kind: str, endpoint: str) -> None:
    kind, *opts = kind.split("+")
    if kind == "raw_sync":
        serve_raw_sync(endpoint)
    elif kind == "raw_async":
        _run_on_uvloop(serve_raw_async(endpoint, curve="curve" in opts))
    else:
        _run_on_uvloop(serve_rollwire(endpoint, kind, curve="curve" in opts))


def run_client(kind: str, endpoint: str, a: argparse.Namespace) -> dict[str, float]:
    kind, *opts = kind.split("+")
    if kind == "raw_sync":
        return client_raw_sync(endpoint, a)
    if kind == "raw_async":
        return _run_on_uvloop(client_raw_async(endpoint, a, curve="curve" in opts))  # type: ignore[no-any-return]
    return _run_on_uvloop(client_rollwire(endpoint, a, curve="curve" in opts,  # type: ignore[no-any-return]
                                          heartbeat="hb" in opts))
