"""Weights by torch.distributed broadcast: the path of SGLang's init_weights_update_group /
update_weights_from_distributed. The trainer is rank 0; receivers are ranks 1..N; every tensor
goes out by ``broadcast(src=0)`` in the announced order. Backend "gloo" on CPU (tested in CI),
"nccl" on GPUs (same code; the trainer sets NCCL_CUMEM_ENABLE=0, as SGLang does for its processes).

The group is built from a ``TCPStore`` and the backend's ProcessGroup constructor directly, never
``init_process_group``: a trainer's own default group (FSDP, DDP...) is left alone, and any number
of weight groups can come and go in one process.

Lifetime (the trainer's choice, see TrainerPublisher): a group is *persistent*. It is built on the
first push to a set of receivers and reused while that set and every push stay healthy; any
failure or timeout tears it down on both sides (a peer's broadcast then fails at once with
"connection closed" instead of waiting out its timeout), and the next push builds a new one on a
new port, so both sides can tell an old group from a new one by its init_method string.

Every call here blocks (rendezvous, collectives): run it on a worker thread, never on an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from rollwire.messages.codec import Buffer
from rollwire.messages.errors import ErrorCode
from rollwire.messages.weights import INBAND, GlooPayload, NamedTensor, NcclPayload, Payload, WeightsReady
from rollwire.runtime.logging import get_logger
from rollwire.weightsync import cuda_ipc
from rollwire.weightsync.checksum import Hasher
from rollwire.weightsync.layout import (
    ALIGN,
    Sender,
    Staged,
    Stager,
    StagingError,
    Where,
    as_frames,
    at_offsets,
    byte_view,
    checksum_problem,
    nbytes_of_meta,
    raise_problems,
    size_problem,
    tensor_bytes,
)

BACKENDS = ("gloo", "nccl")
log = get_logger("rollwire.trainer")


def available(backend: str) -> bool:
    if not dist.is_available():
        return False
    if backend == "gloo":
        return dist.is_gloo_available()
    if backend == "nccl":
        return dist.is_nccl_available() and torch.cuda.is_available()
    return False


def _host_port(init_method: str) -> tuple[str, int]:
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"broadcast group init_method must be tcp://host:port, got {init_method!r}")
    return url.hostname, url.port


class BroadcastGroup:
    """One weight-broadcast group: ``host`` (rank 0, returns at once) or ``join`` (rank >= 1),
    then ``connect`` (blocks until every rank arrived), ``broadcast`` per tensor, ``close``."""

    def __init__(self, store: Any, init_method: str, rank: int, world_size: int, backend: str,
                 timeout_s: float) -> None:
        self.init_method = init_method
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store = store
        self._pg: Any = None
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    @classmethod
    def host(cls, host: str, world_size: int, *, backend: str = "gloo", timeout_s: float = 60.0) -> BroadcastGroup:
        """Rank 0: open the rendezvous store on a free port of ``host`` (non-blocking)."""
        cls._check(backend)
        if backend == "nccl":
            os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
        store = dist.TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        return cls(store, f"tcp://{host}:{store.port}", 0, world_size, backend, timeout_s)

    @classmethod
    def join(cls, init_method: str, rank: int, world_size: int, *, backend: str = "gloo",
             timeout_s: float = 60.0) -> BroadcastGroup:
        """Rank >= 1: connect to rank 0's store (blocks until it is reachable or timeout)."""
        cls._check(backend)
        if not 0 < rank < world_size:
            raise ValueError(f"receiver rank {rank} outside 1..{world_size - 1}")
        if backend == "nccl":  # agree with the trainer (and SGLang); a timed-out collective must fail the
            # push, not kill the server: NCCL's watchdog then only aborts the communicator (mode 2)
            os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        host, port = _host_port(init_method)
        store = dist.TCPStore(host, port, world_size, False, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(store, init_method, rank, world_size, backend, timeout_s)

    @staticmethod
    def _check(backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown broadcast backend {backend!r}; choose one of {BACKENDS}")
        if not available(backend):
            raise ValueError(f"backend {backend!r} is not available in this process (torch {torch.__version__})")

    @property
    def connected(self) -> bool:
        return self._pg is not None

    def connect(self) -> None:
        """Build the process group; blocks until all ranks joined (or raises after the timeout)."""
        if self._pg is not None:
            return
        if self.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self._pg = dist.ProcessGroupNCCL(self._store, self.rank, self.world_size, opts)
        else:
            self._pg = dist.ProcessGroupGloo(self._store, self.rank, self.world_size, self.timeout)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send (rank 0) or receive into (others) ``tensor``, which must be contiguous on ``device``."""
        if self._pg is None:
            raise RuntimeError("broadcast group is not connected")
        if tensor.numel() == 0:
            return  # nothing to move; every rank skips it alike (the layout is shared)
        # as raw bytes: gloo lacks some dtypes (bool...), and a broadcast only copies bytes anyway
        self._pg.broadcast(tensor.view(-1).view(torch.uint8), 0).wait()

    def close(self) -> None:
        """Tear the group down; peers blocked in a collective fail promptly."""
        pg, self._pg = self._pg, None
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.abort() if self.backend == "nccl" else pg.shutdown()
        self._store = None


# -- trainer half ---------------------------------------------------------------------------------
async def send(group: BroadcastGroup, push: Any, workers: Executor) -> None:
    """gloo/nccl: every tensor of the version, in order, from rank 0 (on a worker thread). Announced
    INBAND, each tensor is hashed on ``workers`` while the next ones go out, and the buckets'
    checksums follow the data as one more broadcast (int64, one per bucket)."""
    if push.nccl_arena is not None:
        await asyncio.get_running_loop().run_in_executor(None, _send_arena, group, push)
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
            sums = _sent_checksums(hashers)
            group.broadcast(torch.tensor(sums, dtype=torch.int64, device=group.device))

    await asyncio.get_running_loop().run_in_executor(None, run)


def _sent_checksums(hashers: Sequence[Hasher]) -> list[int]:
    """The checksums the trainer sends after the data (a seam for fault-injection tests)."""
    return [h.result() for h in hashers]


def _send_arena(group: BroadcastGroup, push: Any) -> None:
    """nccl: each packed bucket of the CUDA arena (checksums announced up front), one collective per
    bucket. Written for issue 8; never run across two GPUs."""
    arena = push.nccl_arena
    assert arena is not None
    with torch.cuda.device(arena.device):
        group.connect()
        for plan, off in zip(push.plans, push.offsets, strict=True):
            group.broadcast(arena[off:off + cuda_ipc.padded(plan.nbytes)])
        torch.cuda.synchronize(arena.device)


class GlooSender(Sender):
    """A persistent group per set of receivers (module docstring); INBAND checksums after the data."""

    backend = "gloo"

    def __init__(self, host: str, timeout_s: float) -> None:
        self.host, self.timeout_s = host, timeout_s
        self.group: BroadcastGroup | None = None
        self.ranks: list[str] = []

    async def prepare(self, push: Any, ranks: Sequence[str], workers: Executor) -> tuple[list[int], Payload]:
        self._join(ranks)
        assert self.group is not None
        return [INBAND] * len(push.plans), GlooPayload(group=self.group.init_method, ranks=list(ranks))

    def _join(self, ranks: Sequence[str]) -> None:
        if self.group is None or self.ranks != list(ranks):
            self._drop_group()
            self.group = BroadcastGroup.host(self.host, len(ranks) + 1, backend=self.backend, timeout_s=self.timeout_s)
            self.ranks = list(ranks)

    def announced(self, push: Any, workers: Executor, window: int) -> None:
        push.broadcast = asyncio.ensure_future(self._send(push, workers))

    async def _send(self, push: Any, workers: Executor) -> None:
        group = self.group
        assert group is not None
        try:
            await send(group, push, workers)
        except Exception as e:
            log.warning("broadcast_failed", version=push.version, error=repr(e))
            if self.group is group:
                self._drop_group()
            push.broadcast_failed(f"broadcast failed on the trainer: {e}")

    def failed(self) -> None:
        self._drop_group()

    def forget(self, receiver_id: str) -> None:
        if receiver_id in self.ranks:
            self._drop_group()

    def close(self) -> None:
        self._drop_group()

    def _drop_group(self) -> None:
        group, self.group, self.ranks = self.group, None, []
        if group is not None:
            group.close()


class NcclSender(GlooSender):
    """Packed and checksummed on the GPU as cuda_ipc, then broadcast bucket by bucket."""

    backend = "nccl"
    on_gpu = True

    def __init__(self, host: str, timeout_s: float) -> None:
        super().__init__(host, timeout_s)
        self.arena = cuda_ipc.CudaArena()

    async def prepare(self, push: Any, ranks: Sequence[str], workers: Executor) -> tuple[list[int], Payload]:
        sums, offsets = await cuda_ipc.prepare(self.arena, push.plans, push.device, push.cuda_after, workers)
        push.nccl_arena, push.offsets = self.arena.tensor, offsets
        self._join(ranks)
        assert self.group is not None
        return sums, NcclPayload(group=self.group.init_method, ranks=list(ranks), offsets=offsets)

    def failed(self) -> None:
        super().failed()
        self.arena.retire()

    def close(self) -> None:
        super().close()
        self.arena.close()


# -- receiver half --------------------------------------------------------------------------------
class BroadcastReceiver(Stager):
    """This receiver's rank in the trainer's weight group, and its reusable staging memory; stages
    both gloo and nccl payloads (one group at a time, whichever the trainer announces)."""

    def __init__(self, receiver_id: str) -> None:
        self.receiver_id = receiver_id
        self._group: BroadcastGroup | None = None
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._cuda_staging: torch.Tensor | None = None  # nccl

    async def stage(self, ready: WeightsReady, pool: Executor, stall_timeout_s: float,
                    ) -> tuple[list[NamedTensor], list[Buffer], Where]:
        if isinstance(ready.payload, NcclPayload):
            tensors, key = await self.receive_cuda(ready, ready.payload, stall_timeout_s=stall_timeout_s, pool=pool)
            return tensors, [], {"cuda_arena": key}
        assert isinstance(ready.payload, GlooPayload)
        tensors, frames = await self.receive(ready, ready.payload, stall_timeout_s=stall_timeout_s, pool=pool)
        return tensors, frames, {}

    def after_load(self) -> None:
        if self._cuda_staging is not None:  # nccl: the engine's copies out of the staging buffer are done
            cuda_ipc.synchronize_all()

    def failed(self) -> None:
        self.close()

    def load_timed_out(self) -> None:
        self.discard_staging()

    def discard_staging(self) -> None:
        """Forget the staging memory (a load may still read it): the next version gets fresh memory."""
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._cuda_staging = None

    async def receive_cuda(self, ready: WeightsReady, payload: NcclPayload, *, stall_timeout_s: float, pool: Executor,
                           ) -> tuple[list[NamedTensor], str]:
        """nccl: the packed buckets land in a CUDA staging buffer of this process at the announced
        offsets, are verified with the trainer's GPU checksums (as cuda_ipc), and the engine copies
        them from there: a failed or partial broadcast never touches the live weights. Returns the
        tensors (offsets into the buffer) and the buffer's key (``cuda_ipc.opened``). Written for
        issue 8; never run across two GPUs."""
        self._check_member(payload)
        offsets, sizes = list(payload.offsets), [m.nbytes for m in ready.buckets]
        if any(o < 0 or o % cuda_ipc.ARENA_ALIGN for o in offsets):
            raise StagingError(ErrorCode.BAD_FIELD, f"nccl bucket offsets {offsets[:4]}... negative or misaligned")
        total = max((o + cuda_ipc.padded(n) for o, n in zip(offsets, sizes, strict=True)), default=1)
        device = torch.device("cuda", torch.cuda.current_device())
        staging = self._cuda_staging
        if staging is None or staging.device != device or staging.numel() < total:
            staging = self._cuda_staging = torch.zeros(total, dtype=torch.uint8, device=device)

        def into(g: BroadcastGroup) -> None:
            for off, n in zip(offsets, sizes, strict=True):
                g.broadcast(staging[off:off + cuda_ipc.padded(n)])
            torch.cuda.synchronize(device)

        await self._broadcast_into(payload, into, stall_timeout_s)
        key = cuda_ipc.register_local(staging)
        await cuda_ipc.verify_on_gpu(key, ready.buckets, payload.offsets, pool)
        return at_offsets(ready.buckets, payload.offsets), key

    def close(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.close()

    def _check_member(self, payload: GlooPayload | NcclPayload) -> None:
        if self.receiver_id not in payload.ranks:
            raise StagingError(ErrorCode.BAD_FIELD,
                               f"{self.receiver_id} is not in the broadcast group {payload.ranks}")

    async def _broadcast_into(self, payload: GlooPayload | NcclPayload, into: Any, stall_timeout_s: float) -> None:
        """Run ``into(group)`` on a worker thread in the announced group: the group kept from the
        last version if it is the same one (else a new one is joined), kept again if ``into``
        succeeds, torn down if it fails. A failure becomes a StagingError (TIMEOUT or WEIGHTS_FAILED)."""
        rank, world = payload.ranks.index(self.receiver_id) + 1, len(payload.ranks) + 1
        backend = str(payload.__struct_config__.tag)  # the payload's tag is the backend's name
        group = self._group
        if group is not None and (group.init_method, group.rank, group.world_size) != (payload.group, rank, world):
            self.close()  # the trainer built a new group (new receivers, or after a failure)
            group = None
        self._group = None  # owned by the worker thread until it returns

        def run() -> BroadcastGroup:
            g = group or BroadcastGroup.join(payload.group, rank, world, backend=backend,
                                             timeout_s=stall_timeout_s)
            try:
                g.connect()
                into(g)
            except BaseException:
                g.close()
                raise
            return g

        try:
            self._group = await asyncio.get_running_loop().run_in_executor(None, run)
        except StagingError:
            raise
        except Exception as e:
            raise StagingError(ErrorCode.TIMEOUT if "imeout" in str(e) else ErrorCode.WEIGHTS_FAILED,
                               f"broadcast receive failed: {e}") from None

    async def receive(self, ready: WeightsReady, payload: GlooPayload, *, stall_timeout_s: float,
                      pool: Executor) -> Staged:
        self._check_member(payload)
        offsets, pos = [], 0
        for m in ready.buckets:
            offsets.append(pos)
            pos = (pos + m.nbytes + ALIGN - 1) // ALIGN * ALIGN
        if self._staging.numel() < pos:
            self._staging = torch.empty(pos, dtype=torch.uint8).fill_(0)  # touched once: warm for later pushes
        staging = self._staging
        # each bucket's pieces are hashed on the pool while the next tensors arrive
        hashers = [Hasher(pool) for _ in ready.buckets]
        inband = any(m.checksum == INBAND for m in ready.buckets)
        sent = torch.zeros(len(ready.buckets), dtype=torch.int64)

        def into(g: BroadcastGroup) -> None:
            for i, (meta, off) in enumerate(zip(ready.buckets, offsets, strict=True)):
                bucket = staging[off:off + meta.nbytes]
                view = byte_view(bucket)
                end = 0
                for t in meta.tensors:
                    n = nbytes_of_meta(t.dtype, t.shape)
                    bucket[end:t.offset].zero_()  # gaps are zeros in the checksum
                    g.broadcast(bucket[t.offset:t.offset + n])
                    hashers[i].update(view[end:t.offset + n])
                    end = t.offset + n
            if inband:  # the trainer's checksum of each bucket follows the data
                on_device = sent.to(g.device)
                g.broadcast(on_device)
                sent.copy_(on_device)

        await self._broadcast_into(payload, into, stall_timeout_s)
        sums = [await h.wait() for h in hashers]
        bufs = [byte_view(staging[off:off + m.nbytes]) for m, off in zip(ready.buckets, offsets, strict=True)]
        want = sent.tolist() if inband else [m.checksum for m in ready.buckets]
        raise_problems([size_problem(m, b) or checksum_problem(m, c, w)
                         for m, b, c, w in zip(ready.buckets, bufs, sums, want, strict=True)])
        return as_frames(ready.buckets, bufs)
