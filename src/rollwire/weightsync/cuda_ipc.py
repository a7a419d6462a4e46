"""Weights by CUDA IPC: same host, CUDA tensors on both ends (the path of SGLang's
update_weights_from_tensor with CUDA tensors).

Trainer (``CudaArena``): one flat uint8 CUDA buffer on the GPU that holds the tensors, created once
per size and reused for every push (as the shm arena is). A push packs every bucket into it at
``ARENA_ALIGN``-aligned offsets (one multi-tensor device-to-device copy; the views and the zeroed
gaps are kept while the layout repeats), checksums every bucket on the GPU, and announces. The
arena is exported once, as one handle (torch's ``reduce_tensor``, i.e. ``cudaIpcGetMemHandle`` plus
torch's producer-side reference count): opening a handle costs milliseconds, so receivers open it
once and keep it while it is the trainer's current arena. The trainer does not write the arena
again before every receiver has reported the version (applied or refused); after a failed push it
allocates a new one (``retire``), since a straggler may still read the old one (torch keeps memory
alive while a consumer holds it).

Receiver (``open_arena``, ``verify``): rebuilds the arena as a CUDA tensor (``rebuild_cuda_tensor``,
on the local index of the GPU named by UUID: indices differ between processes), verifies every
bucket's checksum on the GPU, on a side stream, and hands the engine views into the arena. After
the engine's load it synchronizes the GPU before reporting "applied", so the trainer's next pack
cannot overwrite bytes a copy still reads.

Checksums: ``gpu_checksum`` (one pass over the arena on each side).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import torch

from rollwire.messages.codec import Buffer
from rollwire.messages.errors import ErrorCode
from rollwire.messages.weights import BucketMeta, CudaIpcHandle, CudaIpcPayload, NamedTensor, Payload, WeightsReady
from rollwire.weightsync.gpu_checksum import ARENA_ALIGN, gpu_checksums, padded
from rollwire.weightsync.layout import (
    BucketPlan,
    Sender,
    Stager,
    StagingError,
    Where,
    at_offsets,
    nbytes_of,
    raise_problems,
)

_GROW_QUANTUM = 2 << 20
_MAX_OPENED = 2  # arenas a receiver keeps open (the current one and the one it replaced)


def available() -> bool:
    """This process can use CUDA at all (False on CPU-only builds and machines without a GPU)."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - broken driver installs raise here
        return False


def receiver_offers(engine_device: str | None) -> bool:
    """Whether a receiver offers cuda_ipc: this process has CUDA and the engine's weights live on a
    CUDA device (``engine_device`` None: unknown, any engine in a CUDA process takes CUDA tensors)."""
    if not available():
        return False
    return engine_device is None or torch.device(engine_device).type == "cuda"


def device_uuid(device: torch.device | int) -> str:
    index = device if isinstance(device, int) else (device.index if device.index is not None
                                                    else torch.cuda.current_device())
    return str(torch.cuda.get_device_properties(index).uuid)


def visible_uuids() -> list[str]:
    return [device_uuid(i) for i in range(torch.cuda.device_count())] if available() else []


def tensors_device(tensors: Sequence[torch.Tensor]) -> torch.device | None:
    """The one CUDA device holding every tensor, or None (a CPU tensor, or several GPUs)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return None
    (dev,) = devices
    return dev if dev.type == "cuda" else None


def arena_offsets(sizes: Sequence[int]) -> list[int]:
    """Where each bucket starts in the arena: back to back, each at an ``ARENA_ALIGN`` boundary."""
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos += padded(n)
    return offsets


# -- trainer side ------------------------------------------------------------------------------
class CudaArena:
    """Trainer side: one CUDA buffer, exported once, reused across pushes."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.handle: CudaIpcHandle | None = None
        self._layout: Layout | None = None  # the last push's destination views (reused while it repeats)
        self.created = 0  # how many buffers this arena has allocated (benchmarks check it stays 1)

    def reserve(self, nbytes: int, device: torch.device) -> bool:
        """Room for ``nbytes`` on ``device``; True if the buffer was (re)allocated (a new handle)."""
        t = self.tensor
        if t is not None and t.device == device and t.numel() >= nbytes:
            return False
        self.close()
        size = max(_GROW_QUANTUM, -(-nbytes // _GROW_QUANTUM) * _GROW_QUANTUM)
        t = torch.zeros(size, dtype=torch.uint8, device=device)
        self.tensor, self.handle = t, export(t)
        self.created += 1
        return True

    def retire(self) -> None:
        """The next ``reserve`` allocates a new buffer: a receiver may still be reading this one."""
        self.close()

    def close(self) -> None:
        self.tensor, self.handle, self._layout = None, None, None  # freed once no receiver holds it

    def pack(self, plans: Sequence[BucketPlan], offsets: Sequence[int],
             after: torch.cuda.Event | None = None) -> list[int]:
        """Copy every bucket in, then checksum them; blocks until the GPU is done (run it on a worker
        thread). ``after``: an event recorded on the caller's stream after its last write to the
        tensors (the copies wait for it)."""
        arena = self.tensor
        assert arena is not None
        with torch.cuda.device(arena.device):
            if after is not None:
                torch.cuda.current_stream().wait_event(after)
            self._layout = pack_into(arena, plans, offsets, self._layout)
            return gpu_checksums(arena, offsets, [p.nbytes for p in plans])  # .tolist() waits for the copies


Layout = tuple[tuple[Any, ...], list[torch.Tensor]]  # (the layout's key, destination views in the arena)


def pack_into(arena: torch.Tensor, plans: Sequence[Any], offsets: Sequence[int], layout: Layout | None) -> Layout:
    """Copy the plans' tensors into ``arena`` at ``offsets`` with one multi-tensor copy. The views
    are built, and the arena zeroed (gaps and padding must be zeros for the checksum), only when the
    layout differs from ``layout`` (the previous push's): a training run pushes the same layout."""
    key = tuple((off + m.offset, m.dtype, tuple(m.shape)) for plan, off in zip(plans, offsets, strict=True)
                for m in plan.tensors)
    srcs = [t for plan in plans for t in plan.sources]
    if layout is None or layout[0] != key:
        arena.zero_()
        dsts = [arena[o:o + nbytes_of(t)].view(t.dtype).view(t.shape) for (o, _, _), t in zip(key, srcs, strict=True)]
        layout = (key, dsts)
    pairs = [(d, s) for d, s in zip(layout[1], srcs, strict=True) if s.numel()]
    if pairs:
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
    return layout


def export(t: torch.Tensor) -> CudaIpcHandle:
    """The IPC handle of a flat uint8 CUDA tensor that starts its storage (as ``reduce_tensor`` does)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    if t.storage_offset() != 0 or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError("export a flat uint8 tensor that starts its storage")
    fn, args = reduce_tensor(t)
    if fn is not rebuild_cuda_tensor:
        raise ValueError(f"tensor on {t.device} has no CUDA IPC handle")
    (_, _, _, _, _, _, _, handle, storage_size, storage_offset, _, ref_handle, ref_offset, event_handle,
     event_sync) = args
    return CudaIpcHandle(device_uuid=device_uuid(t.device), handle=bytes(handle).hex(), storage_size=int(storage_size),
                         storage_offset=int(storage_offset), ref_counter_handle=bytes(ref_handle).hex(),
                         ref_counter_offset=int(ref_offset), event_handle=bytes(event_handle or b"").hex(),
                         event_sync_required=bool(event_sync), nbytes=t.numel())


# -- receiver side -----------------------------------------------------------------------------
_opened: OrderedDict[str, torch.Tensor] = OrderedDict()


def arena_key(h: CudaIpcHandle) -> str:
    return f"{h.handle}:{h.storage_offset}"


def open_arena(h: CudaIpcHandle) -> str:
    """Open the trainer's arena in this process (once per handle; cached) and return its key for
    ``opened``. Raises ValueError if its GPU is not visible here, RuntimeError if CUDA refuses."""
    key = arena_key(h)
    if key in _opened:
        _opened.move_to_end(key)
        return key
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuids = visible_uuids()
    if h.device_uuid not in uuids:
        raise ValueError(f"GPU {h.device_uuid} is not visible in this process (visible: {uuids})")
    index = uuids.index(h.device_uuid)
    with torch.cuda.device(index):
        t = rebuild_cuda_tensor(torch.Tensor, (h.nbytes,), (1,), 0, torch.UntypedStorage, torch.uint8, index,
                                bytes.fromhex(h.handle), h.storage_size, h.storage_offset, False,
                                bytes.fromhex(h.ref_counter_handle), h.ref_counter_offset,
                                bytes.fromhex(h.event_handle), h.event_sync_required)
    _opened[key] = t
    while len(_opened) > _MAX_OPENED:
        _opened.popitem(last=False)  # closed once the last view on it is gone
    return key


def register_local(t: torch.Tensor) -> str:
    """Make this process's own CUDA buffer (nccl staging) reachable by key, like an opened arena."""
    key = f"local:{t.data_ptr():x}:{t.numel()}"
    _opened[key] = t
    _opened.move_to_end(key)
    while len(_opened) > _MAX_OPENED:
        _opened.popitem(last=False)
    return key


def opened(key: str) -> torch.Tensor:
    try:
        return _opened[key]
    except KeyError:
        raise ValueError(f"CUDA arena {key[:16]}... is not open in this process") from None


def close_all() -> None:
    _opened.clear()


_streams: dict[int, torch.cuda.Stream] = {}


def verify(key: str, offsets: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """The checksums of the buckets in an opened arena, computed on a side stream (generation may
    still be running on the default one); blocks until done: run it on a worker thread."""
    arena = opened(key)
    index = arena.device.index
    assert index is not None
    with torch.cuda.device(index):
        stream = _streams.get(index)
        if stream is None:
            stream = _streams[index] = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            return gpu_checksums(arena, offsets, sizes)


def synchronize_all() -> None:
    """Wait for every GPU of this process (the engine's copies out of the arena included)."""
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


async def prepare(arena: CudaArena, plans: Sequence[BucketPlan], device: torch.device, after: Any,
                  workers: Executor) -> tuple[list[int], list[int]]:
    """Trainer half: pack every bucket into the reused CUDA arena and checksum it on the GPU (on a
    worker thread: the launches and the final wait stay off the event loop). Returns each bucket's
    checksum and its offset in the arena."""
    offsets = arena_offsets([p.nbytes for p in plans])
    arena.reserve(offsets[-1] + padded(plans[-1].nbytes) if plans else 1, device)
    sums = await asyncio.get_running_loop().run_in_executor(workers, arena.pack, plans, offsets, after)
    return sums, offsets


class CudaIpcSender(Sender):
    same_host = needs_device = on_gpu = True

    def __init__(self) -> None:
        self.arena = CudaArena()

    async def prepare(self, push: Any, ranks: Sequence[str], workers: Executor) -> tuple[list[int], Payload]:
        sums, offsets = await prepare(self.arena, push.plans, push.device, push.cuda_after, workers)
        assert self.arena.handle is not None
        return sums, CudaIpcPayload(handle=self.arena.handle, offsets=offsets)

    def failed(self) -> None:
        self.arena.retire()

    def unwaited(self) -> None:
        self.arena.retire()

    def close(self) -> None:
        self.arena.close()


# -- receiver half: staging ----------------------------------------------------------------------
class CudaIpcStager(Stager):
    async def stage(self, ready: WeightsReady, pool: Executor, stall_timeout_s: float,
                    ) -> tuple[list[NamedTensor], list[Buffer], Where]:
        """Open the trainer's CUDA arena (cached), verify every bucket's GPU checksum; tensors are byte
        offsets into it, ``cuda_arena`` names the opened arena in this process."""
        payload = ready.payload
        assert isinstance(payload, CudaIpcPayload)
        h = payload.handle
        for meta, off in zip(ready.buckets, payload.offsets, strict=True):
            if off < 0 or off % ARENA_ALIGN or off + padded(meta.nbytes) > h.nbytes:
                raise StagingError(ErrorCode.BAD_FIELD, f"bucket {meta.index} at {off}+{meta.nbytes} outside the "
                                                        f"{h.nbytes}-byte CUDA arena or misaligned")
        try:
            key = await asyncio.get_running_loop().run_in_executor(pool, open_arena, h)
        except (RuntimeError, ValueError) as e:
            raise StagingError(ErrorCode.BAD_FIELD, f"cannot open the CUDA IPC handle: {e}") from None
        await verify_on_gpu(key, ready.buckets, payload.offsets, pool)
        return at_offsets(ready.buckets, payload.offsets), [], {"cuda_arena": key}

    def after_load(self) -> None:
        synchronize_all()  # the engine's copies out of the trainer's arena are done


async def verify_on_gpu(key: str, buckets: Sequence[BucketMeta], offsets: Sequence[int], pool: Executor) -> None:
    """Every bucket at ``offsets`` of the CUDA buffer ``key`` against its announced GPU checksum
    (cuda_ipc and nccl)."""
    sums = await asyncio.get_running_loop().run_in_executor(pool, verify, key, offsets, [m.nbytes for m in buckets])
    raise_problems([None if got == m.checksum else
                     f"bucket {m.index}: GPU checksum {got:#018x}, announced {m.checksum:#018x}"
                     for m, got in zip(buckets, sums, strict=True)])
