"""The trainer's bookkeeping: registered receivers, the transport a push uses, and the state of one
push (buckets, who has answered, how bytes are served)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from rollwire.messages.weights import BucketMeta, VersionOutcome
from rollwire.weightsync.broadcast import GlooSender, NcclSender
from rollwire.weightsync.cuda_ipc import CudaIpcSender
from rollwire.weightsync.inline import BucketServer, InlineSender
from rollwire.weightsync.layout import BucketPlan, Sender
from rollwire.weightsync.shm import ShmSender

BROADCAST_FAILURE_GRACE_S = 2.0  # after the trainer's broadcast fails, receivers may still explain why


@dataclass(frozen=True)
class PushReport:
    version: int
    seconds: float  # push_weights() call to the last receiver's "applied"
    bytes: int  # payload bytes of the version (sum of bucket sizes)
    receivers: list[str]  # every receiver that applied it
    transport: str
    prepare_s: float = 0.0  # of ``seconds``: packing, checksums (gloo/nccl: the group's set-up), up to the announcement
    failed: dict[str, str] = field(default_factory=dict)  # receiver -> why (only with require_all=False)
    bytes_sent: int = 0  # bucket bytes this trainer sent over its sockets for the push (inline: per receiver)
    wait_s: float = 0.0  # of ``seconds``: the announcement to the last receiver's outcome


class PushError(Exception):
    """A push (or step) that did not reach every receiver: ``failures`` maps receiver id -> why."""

    def __init__(self, what: str, failures: dict[str, str]) -> None:
        detail = "; ".join(f"{rid}: {why}" for rid, why in sorted(failures.items()))
        super().__init__(f"{what} failed on {len(failures)} receiver(s): {detail}")
        self.failures = failures


class ReceiverFailed(Exception):
    pass


@dataclass
class Registered:
    """A receiver the trainer knows; ``joined`` once it acknowledged a beacon on the PUB."""

    receiver_id: str
    peer: bytes  # its DEALER's identity on our ROUTER
    host_id: str
    transports: list[str]
    live_version: int
    cuda_devices: list[str] = field(default_factory=list)  # GPUs it can open CUDA IPC handles on
    key: str = ""  # CURVE: the z85 public key it registered with (only that key may register this id again)
    joined: bool = False
    last_seen: float = field(default_factory=time.monotonic)


# the trainer half of every transport, by name (the payload's tag): what a push needs of its receivers
SENDER_TYPES: dict[str, type[Sender]] = {"cuda_ipc": CudaIpcSender, "shm": ShmSender, "inline": InlineSender,
                                         "gloo": GlooSender, "nccl": NcclSender}
AUTO_ORDER = ("cuda_ipc", "shm", "inline")  # what ``auto`` tries, fastest first (broadcast only when asked)


def choose_transport(wanted: str, offered: Sequence[str], host_id: str, receivers: Sequence[Registered],
                     cuda_device: str | None = None) -> str:
    """``auto``: the fastest transport that every receiver can use: ``cuda_ipc`` when the tensors are
    all on one GPU (``cuda_device``: its UUID) that every receiver, on this host, can open handles on
    (it offers cuda_ipc only when its engine is on CUDA); else ``shm`` (same host); else ``inline``.
    Broadcast is only used when asked for. An explicit choice must suit every receiver."""

    def usable(t: str, r: Registered) -> bool:
        kind = SENDER_TYPES[t]
        return (t in r.transports and (not kind.same_host or r.host_id == host_id)
                and (not kind.needs_device or (cuda_device is not None and cuda_device in r.cuda_devices)))

    if wanted == "auto":  # the user's word for "pick one", not a transport
        for t in AUTO_ORDER:
            if t in offered and all(usable(t, r) for r in receivers):
                return t
        return "inline"
    if wanted not in offered:
        raise ValueError(f"transport {wanted!r} is not available here; this trainer offers {list(offered)}")
    if SENDER_TYPES[wanted].needs_device and cuda_device is None:
        raise ValueError(f"transport {wanted!r} needs every tensor on one CUDA device")
    unable = [r.receiver_id for r in receivers if not usable(wanted, r)]
    if unable:
        why = "other host, GPU not visible there, or not offered" if SENDER_TYPES[wanted].needs_device else \
            "other host or not offered"
        raise ValueError(f"transport {wanted!r} cannot reach receivers {unable} ({why})")
    return wanted


class Push:
    def __init__(self, version: int, plans: list[BucketPlan], transport: str,
                 outcomes: dict[str, asyncio.Future[VersionOutcome]], pack_buf: torch.Tensor) -> None:
        self.version = version
        self.plans = plans
        self.transport = transport
        self.outcomes = outcomes
        self.total_bytes = sum(p.nbytes for p in plans)
        self.metas: list[BucketMeta] = []
        self.offsets: list[int] = []  # shm, nccl: where each bucket lies in the arena
        self.writing: asyncio.Future[Any] | None = None  # shm: the pack, announced before it ends
        self.served = BucketServer(plans, pack_buf)  # inline: buckets packed on first pull
        self.broadcast: asyncio.Future[None] | None = None
        self.cuda_after: Any = None  # cuda_ipc: event on the caller's stream after its last write
        self.device: torch.device | None = None  # cuda_ipc/nccl: the GPU holding the tensors
        self.nccl_arena: torch.Tensor | None = None  # nccl: the packed CUDA arena, buckets at ``offsets``
        self._credits: dict[bytes, asyncio.Semaphore] = {}
        self.bytes_sent = 0  # bucket bytes sent on the ROUTER (inline pulls)
        self.started = time.monotonic()

    # -- outcomes --------------------------------------------------------------------------------
    def outcome(self, msg: VersionOutcome, trainer_id: str) -> None:
        fut = self.outcomes.get(msg.receiver_id)
        if fut is not None and not fut.done() and msg.version == self.version and msg.trainer_id == trainer_id:
            fut.set_result(msg)

    def fail(self, receiver_id: str, why: str) -> None:
        fut = self.outcomes.get(receiver_id)
        if fut is not None and not fut.done():
            fut.set_exception(ReceiverFailed(why))

    def fail_all(self, why: str) -> None:
        for rid in self.outcomes:
            self.fail(rid, why)

    def abandon(self) -> None:
        """The push ended before its outcomes were collected: nothing will read them."""
        for fut in self.outcomes.values():
            if fut.done():
                if not fut.cancelled():
                    fut.exception()  # read: asyncio would report it as never retrieved
            else:
                fut.cancel()

    def broadcast_failed(self, why: str) -> None:
        asyncio.get_running_loop().call_later(BROADCAST_FAILURE_GRACE_S, self.fail_all, why)

    async def written(self) -> None:
        """The trainer's own writing of the version has ended (raises its error, if it failed)."""
        if self.writing is not None:
            await self.writing

    async def wait(self, timeout: float) -> dict[str, str]:
        try:
            return await collect(self.outcomes, timeout)
        finally:
            if self.broadcast is not None and not self.broadcast.done():
                self.broadcast.cancel()  # the worker thread ends with its group's timeout

    # -- serving bytes ---------------------------------------------------------------------------
    def credits(self, peer: bytes, window: int) -> asyncio.Semaphore:
        """At most ``window`` buckets in flight to one receiver, whatever it asks for."""
        sem = self._credits.get(peer)
        if sem is None:
            sem = self._credits[peer] = asyncio.Semaphore(window)
        return sem

    async def bucket_bytes(self, index: int, packer: Executor, *, ahead: int) -> tuple[memoryview, int]:
        """The bytes of bucket ``index``, contiguous, without a copy once packed, and their
        checksum (inline: computed as the bucket is packed, so no pass over the version precedes the
        announcement; it travels in the BucketData reply)."""
        return await self.served.bucket(index, packer, ahead=ahead)


async def collect(futs: dict[str, asyncio.Future[Any]], timeout: float) -> dict[str, str]:
    """receiver -> why it failed, for every future that did not end in an ok result in time."""
    if futs:
        await asyncio.wait(futs.values(), timeout=timeout)
    failures = {}
    for rid, fut in futs.items():
        if not fut.done():
            failures[rid] = f"timed out after {timeout}s without an answer"
            fut.cancel()
        elif fut.exception() is not None:
            failures[rid] = str(fut.exception())
        elif not fut.result().ok:
            failures[rid] = f"{fut.result().error_code}: {fut.result().message}"
    return failures
