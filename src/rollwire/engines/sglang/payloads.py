"""How tensors travel to SGLang's load calls: greedy buckets of ``weight_bucket_bytes``, CPU
tensors staged in shared memory, CUDA tensors as IPC handles (per tensor, or one
"flattened_bucket" per bucket), one payload per TP rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.multiprocessing import reductions

from rollwire.runtime.logging import get_logger

log = get_logger("rollwire.sglang.payloads")

T = TypeVar("T")
Spec = tuple[str, tuple[int, ...], str]  # name, shape, dtype: a tensor an NCCL broadcast will bring


def greedy_buckets(items: list[T], nbytes: Callable[[T], int], bucket_bytes: int) -> list[list[T]]:
    """Greedy packing in order; an item larger than a bucket goes alone."""
    out: list[list[T]] = []
    size = 0
    for item in items:
        n = nbytes(item)
        if not out or size + n > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


def tensor_buckets(items: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    return greedy_buckets([(n, t.detach()) for n, t in items], lambda it: it[1].numel() * it[1].element_size(),
                          bucket_bytes)


def spec_buckets(items: list[Spec], bucket_bytes: int) -> list[list[Spec]]:
    def nbytes(spec: Spec) -> int:
        return torch.Size(spec[1]).numel() * torch.empty((), dtype=getattr(torch, spec[2])).element_size()

    return greedy_buckets(items, nbytes, bucket_bytes)


def stage_cpu(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """CPU tensors of a bucket copied into one shared-memory block (one handle for SGLang's
    scheduler to open; any source storage works, read-only frames and mmaps included). CUDA
    tensors travel as CUDA IPC handles, unchanged."""
    todo = [i for i, (_, t) in enumerate(bucket) if t.device.type == "cpu" and not t.is_shared()]
    if not todo:
        return bucket
    sizes = {i: bucket[i][1].numel() * bucket[i][1].element_size() for i in todo}
    flat = torch.empty(sum((n + 63) // 64 * 64 for n in sizes.values()), dtype=torch.uint8).share_memory_()
    out = list(bucket)
    off = 0
    for i in todo:
        name, t = bucket[i]
        view = flat[off: off + sizes[i]].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[i] = (name, view)
        off += (sizes[i] + 63) // 64 * 64
    return out


def serialize(serializer: Any, bucket: list[tuple[str, torch.Tensor]], ranks: int) -> list[Any]:
    """One payload per TP rank (as sglang.Engine does: torch's CUDA IPC reference count expects one
    share per consumer). SGLang's serializer shares CUDA tensors by IPC handle. torch cannot
    re-share memory this process itself opened from another process (rollwire's cuda_ipc
    transport hands the engine views of the trainer's buffer): such a bucket is copied into this
    process's own CUDA memory first (torch keeps a shared block alive until the consumer lets go)."""
    try:
        first = serializer.serialize(bucket)
    except RuntimeError as e:
        if "received from another process" not in str(e):
            raise
        bucket = [(name, t.clone() if t.is_cuda else t) for name, t in bucket]
        first = serializer.serialize(bucket)
    return [first] + [serializer.serialize(bucket) for _ in range(ranks - 1)]


def flat_bucket(bucket: list[tuple[str, torch.Tensor]], *, copy: bool, device_type: str = "cuda",
                into: Callable[[int, torch.device], torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, list[tuple[str, torch.Size, torch.dtype, int, int]]]:
    """The bucket as one flat uint8 tensor and (name, shape, dtype, start, end) byte ranges in it
    (SGLang's "flattened_bucket" load format: one IPC handle for the whole bucket instead of one
    per tensor). Contiguous views of one storage laid out as densely as the trainer's arena lays
    them out become one slice of that storage (``copy``: one device copy of it); anything else is
    copied tensor by tensor into a fresh buffer. ``into(nbytes, device)``: where copies go (a
    buffer reused across loads) instead of fresh memory."""
    ts = [t for _, t in bucket]
    assert ts and all(t.device.type == device_type for t in ts), "a flat bucket holds tensors of one device type"
    alloc = into or (lambda n, dev: torch.empty(n, dtype=torch.uint8, device=dev))
    spans = [(int(t.storage_offset()) * t.element_size(), t.numel() * t.element_size()) for t in ts]
    lo, hi = min(a for a, _ in spans), max(a + n for a, n in spans)
    lo -= lo % 256  # keeps every view's offset a multiple of its element size
    one_storage = len({(t.device, t.untyped_storage().data_ptr()) for t in ts}) == 1
    if one_storage and all(t.is_contiguous() for t in ts) and hi - lo <= 1.25 * sum(n for _, n in spans) + 4096:
        whole = torch.empty(0, dtype=torch.uint8, device=ts[0].device).set_(ts[0].untyped_storage())
        flat = alloc(hi - lo, ts[0].device).copy_(whole[lo:hi]) if copy else whole[lo:hi]
        return flat, [(name, t.shape, t.dtype, a - lo, a - lo + n)
                      for (name, t), (a, n) in zip(bucket, spans, strict=True)]
    flat = alloc(sum((n + 255) // 256 * 256 for _, n in spans), ts[0].device)
    metas, off = [], 0
    for (name, t), (_, n) in zip(bucket, spans, strict=True):
        flat[off:off + n].view(t.dtype).view(t.shape).copy_(t)
        metas.append((name, t.shape, t.dtype, off, off + n))
        off += (n + 255) // 256 * 256
    return flat, metas


# torch keeps CUDA IPC reference counts in /dev/shm files made by at::RefcountedMapAllocator: a
# 64-byte header (its own count of mappings), then one int64 per share at the share's offset
_COUNTER_FILE_HEADER = 64


def ipc_refcount(counter_file: bytes | str, offset: int) -> int | None:
    """torch's producer-side reference count of one CUDA IPC share (the ``ref_counter_handle`` and
    ``ref_counter_offset`` its ``reduce_tensor`` gave): 1 when shared, 0 once the consumer let go of
    it, having synchronized its stream first. None if the count cannot be read."""
    name = counter_file.decode() if isinstance(counter_file, bytes) else counter_file
    try:
        with open("/dev/shm/" + name.lstrip("/"), "rb") as f:
            f.seek(_COUNTER_FILE_HEADER + offset * 8)
            word = f.read(8)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return int.from_bytes(word, "little", signed=True) if len(word) == 8 else None


class Prebuilt:
    """A tensor already reduced for pickling (``reduce_tensor``'s function and arguments): the share
    is made here, so its reference count is known, and pickles as the tensor would."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]]:
        return self.fn, self.args


class FlatStaging:
    """The CUDA buffer a flat bucket is copied into when its tensors cannot be shared where they lie
    (views of the trainer's arena, which this process opened: torch cannot re-share them), kept
    from one load to the next: a fresh buffer per load cost an allocation of the whole bucket and a
    new IPC handle for SGLang's scheduler to open, every push. It is written again only once every
    share of it handed to the scheduler was let go (``ipc_refcount`` reads 0; the scheduler's torch
    synchronizes its stream before it lets go); otherwise a new buffer is allocated, and torch keeps
    the old one alive until the scheduler lets go of it. Each share wraps the buffer's memory in
    one more torch record (a counter slot, a CUDA event) that lives as long as the buffer, so after
    ``MAX_SHARES`` shares a new buffer is allocated anyway."""

    MAX_SHARES = 64

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.allocated = 0  # buffers allocated so far (tests and benchmarks check reuse)
        self._shares: list[tuple[bytes, int]] = []  # reference counts of the shares handed out
        # a share's count did not read 1 when it was made: this torch keeps its counts elsewhere,
        # so none is trusted and every load gets a fresh buffer (as before the reuse)
        self.counts_unreadable = False

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        buf = self.buffer
        if (buf is None or buf.device != device or buf.numel() < nbytes or len(self._shares) >= self.MAX_SHARES
                or self.counts_unreadable or any(ipc_refcount(f, off) != 0 for f, off in self._shares)):
            self.buffer = buf = None  # dropped before the next one is allocated (peak memory)
            self.buffer = buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._shares = []
            self.allocated += 1
        return buf[:nbytes]

    def share(self, t: torch.Tensor) -> Prebuilt:
        fn, args = reductions.reduce_tensor(t)
        counter = (args[11], int(args[12]))  # ref_counter_handle, ref_counter_offset
        if ipc_refcount(*counter) != 1 and not self.counts_unreadable:
            self.counts_unreadable = True
            log.warning("ipc_refcount_unreadable", counter=repr(counter)[:120], fallback="a fresh buffer per load")
        self._shares.append(counter)
        return Prebuilt(fn, args)

    def close(self) -> None:
        self.buffer, self._shares = None, []


def serialize_flat(serializer: Any, bucket: list[tuple[str, torch.Tensor]], meta_cls: Any,
                   ranks: int, staging: FlatStaging | None = None) -> list[Any]:
    """A CUDA bucket in SGLang's "flattened_bucket" format, one payload per TP rank (see
    ``serialize``). A slice of this process's own memory is shared as it is; memory this process
    opened from another one (the cuda_ipc transport's view of the trainer's arena), which torch
    cannot re-share, is copied once into ``staging`` (or a fresh buffer), each rank's share made
    there so that its reference count is known."""
    flat, spans = flat_bucket(bucket, copy=False)
    metadata = [meta_cls(name=name, shape=shape, dtype=dtype, start_idx=a, end_idx=b, numel=b - a)
                for name, shape, dtype, a, b in spans]
    try:  # shareable where it lies: the serializer shares it once per rank, as any tensor (the
        # tensor goes first: memory opened from another process fails before the metadata is pickled)
        return [serializer.serialize({"flattened_tensor": flat, "metadata": metadata}) for _ in range(ranks)]
    except RuntimeError as e:
        if "received from another process" not in str(e):
            raise
    staging = staging or FlatStaging()
    flat, _ = flat_bucket(bucket, copy=True, into=staging.take)
    tensors = [staging.share(flat) for _ in range(ranks)]
    return [serializer.serialize({"flattened_tensor": t, "metadata": metadata}) for t in tensors]
