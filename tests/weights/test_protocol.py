"""The weight protocol between a trainer and a WeightReceiverActor, over real ZeroMQ sockets.

The receiver applies into an ApplySink (a stand-in governor); the trainer is the real
TrainerPublisher, or a ScriptedTrainer where the test needs a trainer that misbehaves.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import msgspec
import pytest
import torch
import zmq

from rollwire.messages import RemoteError
from rollwire.messages.weights import INBAND, ShmPayload
from rollwire.runtime import ActorSystem
from rollwire.transports import sockets
from rollwire.transports.sockets import free_tcp_endpoint
from rollwire.weightsync import shm
from rollwire.weightsync.checksum import NAME as CHECKSUM_NAME
from rollwire.weightsync.layout import checksum_sources, plan_buckets
from rollwire.weightsync.publisher import PushError, TrainerPublisher
from tests.conftest import until
from tests.weights.conftest import Rig, make_rig
from tests.weights.harness import ScriptedTrainer
from tests.weights.test_layout import awkward_tensors


def assert_applied(rig: Rig, version: int, tensors: dict[str, torch.Tensor]) -> None:
    got = rig.sink.applied[version]
    assert list(got) == list(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


async def outcome_of(fut: asyncio.Future, timeout: float = 20.0):
    return await asyncio.wait_for(fut, timeout)


@pytest.mark.parametrize("transport", ["inline", "shm", "gloo"])
async def test_a_push_arrives_bit_exact_over_each_transport_and_later_pushes_reuse_what_they_can(
        rig: Rig, transport: str) -> None:
    tensors = awkward_tensors()
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, bucket_bytes=256, timeout_s=20) as tp:
        report = await tp.push_weights(1, tensors, transport=transport)
        assert (report.version, report.transport, report.receivers) == (1, transport, ["r1"])
        assert report.bytes == sum(p.nbytes for p in plan_buckets(list(tensors.items()), 256))
        assert_applied(rig, 1, tensors)
        doubled = {k: v * 2 if v.dtype.is_floating_point else v for k, v in tensors.items()}
        await tp.push_weights(2, doubled, transport=transport)
        assert_applied(rig, 2, doubled)
        if transport == "shm":
            assert tp._senders["shm"].arena.created == 1  # type: ignore[attr-defined]  # the same arena served both
    assert rig.receiver.live_version == 2


@pytest.mark.parametrize("transport", ["inline", "shm", "gloo"])
async def test_buckets_over_several_checksum_pieces_agree_on_both_ends(rig: Rig, transport: str) -> None:
    """Tensors straddling the 1 MiB checksum pieces at offsets that are not multiples of them: the
    trainer (packing, or feeding tensor by tensor for gloo) and the receiver cut the same pieces."""
    g = torch.Generator().manual_seed(11)
    tensors = {"small": torch.randn(1001, generator=g), "big": torch.randn(800_001, generator=g),
               "strided": torch.randn(900, 700, generator=g).t(), "last": torch.randn(3, generator=g).half()}
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, bucket_bytes=6 << 20,
                                timeout_s=20) as tp:
        report = await tp.push_weights(1, tensors, transport=transport)
    assert report.bytes > 5 << 20 and len(plan_buckets(list(tensors.items()), 6 << 20)) == 1
    assert_applied(rig, 1, tensors)


async def test_auto_picks_shm_on_the_same_host(rig: Rig) -> None:
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        report = await tp.push_weights(1, {"w": torch.ones(4)})
    assert report.transport == "shm"


async def test_a_corrupted_inline_bucket_is_rejected_with_bad_checksum_and_nothing_is_applied(rig: Rig) -> None:
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan({"a": torch.randn(100), "b": torch.randn(50)}, bucket_bytes=256)
        tr.serve = lambda i, b: [bytes([b[0] ^ 0xFF]) + b[1:]] if i == 1 else [b]
        out = await outcome_of(await tr.announce(1, plans))
        assert (out.ok, out.error_code) == (False, "bad_checksum")
        assert "bucket 1" in out.message
        assert rig.sink.applied == {} and rig.receiver.live_version == 0
        tr.serve = lambda i, b: [b]
        assert (await outcome_of(await tr.announce(2, plans))).ok  # the next good version goes through


async def test_a_bucket_of_the_wrong_size_is_rejected_with_bad_frame(rig: Rig) -> None:
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan({"a": torch.randn(100)}, bucket_bytes=1 << 20)
        tr.serve = lambda i, b: [b[:-4]]
        out = await outcome_of(await tr.announce(1, plans))
        assert (out.ok, out.error_code) == (False, "bad_frame")


def written(tr: ScriptedTrainer, plans: list[Any], *, flip: bool = False) -> tuple[list[int], ShmPayload]:
    """The version written into the scripted trainer's arena as a TrainerPublisher writes it (its
    header, then the pieces), optionally with its first byte flipped after the checksums were
    taken: the INBAND checksums and the payload to announce."""
    offsets, header = shm.layout_arena(tr.arena, plans)
    shm.pack(tr.arena.tensor, plans, offsets, header)
    if flip:
        tr.arena.tensor[offsets[0]] ^= 1
    return [INBAND] * len(plans), ShmPayload(name=tr.arena.name, offsets=offsets, stamp=header.stamp)


async def test_an_shm_arena_that_does_not_match_its_checksum_is_rejected(rig: Rig) -> None:
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan({"a": torch.randn(100)}, bucket_bytes=1 << 20)
        sums, payload = written(tr, plans, flip=True)
        out = await outcome_of(await tr.announce(1, plans, checksums=sums, payload=payload))
        assert (out.ok, out.error_code) == (False, "bad_checksum")
        sums, payload = written(tr, plans)
        out = await outcome_of(await tr.announce(2, plans, checksums=sums, payload=payload))
        assert out.ok and torch.equal(rig.sink.applied[2]["a"], plans[0].sources[0])
        sums, payload = written(tr, plans)
        out = await outcome_of(await tr.announce(3, plans, checksums=[checksum_sources(plans[0])], payload=payload))
        assert (out.ok, out.error_code) == (False, "bad_field")  # shm checksums come in the header, not here


async def test_an_announcement_that_does_not_add_up_is_rejected_with_bad_field(rig: Rig) -> None:
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan({"a": torch.randn(100)}, bucket_bytes=1 << 20)
        sums, payload = written(tr, plans)
        for version, bad in enumerate((msgspec.structs.replace(payload, name="../../etc/passwd"),
                                       msgspec.structs.replace(payload, offsets=[]),
                                       msgspec.structs.replace(payload, offsets=[0]),  # inside the header
                                       msgspec.structs.replace(payload, stamp=0)), start=1):
            out = await outcome_of(await tr.announce(version, plans, checksums=sums, payload=bad))
            assert (out.ok, out.error_code) == (False, "bad_field"), bad
        out = await outcome_of(await tr.announce(9, plans, checksums=sums,
                                                 payload=msgspec.structs.replace(payload, stamp=payload.stamp + 1)))
        assert (out.ok, out.error_code) == (False, "superseded"), out  # not the push the arena holds


async def test_duplicate_stale_and_out_of_order_bucket_replies_still_assemble_the_version(rig: Rig) -> None:
    tensors = {f"t{i}": torch.randn(40 + i) for i in range(20)}
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan(tensors, bucket_bytes=256)
        assert len(plans) >= 8
        tr.reorder = 4  # hold a window's worth of pulls, answer them newest first
        tr.extra_replies = [(1, 0), (0, 2)]  # with every reply: bucket 0 again, and a stale version's bucket
        out = await outcome_of(await tr.announce(1, plans))
        assert out.ok, out.message
    assert_applied(rig, 1, tensors)
    counters = rig.receiver.counters
    assert counters.get("duplicate_buckets") > 0 and counters.get("unexpected_replies") > 0


async def test_a_version_that_stalls_is_dropped_after_the_timeout_and_the_next_one_applies(rig: Rig) -> None:
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan({"a": torch.randn(100), "b": torch.randn(100)}, bucket_bytes=256)
        tr.serve = lambda i, b: None if i == 1 else [b]  # bucket 1 never comes
        out = await outcome_of(await tr.announce(1, plans))
        assert (out.ok, out.error_code) == (False, "timeout")
        assert "stalled" in out.message and rig.receiver.counters.get("versions_stalled") == 1
        assert rig.sink.applied == {}
        tr.serve = lambda i, b: [b]
        assert (await outcome_of(await tr.announce(2, plans))).ok


async def test_a_newer_announcement_supersedes_a_version_still_being_pulled(rig: Rig) -> None:
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan({"a": torch.randn(100)}, bucket_bytes=1 << 20)
        pulled: list[int] = []
        tr.serve = lambda i, b: pulled.append(i)  # the pull is recorded, its bucket withheld
        first = await tr.announce(1, plans)
        await until(lambda: bool(pulled), "the receiver pulling version 1", 10)
        tr.serve = lambda i, b: [b]
        second = await tr.announce(2, plans)
        assert (await outcome_of(first)).error_code == "superseded"
        assert (await outcome_of(second)).ok
    assert list(rig.sink.applied) == [2]


@pytest.mark.parametrize("coalesce", [False, True])
async def test_versions_announced_during_a_load_wait_in_order_or_with_coalesce_only_the_newest(coalesce: bool,
                                                                                              ) -> None:
    system = ActorSystem()
    try:
        rig = await make_rig(system, coalesce=coalesce)
        rig.sink.gate = asyncio.Event()  # loads wait until every announcement is in
        async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
            await tr.wait_joined()
            plans = tr.plan({"a": torch.randn(100)}, bucket_bytes=1 << 20)
            first = await tr.announce(1, plans)
            await asyncio.wait_for(rig.sink.loading.wait(), 10)  # version 1 is being loaded
            later = [await tr.announce(v, plans) for v in (2, 3, 5)]
            stale = await tr.announce(4, plans)  # not above version 5, which already waits
            async with asyncio.timeout(10):
                while rig.receiver.counters.get("announcements") < 5:
                    await asyncio.sleep(0.01)
            rig.sink.gate.set()
            outcomes = [await outcome_of(f) for f in (first, *later, stale)]
        fates = [(o.version, o.ok, o.error_code) for o in outcomes]
        if coalesce:  # each announcement replaced the one waiting before it
            assert fates == [(1, True, ""), (2, False, "superseded"), (3, False, "superseded"), (5, True, ""),
                             (4, False, "bad_version")]
            assert list(rig.sink.applied) == [1, 5]
        else:  # all of them waited and loaded, in order
            assert fates == [(1, True, ""), (2, True, ""), (3, True, ""), (5, True, ""), (4, False, "bad_version")]
            assert list(rig.sink.applied) == [1, 2, 3, 5]
    finally:
        await system.stop()


async def test_a_version_queued_by_a_trainer_that_was_replaced_is_dropped_not_pulled_from_its_successor() -> None:
    """Trainer 1 announces version 2 while its version 1 loads, then dies; trainer 2 starts on the same
    endpoint and announces its own version 2 (same bytes). Trainer 1's queued version must not load
    from trainer 2's buckets and make trainer 2's version look stale."""
    system = ActorSystem()
    try:
        rig = await make_rig(system)
        rig.sink.gate = asyncio.Event()
        tensors = {"a": torch.randn(100)}
        async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as first:
            await first.wait_joined()
            plans = first.plan(tensors, bucket_bytes=1 << 20)
            await first.announce(1, plans)
            await asyncio.wait_for(rig.sink.loading.wait(), 10)
            await first.announce(2, plans)
            async with asyncio.timeout(10):
                while rig.receiver.counters.get("versions_waiting") < 1:
                    await asyncio.sleep(0.01)
        async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as second:
            await second.wait_joined()
            mine = await second.announce(2, second.plan(tensors, bucket_bytes=1 << 20))
            async with asyncio.timeout(10):
                while rig.receiver.counters.get("announcements") < 3:
                    await asyncio.sleep(0.01)
            assert rig.receiver.counters.get("rejected_superseded") == 1  # trainer 1's version 2
            rig.sink.gate.set()
            out = await outcome_of(mine)
        assert (out.ok, out.error_code) == (True, "")
        assert list(rig.sink.applied) == [1, 2] and rig.receiver.live_version == 2
    finally:
        await system.stop()


async def test_versions_must_increase_at_the_trainer_and_at_the_receiver(rig: Rig) -> None:
    w = {"w": torch.ones(3)}
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        await tp.push_weights(5, w)
        with pytest.raises(ValueError, match="not above the last pushed version 5"):
            await tp.push_weights(5, w)
    # a restarted trainer does not know what was pushed before: the receiver refuses for it
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        with pytest.raises(PushError) as err:
            await tp.push_weights(4, w)
        assert err.value.failures == {"r1": "bad_version: version 4 is not above the live version 5"}
        await tp.push_weights(6, w)
    assert sorted(rig.sink.applied) == [5, 6]
    assert rig.receiver.counters.get("registrations") == 2  # it noticed the restart and registered again


async def test_step_messages_reach_the_governor_and_publish_step_returns_once_acted_on(rig: Rig) -> None:
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        assert await tp.publish_step(7, "train_start") == ["r1"]
        assert await tp.publish_step(7, "train_end") == ["r1"]
    assert [(s.step, s.phase) for s in rig.sink.steps] == [(7, "train_start"), (7, "train_end")]


async def test_a_push_with_no_receiver_fails_after_the_timeout_saying_who_is_missing() -> None:
    from tests.conftest import free_tcp_endpoint

    async with TrainerPublisher(free_tcp_endpoint(), pub_endpoint=free_tcp_endpoint(), timeout_s=0.5) as tp:
        with pytest.raises(PushError, match="0 receiver\\(s\\) joined"):
            await tp.push_weights(1, {"w": torch.ones(1)})


async def test_a_trainer_restarted_in_process_rebinds_its_addresses_and_a_port_held_elsewhere_still_fails(
        ) -> None:
    endpoint, pub = free_tcp_endpoint(), free_tcp_endpoint()
    for _ in range(5):  # each successor binds the addresses its predecessor has just closed
        async with TrainerPublisher(endpoint, pub_endpoint=pub, timeout_s=5) as tp:
            assert tp.pub_endpoint == pub
    holder = await sockets.bind_when_free(lambda: sockets.router([endpoint]))  # the last trainer just closed it
    try:
        with pytest.raises(zmq.ZMQError) as err:
            await sockets.bind_when_free(lambda: sockets.router([endpoint]), within_s=0.2)
        assert err.value.errno == errno.EADDRINUSE
    finally:
        sockets.close_router(holder, linger_ms=0)


async def test_a_trainer_given_only_its_tcp_endpoint_publishes_on_the_next_port() -> None:
    """free_tcp_endpoint leaves P + 1 free for the PUB (a CI run once found it taken)."""
    from tests.conftest import free_tcp_endpoint

    for _ in range(20):
        endpoint = free_tcp_endpoint()
        async with TrainerPublisher(endpoint) as tp:
            assert tp.pub_endpoint == f"tcp://127.0.0.1:{int(endpoint.rpartition(':')[2]) + 1}"


async def test_a_receiver_does_not_join_a_trainer_whose_buckets_carry_another_checksum(rig: Rig) -> None:
    """A trainer from before xxh3 checksums (its Welcome names none): every push would fail the
    receiver's checks, so the receiver does not join; it keeps asking and joins once the answer
    names its checksum."""
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        tr.welcome_checksum = ""
        async with asyncio.timeout(20):
            while not tr.registers:
                await asyncio.sleep(0.02)
        assert tr.registers[0].checksums == [CHECKSUM_NAME]
        # it asks again only after it has turned down the first answer (its pause: register_timeout_s)
        await until(lambda: len(tr.registers) >= 2, "the receiver registering again", 20)
        assert not tr.joined and rig.receiver.counters.get("registrations") == 0
        tr.welcome_checksum = CHECKSUM_NAME
        await tr.wait_joined()
        assert len(tr.registers) >= 2 and rig.receiver.counters.get("registrations") == 1


async def test_a_trainer_refuses_a_receiver_that_verifies_another_checksum_with_unsupported_protocol() -> None:
    """A receiver from before xxh3 checksums registers without naming one: a typed refusal."""
    from rollwire.messages import ErrorCode
    from rollwire.messages.weights import Register, TrainerReply
    from rollwire.transports.rpc import RpcClient
    from tests.conftest import free_tcp_endpoint

    endpoint = free_tcp_endpoint()
    async with TrainerPublisher(endpoint, timeout_s=5) as tp:
        old = RpcClient(endpoint, TrainerReply)
        old.start()
        try:
            with pytest.raises(RemoteError) as refused:
                await old.call(Register(receiver_id="old", host_id="h", transports=["inline"], live_version=0),
                               timeout=10)
        finally:
            await old.close()
        assert refused.value.code == ErrorCode.UNSUPPORTED_PROTOCOL
        assert "crc32" in refused.value.message and CHECKSUM_NAME in refused.value.message
        assert "old" not in tp.receivers


async def test_push_error_names_each_receiver_that_refused_and_why() -> None:
    system = ActorSystem()
    try:
        good = await make_rig(system, receiver_id="r1")
        await make_rig(system, receiver_id="r2", known={"other": torch.ones(1)}, endpoint=good.endpoint)
        async with TrainerPublisher(good.endpoint, pub_endpoint=good.pub_endpoint, timeout_s=20,
                                    min_receivers=2) as tp:
            with pytest.raises(PushError) as err:
                await tp.push_weights(1, {"w": torch.ones(3)})
        assert err.value.failures == {"r2": "unknown_tensor: no parameter named 'w'"}
        assert list(good.sink.applied) == [1]
    finally:
        await system.stop()


async def test_a_receiver_that_goes_silent_mid_push_is_named_as_lost_long_before_the_timeout() -> None:
    system = ActorSystem()
    rig = await make_rig(system, delay_s=30.0)
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=60, heartbeat_s=0.1,
                                lost_after_s=0.5) as tp:
        push = asyncio.ensure_future(tp.push_weights(1, {"w": torch.ones(3)}))
        await asyncio.wait_for(rig.sink.loading.wait(), 20)
        rig.receiver.trainer_id = ""  # fault injection: it goes without its goodbye (as if SIGKILLed)
        await system.stop()  # the whole server goes away while loading
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(PushError) as err:
            await push
        assert asyncio.get_running_loop().time() - t0 < 5
    assert list(err.value.failures) == ["r1"] and err.value.failures["r1"].startswith("lost: no heartbeat")


async def test_an_inline_checksum_sent_with_the_bucket_is_checked_and_a_missing_or_wrong_one_is_bad_checksum(
        rig: Rig) -> None:
    """The TrainerPublisher announces inline buckets with checksum INBAND and sends each checksum
    with its bytes (computed while packing). Here by hand: right, wrong, and missing."""
    from rollwire.messages.weights import INBAND
    from rollwire.weightsync.layout import checksum

    tensors = {"a": torch.randn(100), "b": torch.randn(7)}
    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan(tensors, bucket_bytes=256)
        inband = [INBAND] * len(plans)
        tr.checksum_in_reply = lambda i, b: checksum(b)
        assert (await outcome_of(await tr.announce(1, plans, checksums=inband))).ok
        tr.checksum_in_reply = lambda i, b: checksum(b) ^ 1
        out = await outcome_of(await tr.announce(2, plans, checksums=inband))
        assert (out.ok, out.error_code) == (False, "bad_checksum") and "sent" in out.message
        tr.checksum_in_reply = None
        out = await outcome_of(await tr.announce(3, plans, checksums=inband))
        assert (out.ok, out.error_code) == (False, "bad_checksum") and "neither announced nor sent" in out.message
    assert_applied(rig, 1, tensors)
    assert sorted(rig.sink.applied) == [1]


async def test_a_gloo_version_whose_in_band_checksum_does_not_match_is_bad_checksum_and_the_next_one_applies(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broadcast pushes announce INBAND and send each bucket's checksum after the data; a trainer
    whose sums are off (fault injection: its hasher flips a bit) gets bad_checksum, nothing applies."""
    import rollwire.weightsync.broadcast as tpush

    real = tpush._sent_checksums

    def off_by_a_bit(hashers: Any) -> list[int]:  # the trainer's sums only (its receiver shares the module)
        return [s ^ 1 for s in real(hashers)]
    tensors = awkward_tensors()
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, bucket_bytes=256, timeout_s=20) as tp:
        monkeypatch.setattr(tpush, "_sent_checksums", off_by_a_bit)
        with pytest.raises(PushError) as err:
            await tp.push_weights(1, tensors, transport="gloo")
        assert err.value.failures["r1"].startswith("bad_checksum:") and "sent" in err.value.failures["r1"]
        monkeypatch.setattr(tpush, "_sent_checksums", real)
        await tp.push_weights(2, tensors, transport="gloo")
    assert sorted(rig.sink.applied) == [2]
    assert_applied(rig, 2, tensors)


async def test_versions_steps_and_phases_of_the_wrong_kind_are_refused_before_anything_is_announced(
        rig: Rig) -> None:
    """Before, each was announced, dropped by every server, and timed out blaming them; 2**64 used
    the version number up (every later push was "not above" it)."""
    w = {"w": torch.ones(3)}
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        for version, step in ((2.5, None), (2**64, None), (True, None), (3, 1.5), (-1, None)):
            with pytest.raises(TypeError):
                await tp.push_weights(version, w, step=step)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="phase"):
            await tp.publish_step(7, "training_start")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await tp.publish_step("7", "train_start")  # type: ignore[arg-type]
        await tp.push_weights(3, w)  # no number was used up
    assert sorted(rig.sink.applied) == [3] and rig.receiver.counters.get("announcements") == 1


async def test_a_second_trainer_cannot_take_over_a_live_trainers_ipc_endpoints() -> None:
    """ZeroMQ would unlink a listening ipc socket's file and bind anew (the first trainer's
    receivers then reach the second); the bind is refused EADDRINUSE, as over tcp. A file left by a
    trainer that closed is rebound."""
    ep, pub = sockets.ipc_endpoint("tr"), sockets.ipc_endpoint("trpub")
    async with TrainerPublisher(ep, pub_endpoint=pub):
        for other in ((ep, sockets.ipc_endpoint("x")), (sockets.ipc_endpoint("y"), pub)):
            with pytest.raises(zmq.ZMQError) as err:
                async with TrainerPublisher(other[0], pub_endpoint=other[1]):
                    pass
            assert err.value.errno == errno.EADDRINUSE
    async with TrainerPublisher(ep, pub_endpoint=pub) as tp:
        assert tp.pub_endpoint == pub


async def test_an_arena_truncated_after_it_was_mapped_is_refused_not_read(rig: Rig) -> None:
    """A trainer shrinks its arena file after the receiver mapped it: reading the lost pages would
    kill the server with SIGBUS. The version is refused bad_field and the next one applies."""
    import os

    async with ScriptedTrainer(rig.endpoint, rig.pub_endpoint) as tr:
        await tr.wait_joined()
        plans = tr.plan({"a": torch.randn(300_000)}, bucket_bytes=4 << 20)
        sums, payload = written(tr, plans)
        for version in (1, 2):
            if version == 2:
                os.truncate(os.path.join("/dev/shm", tr.arena.name), 4096)
            out = await outcome_of(await tr.announce(version, plans, checksums=sums, payload=payload))
            assert out.ok == (version == 1) and (version == 1 or "shrank" in out.message), out
        tr.arena.retire()
        sums, payload = written(tr, plans)
        out = await outcome_of(await tr.announce(3, plans, checksums=sums, payload=payload))
        assert out.ok and torch.equal(rig.sink.applied[3]["a"], plans[0].sources[0])


async def test_auto_falls_back_to_inline_when_shared_memory_is_full(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: /dev/shm has no room (ENOSPC when the arena is made). ``auto`` pushes
    inline instead (before, the push raised OSError); an explicit ``shm`` still fails, typed."""
    from rollwire.weightsync import shm

    def full(self: object, nbytes: int) -> bool:
        raise OSError(errno.ENOSPC, "cannot allocate in /dev/shm (injected)")

    monkeypatch.setattr(shm.ShmArena, "reserve", full)
    w = {"w": torch.arange(10.0)}
    async with TrainerPublisher(rig.endpoint, pub_endpoint=rig.pub_endpoint, timeout_s=20) as tp:
        report = await tp.push_weights(1, w)
        assert report.transport == "inline"
        with pytest.raises(OSError):
            await tp.push_weights(2, w, transport="shm")
        await tp.push_weights(3, w)
    assert sorted(rig.sink.applied) == [1, 3] and torch.equal(rig.sink.applied[3]["w"], w["w"])
