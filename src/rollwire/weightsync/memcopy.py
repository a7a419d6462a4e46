"""Copying a version's tensors into live parameters on several threads at once.

``torch.Tensor.copy_`` parallelises a large copy over its intra-op threads, but called from a worker
thread of a server (the hf engine copies on its scheduler's thread, beside an event loop and the
receiver's verify threads) it ran at 11-13 ms for 107 MB on this 2-core machine, where the same copy
in 1 MiB ``memmove`` pieces taken by two threads ran at 9-10 ms in the same server (and both at
~8.5 ms in a quiet process). ``ctypes.memmove`` releases the GIL, so the threads copy at once.

Only plain byte copies go this way: both tensors on the CPU, contiguous, of one dtype and size.
Anything else (a CUDA parameter, a strided view) is left to ``copy_``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from concurrent.futures import Executor

import torch

PIECE_BYTES = 1 << 20  # a unit of work: small enough to share evenly, large enough that calls cost nothing


def byte_copyable(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """True if copying ``src`` into ``dst`` is one memmove of their bytes."""
    return (dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype
            and dst.numel() == src.numel() and dst.is_contiguous() and src.is_contiguous())


def copy_bytes(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], pool: Executor | None, threads: int) -> None:
    """Copy each ``src`` into its ``dst`` (pairs that ``byte_copyable`` accepts), cut in PIECE_BYTES
    pieces taken in turn by this thread and ``threads - 1`` workers of ``pool``. Blocks."""
    jobs = []
    for dst, src in pairs:
        n = dst.numel() * dst.element_size()
        d, s = dst.data_ptr(), src.data_ptr()
        if d != s:
            jobs += [(d + o, s + o, min(PIECE_BYTES, n - o)) for o in range(0, n, PIECE_BYTES)]
    todo = iter(jobs)  # shared: each thread takes the next piece (next() is atomic)

    def work() -> None:
        for d, s, n in todo:
            ctypes.memmove(d, s, n)

    helpers = [pool.submit(work) for _ in range(threads - 1)] if pool is not None and len(jobs) > 1 else []
    work()
    for f in helpers:
        if not f.cancel():  # one still queued has nothing left to do
            f.result()
