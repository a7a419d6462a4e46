"""The SGLang adapter's copy of views it opened from another process (cuda_ipc) into one buffer of
its own, so that SGLang's scheduler opens one IPC handle per bucket. Run on CPU tensors here (the
same code; on the GPU it runs in tests/gpu/e2e_sglang.py)."""

from __future__ import annotations

import torch

from rollwire.engines.sglang_weights import own_copy


def arena_views(gap: int) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """bf16, fp32 and int64 tensors packed into one uint8 arena (as the trainer packs its buckets),
    ``gap`` bytes apart, starting off a 256-byte boundary."""
    g = torch.Generator().manual_seed(0)
    specs = [("a", torch.bfloat16, (3, 5)), ("b", torch.float32, (7,)), ("c", torch.int64, (2, 2)),
             ("d", torch.bfloat16, (1,))]
    arena = torch.zeros(4096 + 4 * gap, dtype=torch.uint8)
    off, views = 64, []
    for name, dtype, shape in specs:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        off = (off + 7) // 8 * 8
        v = arena[off:off + n].view(dtype).view(shape)
        v.copy_((torch.randn(shape, generator=g) * 100).to(dtype))
        views.append((name, v))
        off += n + gap
    return arena, views


def check(arena: torch.Tensor, bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    out = own_copy(bucket, device_type="cpu")
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, got), (_, want) in zip(out, bucket, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() != arena.untyped_storage().data_ptr()  # a copy, not the source
    assert len({t.untyped_storage().data_ptr() for _, t in out}) == 1  # one buffer: one IPC handle
    return out


def test_dense_views_are_copied_into_one_buffer_keeping_their_layout() -> None:
    arena, views = arena_views(gap=0)
    out = check(arena, views)
    base = views[0][1].storage_offset() * 2
    for (_, got), (_, want) in zip(out, views, strict=True):  # same relative byte offsets (one copy of the span)
        assert (got.storage_offset() * got.element_size() - out[0][1].storage_offset() * 2
                == want.storage_offset() * want.element_size() - base)


def test_sparse_and_strided_views_are_copied_tensor_by_tensor() -> None:
    arena, views = arena_views(gap=1000)  # mostly gaps: copying the span would waste memory
    check(arena, views)
    _, dense = arena_views(gap=0)
    transposed = [(n, t.t() if t.dim() == 2 else t) for n, t in dense]
    assert not transposed[0][1].is_contiguous()
    check(dense[0][1], transposed)


def test_other_devices_and_a_copy_that_is_not_needed_are_left_alone() -> None:
    _, views = arena_views(gap=0)
    assert own_copy(views, device_type="cuda") == views  # CPU tensors when copying CUDA ones: untouched
