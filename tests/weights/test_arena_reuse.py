"""When the trainer may write a push into the arena it used for the last one: only once no receiver
can still be reading that one. Real ZeroMQ sockets, a real WeightReceiverActor (into an ApplySink)
and a real /dev/shm arena; the slow reader is a raw DEALER and SUB (no rollwire receiver code)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import torch
import zmq
import zmq.asyncio

from rollwire.messages.codec import Codec
from rollwire.messages.weights import NamedTensor, Register, ShmPayload, TrainerAnnouncement, WeightsReady, Welcome
from rollwire.weightsync import shm
from rollwire.weightsync.checksum import NAME as CHECKSUM_NAME
from rollwire.weightsync.layout import at_offsets, plan_buckets
from rollwire.weightsync.publisher import TrainerPublisher
from rollwire.weightsync.staged import forget_views, resolve
from tests.conftest import until
from tests.weights.conftest import Rig
from tests.weights.hostile import call, dealer
from tests.weights.test_layout import pack as pack_plan


async def test_a_cancelled_push_leaves_its_arena_to_the_receiver_still_reading_it(rig: Rig) -> None:
    """The caller gives up on push 1 (cancelled) while the receiver is loading it: push 2 packs into
    a fresh arena, and version 1 loads with its own bytes (before, push 2 overwrote the arena under
    that load, which then took version 2's bytes as version 1's)."""
    v1, v2 = {"w": torch.full((1000,), 1.0)}, {"w": torch.full((1000,), 2.0)}
    rig.sink.gate = asyncio.Event()
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        push = asyncio.ensure_future(tp.push_weights(1, v1, transport="shm"))
        await asyncio.wait_for(rig.sink.loading.wait(), 20)
        push.cancel()
        with pytest.raises(asyncio.CancelledError):
            await push
        second = asyncio.ensure_future(tp.push_weights(2, v2, transport="shm"))
        await until(lambda: tp._senders["shm"].arena.created == 2, "push 2 packed into a fresh arena", 20)  # type: ignore[attr-defined]
        rig.sink.gate.set()
        await asyncio.wait_for(second, 20)
    assert torch.equal(rig.sink.applied[1]["w"], v1["w"]) and torch.equal(rig.sink.applied[2]["w"], v2["w"])


@pytest.mark.parametrize("registers", ["before the push", "after the push"])
async def test_a_receiver_the_push_did_not_wait_for_keeps_reading_that_versions_bytes(rig: Rig, registers: str) -> None:
    """A receiver registered on this host that push 1 did not wait for: registered before it but not
    joined (it never acknowledged a beacon, as one that registered during a push or came back
    after a stall), or registered after it, having heard its announcement (a receiver registers
    when an unknown trainer's WeightsReady reaches it). It may read the arena at its own pace, so
    push 2 writes a fresh arena and the bytes it holds stay version 1's. (Before, push 2 rewrote
    the same arena under it.)"""
    v1, v2 = {"w": torch.full((4096,), 1.0)}, {"w": torch.full((4096,), 2.0)}
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        slow = dealer(tp.endpoint)
        sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(tp.pub_endpoint)

        async def register() -> None:
            welcome = await call(slow, Register(receiver_id="slow", host_id=shm.host_id(), transports=["shm"],
                                                live_version=0, checksums=[CHECKSUM_NAME]), Welcome, 1)
            assert isinstance(welcome, Welcome)
            assert not tp.receivers["slow"].joined  # it never acknowledges a beacon

        try:
            await until(lambda: "r1" in tp.receivers and tp.receivers["r1"].joined, "r1 joined", 20)
            if registers == "before the push":
                await register()
            else:  # the SUB hears beacons before it can hear push 1
                codec: Codec[TrainerAnnouncement] = Codec(TrainerAnnouncement)
                await asyncio.wait_for(sub.recv_multipart(), 20)
            report = await tp.push_weights(1, v1, transport="shm")
            assert report.receivers == ["r1"]  # the push did not wait for "slow"
            codec = Codec(TrainerAnnouncement)
            async with asyncio.timeout(20):
                while not isinstance(ready := codec.decode(await sub.recv_multipart())[1], WeightsReady):
                    pass
            assert ready.version == 1 and isinstance(ready.payload, ShmPayload)
            arena = shm.attach(ready.payload.name).tensor  # "slow" reads version 1 now
            off, n = ready.payload.offsets[0], ready.buckets[0].nbytes
            held = arena[off:off + n].view(torch.float32)
            assert torch.equal(held, v1["w"])
            if registers == "after the push":
                await register()
            await tp.push_weights(2, v2, transport="shm")
            assert tp._senders["shm"].arena.name != ready.payload.name  # type: ignore[attr-defined]
            assert torch.equal(held, v1["w"])  # still version 1's bytes
            assert torch.equal(rig.sink.applied[2]["w"], v2["w"]) and torch.equal(rig.sink.applied[1]["w"], v1["w"])
        finally:
            slow.close(linger=0)
            sub.close(linger=0)


async def test_a_receiver_silent_for_lost_after_s_does_not_keep_the_trainer_from_reusing_its_arena(rig: Rig) -> None:
    """A same-host server killed without a word stays registered; once it has been silent for
    ``lost_after_s`` it is not taken for a reader, so pushes go back to reusing one arena (before,
    every later push made a fresh one)."""
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20,
                                heartbeat_s=0.1, lost_after_s=0.5) as tp:
        dead = dealer(tp.endpoint)
        try:
            await call(dead, Register(receiver_id="dead", host_id=shm.host_id(), transports=["shm"],
                                      live_version=0, checksums=[CHECKSUM_NAME]), Welcome, 1)
        finally:
            dead.close(linger=0)  # killed: it never says Leaving
        await until(lambda: "r1" in tp.receivers and tp.receivers["r1"].joined, "r1 joined", 20)
        await until(lambda: "dead" not in tp._unwaited_readers("shm"), "the dead one silent for lost_after_s", 20)
        await tp.push_weights(1, {"w": torch.ones(4096)}, transport="shm")
        await tp.push_weights(2, {"w": torch.zeros(4096)}, transport="shm")
        await tp.push_weights(3, {"w": torch.ones(4096)}, transport="shm")
        assert "dead" in tp.receivers and tp._senders["shm"].arena.created == 1  # type: ignore[attr-defined]
    assert torch.equal(rig.sink.applied[3]["w"], torch.ones(4096))


async def test_with_every_receiver_waited_for_the_next_push_reuses_the_arena(rig: Rig) -> None:
    """The other side of the rule: every registered receiver was counted, so the arena is reused."""
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        await tp.push_weights(1, {"w": torch.ones(4096)}, transport="shm")
        first = tp._senders["shm"].arena.name  # type: ignore[attr-defined]
        await tp.push_weights(2, {"w": torch.zeros(4096)}, transport="shm")
        assert tp._senders["shm"].arena.name == first  # type: ignore[attr-defined]
        assert tp._senders["shm"].arena.created == 1  # type: ignore[attr-defined]
    assert torch.equal(rig.sink.applied[2]["w"], torch.zeros(4096))


def test_the_receiver_reuses_its_views_only_while_arena_and_layout_repeat() -> None:
    """``staged.resolve`` keeps the last arena's views (hundreds of tensors cost ~1.5 ms to view):
    a repeat of both hands out the same views; another layout or another arena makes new ones; the
    bytes read are the arena's as they are now, in every case. A real /dev/shm arena."""
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.arange(5, dtype=torch.int64)}
    plans = plan_buckets(list(tensors.items()), 1 << 20)
    arenas = [shm.ShmArena(), shm.ShmArena()]
    try:
        for arena in arenas:
            arena.reserve(4096)
        offsets = [256]
        arenas[0].tensor[256:256 + plans[0].nbytes].copy_(pack_plan(plans[0]))

        def resolved(arena: shm.ShmArena, offs: list[int]) -> list[tuple[str, torch.Tensor]]:
            named = at_offsets([p.meta(0) for p in plans], offs)
            named = msgspec.msgpack.decode(msgspec.msgpack.encode(named), type=list[NamedTensor])  # as received
            return resolve(named, [], {"shm_name": arena.name})

        first, again = resolved(arenas[0], offsets), resolved(arenas[0], offsets)
        assert [id(t) for _, t in again] == [id(t) for _, t in first]
        assert all(torch.equal(t, tensors[n]) for n, t in again)
        arenas[0].tensor[512:512 + plans[0].nbytes].copy_(pack_plan(plans[0]) + 1)
        moved = resolved(arenas[0], [512])
        assert all(id(t) != id(u) for (_, t), (_, u) in zip(moved, first, strict=True))
        assert torch.equal(moved[0][1].view(torch.uint8).flatten(), pack_plan(plans[0])[:24] + 1)
        arenas[1].tensor[256:256 + plans[0].nbytes].copy_(pack_plan(plans[0]))
        other = resolved(arenas[1], offsets)
        assert all(id(t) != id(u) for (_, t), (_, u) in zip(other, first, strict=True))
        assert all(torch.equal(t, tensors[n]) for n, t in other)
        forget_views()  # a stopping receiver lets go of them (and of the mapping they hold)
        assert all(id(t) != id(u) for (_, t), (_, u) in zip(resolved(arenas[1], offsets), other, strict=True))
    finally:
        for arena in arenas:
            arena.close()
