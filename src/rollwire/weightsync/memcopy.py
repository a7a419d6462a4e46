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
16-thread memcpy, and more than 8 threads only contend (``MAX_THREADS``).
"""

from __future__ import annotations

import bisect
import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
import xxhash

from rollwire.weightsync import checksum
from rollwire.weightsync.checksum import PIECE_BYTES as HASH_PIECE_BYTES
from rollwire.weightsync.checksum import fold, piece_digest

PIECE_BYTES = 1 << 20  # a unit of work: small enough to share evenly, large enough that calls cost nothing
# memory bandwidth, not cores, bounds a copy: on the 16-core GPU host (2026-12-07) an shm push of
# 107 MB took 7.8 ms on 8 threads, 9.9 on 16, 10.0 on 4 (1 GB: 54, 89, 82 ms): past 8, the threads
# only contend (for memory and for the GIL between pieces)
MAX_THREADS = 8

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def copy_threads() -> int:
    """Threads a weight copy or checksum pass uses in this process (the caller's included);
    ``ROLLWIRE_COPY_THREADS`` sets it (for measurement: how many threads a host's memory needs)."""
    chosen = os.environ.get("ROLLWIRE_COPY_THREADS")
    if chosen is not None:
        try:
            threads = int(chosen)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"ROLLWIRE_COPY_THREADS must be a whole number of threads >= 1, not {chosen!r}")
        return threads
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

    run_shared(work, pool if len(jobs) > 1 else None, threads)


def run_shared(work: Callable[[], None], pool: Executor | None, threads: int) -> None:
    """Run ``work`` (which takes pieces from a shared iterator until none is left) on this thread
    and ``threads - 1`` workers of ``pool`` at once; returns when all are done, raising the first
    error any of them raised (after every one has stopped: no thread copies on behind the caller)."""
    helpers = [pool.submit(work) for _ in range(threads - 1)] if pool is not None else []
    errors: list[BaseException] = []
    try:
        work()
    except BaseException as e:
        errors.append(e)
    for f in helpers:
        if not f.cancel():  # one still queued has nothing left to do
            try:
                f.result()
            except BaseException as e:
                errors.append(e)
    if errors:
        raise errors[0]


# -- copying while verifying ---------------------------------------------------------------------
CopyOp = tuple[int, int, int, int]  # (where in the hashed range, dst, src: 0 zeroes, -1 nothing to do, bytes)


def copy_and_digest(ops: Sequence[CopyOp], lo: int, hi: int) -> int:
    """Run ``ops`` (sorted by their place in the hashed bytes [lo, hi), not overlapping: memmove
    ``n`` bytes ``src`` -> ``dst``, or zero ``dst``) and return the xxh3-64 digest of the bytes at
    addresses [lo, hi), each run of ``checksum.HASH_RUN_BYTES`` hashed right after the ops that
    touch it (while still in cache). The hashed bytes are the destination (packing) or the source
    (copying out of an arena) of the ops."""
    run = checksum.HASH_RUN_BYTES
    if run >= hi - lo:
        for _, d, s, n in ops:
            _do(d, s, n)
        return piece_digest((ctypes.c_char * (hi - lo)).from_address(lo))
    h = xxhash.xxh3_64()
    i, done = 0, 0  # the op under way, and how many of its bytes are done
    for q0 in range(lo, hi, run):
        q1 = min(q0 + run, hi)
        while i < len(ops):
            pos, d, s, n = ops[i]
            if pos + done >= q1:
                break
            take = min(pos + n, q1) - pos - done
            _do(d + done, s + done if s > 0 else s, take)
            done += take
            if done < n:
                break
            i, done = i + 1, 0
        h.update((ctypes.c_char * (q1 - q0)).from_address(q0))
    return h.intdigest()


def _do(d: int, s: int, n: int) -> None:
    if s > 0:
        ctypes.memmove(d, s, n)
    elif s == 0:
        ctypes.memset(d, 0, n)


class PartlyCopied(Exception):
    """``copy_verified`` stopped on an error (its ``__cause__``) after bytes had gone into the
    destinations: they hold part of what was being copied."""


class PieceWaiter(Protocol):
    """Bytes another process is still writing (``arena_header.HeaderReader``)."""

    def wait_piece(self, bucket: int, k: int) -> None:
        """Block until checksum piece ``k`` of bucket ``bucket`` is written (or raise)."""

    def checksums(self) -> list[int]:
        """Every bucket's checksum, once all is written (or raise)."""


@dataclass(frozen=True)
class ByteCheck:
    """Bytes still to verify: ``data`` (a flat uint8 CPU view of one announced bucket) must hash to
    ``checksum`` (``checksum.py``). The view keeps the memory under it alive. ``written``: the
    trainer is still writing them; each piece is copied once it is written, and the checksum to
    compare with is the one it writes last (``checksum`` is then unused)."""

    index: int  # the bucket's index in its version, for the error message
    data: torch.Tensor
    checksum: int
    written: PieceWaiter | None = None


def copy_verified(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], checks: Sequence[ByteCheck],
                  pool: Executor | None, threads: int) -> list[int]:
    """Copy each ``src`` into its ``dst`` (``byte_copyable`` pairs) and hash every check's bytes in
    the same pass: a piece of a checked bucket is hashed right after the copies that read it, while
    it is still in cache (nearly free next to the copy, where a separate pass reads the bytes from
    memory once more). Pairs whose source is not inside one checked bucket are copied afterwards.
    Returns the indices of the checks whose bytes did not hash to their checksum; the copies are
    made whatever the outcome (the caller decides what a failed check means for the destinations).
    A failed wait for bytes still being written raises its error, or ``PartlyCopied`` from it once
    anything was copied.
    Blocks: run it on a worker thread. ``pairs=[]``: a plain verification pass."""
    spans = sorted((c.data.data_ptr(), c.data.data_ptr() + c.data.numel(), i) for i, c in enumerate(checks))
    inside: list[tuple[int, int, int]] = []  # (src start, src end, dst), each inside one span
    rest = []
    for dst, src in pairs:
        s, n = src.data_ptr(), dst.numel() * dst.element_size()
        k = bisect.bisect_right(spans, (s, float("inf"))) - 1
        if k >= 0 and s + n <= spans[k][1] and dst.data_ptr() != s:
            inside.append((s, s + n, dst.data_ptr()))
        else:
            rest.append((dst, src))
    inside.sort()
    jobs = []  # (check, piece index, piece start, piece end, [(dst, src, n)])
    j, active = 0, []  # sweep: pairs whose source starts before the current piece ends
    for start, end, ci in spans:
        for k, p0 in enumerate(range(start, end, HASH_PIECE_BYTES)):
            p1 = min(p0 + HASH_PIECE_BYTES, end)
            while j < len(inside) and inside[j][0] < p1:
                active.append(inside[j])
                j += 1
            active = [a for a in active if a[1] > p0]
            ops = [(a, d + a - s, a, min(e, p1) - a) for s, e, d in active if s < p1 for a in (max(s, p0),)]
            jobs.append((ci, k, p0, p1, ops))
    digests: list[list[int]] = [[0] * -(-c.data.numel() // HASH_PIECE_BYTES) for c in checks]
    todo = iter(jobs)  # shared: each thread takes the next piece (next() is atomic)

    waiters = [c.written for c in checks]
    copied = [False]  # set before the first byte goes into a destination (any thread)

    def work() -> None:
        for ci, k, p0, p1, ops in todo:
            waiter = waiters[ci]
            if waiter is not None:
                waiter.wait_piece(checks[ci].index, k)
            if ops:
                copied[0] = True
            digests[ci][k] = copy_and_digest(ops, p0, p1)

    try:
        run_shared(work, pool if len(jobs) > 1 else None, threads)
    except Exception as e:  # a wait failed (the writer stopped): say whether anything was copied
        if copied[0]:
            raise PartlyCopied(str(e)) from e
        raise
    if rest:
        copy_bytes(rest, pool, threads)
    expected = [c.checksum if c.written is None else c.written.checksums()[c.index] for c in checks]
    return [c.index for c, d, e in zip(checks, digests, expected, strict=True) if fold(d) != e]
