"""The parallel byte copy the hf engine loads CPU weights with."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rollwire.weightsync.memcopy import PIECE_BYTES, byte_copyable, copy_bytes, copy_pool, copy_threads


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
