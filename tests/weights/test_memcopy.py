"""The parallel byte copy the hf engine loads CPU weights with."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rollwire.weightsync import checksum as checksum_module
from rollwire.weightsync.checksum import PIECE_BYTES as HASH_PIECE
from rollwire.weightsync.checksum import checksum_of
from rollwire.weightsync.memcopy import (
    PIECE_BYTES,
    ByteCheck,
    byte_copyable,
    copy_bytes,
    copy_pool,
    copy_threads,
    copy_verified,
)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_copy_bytes_copies_every_tensor_exactly_whatever_its_size(threads: int) -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [0, 1, 7, PIECE_BYTES // 2 - 1, PIECE_BYTES // 2, PIECE_BYTES // 2 + 3, 3 * PIECE_BYTES // 2 + 1]
    srcs = [torch.randn(n, generator=g).to(torch.bfloat16) for n in sizes]
    dsts = [torch.zeros_like(s) for s in srcs]
    with ThreadPoolExecutor(2) as pool:
        copy_bytes(list(zip(dsts, srcs, strict=True)), pool, threads)
    for d, s in zip(dsts, srcs, strict=True):
        assert torch.equal(d.view(torch.int16), s.view(torch.int16))


def test_copy_bytes_without_a_pool_copies_on_this_thread() -> None:
    src = torch.arange(3 * PIECE_BYTES, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    copy_bytes([(dst, src)], None, 4)
    assert torch.equal(dst, src)


def test_a_tensor_copied_onto_itself_is_left_as_it_is() -> None:
    t = torch.arange(1000, dtype=torch.float32)
    copy_bytes([(t, t)], None, 1)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32))


def test_only_plain_cpu_byte_copies_are_byte_copyable() -> None:
    a = torch.zeros(4, 6)
    assert byte_copyable(a, torch.ones(4, 6))
    assert not byte_copyable(a, torch.ones(6, 4).t())  # strided source
    assert not byte_copyable(a, torch.ones(4, 6, dtype=torch.float64))
    assert not byte_copyable(a, torch.ones(4, 5))


def test_the_copy_pool_is_made_once_with_at_least_two_threads() -> None:
    assert copy_threads() >= 2
    assert copy_pool() is copy_pool()
    assert copy_pool()._max_workers == copy_threads()


def test_rollwire_copy_threads_sets_the_thread_count_and_nonsense_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLWIRE_COPY_THREADS", "5")
    assert copy_threads() == 5
    for bad in ("0", "-2", "four", ""):
        monkeypatch.setenv("ROLLWIRE_COPY_THREADS", bad)
        with pytest.raises(ValueError, match="ROLLWIRE_COPY_THREADS"):
            copy_threads()


def _buckets(sizes: list[int], seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One arena holding buckets of ``sizes`` back to back (random bytes), and each bucket's view."""
    g = torch.Generator().manual_seed(seed)
    arena = torch.randint(0, 256, (sum(sizes),), dtype=torch.uint8, generator=g)
    views, off = [], 0
    for n in sizes:
        views.append(arena[off:off + n])
        off += n
    return arena, views


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("run_bytes", [1 << 20, 4096, 77_777])
def test_copy_verified_copies_every_tensor_and_checks_each_bucket_like_checksum_of(
        threads: int, run_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors cut anywhere (across piece and bucket edges, a bucket's padding left uncopied), plus
    a tensor outside every bucket: every byte is copied, and a bucket's bytes hash exactly as
    ``checksum_of`` (the trainer's checksum) does; a flipped byte fails that bucket alone. Pieces
    hashed whole after their copies, or in runs (``HASH_RUN_BYTES``) cutting the copies anywhere."""
    monkeypatch.setattr(checksum_module, "HASH_RUN_BYTES", run_bytes)
    sizes = [3 * HASH_PIECE + 12345, 17, 2 * HASH_PIECE]
    arena, views = _buckets(sizes)
    checks = [ByteCheck(i, v, checksum_of([v.numpy()])) for i, v in enumerate(views)]
    cuts = [(0, 999), (999, HASH_PIECE + 5), (HASH_PIECE + 5, sizes[0]), (sizes[0], sizes[0] + 17),
            (sizes[0] + 17, sizes[0] + 17 + 2 * HASH_PIECE - 64)]  # the last 64 bytes: padding
    pairs = [(torch.zeros(b - a, dtype=torch.uint8), arena[a:b]) for a, b in cuts]
    outside = torch.randn(1000)
    pairs.append((torch.zeros_like(outside), outside))
    with ThreadPoolExecutor(2) as pool:
        assert copy_verified(pairs, checks, pool, threads) == []
        assert all(torch.equal(d.view(torch.uint8), s.view(torch.uint8)) for d, s in pairs)
        arena[sizes[0] + 3] ^= 1  # the middle bucket changes after its checksum was taken
        for d, _ in pairs:
            d.zero_()
        assert copy_verified(pairs, checks, pool, threads) == [1]
        assert all(torch.equal(d.view(torch.uint8), s.view(torch.uint8)) for d, s in pairs)  # copied anyway
        assert copy_verified([], checks, pool, threads) == [1]  # a verification pass alone


def test_copy_verified_over_a_tensor_that_straddles_two_buckets_still_copies_it_and_checks_both() -> None:
    arena, views = _buckets([HASH_PIECE + 10, HASH_PIECE + 10], seed=1)
    checks = [ByteCheck(i, v, checksum_of([v.numpy()])) for i, v in enumerate(views)]
    straddling = arena[HASH_PIECE:HASH_PIECE + 40]
    dst = torch.zeros_like(straddling)
    assert copy_verified([(dst, straddling)], checks, None, 1) == []
    assert torch.equal(dst, straddling)
