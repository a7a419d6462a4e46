"""crc32 of weight buckets, as fast as the machine allows.

The checksum is zlib's crc32 (the value ``zlib.crc32`` returns). ISA-L (package ``isal``) computes
the same value with carry-less multiplication, about 3x faster than zlib here, and offers
``crc32_combine``: a bucket is then cut into pieces that worker threads checksum in parallel (the
crc functions release the GIL) and the pieces' values are combined in order. Without ``isal`` a
bucket is checksummed in one piece with zlib: the same value, slower.

Measured on this 2-core machine, 107 MB: one thread 8.9 GiB/s, two threads on 4 MiB pieces
13 GiB/s (ISA-L); zlib 2-3 GiB/s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from rollwire.messages.codec import Buffer

crc32: Callable[..., int]
crc32_combine: Callable[[int, int, int], int] | None
try:
    from isal.isal_zlib import crc32, crc32_combine
except ImportError:  # pragma: no cover - exercised where isal is not installed
    from zlib import crc32

    crc32_combine = None

MIN_PART_BYTES = 4 << 20  # below this a part is not worth a thread
MAX_PARTS = 8  # a few parts per core keeps the threads evenly busy, without many tiny tasks


def _views(bufs: Sequence[Buffer]) -> list[memoryview]:
    out = []
    for b in bufs:
        mv = memoryview(b)
        out.append(mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B"))
    return out


def _split(views: list[memoryview], parts: int) -> list[list[memoryview]]:
    """Cut the concatenation of ``views`` into ``parts`` runs of about equal size, in order."""
    total = sum(len(v) for v in views)
    size = -(-total // parts)
    out: list[list[memoryview]] = [[]]
    room = size
    for v in views:
        while len(v):
            take = v[:room]
            out[-1].append(take)
            v, room = v[len(take):], room - len(take)
            if room == 0:
                out.append([])
                room = size
    return [p for p in out if p]


def crc32_of(bufs: Sequence[Buffer]) -> int:
    """crc32 of the concatenation of ``bufs``, on this thread."""
    crc = 0
    for b in bufs:
        crc = crc32(b, crc)
    return crc


async def crc32_parallel(bufs: Sequence[Buffer], pool: Executor) -> int:
    """crc32 of the concatenation of ``bufs``, computed on ``pool``'s threads."""
    loop = asyncio.get_running_loop()
    views = _views(bufs)
    total = sum(len(v) for v in views)
    parts = 1 if crc32_combine is None else max(1, min(MAX_PARTS, total // MIN_PART_BYTES))
    if parts == 1:
        return await loop.run_in_executor(pool, crc32_of, views)
    runs = _split(views, parts)
    sums = await asyncio.gather(*(loop.run_in_executor(pool, crc32_of, run) for run in runs))
    crc = 0
    for run, s in zip(runs, sums, strict=True):
        crc = crc32_combine(crc, s, sum(len(v) for v in run))  # type: ignore[misc]
    return crc
