"""The SGLang adapter's flat buckets (SGLang's "flattened_bucket" load format: one tensor, one IPC
handle per bucket): views of one storage become one slice of it, or one copy of that slice when
they were opened from another process (cuda_ipc); anything else is copied tensor by tensor. Run on
CPU tensors here (the same code; on the GPU it runs in tests/gpu/e2e_sglang.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rollwire.engines.sglang.payloads import flat_bucket


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


def rebuilt(flat: torch.Tensor, metas: list) -> list[tuple[str, torch.Tensor]]:
    """What SGLang's FlattenedTensorBucket.reconstruct_tensors does with the metadata."""
    return [(name, flat[a:b].view(dtype).reshape(shape)) for name, shape, dtype, a, b in metas]


def check(bucket: list[tuple[str, torch.Tensor]], copy: bool) -> tuple[torch.Tensor, list]:
    flat, metas = flat_bucket(bucket, copy=copy, device_type="cpu")
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    out = rebuilt(flat, metas)
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, got), (_, want) in zip(out, bucket, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    return flat, metas


def test_dense_views_become_one_slice_of_their_storage_or_one_copy_of_it() -> None:
    arena, views = arena_views(gap=0)
    flat, metas = check(views, copy=False)
    assert flat.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()  # no copy
    assert flat.numel() < 512 and metas[0][3] == 64  # the span, from the 256-byte boundary below the first
    copied, copied_metas = check(views, copy=True)
    assert copied.untyped_storage().data_ptr() != arena.untyped_storage().data_ptr()
    assert copied_metas == metas and torch.equal(copied, flat)
    arena.zero_()  # the copy is the trainer's bytes at the time, not a view of them
    assert any(t.abs().sum() > 0 for _, t in rebuilt(copied, copied_metas))


def test_sparse_strided_or_scattered_tensors_are_copied_tensor_by_tensor() -> None:
    arena, views = arena_views(gap=3000)  # mostly gaps: taking the span would share (or copy) the gaps
    flat, _ = check(views, copy=False)
    assert flat.untyped_storage().data_ptr() != arena.untyped_storage().data_ptr() and flat.numel() < 2048
    _, dense = arena_views(gap=0)
    check([(n, t.t() if t.dim() == 2 else t) for n, t in dense], copy=False)  # non-contiguous views
    g = torch.Generator().manual_seed(1)
    check([("x", torch.randn(5, 3, generator=g)), ("y", torch.randn(4, generator=g).to(torch.bfloat16))], copy=False)


class ForkingSerializer:
    """What SGLang's MultiprocessingSerializer does (ForkingPickler: tensors shared, not copied)."""

    @staticmethod
    def serialize(obj: object) -> bytes:
        import io
        from multiprocessing.reduction import ForkingPickler

        buf = io.BytesIO()
        ForkingPickler(buf).dump(obj)
        return buf.getvalue()


def test_one_payload_per_tp_rank_each_a_share_of_its_own() -> None:
    """As sglang.Engine does: torch's IPC reference count expects one share per consumer, so every
    TP rank gets its own serialization of the bucket, not one payload repeated."""
    import pickle

    from rollwire.engines.sglang.payloads import serialize

    _, views = arena_views(gap=0)
    payloads = serialize(ForkingSerializer, [(n, t.clone()) for n, t in views], 3)
    assert len(payloads) == 3 and len({id(p) for p in payloads}) == 3
    for p in payloads:
        got = pickle.loads(p)
        assert [n for n, _ in got] == [n for n, _ in views]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, views, strict=True))


def test_the_staging_buffer_is_written_again_only_when_every_share_of_it_reads_let_go(tmp_path) -> None:
    """The reuse rule alone, on the CPU, against a reference-count file laid out as torch's (a
    64-byte header, then int64 counts in a /dev/shm file; the GPU test below checks that torch's own
    counts read 1 when shared and 0 when let go)."""
    import os
    import struct

    from rollwire.engines.sglang.payloads import FlatStaging, ipc_refcount

    name = f"rw_test_refcounts_{os.getpid()}"
    path = Path("/dev/shm") / name
    path.write_bytes(struct.pack("<8q", *[7] * 8) + struct.pack("<3q", 0, 1, 0))  # header: not a count
    try:
        assert [ipc_refcount(name, i) for i in range(3)] == [0, 1, 0]
        assert ipc_refcount(name, 3) is None and ipc_refcount("no_such_counter_file", 0) is None
        staging = FlatStaging()
        first = staging.take(1000, torch.device("cpu"))
        staging._shares = [(f"/{name}".encode(), 0), (name.encode(), 2)]  # two shares, both let go
        assert staging.take(800, torch.device("cpu")).data_ptr() == first.data_ptr() and staging.allocated == 1
        staging._shares.append((name.encode(), 1))  # one still held by a loader
        assert staging.take(800, torch.device("cpu")).data_ptr() != first.data_ptr() and staging.allocated == 2
        assert staging._shares == []
        staging._shares = [(b"no_such_counter_file", 0)]  # unreadable: not known to be let go
        staging.take(10, torch.device("cpu"))
        assert staging.allocated == 3
        staging.take(2000, torch.device("cpu"))  # larger than the buffer
        assert staging.allocated == 4
        staging._shares = [(name.encode(), 0)] * FlatStaging.MAX_SHARES  # all let go, but many records
        staging.take(10, torch.device("cpu"))
        assert staging.allocated == 5
        staging.take(10, torch.device("cpu"))
        assert staging.allocated == 5  # reused
        staging.counts_unreadable = True  # a share's count did not read 1 when made: none is trusted
        staging.take(10, torch.device("cpu"))
        assert staging.allocated == 6
    finally:
        path.unlink()


# -- on a GPU: views of another process's memory, copied into a reused buffer ----------------------
@dataclass
class Meta:  # SGLang's FlattenedTensorMetadata, as the consumer needs to unpickle it
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def _producer(q: object, done: object) -> None:  # a trainer: owns a CUDA arena, shares it once
    arena = torch.arange(64 * 1024, dtype=torch.int32, device="cuda").view(torch.uint8)
    q.put(arena)  # type: ignore[attr-defined]
    done.wait(120)  # type: ignore[attr-defined]


def _consumer(conn: object) -> None:  # SGLang's scheduler: opens each payload, checks it, lets go
    import pickle

    while True:
        data = conn.recv()  # type: ignore[attr-defined]
        if data is None:
            return
        flat = pickle.loads(data)["flattened_tensor"]
        read = int(flat.view(torch.int32)[:8].sum())
        del flat  # torch synchronizes this process's stream, then gives the share back
        conn.send(read)  # type: ignore[attr-defined]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU: tests/gpu/run_gpu.sh ipc_speed")
def test_views_of_another_process_are_copied_into_one_buffer_reused_once_the_loader_let_go() -> None:
    import torch.multiprocessing as tmp

    from rollwire.engines.sglang.payloads import FlatStaging, ipc_refcount, serialize_flat

    ctx = tmp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    producer = ctx.Process(target=_producer, args=(q, done))
    producer.start()
    here, there = ctx.Pipe()
    consumer = ctx.Process(target=_consumer, args=(there,))
    consumer.start()
    try:
        arena = q.get(timeout=120)  # opened here: torch cannot share it on
        bucket = [("w", arena[:4096].view(torch.int32)), ("b", arena[4096:8192].view(torch.int32))]
        staging = FlatStaging()
        for push in range(3):
            (payload,) = serialize_flat(ForkingSerializer, bucket, Meta, 1, staging)
            assert staging.allocated == 1, f"push {push}: the buffer was reused"
            (counter, offset), = staging._shares[-1:]
            assert ipc_refcount(counter, offset) == 1  # handed out, not let go yet
            here.send(payload)
            assert here.recv() == sum(range(8))  # the consumer read the trainer's bytes
            assert ipc_refcount(counter, offset) == 0  # let go, after its stream synchronized
        held = serialize_flat(ForkingSerializer, bucket, Meta, 1, staging)  # not sent: never let go
        serialize_flat(ForkingSerializer, bucket, Meta, 1, staging)
        assert staging.allocated == 2, "a buffer a loader may still read is not written again"
        del held
    finally:
        here.send(None)
        done.set()
        consumer.join(60)
        producer.join(60)
