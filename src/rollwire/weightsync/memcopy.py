"""Copying a version's tensors into live parameters on several threads at once.

``torch.Tensor.copy_`` parallelises a large copy over its intra-op threads, but called from a worker
thread of a server (the hf engine copies on its scheduler's thread, beside an event loop and the
receiver's verify threads) it ran at 11-13 ms for 107 MB on this 2-core machine, where the same copy
in 1 MiB ``memmove`` pieces taken by two threads ran at 9-10 ms in the same server (and both at
~8.5 ms in a quiet process). ``ctypes.memmove`` releases the GIL, so the threads copy at once.

Only plain byte copies go this way: both tensors on the CPU, contiguous, of one dtype and size.
Anything else (a CUDA parameter, a strided view) is left to ``copy_``.

``copy_threads`` and ``copy_pool``: how many threads a process copies and hashes weights with, as
many as torch computes with (the floor a push is measured against copies on those), at most
``MAX_THREADS``; the pool has that many threads (a copy's caller works too and takes one fewer
helper; a checksum pass runs on the pool alone) and is made once per process. On the 2-core
machine this changes nothing; on a 16-core host a 2-thread pack and verify cannot keep up with a
16-thread memcpy.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import torch

PIECE_BYTES = 1 << 20  # a unit of work: small enough to share evenly, large enough that calls cost nothing
MAX_THREADS = 16  # memory bandwidth, not cores, bounds a copy well before this

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def copy_threads() -> int:
    """Threads a weight copy or checksum pass uses in this process (the caller's included)."""
    return max(2, min(torch.get_num_threads(), os.cpu_count() or 1, MAX_THREADS))


def copy_pool() -> ThreadPoolExecutor:
    """The process's threads for weight copies and checksums (``copy_threads()`` of them), made on
    first use. Work on it never blocks on other work on it (callers take pieces themselves)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(copy_threads(), thread_name_prefix="rw-copy")
        return _pool


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
