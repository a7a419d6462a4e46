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

from rollwire.messages.weights import INBAND, BucketMeta, VersionOutcome
from rollwire.transports.checksum import Hasher, checksum_of
from rollwire.transports.weights import (
    ALIGN,
    BucketPlan,
    byte_view,
    pack_with_checksum,
    tensor_bytes,
)

BROADCAST_FAILURE_GRACE_S = 2.0  # after the trainer's broadcast fails, receivers may still explain why


@dataclass(frozen=True)
class PushReport:
    version: int
    seconds: float  # push_weights() call to the last receiver's "applied"
    bytes: int  # payload bytes of the version (sum of bucket sizes)
    receivers: list[str]  # every receiver that applied it
    transport: str
    prepare_s: float = 0.0  # of ``seconds``: packing, checksums (gloo/nccl: the group's set-up), up to the announcement


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


def choose_transport(wanted: str, offered: Sequence[str], host_id: str, receivers: Sequence[Registered],
                     cuda_device: str | None = None) -> str:
    """``auto``: the fastest transport that every receiver can use: ``cuda_ipc`` when the tensors are
    all on one GPU (``cuda_device``: its UUID) that every receiver, on this host, can open handles on
    (it offers cuda_ipc only when its engine is on CUDA); else ``shm`` (same host); else ``inline``.
    Broadcast is only used when asked for. An explicit choice must suit every receiver."""

    def usable(t: str, r: Registered) -> bool:
        if t not in r.transports:
            return False
        if t == "cuda_ipc":
            return r.host_id == host_id and cuda_device is not None and cuda_device in r.cuda_devices
        return t != "shm" or r.host_id == host_id

    if wanted == "auto":
        for t in ("cuda_ipc", "shm", "inline"):
            if t in offered and all(usable(t, r) for r in receivers):
                return t
        return "inline"
    if wanted not in offered:
        raise ValueError(f"transport {wanted!r} is not available here; this trainer offers {list(offered)}")
    if wanted == "cuda_ipc" and cuda_device is None:
        raise ValueError("transport 'cuda_ipc' needs every tensor on one CUDA device")
    unable = [r.receiver_id for r in receivers if not usable(wanted, r)]
    if unable:
        why = "other host, GPU not visible there, or not offered" if wanted == "cuda_ipc" else \
            "other host or not offered"
        raise ValueError(f"transport {wanted!r} cannot reach receivers {unable} ({why})")
    return wanted


def shm_offsets(plans: Sequence[BucketPlan]) -> list[int]:
    """Where each bucket starts in a buffer holding all of them back to back (aligned)."""
    offsets, pos = [], 0
    for p in plans:
        offsets.append(pos)
        pos = (pos + p.nbytes + ALIGN - 1) // ALIGN * ALIGN
    return offsets


class Push:
    def __init__(self, version: int, plans: list[BucketPlan], transport: str,
                 outcomes: dict[str, asyncio.Future[VersionOutcome]], pack_buf: torch.Tensor) -> None:
        self.version = version
        self.plans = plans
        self.transport = transport
        self.outcomes = outcomes
        self.total_bytes = sum(p.nbytes for p in plans)
        self.metas: list[BucketMeta] = []
        self.arena: torch.Tensor | None = None  # shm: buckets already packed here, at ``offsets``
        self.offsets: list[int] = []
        self.pack_buf = pack_buf  # inline: buckets packed here on first pull (handed back for reuse)
        self.broadcast: asyncio.Future[None] | None = None
        self.cuda_after: Any = None  # cuda_ipc: event on the caller's stream after its last write
        self.device: torch.device | None = None  # cuda_ipc/nccl: the GPU holding the tensors
        self.nccl_arena: torch.Tensor | None = None  # nccl: the packed CUDA arena, buckets at ``offsets``
        self._packed: dict[int, asyncio.Future[tuple[memoryview, int]]] = {}
        self._credits: dict[bytes, asyncio.Semaphore] = {}
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

    def broadcast_failed(self, why: str) -> None:
        asyncio.get_running_loop().call_later(BROADCAST_FAILURE_GRACE_S, self.fail_all, why)

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
        plan = self.plans[index]
        if self.arena is not None:
            off = self.offsets[index]
            return byte_view(self.arena[off:off + plan.nbytes]), self.metas[index].checksum
        self.prefetch(packer, index, ahead + 1)  # pack ahead of the pulls
        return await self._packed[index]

    def prefetch(self, packer: Executor, first: int, n: int) -> None:
        for i in range(first, min(len(self.plans), first + n)):
            self._start_packing(i, packer)

    def _start_packing(self, index: int, packer: Executor) -> None:
        if index in self._packed:
            return
        plan = self.plans[index]
        if _is_one_tensor(plan):  # a bucket of one tensor is that tensor: no packing, only the checksum
            view = tensor_bytes(plan.sources[0])
            self._packed[index] = asyncio.wrap_future(packer.submit(lambda: (view, checksum_of([view]))))
            return
        if not self.offsets:
            self.offsets = shm_offsets(self.plans)
            need = self.offsets[-1] + self.plans[-1].nbytes
            if self.pack_buf.numel() < need:
                self.pack_buf = torch.empty(need, dtype=torch.uint8).fill_(0)  # touched once, warm after
        off, buf = self.offsets[index], self.pack_buf

        def pack() -> tuple[memoryview, int]:
            dst = buf[off:off + plan.nbytes]  # buckets are packed in parallel already: one thread each
            return byte_view(dst), pack_with_checksum([plan], [dst], packer, threads=1)[0]

        self._packed[index] = asyncio.wrap_future(packer.submit(pack))


async def prepare_payload(push: Push, shm_arena: Any, cuda_arena: Any,
                          workers: Executor) -> tuple[list[int], dict[str, Any]]:
    """Each bucket's checksum, and the transport's WeightsReady fields, before the announcement (on
    worker threads, off the event loop). shm: packed into the reused arena and checksummed piece by
    piece; cuda_ipc: see ``prepare_cuda_ipc``; inline: INBAND (each checksum is computed as its bucket
    is packed and sent with it); broadcast: INBAND too (``broadcast_push`` sends them after the
    data)."""
    loop = asyncio.get_running_loop()
    if push.transport in ("cuda_ipc", "nccl"):  # nccl: packed and checksummed the same way, then broadcast
        return await prepare_cuda_ipc(push, cuda_arena, workers)
    if push.transport == "inline":
        return [INBAND] * len(push.plans), {}
    if push.transport == "shm":
        offsets = shm_offsets(push.plans)
        shm_arena.reserve(offsets[-1] + push.plans[-1].nbytes if push.plans else 1)
        arena = shm_arena.tensor
        push.arena, push.offsets = arena, offsets
        views = [arena[off:off + p.nbytes] for p, off in zip(push.plans, offsets, strict=True)]
        # copied and checksummed piece by piece, on two threads
        sums = await loop.run_in_executor(workers, pack_with_checksum, push.plans, views, workers)
        return sums, {"shm_name": shm_arena.name, "shm_offsets": offsets}
    return [INBAND] * len(push.plans), {}  # gloo/nccl


async def prepare_cuda_ipc(push: Push, arena: Any, workers: Executor) -> tuple[list[int], dict[str, Any]]:
    """cuda_ipc: pack every bucket into the reused CUDA arena and checksum it on the GPU (on a worker
    thread: the launches and the final wait stay off the event loop)."""
    from rollwire.transports.cuda_ipc import arena_offsets, padded

    assert push.device is not None
    offsets = arena_offsets([p.nbytes for p in push.plans])
    arena.reserve(offsets[-1] + padded(push.plans[-1].nbytes) if push.plans else 1, push.device)
    sums = await asyncio.get_running_loop().run_in_executor(workers, arena.pack, push.plans, offsets, push.cuda_after)
    return sums, {"cuda_ipc": arena.handle, "shm_offsets": offsets}


async def broadcast_push(group: Any, push: Push, workers: Executor) -> None:
    """gloo/nccl: every tensor of the version, in order, from rank 0 (on a worker thread). Announced
    INBAND, each tensor is hashed on ``workers`` while the next ones go out, and the buckets'
    checksums follow the data as one more broadcast (int64, one per bucket)."""
    if push.transport == "nccl":
        await asyncio.get_running_loop().run_in_executor(None, _broadcast_arena, group, push)
        return
    inband = any(m.checksum == INBAND for m in push.metas)

    def run() -> None:
        group.connect()
        hashers = [Hasher(workers) for _ in push.plans]
        for plan, hasher in zip(push.plans, hashers, strict=True):
            pos = 0
            for meta, t in zip(plan.tensors, plan.sources, strict=True):
                t = t.contiguous()
                group.broadcast(t)
                if inband:  # the bucket's bytes in order: the zero gap, then the tensor
                    if meta.offset > pos:
                        hasher.update(bytes(meta.offset - pos))
                    hasher.update(tensor_bytes(t))
                    pos = meta.offset + t.numel() * t.element_size()
        if inband:
            sums = [h.result() for h in hashers]
            group.broadcast(torch.tensor(sums, dtype=torch.int64, device=group.device))

    await asyncio.get_running_loop().run_in_executor(None, run)


def _broadcast_arena(group: Any, push: Push) -> None:
    """nccl: each packed bucket of the CUDA arena (checksums announced up front), one collective per
    bucket. Written for issue 8; never run across two GPUs."""
    from rollwire.transports.cuda_ipc import padded

    arena = push.nccl_arena
    assert arena is not None
    with torch.cuda.device(arena.device):
        group.connect()
        for plan, off in zip(push.plans, push.offsets, strict=True):
            group.broadcast(arena[off:off + padded(plan.nbytes)])
        torch.cuda.synchronize(arena.device)


def _is_one_tensor(plan: BucketPlan) -> bool:
    return len(plan.sources) == 1 and plan.sources[0].is_contiguous()


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
