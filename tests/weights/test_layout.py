"""Buckets: planning, packing, checksums and views, with the tensors that break naive code."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from rollwire.messages.weights import BucketMeta, InlinePayload, NamedTensor, TensorMeta, WeightsReady
from rollwire.weightsync import checksum as checksum_module
from rollwire.weightsync.checksum import Hasher, checksum_parallel
from rollwire.weightsync.layout import (
    ALIGN,
    LayoutError,
    as_frames,
    check_layout,
    checksum,
    checksum_sources,
    pack_bucket,
    pack_with_checksum,
    plan_buckets,
    tensor_bytes,
    tensor_slices,
    verify_bucket,
)
from rollwire.weightsync.staged import resolve


def awkward_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "non_contiguous": base.t()[::2],  # strided view: shape (5, 6)
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
        "odd_bytes": torch.arange(3, dtype=torch.uint8),  # 3 bytes: the next tensor must be realigned
        "int64": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "fp16": torch.randn(4, generator=g).half(),
        "large": torch.randn(300, generator=g),  # 1200 bytes: bigger than a bucket below
    }


def pack(plan) -> torch.Tensor:
    buf = torch.full((plan.nbytes,), 0xAB, dtype=torch.uint8)  # garbage in the gaps must be zeroed
    pack_bucket(plan, buf)
    return buf


def ready_for(plans, **kw) -> WeightsReady:
    kw.setdefault("payload", InlinePayload())
    return WeightsReady(trainer_id="t", version=1, step=1, n_buckets=len(plans),
                        total_bytes=sum(p.nbytes for p in plans),
                        buckets=[p.meta(checksum_sources(p)) for p in plans], **kw)


def test_bf16_non_contiguous_empty_and_scalar_tensors_round_trip_bit_exact_through_buckets() -> None:
    tensors = awkward_tensors()
    plans = plan_buckets(list(tensors.items()), bucket_bytes=256)
    bufs = [pack(p) for p in plans]
    metas = [p.meta(checksum(b.numpy())) for p, b in zip(plans, bufs, strict=True)]
    named, frames = as_frames(metas, [memoryview(b.numpy()) for b in bufs])
    assert len(frames) == len(tensors)  # one payload frame per tensor, empty ones included
    named = msgspec.msgpack.decode(msgspec.msgpack.encode(named), type=list[NamedTensor])
    out = dict(resolve(named, frames, {}))
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert torch.equal(out[name], t), name


def test_the_checksum_from_source_tensors_equals_the_checksum_of_the_packed_bucket() -> None:
    for p in plan_buckets(list(awkward_tensors().items()), bucket_bytes=256):
        assert checksum(pack(p).numpy()) == checksum_sources(p)


def reference_checksum(data: bytes) -> int:
    """The definition, written out: xxh3-64 of each 1 MiB piece, then of the digests, 63 bits."""
    pieces = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    digests = b"".join(xxhash.xxh3_64_intdigest(p).to_bytes(8, "little") for p in pieces)
    return xxhash.xxh3_64_intdigest(digests) & ((1 << 63) - 1)


def random_bytes(n: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()


@pytest.mark.parametrize("sizes", [[0], [5], [3, 4 << 20, 7], [9 << 20], [1 << 20] * 20, [(1 << 20) - 1, 2, 1 << 20]])
async def test_the_parallel_checksum_of_pieces_equals_the_definition_over_the_whole(sizes: list[int]) -> None:
    bufs = [random_bytes(n, i) for i, n in enumerate(sizes)]
    with ThreadPoolExecutor(2) as pool:
        assert await checksum_parallel(bufs, pool) == reference_checksum(b"".join(bufs))
        assert checksum(b"".join(bufs)) == reference_checksum(b"".join(bufs))


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 3 << 20), max_size=6), pooled=st.booleans())
def test_bytes_fed_to_a_hasher_in_any_cuts_give_the_checksum_of_the_whole(cuts: list[int], pooled: bool) -> None:
    data = random_bytes(3 << 20 | 12345, 7)
    bounds = [0, *sorted(cuts), len(data)]
    with ThreadPoolExecutor(2) as pool:
        h = Hasher(pool if pooled else None)
        for a, b in itertools.pairwise(bounds):
            h.update(data[a:b])
        assert h.result() == reference_checksum(data)


@pytest.mark.parametrize("run_bytes", [1 << 20, 4096, 77_777])
def test_packing_with_checksums_packs_exactly_and_each_checksum_is_its_buckets(
        run_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Buckets over several 1 MiB pieces, tensors straddling piece edges, a non-contiguous one, and
    one bucket of a single large tensor; against pack_bucket and the definition. Each piece hashed
    whole after its copy, or in runs (``HASH_RUN_BYTES``) that do not divide it or the tensors."""
    monkeypatch.setattr(checksum_module, "HASH_RUN_BYTES", run_bytes)
    g = torch.Generator().manual_seed(3)
    tensors = {"odd": torch.randn(333_333, generator=g), "t": torch.randn(700, 900, generator=g).t(),
               **awkward_tensors(), "big": torch.randn(1 << 20, generator=g).to(torch.bfloat16)}
    plans = plan_buckets(list(tensors.items()), bucket_bytes=3 << 20)
    assert len(plans) > 1 and max(p.nbytes for p in plans) > 2 << 20
    dsts = [torch.full((p.nbytes,), 0xAB, dtype=torch.uint8) for p in plans]  # gaps must be zeroed
    with ThreadPoolExecutor(1) as pool:
        sums = pack_with_checksum(plans, dsts, pool, threads=2)
    for plan, dst, got in zip(plans, dsts, sums, strict=True):
        assert torch.equal(dst, pack(plan))
        assert got == reference_checksum(dst.numpy().tobytes()) == checksum_sources(plan)


def test_the_bytes_of_a_one_element_view_with_a_stride_are_its_element() -> None:
    one = torch.arange(4.0)[::2][:1]  # "contiguous" (one element), yet its stride is 2
    assert bytes(tensor_bytes(one)) == torch.tensor([0.0]).numpy().tobytes()


def test_a_tensor_larger_than_a_bucket_gets_a_bucket_of_its_own_and_others_stay_under_the_size() -> None:
    plans = plan_buckets(list(awkward_tensors().items()), bucket_bytes=256)
    large = [p for p in plans if any(t.name == "large" for t in p.tensors)]
    assert len(large) == 1 and [t.name for t in large[0].tensors] == ["large"] and large[0].nbytes == 1200
    assert all(p.nbytes <= 256 for p in plans if p is not large[0])
    assert all(t.offset % ALIGN == 0 for p in plans for t in p.tensors)
    check_layout(ready_for(plans))


def test_no_tensors_plan_no_buckets_and_a_single_bucket_holds_everything_when_it_fits() -> None:
    assert plan_buckets([], 1024) == []
    plans = plan_buckets(list(awkward_tensors().items()), bucket_bytes=1 << 20)
    assert len(plans) == 1 and len(plans[0].tensors) == len(awkward_tensors())


def test_a_flipped_byte_or_a_short_bucket_fails_verification_with_the_reason() -> None:
    (plan,) = plan_buckets([("w", torch.randn(64))], 1 << 20)
    buf = pack(plan)
    meta = plan.meta(checksum(buf.numpy()))
    assert verify_bucket(meta, buf.numpy().tobytes()) is None
    bad = bytearray(buf.numpy().tobytes())
    bad[17] ^= 0x01
    assert "checksum" in (verify_bucket(meta, bytes(bad)) or "")
    assert "bytes, announced" in (verify_bucket(meta, bytes(bad[:-1])) or "")


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: [b[0], BucketMeta(5, b[1].nbytes, b[1].checksum, b[1].tensors)], "says it is bucket"),
    (lambda b: [BucketMeta(0, b[0].nbytes, 0, [b[0].tensors[0], b[0].tensors[0]])], "appears twice"),
    (lambda b: [BucketMeta(0, 8, 0, [TensorMeta("x", "float32", [2], 2)])], "misaligned"),
    (lambda b: [BucketMeta(0, 8, 0, [TensorMeta("x", "complex64", [1], 0)])], "unsupported tensor dtype"),
    (lambda b: [BucketMeta(0, 100, 0, [TensorMeta("x", "float32", [2], 0)])], "tensors end at byte"),
    (lambda b: [BucketMeta(0, 8, 0, [TensorMeta("x", "float32", [-2], 0)])], "negative dimension"),
])
def test_an_announcement_whose_layout_does_not_add_up_is_refused_before_any_pull(mutate, reason) -> None:
    plans = plan_buckets([("a", torch.zeros(4)), ("b", torch.zeros(4))], bucket_bytes=16)
    good = ready_for(plans)
    buckets = mutate(good.buckets)
    bad = msgspec.structs.replace(good, buckets=buckets, n_buckets=len(buckets),
                                  total_bytes=sum(b.nbytes for b in buckets))
    with pytest.raises(LayoutError, match=reason):
        check_layout(bad)
    with pytest.raises(LayoutError, match="n_buckets"):
        check_layout(msgspec.structs.replace(good, n_buckets=3))
    with pytest.raises(LayoutError, match="total_bytes"):
        check_layout(msgspec.structs.replace(good, total_bytes=1))


def test_tensor_slices_are_views_of_the_bucket_not_copies() -> None:
    (plan,) = plan_buckets([("a", torch.ones(3)), ("b", torch.zeros(2))], 1 << 20)
    buf = pack(plan)
    meta = plan.meta(0)
    mv = memoryview(buf.numpy())
    views = tensor_slices(meta, mv)
    buf[0] = 7  # visible through the slice: same memory
    assert views[0][0] == 7 and len(views[1]) == 8
