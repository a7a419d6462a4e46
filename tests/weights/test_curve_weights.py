"""CURVE on the trainer link (Ironhouse), with real key files: the receiver only hears the trainer
whose public key it was given, the trainer only lets in the servers it lists, a receiver id belongs
to the key that registered it, and outcomes count only from the receiver's own connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio

from rollwire.messages import ErrorCode, ErrorReply
from rollwire.messages.weights import PullBucket, Register, StepMessage, TrainerReply, VersionOutcome
from rollwire.runtime import ActorSystem
from rollwire.transports.security import RECEIVERS_DOMAIN, CurveClient, CurveServer, KeyPair, create_keys
from rollwire.weightsync.checksum import NAME as CHECKSUM_NAME
from rollwire.weightsync.publisher import TrainerPublisher
from tests.conftest import free_tcp_endpoint
from tests.weights.conftest import Rig, make_rig
from tests.weights.harness import ScriptedTrainer
from tests.weights.hostile import HandshakeWatch, call
from tests.weights.test_hostile_trainer_link import TENSORS, ReceiverProcess

STRANGER_TENSORS = {k: -t for k, t in TENSORS.items()}


def sums(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(t.double().sum()) for k, t in tensors.items()}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """(public .key, .key_secret) per name, written as `rollwire keys` writes them."""
    return {name: create_keys(tmp_path, name) for name in ("trainer", "server", "other", "stranger")}


def pair(keys: dict[str, tuple[Path, Path]], name: str) -> KeyPair:
    return KeyPair.load(keys[name][1])


def watched_dealer(endpoint: str, curve: CurveClient | None) -> tuple[zmq.asyncio.Socket, HandshakeWatch]:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    watch = HandshakeWatch(sock)  # before connect: no failure goes unseen
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    return sock, watch


def trainer(keys: dict[str, tuple[Path, Path]], endpoint: str, pub: str | None = None) -> TrainerPublisher:
    return TrainerPublisher(endpoint, pub_endpoint=pub, bucket_bytes=4 << 10, timeout_s=60,
                            keys=pair(keys, "trainer"), receiver_keys={pair(keys, "server").public,
                                                                       pair(keys, "other").public})


async def test_a_stranger_at_the_trainer_endpoints_is_never_heard_and_the_real_trainer_then_pushes(
        keys: dict[str, tuple[Path, Path]]) -> None:
    """A receiver process registered with the real trainer, which pushed version 1 and went away. A
    stranger (its own keys, the server's public key on its allow-list) binds both of the trainer's
    endpoints, announces version 2 with its own weights and publishes train_start: the receiver's
    DEALER and SUB refuse its key in every handshake, so none of it reaches the receiver (no
    Register reaches the stranger, its version is never pulled). The real trainer comes back on
    the same endpoints; its train_start and version 2 are applied, and only its weights."""
    endpoint, pub = free_tcp_endpoint(), free_tcp_endpoint()
    files = (str(keys["server"][1]), str(keys["trainer"][0]))
    receiver = await ReceiverProcess(endpoint, "r1", curve_files=files).start()
    try:
        async with trainer(keys, endpoint, pub) as tp:
            assert (await tp.push_weights(1, TENSORS)).receivers == ["r1"]
        stranger = ScriptedTrainer(endpoint, pub, curve=CurveServer(pair(keys, "stranger"), RECEIVERS_DOMAIN,
                                                                   frozenset({pair(keys, "server").public})))
        async with stranger:
            router_watch, pub_watch = HandshakeWatch(stranger.router), HandshakeWatch(stranger.pub._sock)
            await router_watch.wait(2)  # the receiver's DEALER tried, and refused the stranger's key
            await pub_watch.wait(2)  # so did its SUB
            pushed = await stranger.announce(2, stranger.plan(STRANGER_TENSORS, 4 << 10))
            await stranger.pub.publish(StepMessage(step=2, phase="train_start"))
            await router_watch.wait(1)
            await pub_watch.wait(1)  # handshakes after the announcement failed too
            assert stranger.registers == [] and not stranger.joined and not pushed.done()
            router_watch.close()
            pub_watch.close()
        async with trainer(keys, endpoint, pub) as tp:
            assert await tp.publish_step(3, "train_start") == ["r1"]
            assert (await tp.push_weights(2, TENSORS)).receivers == ["r1"]
        report = await receiver.report()
        assert report["applied"] == {1: sums(TENSORS), 2: sums(TENSORS)}
        assert report["steps"] == [(3, "train_start")]  # the stranger's train_start never arrived
        assert report["restarts"] == 0
    finally:
        assert await receiver.stop() == 0


@pytest.fixture
async def curve_rig(keys: dict[str, tuple[Path, Path]]) -> AsyncIterator[tuple[TrainerPublisher, Rig]]:
    endpoint = free_tcp_endpoint()
    system = ActorSystem()
    try:
        async with trainer(keys, endpoint) as tp:
            rig = await make_rig(system, endpoint=endpoint, receiver_id="r1",
                                 curve=CurveClient(pair(keys, "server"), pair(keys, "trainer").public))
            yield tp, rig
    finally:
        await system.stop()


async def test_strangers_on_the_trainers_router_and_pub_never_complete_a_handshake_and_get_nothing(
        keys: dict[str, tuple[Path, Path]], curve_rig: tuple[TrainerPublisher, Rig]) -> None:
    """A stranger with keys (not on the allow-list) and one without CURVE send Register, PullBucket
    and a forged VersionOutcome, and a stranger SUB listens on the PUB: every handshake fails, the
    trainer receives none of it; the real receiver's push applies."""
    tp, rig = curve_rig
    trainer_key = pair(keys, "trainer").public
    socks = [watched_dealer(tp.endpoint, CurveClient(pair(keys, "stranger"), trainer_key)),
             watched_dealer(tp.endpoint, None)]
    sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sub_watch = HandshakeWatch(sub)
    CurveClient(pair(keys, "stranger"), trainer_key).apply(sub)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(tp.pub_endpoint)
    try:
        for i, (sock, _) in enumerate(socks):
            for msg in (Register(receiver_id=f"s{i}", host_id="x", transports=["inline"], live_version=0,
                                 checksums=[CHECKSUM_NAME]),
                        PullBucket(version=1, index=0),
                        VersionOutcome(receiver_id="r1", version=1, ok=False, error_code="bad_checksum",
                                       trainer_id=tp.trainer_id)):
                await sock.send_multipart(tp._codec.encode(1, msg))
        for _, watch in socks:
            await watch.wait(1)
        await sub_watch.wait(1)
        report = await tp.push_weights(1, TENSORS)
        assert report.receivers == ["r1"] and sorted(rig.sink.applied) == [1]
        assert sorted(tp.receivers) == ["r1"] and not tp.counters  # nothing from them, not even a drop
        assert await sub.poll(0) == 0  # the stranger SUB heard no announcement
    finally:
        for sock, watch in socks:
            watch.close()
            sock.close(linger=0)
        sub_watch.close()
        sub.close(linger=0)


async def test_another_allowed_server_cannot_take_a_receiver_id_pull_or_forge_its_outcome(
        keys: dict[str, tuple[Path, Path]], curve_rig: tuple[TrainerPublisher, Rig]) -> None:
    """"other" is on the allow-list (a second server) but is not r1: its Register as r1 is refused
    (UNAUTHORIZED: the id belongs to r1's key), its pull is refused (no receiver registered its
    key), its VersionOutcome for r1, sent while r1's load is held, is dropped; the push in flight is
    decided by r1 alone and succeeds."""
    tp, rig = curve_rig
    other = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    CurveClient(pair(keys, "other"), pair(keys, "trainer").public).apply(other)
    other.connect(tp.endpoint)
    try:
        rig.sink.gate = asyncio.Event()
        push = asyncio.ensure_future(tp.push_weights(1, TENSORS))
        await asyncio.wait_for(rig.sink.loading.wait(), 30)  # r1 pulled and verified; its load is held
        peer = tp.receivers["r1"].peer
        squat = await call(other, Register(receiver_id="r1", host_id="x", transports=["inline"], live_version=0,
                                           checksums=[CHECKSUM_NAME]), TrainerReply, 1)
        assert isinstance(squat, ErrorReply) and squat.code == ErrorCode.UNAUTHORIZED, squat
        pulled = await call(other, PullBucket(version=1, index=0), TrainerReply, 2)
        assert isinstance(pulled, ErrorReply) and pulled.code == ErrorCode.UNAUTHORIZED, pulled
        await other.send_multipart(tp._codec.encode(0, VersionOutcome(
            receiver_id="r1", version=1, ok=False, error_code="bad_checksum", message="forged",
            trainer_id=tp.trainer_id)))
        await call(other, PullBucket(version=1, index=0), TrainerReply, 3)  # answered after the outcome
        assert not push.done() and tp.receivers["r1"].peer == peer
        assert tp.counters == {"registrations_refused": 1, "pulls_refused": 2, "outcomes_dropped": 1}
        rig.sink.gate.set()
        report = await asyncio.wait_for(push, 30)
        assert report.receivers == ["r1"] and sorted(rig.sink.applied) == [1]
    finally:
        other.close(linger=0)


async def test_a_bucket_above_the_control_frame_limit_crosses_curve_to_a_receiver_process(
        keys: dict[str, tuple[Path, Path]]) -> None:
    """Regression: the bucket link's frame limit was exactly the bucket size, but libzmq counts the
    encrypted frame (CURVE adds a box and a nonce): between processes every bucket above 1 MiB
    stalled under CURVE."""
    endpoint = free_tcp_endpoint()
    receiver = await ReceiverProcess(endpoint, "r1", curve_files=(str(keys["server"][1]),
                                                                  str(keys["trainer"][0]))).start()
    big = {"big": torch.arange(30 << 18, dtype=torch.float32)}  # 30 MiB: a bucket of its own
    try:
        async with trainer(keys, endpoint) as tp:
            assert (await tp.push_weights(1, big)).receivers == ["r1"]
        assert (await receiver.report())["applied"] == {1: sums(big)}
    finally:
        assert await receiver.stop() == 0


def test_keys_and_receiver_keys_go_together() -> None:
    kp = KeyPair.generate()
    with pytest.raises(ValueError, match="together"):
        TrainerPublisher("tcp://127.0.0.1:1", keys=kp)
    with pytest.raises(ValueError, match="together"):
        TrainerPublisher("tcp://127.0.0.1:1", receiver_keys={kp.public})
    with pytest.raises(ValueError, match="secret"):
        TrainerPublisher("tcp://127.0.0.1:1", keys=KeyPair(kp.public), receiver_keys={kp.public})


