"""Receiving one announced weight version, by transport, into tensors ready to load.

Each function gathers the bytes of every bucket, verifies them against the announcement (size and
checksum, or cuda_ipc's GPU checksum; the layout itself was checked by ``check_layout``) on worker
threads, and returns the
``NamedTensor``s of an ApplyVersion plus its payload frames. Failures are ``StagingError`` with a
wire ``ErrorCode``; nothing here decides what a failure means for the live version.

Ownership: inline frames belong to ZeroMQ messages (kept alive by the returned memoryviews);
gloo staging memory belongs to ``BroadcastReceiver`` and must not be reused until the load that
reads it has finished; shm and cuda_ipc views belong to the trainer's arena, which it does not
rewrite before every receiver has reported the version (cuda_ipc: the receiver synchronizes the GPU
before reporting).

A checksum announced as INBAND comes with the bytes instead: in each BucketData (inline, computed
as the trainer packs the bucket) or as one last broadcast of the buckets' checksums (gloo/nccl), so the
trainer makes no pass over the version before announcing it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import torch

from rollwire.messages.codec import Buffer, ProtocolError
from rollwire.messages.envelope import TensorRef
from rollwire.messages.errors import ErrorCode, ErrorReply
from rollwire.messages.weights import INBAND, BucketData, BucketMeta, NamedTensor, PullBucket, WeightsReady
from rollwire.transports.broadcast import BroadcastGroup
from rollwire.transports.checksum import Hasher, checksum_parallel
from rollwire.transports.rpc import ConnectionClosed, RpcClient
from rollwire.transports.weights import ALIGN, byte_view, checksum_problem, size_problem, tensor_slices


class StagingError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


Staged = tuple[list[NamedTensor], list[Buffer]]


async def _check(meta: BucketMeta, buf: Buffer, pool: Executor, sent: int = INBAND) -> str | None:
    """Size and checksum against the announcement, or against ``sent`` (the checksum that came with
    the bytes) where the announcement says INBAND."""
    want = sent if meta.checksum == INBAND else meta.checksum
    if want == INBAND:
        return size_problem(meta, buf) or f"bucket {meta.index}: no checksum, neither announced nor sent"
    return size_problem(meta, buf) or checksum_problem(meta, await checksum_parallel([buf], pool), want)


def _raise_problems(problems: Sequence[str | None]) -> None:
    bad = [p for p in problems if p]
    if bad:
        code = ErrorCode.BAD_CHECKSUM if "checksum" in bad[0] else ErrorCode.BAD_FRAME
        raise StagingError(code, "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))


async def _verify(metas: Sequence[BucketMeta], bufs: Sequence[Buffer], pool: Executor) -> None:
    _raise_problems(await asyncio.gather(*(_check(m, b, pool) for m, b in zip(metas, bufs, strict=True))))


def _as_frames(metas: Sequence[BucketMeta], bufs: Sequence[Buffer]) -> Staged:
    """One payload frame per tensor: zero-copy slices of the verified buckets."""
    named: list[NamedTensor] = []
    frames: list[Buffer] = []
    for meta, buf in zip(metas, bufs, strict=True):
        for t, view in zip(meta.tensors, tensor_slices(meta, buf), strict=True):
            named.append(NamedTensor(t.name, TensorRef(len(frames), t.dtype, list(t.shape))))
            frames.append(view)
    return named, frames


# -- inline ------------------------------------------------------------------------------------
async def pull_inline(trainer: RpcClient[Any], ready: WeightsReady, *, window: int, stall_timeout_s: float,
                      pool: Executor, counters: Any) -> Staged:
    """Pull every bucket with at most ``window`` requests outstanding. All pulls of a version share one
    request id, so replies are matched by (version, index): duplicates and replies to nothing we
    asked for are counted and dropped, any order is fine. No progress for ``stall_timeout_s``
    (no accepted bucket) fails the version with TIMEOUT. Anything else the trainer sends, or a link
    that dies under us, fails the version with a typed StagingError; nothing else is raised."""
    n = ready.n_buckets
    rid = trainer.next_rid()
    replies = trainer.open_stream(rid)
    got: dict[int, Buffer] = {}
    checks: list[asyncio.Future[Any]] = []
    asked: set[int] = set()
    try:
        await _pull(trainer, rid, replies, ready, window, stall_timeout_s, pool, counters, got, checks, asked)
    except ConnectionClosed as e:  # the bucket link's receiving task died (what the trainer sent broke it)
        raise StagingError(ErrorCode.BAD_FRAME, f"trainer link closed: {e}") from None
    finally:
        trainer.close_stream(rid)
        for c in checks:
            c.cancel()
    return _as_frames(ready.buckets, [got[i] for i in range(n)])


async def _pull(trainer: RpcClient[Any], rid: int, replies: asyncio.Queue[Any], ready: WeightsReady, window: int,
                stall_timeout_s: float, pool: Executor, counters: Any, got: dict[int, Buffer],
                checks: list[asyncio.Future[Any]], asked: set[int]) -> None:
    """pull_inline's loop: fills ``got``, ``checks`` and ``asked`` (the caller cleans up)."""
    n = ready.n_buckets
    next_index = 0
    while next_index < n and len(asked) < window:
        await trainer.send(rid, PullBucket(version=ready.version, index=next_index))
        asked.add(next_index)
        next_index += 1
    progress = time.monotonic()
    while len(got) < n:
        left = progress + stall_timeout_s - time.monotonic()
        try:
            item = await asyncio.wait_for(replies.get(), max(left, 0.0))
        except TimeoutError:
            raise StagingError(ErrorCode.TIMEOUT, f"stalled: no bucket for {stall_timeout_s}s "
                                                  f"({len(got)}/{n} received)") from None
        if isinstance(item, ProtocolError):
            raise StagingError(item.code, f"trainer reply: {item.message}")
        if isinstance(item, ConnectionClosed):
            raise StagingError(ErrorCode.BAD_FRAME, f"trainer link: {item}")
        if isinstance(item, BaseException):
            raise StagingError(ErrorCode.BAD_FRAME, f"trainer link: {item!r}"[:300])
        msg = item.msg
        if isinstance(msg, ErrorReply):
            raise StagingError(msg.code, f"trainer: {msg.message}")
        if not isinstance(msg, BucketData) or msg.version != ready.version or msg.index not in asked:
            counters.inc("duplicate_buckets" if isinstance(msg, BucketData) and msg.index in got
                         else "unexpected_replies")
            continue
        if len(item.payload) != 1:
            raise StagingError(ErrorCode.BAD_FRAME, f"bucket {msg.index} came in {len(item.payload)} frames")
        asked.discard(msg.index)
        got[msg.index] = item.payload[0]
        progress = time.monotonic()
        if next_index < n:  # one credit back: keep the window full while we verify
            await trainer.send(rid, PullBucket(version=ready.version, index=next_index))
            asked.add(next_index)
            next_index += 1
        # verified on worker threads while the next buckets arrive
        checks.append(asyncio.ensure_future(_check(ready.buckets[msg.index], got[msg.index], pool,
                                                   msg.checksum)))
    _raise_problems(await asyncio.gather(*checks))


# -- shm ---------------------------------------------------------------------------------------
async def attach_shm(ready: WeightsReady, pool: Executor) -> list[NamedTensor]:
    """Verify the buckets in the trainer's arena in place; tensors are byte offsets into it."""
    from rollwire.transports.shm import attach

    try:
        arena = attach(ready.shm_name)
    except (OSError, ValueError) as e:
        raise StagingError(ErrorCode.BAD_FIELD, f"cannot attach shm arena {ready.shm_name!r}: {e}") from None
    bufs = []
    for meta, off in zip(ready.buckets, ready.shm_offsets, strict=True):
        if off < 0 or off + meta.nbytes > arena.size:
            raise StagingError(ErrorCode.BAD_FIELD, f"bucket {meta.index} at {off}+{meta.nbytes} outside the "
                                                    f"{arena.size}-byte arena")
        bufs.append(byte_view(arena.tensor[off:off + meta.nbytes]))
    await _verify(ready.buckets, bufs, pool)
    return _at_offsets(ready)


# -- cuda_ipc ----------------------------------------------------------------------------------
async def attach_cuda_ipc(ready: WeightsReady, pool: Executor) -> tuple[list[NamedTensor], str]:
    """Open the trainer's CUDA arena (cached), verify every bucket's GPU checksum; tensors are byte
    offsets into it, the key names the opened arena in this process."""
    from rollwire.transports import cuda_ipc

    h = ready.cuda_ipc
    if h is None:
        raise StagingError(ErrorCode.BAD_FIELD, "cuda_ipc announcement without a handle")
    for meta, off in zip(ready.buckets, ready.shm_offsets, strict=True):
        if off < 0 or off % cuda_ipc.ARENA_ALIGN or off + cuda_ipc.padded(meta.nbytes) > h.nbytes:
            raise StagingError(ErrorCode.BAD_FIELD, f"bucket {meta.index} at {off}+{meta.nbytes} outside the "
                                                    f"{h.nbytes}-byte CUDA arena or misaligned")
    try:
        key = await asyncio.get_running_loop().run_in_executor(pool, cuda_ipc.open_arena, h)
    except (RuntimeError, ValueError) as e:
        raise StagingError(ErrorCode.BAD_FIELD, f"cannot open the CUDA IPC handle: {e}") from None
    await _verify_on_gpu(key, ready, pool)
    return _at_offsets(ready), key


async def _verify_on_gpu(key: str, ready: WeightsReady, pool: Executor) -> None:
    """Every bucket at ``ready.shm_offsets`` of the CUDA buffer ``key`` against its announced GPU
    checksum (cuda_ipc and nccl)."""
    from rollwire.transports import cuda_ipc

    sums = await asyncio.get_running_loop().run_in_executor(pool, cuda_ipc.verify, key, ready.shm_offsets,
                                                            [m.nbytes for m in ready.buckets])
    _raise_problems([None if got == m.checksum else
                     f"bucket {m.index}: GPU checksum {got:#018x}, announced {m.checksum:#018x}"
                     for m, got in zip(ready.buckets, sums, strict=True)])


def _at_offsets(ready: WeightsReady) -> list[NamedTensor]:
    """The version's tensors as byte offsets into the buffer holding its buckets at ``shm_offsets``."""
    return [NamedTensor(t.name, TensorRef(off + t.offset, t.dtype, list(t.shape)))
            for meta, off in zip(ready.buckets, ready.shm_offsets, strict=True) for t in meta.tensors]


# -- gloo / nccl broadcast ----------------------------------------------------------------------
class BroadcastReceiver:
    """This receiver's rank in the trainer's weight group, and its reusable staging memory."""

    def __init__(self, receiver_id: str) -> None:
        self.receiver_id = receiver_id
        self._group: BroadcastGroup | None = None
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._cuda_staging: torch.Tensor | None = None  # nccl

    def discard_staging(self) -> None:
        """Forget the staging memory (a load may still read it): the next version gets fresh memory."""
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._cuda_staging = None

    async def receive_cuda(self, ready: WeightsReady, *, stall_timeout_s: float, pool: Executor,
                           ) -> tuple[list[NamedTensor], str]:
        """nccl: the packed buckets land in a CUDA staging buffer of this process at the announced
        offsets, are verified with the trainer's GPU checksums (as cuda_ipc), and the engine copies
        them from there: a failed or partial broadcast never touches the live weights. Returns the
        tensors (offsets into the buffer) and the buffer's key (``cuda_ipc.opened``). Written for
        issue 8; never run across two GPUs."""
        from rollwire.transports import cuda_ipc

        self._check_member(ready)
        offsets, sizes = list(ready.shm_offsets), [m.nbytes for m in ready.buckets]
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

        await self._broadcast_into(ready, into, stall_timeout_s)
        key = cuda_ipc.register_local(staging)
        await _verify_on_gpu(key, ready, pool)
        return _at_offsets(ready), key

    def close(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.close()

    def _check_member(self, ready: WeightsReady) -> None:
        if self.receiver_id not in ready.group_ranks:
            raise StagingError(ErrorCode.BAD_FIELD,
                               f"{self.receiver_id} is not in the broadcast group {ready.group_ranks}")

    async def _broadcast_into(self, ready: WeightsReady, into: Any, stall_timeout_s: float) -> None:
        """Run ``into(group)`` on a worker thread in the announced group: the group kept from the
        last version if it is the same one (else a new one is joined), kept again if ``into``
        succeeds, torn down if it fails. A failure becomes a StagingError (TIMEOUT or WEIGHTS_FAILED)."""
        rank, world = ready.group_ranks.index(self.receiver_id) + 1, len(ready.group_ranks) + 1
        group = self._group
        if group is not None and (group.init_method, group.rank, group.world_size) != (ready.group, rank, world):
            self.close()  # the trainer built a new group (new receivers, or after a failure)
            group = None
        self._group = None  # owned by the worker thread until it returns

        def run() -> BroadcastGroup:
            g = group or BroadcastGroup.join(ready.group, rank, world, backend=ready.transport,
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

    async def receive(self, ready: WeightsReady, *, stall_timeout_s: float, pool: Executor) -> Staged:
        self._check_member(ready)
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
                    n = _nbytes(t.dtype, t.shape)
                    bucket[end:t.offset].zero_()  # gaps are zeros in the checksum
                    g.broadcast(bucket[t.offset:t.offset + n])
                    hashers[i].update(view[end:t.offset + n])
                    end = t.offset + n
            if inband:  # the trainer's checksum of each bucket follows the data
                on_device = sent.to(g.device)
                g.broadcast(on_device)
                sent.copy_(on_device)

        await self._broadcast_into(ready, into, stall_timeout_s)
        sums = [await h.wait() for h in hashers]
        bufs = [byte_view(staging[off:off + m.nbytes]) for m, off in zip(ready.buckets, offsets, strict=True)]
        want = sent.tolist() if inband else [m.checksum for m in ready.buckets]
        _raise_problems([size_problem(m, b) or checksum_problem(m, c, w)
                         for m, b, c, w in zip(ready.buckets, bufs, sums, want, strict=True)])
        return _as_frames(ready.buckets, bufs)


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    from rollwire.transports.tensors import dtype_from_name

    n = dtype_from_name(dtype).itemsize
    for d in shape:
        n *= d
    return n
