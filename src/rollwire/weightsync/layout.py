"""How a weight version is laid out in buckets, checksummed, verified and turned back into tensors.

A bucket is a run of named tensors packed back to back, each at an offset aligned to ``ALIGN``
bytes (the gaps are zeros), so any tensor can be viewed in place whatever its dtype. A tensor
larger than the bucket size gets a bucket of its own. The checksum of a bucket covers all its
bytes, gaps included (``weightsync/checksum.py`` defines it: xxh3-64 over 1 MiB pieces, folded).

Shared by the trainer (plan, checksum from the source tensors) and every receiver-side transport
(verify what arrived, ``StagingError``). The dtype names the wire carries live here too, so that
``inline``, ``shm``, ``cuda_ipc`` and ``broadcast`` all sit above this module and none imports another
for them.
"""

from __future__ import annotations

import asyncio
import mmap
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, cast

import torch

from rollwire.messages.codec import Buffer
from rollwire.messages.envelope import TensorRef
from rollwire.messages.errors import ErrorCode
from rollwire.messages.weights import (
    INBAND,
    BucketMeta,
    CudaIpcPayload,
    NamedTensor,
    NcclPayload,
    Payload,
    ShmPayload,
    TensorMeta,
    WeightsReady,
)
from rollwire.weightsync.checksum import PIECE_BYTES, checksum_of, checksum_parallel, fold
from rollwire.weightsync.memcopy import ByteCheck, copy_and_digest, run_shared

ALIGN = 64  # cache-line aligned offsets: a view of any dtype is legal, and copies vectorise
_ZEROS = bytes(ALIGN)

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {name!r}; supported: {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def as_named_list(tensors: NamedTensors, *, to_cpu: bool = True) -> list[tuple[str, torch.Tensor]]:
    """``state_dict()`` or (name, tensor) pairs -> detached tensors (moved to the CPU unless
    ``to_cpu`` is False: cuda_ipc sends CUDA tensors as they are); names must be unique."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    out, seen = [], set()
    for name, t in items:
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice")
        seen.add(name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
        dtype_from_name(dtype_name(t.dtype))  # raises ValueError on a dtype the wire does not carry
        t = t.detach()
        out.append((name, t if t.device.type == "cpu" or not to_cpu else t.cpu()))
    return out


def on_cpu(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    return [(n, t if t.device.type == "cpu" else t.cpu()) for n, t in named]


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class BucketPlan:
    index: int
    nbytes: int
    tensors: list[TensorMeta]
    sources: list[torch.Tensor]  # the trainer's tensors, in order (not on the wire)

    def meta(self, checksum: int) -> BucketMeta:
        return BucketMeta(self.index, self.nbytes, checksum, self.tensors)


def plan_buckets(named: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[BucketPlan]:
    """Greedy packing in the given order (the order the receiver loads them in)."""
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    buckets: list[BucketPlan] = []
    cur: BucketPlan | None = None
    for name, t in named:
        size = nbytes_of(t)
        offset = 0 if cur is None else _aligned(cur.nbytes)
        if cur is None or (offset + size > bucket_bytes and cur.tensors):
            cur = BucketPlan(len(buckets), 0, [], [])
            buckets.append(cur)
            offset = 0
        cur.tensors.append(TensorMeta(name, dtype_name(t.dtype), list(t.shape), offset))
        cur.sources.append(t)
        cur.nbytes = offset + size
    return buckets


def packed_offsets(plans: Sequence[BucketPlan]) -> list[int]:
    """Where each bucket starts in a buffer holding all of them back to back (``ALIGN``-aligned)."""
    offsets, pos = [], 0
    for p in plans:
        offsets.append(pos)
        pos = (pos + p.nbytes + ALIGN - 1) // ALIGN * ALIGN
    return offsets


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order (a temporary copy only for a non-contiguous tensor)."""
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # one element with another stride: "contiguous", yet not viewable as bytes
        flat = flat.clone(memory_format=torch.contiguous_format)
    return byte_view(flat.view(torch.uint8))


def bucket_buffers(plan: BucketPlan) -> list[memoryview]:
    """The bytes of the bucket as it will be packed, in order, without packing it: the zero gaps
    and each tensor's own bytes (a temporary copy only for a non-contiguous tensor)."""
    out, pos = [], 0
    for meta, t in zip(plan.tensors, plan.sources, strict=True):
        if meta.offset > pos:
            out.append(memoryview(_ZEROS[: meta.offset - pos]))
        out.append(tensor_bytes(t))
        pos = meta.offset + nbytes_of(t)
    return out


def checksum_sources(plan: BucketPlan) -> int:
    """The checksum of the bucket as it will be packed, computed from the source tensors (no packing)."""
    return checksum_of(bucket_buffers(plan))


def checksum(buf: Buffer) -> int:
    return checksum_of([buf])


def pack_bucket(plan: BucketPlan, dst: torch.Tensor) -> None:
    """Copy the bucket's tensors into ``dst`` (a uint8 tensor of ``plan.nbytes``), gaps zeroed.
    One strided copy per tensor: a non-contiguous source is packed without a temporary."""
    pos = 0
    for meta, t in zip(plan.tensors, plan.sources, strict=True):
        if meta.offset > pos:
            dst[pos:meta.offset].zero_()
        n = nbytes_of(t)
        if n:
            dst[meta.offset:meta.offset + n].view(t.dtype).view(t.shape).copy_(t)
        pos = meta.offset + n


def _ops(plan: BucketPlan, dst: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, length, source address or 0 for zeros or -1 for already packed) covering the bucket
    in order; a non-contiguous source is packed here (one strided copy) and only checksummed later."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    for meta, t in zip(plan.tensors, plan.sources, strict=True):
        if meta.offset > pos:
            out.append((pos, meta.offset - pos, 0))
        n = nbytes_of(t)
        if n and not t.is_contiguous():
            dst[meta.offset:meta.offset + n].view(t.dtype).view(t.shape).copy_(t)
        if n:
            out.append((meta.offset, n, t.data_ptr() if t.is_contiguous() else -1))
        pos = meta.offset + n
    return out


def _cells(plan: BucketPlan, dst: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """The bucket's copy operations cut at checksum-piece boundaries: one list per piece."""
    cells: list[list[tuple[int, int, int]]] = [[] for _ in range(-(-plan.nbytes // PIECE_BYTES))]
    for start, n, src in _ops(plan, dst):
        while n:
            take = min(n, PIECE_BYTES - start % PIECE_BYTES)
            cells[start // PIECE_BYTES].append((start, take, src))
            start, n, src = start + take, n - take, (src + take if src > 0 else src)
    return cells


def pack_with_checksum(plans: Sequence[BucketPlan], dsts: Sequence[torch.Tensor], pool: Executor,
                       threads: int = 2, on_piece: Callable[[int], None] | None = None) -> list[int]:
    """Pack every bucket into its ``dst`` (flat uint8 CPU tensors) and return each bucket's checksum,
    each piece hashed right after it is copied (still in cache: nearly free next to the copy). This
    thread and ``threads - 1`` workers of ``pool`` take pieces in turn. ``on_piece(i)``: piece ``i``
    (buckets in order, 1 MiB pieces from each bucket's start) is written and hashed. Blocks: run it
    on a worker thread."""

    jobs = []  # (bucket, ops, the piece's first and last + 1 address)
    for b, (plan, dst) in enumerate(zip(plans, dsts, strict=True)):
        addr = dst.data_ptr()
        jobs += [(b, [(addr + start, addr + start, src, n) for start, n, src in ops],
                  addr + k * PIECE_BYTES, addr + min((k + 1) * PIECE_BYTES, plan.nbytes))
                 for k, ops in enumerate(_cells(plan, dst))]
    digests = [0] * len(jobs)
    todo = iter(range(len(jobs)))  # shared: each worker takes the next piece (next() is atomic)

    def work() -> None:
        for i in todo:
            _, ops, lo, hi = jobs[i]
            digests[i] = copy_and_digest(ops, lo, hi)
            if on_piece is not None:
                on_piece(i)

    run_shared(work, pool, threads)  # this thread takes pieces too
    per_bucket: list[list[int]] = [[] for _ in plans]
    for (b, _, _, _), d in zip(jobs, digests, strict=True):
        per_bucket[b].append(d)
    return [fold(d) for d in per_bucket]


# -- receiver side ------------------------------------------------------------------------------
class LayoutError(ValueError):
    """Announced metadata that does not describe a valid version (receiver answers BAD_FIELD)."""


def check_layout(ready: WeightsReady) -> None:
    """Every count, offset and size in the announcement is consistent, before a byte is pulled."""
    if ready.n_buckets != len(ready.buckets):
        raise LayoutError(f"n_buckets={ready.n_buckets} but {len(ready.buckets)} buckets described")
    if sum(b.nbytes for b in ready.buckets) != ready.total_bytes:
        raise LayoutError(f"total_bytes={ready.total_bytes} is not the sum of the bucket sizes")
    names: set[str] = set()
    for i, b in enumerate(ready.buckets):
        if b.index != i:
            raise LayoutError(f"bucket {i} says it is bucket {b.index}")
        end = 0
        for t in b.tensors:
            if t.name in names:
                raise LayoutError(f"tensor {t.name!r} appears twice")
            names.add(t.name)
            try:
                item = dtype_from_name(t.dtype).itemsize
            except ValueError as e:
                raise LayoutError(f"{t.name}: {e}") from None
            if any(d < 0 for d in t.shape):
                raise LayoutError(f"{t.name}: negative dimension in {t.shape}")
            if t.offset < end or t.offset % item:
                raise LayoutError(f"{t.name}: offset {t.offset} overlaps the previous tensor or is misaligned")
            end = t.offset + item * _numel(t.shape)
        if end != b.nbytes:
            raise LayoutError(f"bucket {i}: tensors end at byte {end}, bucket has {b.nbytes}")
    match ready.payload:  # payloads that place the buckets in one buffer give one offset per bucket
        case ShmPayload(offsets=offsets) | CudaIpcPayload(offsets=offsets) | NcclPayload(offsets=offsets):
            if len(offsets) != ready.n_buckets:
                raise LayoutError(f"{ready.transport}: {len(offsets)} offsets for {ready.n_buckets} buckets")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def size_problem(meta: BucketMeta, buf: Buffer) -> str | None:
    if len(buf) != meta.nbytes:
        return f"bucket {meta.index}: {len(buf)} bytes, announced {meta.nbytes}"
    return None


def checksum_problem(meta: BucketMeta, got: int, want: int | None = None) -> str | None:
    want = meta.checksum if want is None else want
    if got != want:
        how = "announced" if want == meta.checksum else "sent"
        return f"bucket {meta.index}: checksum {got:#018x}, {how} {want:#018x}"
    return None


def verify_bucket(meta: BucketMeta, buf: Buffer) -> str | None:
    """None if ``buf`` is exactly the announced bucket; else why not (size or checksum)."""
    return size_problem(meta, buf) or checksum_problem(meta, checksum(buf))


def tensor_slices(meta: BucketMeta, buf: Buffer) -> list[memoryview]:
    """Zero-copy slices of a verified bucket, one per tensor (they keep ``buf`` alive)."""
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    out = []
    for t in meta.tensors:
        n = dtype_from_name(t.dtype).itemsize * _numel(t.shape)
        out.append(mv[t.offset:t.offset + n])
    return out


def view_at(base: torch.Tensor, offset: int, dtype_str: str, shape: Sequence[int]) -> torch.Tensor:
    """A tensor view of ``base`` (flat uint8) at byte ``offset``; raises ValueError if out of range."""
    dtype = dtype_from_name(dtype_str)
    n = dtype.itemsize * _numel(shape)
    if offset < 0 or offset + n > base.numel() or offset % dtype.itemsize:
        raise ValueError(f"tensor at byte {offset} (+{n}) outside a {base.numel()}-byte arena or misaligned")
    if n == 0:
        return torch.empty(list(shape), dtype=dtype, device=base.device)
    return base[offset:offset + n].view(dtype).view(list(shape))


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a flat uint8 CPU tensor as a memoryview (no copy; keeps the tensor alive)."""
    return memoryview(cast(Any, t.numpy()))


def uint8_view(buf: Buffer | mmap.mmap) -> torch.Tensor:
    """A flat uint8 tensor on ``buf`` without a copy (read-only buffers are fine for reading)."""
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # frombuffer warns on read-only buffers; callers only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8)


# -- staging: what every receiver-side transport shares -------------------------------------------
class StagingError(Exception):
    """A version that cannot be staged, with the wire ``ErrorCode`` its outcome reports."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


Staged = tuple[list[NamedTensor], list[Buffer]]
Where = dict[str, str]  # where staged tensor offsets point (shm_name or cuda_arena; staged.resolve)


class Sender:
    """The trainer half of a payload transport. The TrainerPublisher keeps one per transport it
    offers (by name, the payload's tag); a push calls ``prepare`` before the announcement and
    ``announced`` after it; the hooks default to nothing."""

    same_host = False  # receivers must be on the trainer's host (Register.host_id)
    needs_device = False  # receivers must see the GPU holding the tensors (Register.cuda_devices)
    on_gpu = False  # the tensors stay on their GPU (the others are moved to the CPU first)

    async def prepare(self, push: Any, ranks: Sequence[str], workers: Executor) -> tuple[list[int], Payload]:
        """Each bucket's checksum (INBAND: sent with the bytes) and the announcement's payload."""
        raise NotImplementedError

    def announced(self, push: Any, workers: Executor, window: int) -> None:
        """The version was announced: start moving bytes, if the trainer moves them."""

    def failed(self) -> None:
        """The push failed: a receiver may still read what this push prepared."""

    def unwaited(self) -> None:
        """Before a push: a receiver the last push did not wait for may have heard its announcement
        and still read what it prepared, at its own pace: do not write over it."""

    def forget(self, receiver_id: str) -> None:
        """``receiver_id`` restarted: whatever it had joined for this transport is gone."""

    def close(self) -> None:
        pass


class Stager:
    """The receiver half of a payload transport: stage an announced version into tensors the engine
    can load. The WeightReceiverActor keeps one per payload type it offers and calls it by the type
    of ``WeightsReady.payload``; the hooks below default to nothing."""

    async def stage(self, ready: WeightsReady, pool: Executor, stall_timeout_s: float,
                    ) -> tuple[list[NamedTensor], list[Buffer], Where]:
        raise NotImplementedError

    def deferred_checks(self, ready: WeightsReady) -> list[ByteCheck]:
        """The buckets ``stage`` left unverified, for the engine to verify as it copies them."""
        return []

    def after_load(self) -> None:
        """The engine loaded the version (blocking; on a worker thread): its reads of the staged
        bytes must be finished before the trainer hears "applied"."""

    def failed(self) -> None:
        """Staging or loading the version failed."""

    def load_timed_out(self) -> None:
        """The load did not answer in time: the engine may still read the staged bytes."""


async def check_bucket(meta: BucketMeta, buf: Buffer, pool: Executor, sent: int = INBAND) -> str | None:
    """Size and checksum against the announcement, or against ``sent`` (the checksum that came with
    the bytes) where the announcement says INBAND."""
    want = sent if meta.checksum == INBAND else meta.checksum
    if want == INBAND:
        return size_problem(meta, buf) or f"bucket {meta.index}: no checksum, neither announced nor sent"
    return size_problem(meta, buf) or checksum_problem(meta, await checksum_parallel([buf], pool), want)


def raise_problems(problems: Sequence[str | None]) -> None:
    bad = [p for p in problems if p]
    if bad:
        code = ErrorCode.BAD_CHECKSUM if "checksum" in bad[0] else ErrorCode.BAD_FRAME
        raise StagingError(code, "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))


async def verify_buckets(metas: Sequence[BucketMeta], bufs: Sequence[Buffer], pool: Executor) -> None:
    raise_problems(await asyncio.gather(*(check_bucket(m, b, pool) for m, b in zip(metas, bufs, strict=True))))


def at_offsets(buckets: Sequence[BucketMeta], offsets: Sequence[int]) -> list[NamedTensor]:
    """The version's tensors as byte offsets into the buffer holding its buckets at ``offsets``."""
    return [NamedTensor(t.name, TensorRef(off + t.offset, t.dtype, list(t.shape)))
            for meta, off in zip(buckets, offsets, strict=True) for t in meta.tensors]


def as_frames(metas: Sequence[BucketMeta], bufs: Sequence[Buffer]) -> Staged:
    """One payload frame per tensor: zero-copy slices of the verified buckets."""
    named: list[NamedTensor] = []
    frames: list[Buffer] = []
    for meta, buf in zip(metas, bufs, strict=True):
        for t, view in zip(meta.tensors, tensor_slices(meta, buf), strict=True):
            named.append(NamedTensor(t.name, TensorRef(len(frames), t.dtype, list(t.shape))))
            frames.append(view)
    return named, frames


def nbytes_of_meta(dtype: str, shape: Sequence[int]) -> int:
    return dtype_from_name(dtype).itemsize * _numel(shape)
