"""How tensors travel to SGLang's load calls: greedy buckets of ``weight_bucket_bytes``, CPU
tensors staged in shared memory, CUDA tensors as IPC handles (per tensor, or one
"flattened_bucket" per bucket), one payload per TP rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

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


def flat_bucket(bucket: list[tuple[str, torch.Tensor]], *, copy: bool,
                device_type: str = "cuda") -> tuple[torch.Tensor, list[tuple[str, torch.Size, torch.dtype, int, int]]]:
    """The bucket as one flat uint8 tensor and (name, shape, dtype, start, end) byte ranges in it
    (SGLang's "flattened_bucket" load format: one IPC handle for the whole bucket instead of one
    per tensor). Contiguous views of one storage laid out as densely as the trainer's arena lays
    them out become one slice of that storage (``copy``: one device copy of it); anything else is
    copied tensor by tensor into a fresh buffer."""
    ts = [t for _, t in bucket]
    assert ts and all(t.device.type == device_type for t in ts), "a flat bucket holds tensors of one device type"
    spans = [(int(t.storage_offset()) * t.element_size(), t.numel() * t.element_size()) for t in ts]
    lo, hi = min(a for a, _ in spans), max(a + n for a, n in spans)
    lo -= lo % 256  # keeps every view's offset a multiple of its element size
    one_storage = len({(t.device, t.untyped_storage().data_ptr()) for t in ts}) == 1
    if one_storage and all(t.is_contiguous() for t in ts) and hi - lo <= 1.25 * sum(n for _, n in spans) + 4096:
        whole = torch.empty(0, dtype=torch.uint8, device=ts[0].device).set_(ts[0].untyped_storage())
        flat = whole[lo:hi].clone() if copy else whole[lo:hi]
        return flat, [(name, t.shape, t.dtype, a - lo, a - lo + n)
                      for (name, t), (a, n) in zip(bucket, spans, strict=True)]
    flat = torch.empty(sum((n + 255) // 256 * 256 for _, n in spans), dtype=torch.uint8, device=ts[0].device)
    metas, off = [], 0
    for (name, t), (_, n) in zip(bucket, spans, strict=True):
        flat[off:off + n].view(t.dtype).view(t.shape).copy_(t)
        metas.append((name, t.shape, t.dtype, off, off + n))
        off += (n + 255) // 256 * 256
    return flat, metas


def serialize_flat(serializer: Any, bucket: list[tuple[str, torch.Tensor]], meta_cls: Any,
                    ranks: int) -> list[Any]:
    """A CUDA bucket in SGLang's "flattened_bucket" format, one payload per TP rank (see
    ``serialize``). A slice of this process's own memory is shared as it is; memory this process
    opened from another one (the cuda_ipc transport's view of the trainer's arena), which torch
    cannot re-share, is copied once into a buffer of its own (torch keeps that block alive until
    SGLang's scheduler lets go of it)."""
    for copy in (False, True):
        flat, spans = flat_bucket(bucket, copy=copy)
        payload = {"flattened_tensor": flat,
                   "metadata": [meta_cls(name=name, shape=shape, dtype=dtype, start_idx=a, end_idx=b, numel=b - a)
                                for name, shape, dtype, a, b in spans]}
        try:
            first = serializer.serialize(payload)
        except RuntimeError as e:
            if copy or "received from another process" not in str(e):
                raise
            continue
        return [first] + [serializer.serialize(payload) for _ in range(ranks - 1)]
    raise AssertionError("unreachable")
