"""Bucket checksums of a flat buffer that stays in GPU memory (cuda_ipc and nccl; the CPU runs the
same arithmetic in tests).

xxh3 has no GPU kernel in torch, and what a checksum catches here is a wrong handle, offset or
layout, or a buffer rewritten too early, not wire corruption. So each bucket, zero-padded to
``ARENA_ALIGN`` bytes, is read as int64 words in rows of 512, and three sums are taken modulo 2**64
(integer sums: exact whatever the reduction order, equal on CPU and GPU): all words, the row sums
weighted by row index, the column sums weighted by column index. A changed word changes the first;
two swapped unequal words change the second or the third; a shifted layout changes them all. The
three sums of every bucket come back in one host transfer and are hashed (blake2b) to the bucket's
64-bit checksum. An integrity check against bugs, not against an adversary.

On a CUDA device with Triton (every CUDA build of torch carries it), one kernel reads each bucket
once, writing its row sums and per-program column sums; torch's own reductions need two passes
(row sums, then column sums), and the checksum was most of the receiver's own cost of a cuda_ipc
push (2.2 ms of 18 for 988 MB on an H100). ``ROLLWIRE_GPU_CHECKSUM=torch`` forces the two-pass
path (a measurement knob; both give the same checksums, tests/gpu checks it).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from typing import Any

import torch

from rollwire.runtime.logging import get_logger

log = get_logger("rollwire.gpu_checksum")

ARENA_ALIGN = 4096  # bucket offsets and checksum padding: whole rows of 512 int64 words
ROW_WORDS = ARENA_ALIGN // 8
_PROGRAMS = 1024  # Triton programs per bucket (a persistent grid: each loops over its rows)
_BLOCK_ROWS = 4


def padded(n: int) -> int:
    return (n + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN


def _triton_kernel() -> Any:
    """The one-pass kernel, compiled on first use; None without Triton (or when forced off)."""
    global _KERNEL
    if _KERNEL is not False:
        return _KERNEL
    _KERNEL = None
    if os.environ.get("ROLLWIRE_GPU_CHECKSUM", "triton") == "torch":
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def sums(words, row_out, col_out, n_rows, ROWS: tl.constexpr, COLS: tl.constexpr):  # type: ignore[no-untyped-def]
        pid = tl.program_id(0)  # its rows: pid*ROWS.. in each sweep of programs x ROWS rows
        step = tl.num_programs(0) * ROWS
        cols = tl.arange(0, COLS)
        acc = tl.zeros([COLS], dtype=tl.int64)
        for i in range(0, tl.cdiv(n_rows, step)):
            rows = pid * ROWS + i * step + tl.arange(0, ROWS)
            keep = rows < n_rows
            x = tl.load(words + rows.to(tl.int64)[:, None] * COLS + cols[None, :], mask=keep[:, None], other=0)
            tl.store(row_out + rows, tl.sum(x, axis=1), mask=keep)
            acc += tl.sum(x, axis=0)
        tl.store(col_out + pid * COLS + cols, acc)

    _KERNEL = sums
    return _KERNEL


_KERNEL: Any = False  # False: not tried yet


def _row_and_col_sums(words: torch.Tensor, starts: Sequence[int], counts: Sequence[int]) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Every row's sum, and each bucket's column sums ([buckets, ROW_WORDS])."""
    global _KERNEL
    dev = words.device
    kernel = _triton_kernel() if dev.type == "cuda" else None
    if kernel is not None:
        try:
            return _one_pass(kernel, words, starts, counts)
        except torch.cuda.OutOfMemoryError:
            raise  # the GPU's state, not the kernel's: the two-pass way would need memory too
        except Exception as e:  # a Triton that cannot compile or launch here (no C compiler, ...): torch's way
            log.warning("gpu_checksum_kernel_failed", error=repr(e)[:300], fallback="two torch reductions")
            _KERNEL = None
    rows = words.sum(dim=1)
    zero = torch.zeros(ROW_WORDS, dtype=torch.int64, device=dev)
    return rows, torch.stack([words[s:s + c].sum(dim=0) if c else zero for s, c in zip(starts, counts, strict=True)])


def _one_pass(kernel: Any, words: torch.Tensor, starts: Sequence[int], counts: Sequence[int]) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    dev = words.device
    rows = torch.zeros(words.shape[0], dtype=torch.int64, device=dev)  # rows no bucket covers: 0
    cols = []
    for s, c in zip(starts, counts, strict=True):
        programs = max(1, min(_PROGRAMS, -(-c // _BLOCK_ROWS)))
        part = torch.zeros(programs, ROW_WORDS, dtype=torch.int64, device=dev)
        if c:
            kernel[(programs,)](words[s:s + c], rows[s:s + c], part, c, ROWS=_BLOCK_ROWS, COLS=ROW_WORDS)
        cols.append(part.sum(dim=0))
    return rows, torch.stack(cols)


def gpu_checksums(arena: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """The 64-bit checksum of each bucket ``arena[off:off + padded(size)]`` (padding included, so it
    must be zeros; ``off`` a multiple of ``ARENA_ALIGN``). Works on any device; a few launches
    whatever the number of buckets, one host transfer for all of them."""
    if not offsets:
        return []
    dev = arena.device
    starts = [off // ARENA_ALIGN for off in offsets]  # buckets as runs of rows
    counts = [padded(n) // ARENA_ALIGN for n in sizes]
    end = max(s + c for s, c in zip(starts, counts, strict=True))
    words = arena[:end * ARENA_ALIGN].view(torch.int64).view(end, ROW_WORDS)
    rows, cols = _row_and_col_sums(words, starts, counts)
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    r = torch.arange(1, end + 1, dtype=torch.int64, device=dev)  # global row index + 1
    prefix = torch.cat([zero, rows.cumsum(0)])
    prefix_r = torch.cat([zero, (rows * r).cumsum(0)])
    st = torch.tensor(starts, dtype=torch.int64, device=dev)
    en = st + torch.tensor(counts, dtype=torch.int64, device=dev)
    total = prefix[en] - prefix[st]
    by_row = prefix_r[en] - prefix_r[st] - st * total  # weights local row index + 1
    by_col = (cols * torch.arange(1, ROW_WORDS + 1, dtype=torch.int64, device=dev)).sum(dim=1)
    values = torch.stack([total, by_row, by_col], dim=1).tolist()
    return [int.from_bytes(hashlib.blake2b(struct.pack("<3q", *v), digest_size=8).digest(), "little")
            for v in values]
