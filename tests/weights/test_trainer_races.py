"""TrainerPublisher calls racing close(), each other and cancellation, and a flood of registrations
(found by an adversarial try and a review; each failed on the code before the fix: a 60 s hang, a
step answered but reported timed out, a cancelled barrier push kept running for timeout_s, an
uncounted forged acknowledgement, a roster without bound)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rollwire.messages.errors import ErrorCode, ErrorReply
from rollwire.messages.weights import BeaconSeen, Register, StepDone, TrainerReply, Welcome
from rollwire.runtime import ActorSystem
from rollwire.weightsync.checksum import NAME as CHECKSUM_NAME
from rollwire.weightsync.publisher import PushError, TrainerPublisher
from tests.conftest import free_tcp_endpoint
from tests.weights.conftest import make_rig
from tests.weights.hostile import call, dealer

TENSORS = {"w": torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32), "b": torch.ones(64)}


async def test_close_ends_a_push_and_a_step_waiting_for_receivers_to_join_at_once() -> None:
    tp = await TrainerPublisher(free_tcp_endpoint(), timeout_s=600).start()  # nobody will join
    push = asyncio.ensure_future(tp.push_weights(1, TENSORS))
    step = asyncio.ensure_future(tp.publish_step(1, "train_start"))
    await asyncio.sleep(0)  # both are waiting now
    await tp.close()
    for waiting in (push, step):
        with pytest.raises(PushError, match="trainer closed"):
            await asyncio.wait_for(waiting, 10)  # hang guard: they used to wait out timeout_s
    with pytest.raises(PushError, match="trainer closed"):  # and a call after close says so too
        await tp.publish_step(2, "train_start")


async def test_two_step_calls_for_the_same_step_are_both_answered_by_one_acknowledgement() -> None:
    system = ActorSystem()
    endpoint = free_tcp_endpoint()
    try:
        async with TrainerPublisher(endpoint, timeout_s=60) as tp:
            await make_rig(system, endpoint=endpoint, receiver_id="r1")
            both = await asyncio.wait_for(asyncio.gather(tp.publish_step(7, "train_end"),
                                                         tp.publish_step(7, "train_end")), 60)
            assert both == [["r1"], ["r1"]]
    finally:
        await system.stop()


async def test_a_cancelled_barrier_push_ends_at_once_and_the_server_is_released() -> None:
    system = ActorSystem()
    endpoint = free_tcp_endpoint()
    try:
        async with TrainerPublisher(endpoint, timeout_s=600) as tp:
            rig = await make_rig(system, endpoint=endpoint, receiver_id="r1")
            await asyncio.wait_for(tp.publish_step(1, "train_end"), 60)  # r1 joined
            receiver = rig.receiver
            send = receiver._send

            async def no_step_acks(msg: object) -> None:  # fault injection: the release is never acknowledged
                if not isinstance(msg, StepDone):
                    await send(msg)

            receiver._send = no_step_acks  # type: ignore[method-assign]
            rig.sink.gate = asyncio.Event()  # version 1 stays loading
            push = asyncio.ensure_future(tp.push_weights(1, TENSORS, barrier=True))
            await asyncio.wait_for(rig.sink.loading.wait(), 30)
            push.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(push, 10)  # hang guard: it used to wait timeout_s for acknowledgements
            async with asyncio.timeout(20):  # the release went out all the same
                while not any(m.step == 1 and m.phase == "barrier_release" for m in rig.sink.steps):
                    await asyncio.sleep(0.02)
            receiver._send = send  # type: ignore[method-assign]
            rig.sink.gate.set()
            report = await asyncio.wait_for(tp.push_weights(2, TENSORS, barrier=True), 60)  # the next one as usual
            assert report.receivers == ["r1"] and sorted(rig.sink.applied) == [1, 2], report
    finally:
        await system.stop()


async def test_a_beacon_acknowledgement_from_a_connection_that_did_not_register_its_receiver_is_counted() -> None:
    system = ActorSystem()
    endpoint = free_tcp_endpoint()
    try:
        async with TrainerPublisher(endpoint, timeout_s=60) as tp:
            await make_rig(system, endpoint=endpoint, receiver_id="r1")
            await asyncio.wait_for(tp.publish_step(1, "train_end"), 60)  # r1 joined
            sock = dealer(tp.endpoint)
            try:
                for trainer_id in (tp.trainer_id, "another trainer"):
                    await sock.send_multipart(tp._peers.codec.encode(0, BeaconSeen(
                        receiver_id="r1", trainer_id=trainer_id, seq=1)))
                async with asyncio.timeout(20):
                    while tp.counters["beacon_acks_dropped"] < 2:
                        await asyncio.sleep(0.02)
            finally:
                sock.close(linger=0)
            assert tp.counters["beacon_acks_dropped"] == 2 and tp.receivers["r1"].joined
    finally:
        await system.stop()


async def test_registrations_beyond_max_receivers_or_with_an_oversize_id_are_refused_with_a_typed_error() -> None:
    """Without CURVE anyone may register: a flood of made-up ids must not grow the roster without bound."""
    async with TrainerPublisher(free_tcp_endpoint(), timeout_s=60, max_receivers=2) as tp:
        def register(receiver_id: str) -> Register:
            return Register(receiver_id=receiver_id, host_id="h", transports=["inline"], live_version=0,
                            checksums=[CHECKSUM_NAME])

        socks = [dealer(tp.endpoint) for _ in range(4)]
        try:
            replies = [await call(sock, register(rid), TrainerReply, 1)
                       for sock, rid in zip(socks, ["a", "b", "c", "x" * 513], strict=True)]
            again = await call(socks[0], register("a"), TrainerReply, 2)  # the same connection: still welcome
        finally:
            for sock in socks:
                sock.close(linger=0)
        assert [type(r).__name__ for r in replies[:2]] == ["Welcome", "Welcome"] and isinstance(again, Welcome)
        assert isinstance(replies[2], ErrorReply) and replies[2].code == ErrorCode.OVERLOADED, replies[2]
        assert isinstance(replies[3], ErrorReply) and replies[3].code == ErrorCode.BAD_FIELD, replies[3]
        assert sorted(tp.receivers) == ["a", "b"] and tp.counters["registrations_refused"] == 2


async def test_at_max_receivers_a_new_registration_takes_the_place_of_one_silent_and_not_joined() -> None:
    """Dead servers (SIGKILLed, each with a fresh host:pid id) and made-up ids must not lock new
    servers out: a registration that never joined and stayed silent for lost_after_s gives way."""
    async with TrainerPublisher(free_tcp_endpoint(), timeout_s=60, max_receivers=2, lost_after_s=0.3) as tp:
        socks = [dealer(tp.endpoint) for _ in range(3)]
        try:
            for sock, rid in zip(socks[:2], ["a", "b"], strict=True):  # raw sockets: they never join
                assert isinstance(await call(sock, Register(receiver_id=rid, host_id="h", transports=["inline"],
                                                            live_version=0, checksums=[CHECKSUM_NAME]),
                                             TrainerReply, 1), Welcome)
            replies = []
            async with asyncio.timeout(20):
                while not replies or not isinstance(replies[-1], Welcome):  # overloaded until a and b are stale
                    replies.append(await call(socks[2], Register(receiver_id="c", host_id="h", transports=["inline"],
                                                                 live_version=0, checksums=[CHECKSUM_NAME]),
                                              TrainerReply, len(replies) + 1))
        finally:
            for sock in socks:
                sock.close(linger=0)
        assert all(isinstance(r, ErrorReply) and r.code == ErrorCode.OVERLOADED for r in replies[:-1]), replies
        assert len(tp.receivers) == 2 and "c" in tp.receivers


async def test_a_receiver_forgotten_to_make_room_is_told_at_its_next_beacon_and_registers_again() -> None:
    system = ActorSystem()
    endpoint = free_tcp_endpoint()
    try:
        async with TrainerPublisher(endpoint, timeout_s=60, max_receivers=1, lost_after_s=0.3,
                                    heartbeat_s=0.1) as tp:
            rig = await make_rig(system, endpoint=endpoint, receiver_id="r1")
            await asyncio.wait_for(tp.publish_step(1, "train_end"), 60)  # r1 joined
            receiver = rig.receiver
            send = receiver._send

            async def silent(msg: object) -> None:  # fault injection: r1 stops acknowledging beacons
                if not isinstance(msg, BeaconSeen):
                    await send(msg)

            receiver._send = silent  # type: ignore[method-assign]
            async with asyncio.timeout(20):
                while tp.receivers["r1"].joined:
                    await asyncio.sleep(0.02)
                sock = dealer(tp.endpoint)  # a new id at the cap: takes the silent one's place
                try:
                    while not isinstance(await call(sock, Register(
                            receiver_id="someone", host_id="h", transports=["inline"], live_version=0,
                            checksums=[CHECKSUM_NAME]), TrainerReply, 1), Welcome):
                        await asyncio.sleep(0.05)
                finally:
                    sock.close(linger=0)
            assert sorted(tp.receivers) == ["someone"]
            receiver._send = send  # type: ignore[method-assign]
            async with asyncio.timeout(30):  # told at its next acknowledgement, it registers and joins again
                while "r1" not in tp.receivers or not tp.receivers["r1"].joined:
                    await asyncio.sleep(0.02)
            assert receiver.counters.get("forgotten_by_trainer") >= 1
            report = await asyncio.wait_for(tp.push_weights(1, TENSORS), 60)
            assert report.receivers == ["r1"] and sorted(rig.sink.applied) == [1], report
    finally:
        await system.stop()
