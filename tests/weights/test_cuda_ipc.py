"""cuda_ipc: the GPU checksum, the rules of ``auto``, and refusals, on the CPU; a real push between
processes where a GPU is present (the GPU machine runs it, and tests/gpu/run_cuda_ipc.sh more)."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing as mp
import struct

import msgspec
import pytest
import torch

from rollwire.messages.weights import CudaIpcHandle, CudaIpcPayload
from rollwire.weightsync import cuda_ipc
from rollwire.weightsync.cuda_ipc import ARENA_ALIGN, arena_offsets, gpu_checksums, padded, tensors_device
from rollwire.weightsync.layout import LayoutError, check_layout, plan_buckets
from rollwire.weightsync.publisher import TrainerPublisher
from rollwire.weightsync.push import Registered, choose_transport
from tests.weights.conftest import Rig
from tests.weights.harness import ScriptedTrainer
from tests.weights.procs import trainer_main
from tests.weights.test_layout import awkward_tensors, ready_for

NO_GPU = "cuda_ipc needs a CUDA GPU in this process (CPU-only here); tests/gpu/run_cuda_ipc.sh runs it on one"
GPU_A, GPU_B = "GPU-aaaa", "GPU-bbbb"


# -- the GPU checksum, computed here on CPU tensors (the same torch ops) --------------------------
def reference(data: bytes) -> int:
    """The checksum by its definition, in Python integers modulo 2**64."""
    data = data + bytes(padded(len(data)) - len(data))
    words = struct.unpack(f"<{len(data) // 8}q", data)
    rows = [words[i:i + 512] for i in range(0, len(words), 512)]
    mask = (1 << 64) - 1
    total = sum(words) & mask
    by_row = sum((r + 1) * sum(row) for r, row in enumerate(rows)) & mask
    by_col = sum((c + 1) * sum(row[c] for row in rows) for c in range(512)) & mask
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in (total, by_row, by_col)]
    return int.from_bytes(hashlib.blake2b(struct.pack("<3q", *signed), digest_size=8).digest(), "little")


def arena_with(payloads: list[bytes]) -> tuple[torch.Tensor, list[int], list[int]]:
    sizes = [len(p) for p in payloads]
    offsets = arena_offsets(sizes)
    arena = torch.zeros(offsets[-1] + padded(sizes[-1]), dtype=torch.uint8)
    for off, p in zip(offsets, payloads, strict=True):
        if p:
            arena[off:off + len(p)] = torch.frombuffer(bytearray(p), dtype=torch.uint8)
    return arena, offsets, sizes


def test_the_gpu_checksum_matches_its_definition_with_wrapping_sums_and_padding() -> None:
    g = torch.Generator().manual_seed(3)
    payloads = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes()
                for n in (5000, 3 * ARENA_ALIGN, 1, 70_000)]
    payloads.append(bytes([0xFF]) * 9000)  # large words: the sums wrap modulo 2**64
    arena, offsets, sizes = arena_with(payloads)
    assert all(off % ARENA_ALIGN == 0 for off in offsets)
    assert gpu_checksums(arena, offsets, sizes) == [reference(p) for p in payloads]


@pytest.mark.parametrize("change", ["flip one bit", "swap two words of a row", "swap two words of a column",
                                    "shift by one word", "garbage in the padding"])
def test_the_gpu_checksum_catches_a_changed_bit_swapped_words_a_shifted_layout_and_dirty_padding(change: str) -> None:
    g = torch.Generator().manual_seed(4)
    data = torch.randint(0, 256, (3 * ARENA_ALIGN - 100,), generator=g, dtype=torch.uint8)
    arena, offsets, sizes = arena_with([data.numpy().tobytes()])
    want = gpu_checksums(arena, offsets, sizes)
    words = arena.view(torch.int64)
    if change == "flip one bit":
        arena[1234] ^= 4
    elif change == "swap two words of a row":
        words[[3, 7]] = words[[7, 3]]
    elif change == "swap two words of a column":
        words[[3, 3 + 512]] = words[[3 + 512, 3]]
    elif change == "shift by one word":
        words[1:] = words[:-1].clone()
    else:
        arena[-1] = 1
    assert gpu_checksums(arena, offsets, sizes) != want


def test_empty_buckets_have_a_checksum_and_no_bucket_list_needs_no_transfer() -> None:
    arena, offsets, sizes = arena_with([b"", b"abc"])
    assert gpu_checksums(arena, offsets, sizes) == [reference(b""), reference(b"abc")]
    assert gpu_checksums(arena, [], []) == []


@pytest.mark.skipif(not cuda_ipc.available(), reason=NO_GPU)
def test_the_one_pass_gpu_kernel_gives_the_definitions_checksums_and_the_two_pass_ones(monkeypatch) -> None:
    from rollwire.weightsync import gpu_checksum

    g = torch.Generator().manual_seed(5)
    # a few rows, more rows than the persistent grid covers in one sweep, a bucket of one row, empty ones
    sizes = [5000, 0, (gpu_checksum._PROGRAMS * gpu_checksum._BLOCK_ROWS + 3) * ARENA_ALIGN - 17, 1, 0, 9000]
    payloads = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes() for n in sizes]
    payloads[-1] = bytes([0xFF]) * 9000  # the sums wrap modulo 2**64
    arena, offsets, sizes = arena_with(payloads)
    gpu = arena.cuda()
    assert gpu_checksum._triton_kernel() is not None, "Triton comes with every CUDA build of torch"
    one_pass = gpu_checksums(gpu, offsets, sizes)
    monkeypatch.setattr(gpu_checksum, "_KERNEL", None)  # the two-pass torch reductions, on the same GPU
    assert gpu_checksums(gpu, offsets, sizes) == one_pass
    assert one_pass == [reference(p) for p in payloads]
    assert one_pass == gpu_checksums(arena, offsets, sizes)  # and the CPU's


# -- auto, on the CPU ---------------------------------------------------------------------------
def receiver(rid: str = "r", host: str = "h", transports: tuple[str, ...] = ("cuda_ipc", "shm", "inline"),
             gpus: tuple[str, ...] = (GPU_A,)) -> Registered:
    return Registered(rid, b"peer", host, list(transports), 0, list(gpus))


ALL = ["cuda_ipc", "shm", "inline", "gloo"]


def test_auto_picks_cuda_ipc_only_for_gpu_tensors_that_every_receiver_on_this_host_can_open() -> None:
    same = [receiver("a"), receiver("b", gpus=(GPU_B, GPU_A))]
    assert choose_transport("auto", ALL, "h", same, GPU_A) == "cuda_ipc"
    assert choose_transport("auto", ALL, "h", same, None) == "shm"  # CPU tensors (or on several GPUs)
    # one receiver whose engine is on the CPU (it does not offer cuda_ipc), or that cannot see the GPU
    assert choose_transport("auto", ALL, "h", [*same, receiver("c", transports=("shm", "inline"), gpus=())],
                            GPU_A) == "shm"
    assert choose_transport("auto", ALL, "h", [*same, receiver("c", gpus=(GPU_B,))], GPU_A) == "shm"
    # another host: neither cuda_ipc nor shm
    assert choose_transport("auto", ALL, "h", [*same, receiver("c", host="other")], GPU_A) == "inline"
    # a trainer without CUDA does not offer it, whatever the receivers say
    assert choose_transport("auto", ["shm", "inline"], "h", same, GPU_A) == "shm"


def test_asking_for_cuda_ipc_where_it_cannot_work_says_why() -> None:
    with pytest.raises(ValueError, match="one CUDA device"):
        choose_transport("cuda_ipc", ALL, "h", [receiver()], None)
    with pytest.raises(ValueError, match=r"cannot reach receivers \['far'\].*GPU not visible"):
        choose_transport("cuda_ipc", ALL, "h", [receiver(), receiver("far", host="x")], GPU_A)
    with pytest.raises(ValueError, match="not available here"):
        choose_transport("cuda_ipc", ["shm", "inline"], "h", [receiver()], GPU_A)


def test_tensors_on_the_cpu_or_on_no_single_gpu_are_not_cuda_ipc_material() -> None:
    assert tensors_device([torch.ones(2), torch.ones(3)]) is None
    assert tensors_device([]) is None
    assert not cuda_ipc.receiver_offers("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
async def test_on_a_cpu_only_machine_nobody_offers_cuda_ipc_and_auto_pushes_gpu_less_weights_over_shm(
        rig: Rig) -> None:
    assert "cuda_ipc" not in rig.receiver.transports and rig.receiver.cuda_devices == []
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        assert "cuda_ipc" not in tp.transports
        with pytest.raises(ValueError, match="not available here"):
            await tp.push_weights(1, {"w": torch.ones(4)}, transport="cuda_ipc")
        assert (await tp.push_weights(2, {"w": torch.ones(4)})).transport == "shm"


# -- announcements the receiver refuses --------------------------------------------------------
def handle(nbytes: int = 1 << 20) -> CudaIpcHandle:
    return CudaIpcHandle(device_uuid=GPU_A, handle="00" * 64, storage_size=nbytes, storage_offset=0,
                         ref_counter_handle=b"/torch_x".hex(), ref_counter_offset=0, event_handle="00" * 64,
                         event_sync_required=False, nbytes=nbytes)


def test_a_cuda_ipc_announcement_needs_one_offset_per_bucket() -> None:
    plans = plan_buckets(list(awkward_tensors().items()), 256)
    assert len(plans) > 1
    with pytest.raises(LayoutError, match="cuda_ipc: 1 offsets"):
        check_layout(msgspec.structs.replace(ready_for(plans), payload=CudaIpcPayload(handle=handle(), offsets=[0])))


async def test_a_receiver_that_does_not_offer_cuda_ipc_refuses_a_cuda_ipc_version_and_keeps_serving(
        rig: Rig) -> None:
    if "cuda_ipc" in rig.receiver.transports:
        pytest.skip("this receiver offers cuda_ipc (a GPU is present)")
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan({"a": torch.randn(100)}, bucket_bytes=1 << 20)
        fut = await tr.announce(1, plans, payload=CudaIpcPayload(handle=handle(), offsets=[0]))
        out = await asyncio.wait_for(fut, 20)
        assert (out.ok, out.error_code) == (False, "bad_field") and "not offered" in out.message
        fut = await tr.announce(2, plans)  # inline, the next version: applied
        assert (await asyncio.wait_for(fut, 20)).ok
    assert sorted(rig.sink.applied) == [2]


# -- a real push, where there is a GPU ------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
async def test_a_trainer_process_pushes_gpu_tensors_over_cuda_ipc_bit_exact_and_reuses_its_arena(rig: Rig) -> None:
    """Awkward tensors (bf16, strided, empty, scalar, odd sizes) from a trainer process's GPU arrive
    bit-exact as CUDA tensors; auto picks cuda_ipc; each of three versions is applied whole."""
    tensors = {k: v.contiguous() if k != "non_contiguous" else v for k, v in awkward_tensors().items()}
    perturbed = {k: v + 1 if v.dtype not in (torch.bool,) and v.numel() else v for k, v in tensors.items()}
    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=trainer_main, args=(rig.endpoint, {"a": tensors, "b": perturbed}, commands, results),
                       kwargs={"bucket_bytes": 256, "device": "cuda", "pub_endpoint": rig.pub_endpoint})
    proc.start()
    loop = asyncio.get_running_loop()
    opened_before = set(cuda_ipc._opened)
    try:
        assert (await loop.run_in_executor(None, results.get, True, 120))[0] == "started"
        for version, kind in ((1, "a"), (2, "b"), (3, "a")):
            commands.put((version, kind, "auto"))
            assert await loop.run_in_executor(None, results.get, True, 120) == ("ok", version, "cuda_ipc", ["r1"])
            want = tensors if kind == "a" else perturbed
            got = rig.sink.applied[version]
            assert list(got) == list(want)
            for name, t in want.items():
                assert got[name].is_cuda and got[name].dtype == t.dtype and got[name].shape == t.shape, name
                assert torch.equal(got[name].cpu(), t), name
    finally:
        commands.put(None)
        await loop.run_in_executor(None, proc.join, 60)
    assert proc.exitcode == 0
    assert len(set(cuda_ipc._opened) - opened_before) == 1  # one arena, opened once, for all three versions


def test_the_trainer_packs_into_its_arena_with_zeroed_gaps_and_reuses_the_layout_until_it_changes() -> None:
    """``pack_into`` (run here on a CPU buffer standing in for the CUDA arena): bytes equal the
    reference packing, gaps and padding are zeros, a repeated layout reuses its views, a new one is
    laid out afresh over whatever the last push left."""
    from rollwire.weightsync.cuda_ipc import pack_into
    from rollwire.weightsync.layout import pack_bucket

    def packed(tensors: dict[str, torch.Tensor], arena: torch.Tensor, layout):
        plans = plan_buckets(list(tensors.items()), 256)
        offsets = arena_offsets([p.nbytes for p in plans])
        layout = pack_into(arena, plans, offsets, layout)
        want = torch.zeros_like(arena)
        for p, off in zip(plans, offsets, strict=True):
            pack_bucket(p, want[off:off + p.nbytes])
        assert torch.equal(arena, want)
        return layout

    arena = torch.full((64 * ARENA_ALIGN,), 0xAB, dtype=torch.uint8)  # garbage: must not survive in gaps
    tensors = awkward_tensors()
    layout = packed(tensors, arena, None)
    again = packed({k: v * 2 if v.dtype != torch.bool else v for k, v in tensors.items()}, arena, layout)
    assert again is layout  # same layout: the views were reused
    fewer = {k: v for k, v in tensors.items() if k != "bf16"}
    assert packed(fewer, arena, layout)[0] != layout[0]
