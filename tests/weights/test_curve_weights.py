"""CURVE on the trainer link (Ironhouse), with real key files: the receiver only hears the trainer
whose public key it was given, the trainer only lets in the servers it lists, a receiver id belongs
to the key that registered it, and outcomes count only from the receiver's own connection. A key
that is valid in another role (a rollout client's, allow-listed on the server's public sockets) is
a stranger on the trainer link, in either direction."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio

from rollwire import RolloutClient, SamplingParams
from rollwire.messages import ErrorCode, ErrorReply
from rollwire.messages.weights import Leaving, PullBucket, Register, StepMessage, TrainerReply, VersionOutcome
from rollwire.runtime import ActorSystem
from rollwire.transports.security import RECEIVERS_DOMAIN, CurveClient, CurveServer, KeyPair, create_keys
from rollwire.weightsync.checksum import NAME as CHECKSUM_NAME
from rollwire.weightsync.publisher import TrainerPublisher
from tests.conftest import free_tcp_endpoint, until
from tests.versioned import greedy, version_state
from tests.weights.conftest import Rig, make_rig
from tests.weights.harness import ScriptedTrainer
from tests.weights.hostile import HandshakeWatch, call
from tests.weights.test_hostile_trainer_link import TENSORS, ReceiverProcess

STRANGER_TENSORS = {k: -t for k, t in TENSORS.items()}
PROMPT = [3, 17, 42]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


def sums(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(t.double().sum()) for k, t in tensors.items()}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """(public .key, .key_secret) per name, written as `rollwire keys` writes them."""
    return {name: create_keys(tmp_path, name) for name in ("trainer", "server", "other", "stranger", "worker")}


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


def trainer(keys: dict[str, tuple[Path, Path]], endpoint: str, pub: str | None = None, *,
            receivers: tuple[str, ...] = ("server", "other")) -> TrainerPublisher:
    return TrainerPublisher(endpoint, pub_endpoint=pub, bucket_bytes=4 << 10, timeout_s=60,
                            keys=pair(keys, "trainer"), receiver_keys={pair(keys, r).public for r in receivers})


def serve(keys: dict[str, tuple[Path, Path]], rollout: str, trainer_endpoint: str,
          *extra: str) -> subprocess.Popen[bytes]:
    """A real `rollwire serve` under CURVE, as a deployment runs it: "server"'s key pair, "worker" on
    its rollout clients' allow-list, "trainer" as the trainer it pulls from, registering as server-0."""
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                             "--rollout-endpoint", rollout, "--trainer-endpoint", trainer_endpoint,
                             "--receiver-id", "server-0", "--secret-key", str(keys["server"][1]),
                             "--client-keys", str(keys["worker"][0]), "--trainer-keys", str(keys["trainer"][0]),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as tests/test_trust.py stops its CURVE server: with --secret-key, `rollwire serve`
    does not exit on SIGTERM yet (its context's term() waits on the ZAP authenticator's socket)."""
    server.kill()
    server.wait(60)


def worker_client(keys: dict[str, tuple[Path, Path]], rollout: str) -> RolloutClient:
    """The rollout client whose key the wrong-role tests use: valid on the server's public sockets."""
    return RolloutClient(rollout, curve=CurveClient(pair(keys, "worker"), pair(keys, "server").public))


async def generates_with(worker: RolloutClient, version: int) -> None:
    """The server generates with version ``version``'s weights (the tiny model of that seed), and says so."""
    done = await worker.generate(PROMPT, GREEDY)
    assert (done.weight_version, done.output_ids) == (version, greedy(version, PROMPT, 8)), done  # type: ignore[union-attr]


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


async def test_a_rollout_clients_key_at_the_trainer_endpoints_is_never_heard_and_the_real_trainer_then_pushes(
        keys: dict[str, tuple[Path, Path]]) -> None:
    """A real colocated `rollwire serve` took version 1 from the real trainer, which went away.
    "worker" (a valid key: the server serves it as a rollout client) binds a TrainerPublisher at
    both trainer endpoints with its own key pair and the server on its allow-list, publishes
    train_start and pushes a "newer" version 5 (inline, over the PUB and the ROUTER): the server's
    DEALER and SUB refuse its key in every handshake, so no Register reaches it, its step and its
    announcement go to no one, and the server still serves version 1 with its memory in place. The
    real trainer comes back; its train_start releases the server's memory and its version 2 applies
    (not refused as older than 5), and only its weights are served."""
    rollout, endpoint, pub = free_tcp_endpoint(), free_tcp_endpoint(), free_tcp_endpoint()
    server = serve(keys, rollout, endpoint, "--mode", "colocated")
    try:
        async with worker_client(keys, rollout) as worker:
            await worker.wait_ready(timeout=120)
            async with trainer(keys, endpoint, pub) as tp:
                assert (await tp.push_weights(1, version_state(1), transport="inline")).receivers == ["server-0"]
            await generates_with(worker, 1)  # the worker's key is served where it belongs
            impostor = TrainerPublisher(endpoint, pub_endpoint=pub, bucket_bytes=4 << 10, timeout_s=60,
                                        min_receivers=0,  # announce to whoever is there: no one
                                        keys=pair(keys, "worker"), receiver_keys={pair(keys, "server").public})
            async with impostor:
                router_watch, pub_watch = HandshakeWatch(impostor._peers.router), HandshakeWatch(impostor._pub._sock)
                try:
                    await router_watch.wait(2)  # the server's DEALER tried, and refused the worker's key
                    await pub_watch.wait(2)  # so did its SUB
                    assert await impostor.publish_step(4, "train_start", wait=False) == []
                    pushed = await impostor.push_weights(5, version_state(5), transport="inline")
                    await router_watch.wait(1)
                    await pub_watch.wait(1)  # handshakes after the announcement failed too
                    assert pushed.receivers == [] and pushed.failed == {}, pushed
                    assert impostor.receivers == {} and not impostor.counters  # nothing came from the server
                finally:
                    router_watch.close()
                    pub_watch.close()
                status = await worker.status()
                assert (status.weight_version, status.governor_state) == (1, "SERVING"), status
                await generates_with(worker, 1)  # not version 5's weights, and nothing held
            async with trainer(keys, endpoint, pub) as tp:
                assert await tp.publish_step(6, "train_start") == ["server-0"]
                assert (await worker.status()).governor_state == "RELEASED"  # the real trainer's step is acted on
                assert (await tp.push_weights(2, version_state(2), transport="inline")).receivers == ["server-0"]
            status = await worker.status()
            assert (status.weight_version, status.governor_state) == (2, "SERVING"), status
            await generates_with(worker, 2)
        assert server.poll() is None  # still serving: nothing it was sent stopped it
    finally:
        stop(server)


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
                await sock.send_multipart(tp._peers.codec.encode(1, msg))
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


async def test_a_rollout_clients_key_as_a_receiver_never_completes_a_handshake_and_the_server_gets_the_version(
        keys: dict[str, tuple[Path, Path]]) -> None:
    """A real `rollwire serve` registered with a trainer that lists only the server's key. "worker"
    (a valid key: the server serves it as a rollout client) tries the receiver's role: a real
    WeightReceiverActor process with the worker's key pair (and the trainer's public key right), a
    raw DEALER with that key sending Register (its own id, and server-0's), PullBucket and a forged
    VersionOutcome for server-0, and a SUB on the PUB. Every handshake is refused: the trainer
    receives none of it (no receiver, no refusal or drop counted), the step and the version reach
    only server-0, which applies it; the worker's receiver process registered nowhere, applied
    nothing and heard no step, and the raw peers got no reply and no announcement."""
    rollout, endpoint, pub = free_tcp_endpoint(), free_tcp_endpoint(), free_tcp_endpoint()
    server = serve(keys, rollout, endpoint)
    worker_as_receiver = CurveClient(pair(keys, "worker"), pair(keys, "trainer").public)
    wrong: ReceiverProcess | None = None
    try:
        async with trainer(keys, endpoint, pub, receivers=("server",)) as tp, worker_client(keys, rollout) as worker:
            await worker.wait_ready(timeout=120)
            await generates_with(worker, 0)  # the worker's key is served where it belongs
            await until(lambda: "server-0" in tp.receivers and tp.receivers["server-0"].joined, "server-0 joined",
                        timeout=120)
            router_watch = HandshakeWatch(tp._peers.router)  # after server-0's handshake: counts only the worker's
            dealer, dealer_watch = watched_dealer(endpoint, worker_as_receiver)
            sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
            sub_watch = HandshakeWatch(sub)
            worker_as_receiver.apply(sub)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(pub)
            try:
                for msg in (Register(receiver_id=rid, host_id="x", transports=["inline"], live_version=0,
                                     checksums=[CHECKSUM_NAME]) for rid in ("w2", "server-0")):
                    await dealer.send_multipart(tp._peers.codec.encode(1, msg))
                await dealer.send_multipart(tp._peers.codec.encode(2, PullBucket(version=1, index=0)))
                await dealer.send_multipart(tp._peers.codec.encode(0, VersionOutcome(
                    receiver_id="server-0", version=1, ok=False, error_code="bad_checksum", trainer_id=tp.trainer_id)))
                await dealer_watch.wait(1)
                await sub_watch.wait(1)
                wrong = await ReceiverProcess(endpoint, "w1", curve_files=(str(keys["worker"][1]),
                                                                           str(keys["trainer"][0]))).start()
                await router_watch.wait(2)  # the raw DEALER's refusal, then the receiver process's
                assert await tp.publish_step(1, "train_start") == ["server-0"]
                report = await tp.push_weights(1, version_state(1), transport="inline")
                assert report.receivers == ["server-0"] and report.failed == {}, report
                assert sorted(tp.receivers) == ["server-0"] and not tp.counters  # nothing from them, not even a drop
                assert await dealer.poll(0) == 0 and await sub.poll(0) == 0  # no reply, no announcement
                got = await wrong.report()
                assert (got["applied"], got["steps"], got["restarts"]) == ({}, [], 0), got
                assert not got["counters"].get("registrations"), got["counters"]  # never welcomed
            finally:
                router_watch.close()
                dealer_watch.close()
                dealer.close(linger=0)
                sub_watch.close()
                sub.close(linger=0)
            status = await worker.status()
            assert status.weight_version == 1, status
            await generates_with(worker, 1)
        assert server.poll() is None  # still serving: nothing it was sent stopped it
    finally:
        if wrong is not None:
            # it stops when asked, cleanly (regression: a cancel that met a failed call was lost in
            # asyncio.wait_for, and its register loop went on forever)
            code = await wrong.stop()
            if code is None:
                wrong.proc.kill()
            assert code == 0, code
        stop(server)


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
        await other.send_multipart(tp._peers.codec.encode(0, VersionOutcome(
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


async def test_an_id_stays_its_keys_after_it_leaves_and_what_is_kept_of_left_ids_is_bounded(
        keys: dict[str, tuple[Path, Path]]) -> None:
    """Under CURVE "other" registers ten made-up ids and leaves each (max_receivers=2): at each
    registration the trainer keeps the owner of at most 2 ids no longer registered, the newest;
    "server" may not take the newest (UNAUTHORIZED), but may take the oldest, whose owner was let go."""
    async with TrainerPublisher(free_tcp_endpoint(), timeout_s=60, max_receivers=2, keys=pair(keys, "trainer"),
                                receiver_keys={pair(keys, "server").public, pair(keys, "other").public}) as tp:
        socks = {}
        for name in ("other", "server"):
            socks[name] = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            socks[name].setsockopt(zmq.LINGER, 0)
            CurveClient(pair(keys, name), pair(keys, "trainer").public).apply(socks[name])
            socks[name].connect(tp.endpoint)
        try:
            def register(rid: str) -> Register:
                return Register(receiver_id=rid, host_id="h", transports=["inline"], live_version=0,
                                checksums=[CHECKSUM_NAME])
            codec = tp._peers.codec
            for i in range(10):
                welcome = await call(socks["other"], register(f"x{i}"), TrainerReply, i + 1)
                assert not isinstance(welcome, ErrorReply), welcome
                await socks["other"].send_multipart(codec.encode(0, Leaving(receiver_id=f"x{i}")))
                await until(lambda i=i: f"x{i}" not in tp.receivers, "the trainer forgets the id that left")
            # pruned as each registers: x9 was registered at its own, so 2 left ones besides it
            assert list(tp.roster.owners) == ["x7", "x8", "x9"]
            newest = await call(socks["server"], register("x9"), TrainerReply, 100)
            assert isinstance(newest, ErrorReply) and newest.code == ErrorCode.UNAUTHORIZED, newest
            oldest = await call(socks["server"], register("x0"), TrainerReply, 101)
            assert not isinstance(oldest, ErrorReply), oldest
            assert tp.receivers["x0"].key == pair(keys, "server").public.decode()
            assert list(tp.roster.owners) == ["x8", "x9", "x0"]
        finally:
            for sock in socks.values():
                sock.close(linger=0)


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


