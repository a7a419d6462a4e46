"""Test harness for the weight protocol: a stand-in for the governor's "weights" port, and a
scripted trainer that speaks the wire protocol by hand so it can misbehave on purpose (corrupt,
duplicate, reorder or withhold buckets). Both use real ZeroMQ sockets; neither is the proof of a
feature on its own: the end-to-end tests run the real TrainerPublisher and RolloutServer.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rollwire.messages import Ack, Codec, ErrorCode, GovernorRequest, LoadVersion, StepMessage, VersionApplied
from rollwire.messages.weights import (
    Beacon,
    BeaconSeen,
    BucketData,
    InlinePayload,
    PullBucket,
    Register,
    TrainerRequest,
    VersionOutcome,
    WeightsReady,
    Welcome,
)
from rollwire.runtime import Actor, Origin, Port, RollwireError, handles
from rollwire.transports import sockets
from rollwire.transports.pubsub import Publisher
from rollwire.weightsync.checksum import NAME as CHECKSUM_NAME
from rollwire.weightsync.layout import BucketPlan, checksum_sources, pack_bucket, plan_buckets
from rollwire.weightsync.shm import ShmArena
from rollwire.weightsync.staged import STAGED


class ApplySink(Actor):
    """Loads nothing: keeps a copy of every applied version, refuses names outside ``known``."""

    ports = {"weights": Port(GovernorRequest, zero_copy=True)}

    def __init__(self, known: dict[str, torch.Tensor] | None = None, name: str = "sink", delay_s: float = 0.0) -> None:
        super().__init__(name)
        self.known = known
        self.delay_s = delay_s  # a slow load
        self.gate: asyncio.Event | None = None  # set: every load waits until it opens
        self.loading = asyncio.Event()
        self.applied: dict[int, dict[str, torch.Tensor]] = {}
        self.steps: list[StepMessage] = []

    @handles(LoadVersion)
    async def on_apply(self, origin: Origin, msg: LoadVersion, payload: Sequence[Any]) -> None:
        self.loading.set()
        await asyncio.sleep(self.delay_s)
        if self.gate is not None:
            await self.gate.wait()
        named = STAGED.get(msg.staged).tensors
        for name, _ in named:
            if self.known is not None and name not in self.known:
                raise RollwireError(ErrorCode.UNKNOWN_TENSOR, f"no parameter named {name!r}")
        self.applied[msg.version] = {name: t.clone() for name, t in named}
        await self.reply(origin, VersionApplied(version=msg.version, load_s=0.0, pause_s=0.0))

    @handles(StepMessage)
    async def on_step(self, origin: Origin, msg: StepMessage, payload: Sequence[Any]) -> None:
        self.steps.append(msg)
        await self.reply(origin, Ack())


_HEADER0 = Codec(Ack).encode(0, Ack())[0]
BucketServe = Callable[[int, bytes], list[bytes] | None]  # index, bytes -> frames to send (None: withhold)


class ScriptedTrainer:
    """The trainer side of the protocol, by hand. ``serve`` decides what each pull gets;
    ``reorder`` holds pulls until ``reorder`` of them are queued, then answers them newest first."""

    def __init__(self, endpoint: str, pub_endpoint: str, curve: Any = None) -> None:
        self.endpoint, self.pub_endpoint = endpoint, pub_endpoint
        self.curve = curve  # a CurveServer: ROUTER and PUB authenticate their peers
        # hostile scripts: raw frame lists sent instead of the Welcome to the next Registers, and
        # before the answer to the next pulls (a first frame equal to header(0) gets the request's rid)
        self.register_script: list[list[bytes]] = []
        self.pull_script: list[list[bytes]] = []
        self.peers: dict[str, bytes] = {}  # receiver id -> the connection that last registered it
        self.beacon_acks = 0  # BeaconSeen received for this trainer
        self.beacon_acked = asyncio.Event()
        self.trainer_id = uuid.uuid4().hex
        self.codec: Codec[Any] = Codec(TrainerRequest)
        self.joined: set[str] = set()
        self.outcomes: dict[int, asyncio.Future[VersionOutcome]] = {}
        self.buckets: dict[int, bytes] = {}
        self.serve: BucketServe = lambda i, b: [b]
        self.reorder = 0
        self.extra_replies: list[tuple[int, int]] = []  # (version, index) sent unasked with each reply
        self.checksum_in_reply: Callable[[int, bytes], int] | None = None  # the checksum sent with bucket i
        self.welcome_checksum = CHECKSUM_NAME  # "": answer as a rollwire from before xxh3 checksums
        self.registers: list[Register] = []
        self._held: list[tuple[bytes, int, PullBucket]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.arena = ShmArena()

    async def __aenter__(self) -> ScriptedTrainer:
        curve = {"curve": self.curve} if self.curve is not None else {}  # (no keyword: runs on older code too)
        self.router = await sockets.bind_when_free(lambda: sockets.router([self.endpoint], **curve))
        self.pub = await sockets.bind_when_free(lambda: Publisher(self.pub_endpoint, **curve))
        self._tasks = [asyncio.ensure_future(self._recv()), asyncio.ensure_future(self._beacons())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        sockets.close_router(self.router, linger_ms=0)
        self.pub.close()
        self.arena.close()

    async def wait_joined(self, n: int = 1, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.joined) < n:
                await asyncio.sleep(0.02)

    def plan(self, tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[BucketPlan]:
        plans = plan_buckets(list(tensors.items()), bucket_bytes)
        for p in plans:
            buf = torch.empty(p.nbytes, dtype=torch.uint8)
            pack_bucket(p, buf)
            self.buckets[p.index] = buf.numpy().tobytes()
        return plans

    async def announce(self, version: int, plans: list[BucketPlan], *, payload: Any = None,
                       checksums: list[int] | None = None) -> asyncio.Future[VersionOutcome]:
        sums = checksums or [checksum_sources(p) for p in plans]
        ready = WeightsReady(trainer_id=self.trainer_id, version=version, step=version, n_buckets=len(plans),
                             total_bytes=sum(p.nbytes for p in plans),
                             buckets=[p.meta(c) for p, c in zip(plans, sums, strict=True)],
                             payload=payload if payload is not None else InlinePayload())
        fut: asyncio.Future[VersionOutcome] = asyncio.get_running_loop().create_future()
        self.outcomes[version] = fut
        await self.pub.publish(ready)
        return fut

    async def send_raw(self, peer: bytes, rid: int, frames: list[bytes]) -> None:
        if frames and frames[0] == _HEADER0:
            frames = [self.codec.encode(rid, Ack())[0], *frames[1:]]
        await sockets.send(self.router, [peer, *frames])

    async def publish_raw(self, frames: list[bytes]) -> None:
        await self.pub._sock.send_multipart(frames)

    async def wait_beacon_acks(self, more: int = 1, timeout: float = 30.0) -> None:
        """Until ``more`` further beacons were acknowledged: the receiver's SUB and DEALER both work."""
        target = self.beacon_acks + more
        async with asyncio.timeout(timeout):
            while self.beacon_acks < target:
                self.beacon_acked.clear()
                await self.beacon_acked.wait()

    async def _send(self, peer: bytes, rid: int, msg: Any, payload: Sequence[bytes] = ()) -> None:
        await sockets.send(self.router, [peer, *self.codec.encode(rid, msg, payload)])

    async def _answer(self, peer: bytes, rid: int, pull: PullBucket) -> None:
        if self.pull_script:
            await self.send_raw(peer, rid, self.pull_script.pop(0))
        if pull.index not in self.buckets:
            return
        frames = self.serve(pull.index, self.buckets[pull.index])
        if frames is None:
            return
        digest = -1 if self.checksum_in_reply is None else self.checksum_in_reply(pull.index, self.buckets[pull.index])
        await self._send(peer, rid, BucketData(version=pull.version, index=pull.index, checksum=digest), frames)
        for version, index in self.extra_replies:
            await self._send(peer, rid, BucketData(version=version, index=index), [self.buckets.get(index, b"")])

    async def _flush(self) -> None:
        held, self._held = self._held, []
        for p, r, m in reversed(held):
            await self._answer(p, r, m)

    async def _recv(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            peer = frames[0]
            rid, msg, _ = self.codec.decode(frames[1:])
            match msg:
                case Register() if self.register_script:
                    self.registers.append(msg)
                    await self.send_raw(peer, rid, self.register_script.pop(0))
                case Register():
                    self.registers.append(msg)
                    self.peers[msg.receiver_id] = peer
                    await self._send(peer, rid, Welcome(trainer_id=self.trainer_id, pub_endpoint=self.pub_endpoint,
                                                        checksum=self.welcome_checksum))
                case BeaconSeen():
                    if msg.trainer_id == self.trainer_id:
                        self.joined.add(msg.receiver_id)
                        self.beacon_acks += 1
                        self.beacon_acked.set()
                case PullBucket():
                    if not self.reorder:
                        await self._answer(peer, rid, msg)
                        continue
                    self._held.append((peer, rid, msg))
                    if len(self._held) >= self.reorder:
                        await self._flush()
                    else:  # the last few pulls of a version: answer them soon anyway
                        asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self._flush()))
                case VersionOutcome() if msg.trainer_id in ("", self.trainer_id):  # as TrainerPublisher does
                    fut = self.outcomes.get(msg.version)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)

    async def _beacons(self) -> None:
        seq = 0
        while True:
            seq += 1
            with contextlib.suppress(Exception):
                await self.pub.publish(Beacon(trainer_id=self.trainer_id, seq=seq))
            await asyncio.sleep(0.05)

