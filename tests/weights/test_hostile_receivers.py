"""Hostile receivers against a real TrainerPublisher: whatever reaches its ROUTER, the trainer
answers with a typed error or drops and counts it, keeps serving, and pushes to the real receivers.
A receiver id cannot be taken from a live receiver, outcomes count only from the connection that
registered their receiver id, and a trainer whose receiving task dies fails its pushes at once."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from rollwire.messages import ErrorCode, ErrorReply
from rollwire.messages.weights import Leaving, PullBucket, Register, TrainerReply, VersionOutcome
from rollwire.runtime import ActorSystem
from rollwire.transports import pubsub
from rollwire.weightsync.checksum import NAME as CHECKSUM_NAME
from rollwire.weightsync.publisher import PushError, TrainerPublisher
from tests.conftest import free_tcp_endpoint
from tests.weights.conftest import Rig, make_rig
from tests.weights.hostile import call, dealer, header, hostile_frames, nested
from tests.weights.procs import trainer_main
from tests.weights.test_hostile_trainer_link import draw_cases

TENSORS = {"w": torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32), "b": torch.ones(64)}
CONTROL_MAX_FRAME = getattr(pubsub, "CONTROL_MAX_FRAME", 1 << 20)  # (getattr: the regressions also run on older code)
_rids = itertools.count(1000)


class TrainerProcess:
    """A TrainerPublisher in its own process pushing ``TENSORS`` (commands as procs.trainer_main)."""

    def __init__(self, endpoint: str) -> None:
        ctx = mp.get_context("spawn")
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=trainer_main, args=(endpoint, {"small": TENSORS}, self.commands, self.results),
                                kwargs={"bucket_bytes": 4 << 10})

    async def get(self, timeout: float = 120.0) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.results.get, True, timeout)

    async def start(self) -> TrainerProcess:
        self.proc.start()
        assert (await self.get())[0] == "started"
        return self

    async def push(self, version: int) -> Any:
        self.commands.put((version, "small", "inline"))
        return await self.get()

    async def stop(self) -> int | None:
        if self.proc.is_alive():
            self.commands.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self.proc.join, 30)
        return self.proc.exitcode


async def probe(sock: Any) -> ErrorReply:
    """A pull for a version nobody pushes, on the connection that sent the hostile messages (so it
    is answered after them), until answered: the trainer's receiving task still serves. A
    connection dropped for an oversize frame loses what followed it; ZeroMQ reconnects and the
    next try gets through."""
    for _ in range(30):
        try:
            reply = await call(sock, PullBucket(version=10**9, index=0), TrainerReply, next(_rids), timeout=1.0)
            assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_VERSION, reply
            return reply
        except TimeoutError:
            continue
    raise AssertionError("the trainer never answered")


@pytest.fixture
async def trainer_proc() -> AsyncIterator[tuple[str, TrainerProcess]]:
    endpoint = free_tcp_endpoint()
    proc = await TrainerProcess(endpoint).start()
    try:
        yield endpoint, proc
    finally:
        assert await proc.stop() == 0


async def push_to_a_real_receiver(endpoint: str, proc: TrainerProcess, version: int = 1) -> Rig:
    system = ActorSystem()
    try:
        rig = await make_rig(system, endpoint=endpoint, receiver_id="real-0")
        assert await proc.push(version) == ("ok", version, "inline", ["real-0"])
        assert {k: t.sum().item() for k, t in rig.sink.applied[version].items()} == \
               {k: t.sum().item() for k, t in TENSORS.items()}
        return rig
    finally:
        await system.stop()


async def test_fuzzed_receivers_never_stop_a_trainer_process_and_a_real_receiver_then_gets_its_push(
        trainer_proc: tuple[str, TrainerProcess]) -> None:
    """Random, truncated, deeply nested, wrong-kind, wrong-field, extra-frame and oversize messages,
    each case from a fresh connection; after each, the trainer still answers a request (typed
    BAD_VERSION); at the end a real receiver registers and the trainer process pushes to it."""
    endpoint, proc = trainer_proc
    for messages in draw_cases(st_cases(), 60):
        sock = dealer(endpoint)
        try:
            for frames in messages:
                await sock.send_multipart(frames)
            await probe(sock)
        finally:
            sock.close(linger=0)
    await push_to_a_real_receiver(endpoint, proc)


def st_cases() -> Any:
    from hypothesis import strategies as st

    return st.lists(hostile_frames(rid=next(_rids), oversize=CONTROL_MAX_FRAME), min_size=1, max_size=4)


async def test_deeply_nested_messages_get_a_typed_error_and_the_trainer_process_still_pushes(
        trainer_proc: tuple[str, TrainerProcess]) -> None:
    """Regression: RecursionError out of the codec killed the trainer's receiving task silently;
    every later push then failed."""
    endpoint, proc = trainer_proc
    sock = dealer(endpoint)
    try:
        for prefix in (b"", b"\x92\xa4pull", b"\x81\xa4type"):
            await sock.send_multipart([header(5), prefix + nested(100_000)])
        await probe(sock)
    finally:
        sock.close(linger=0)
    await push_to_a_real_receiver(endpoint, proc)


@pytest.fixture
async def trainer_and_rig() -> AsyncIterator[tuple[TrainerPublisher, Rig]]:
    system = ActorSystem()
    endpoint = free_tcp_endpoint()
    try:
        async with TrainerPublisher(endpoint, timeout_s=60, bucket_bytes=4 << 10) as tp:
            rig = await make_rig(system, endpoint=endpoint, receiver_id="r1")
            yield tp, rig
    finally:
        await system.stop()


async def test_a_trainer_whose_receiving_task_dies_fails_the_pending_push_and_every_later_one_at_once(
        trainer_and_rig: tuple[TrainerPublisher, Rig]) -> None:
    """The push in flight fails with the reason (it used to wait out timeout_s and then blame the
    receiver), the next push fails at once; the receiver, which had staged version 1 before, still
    applies it when its load goes on (the trainer no longer hears about it)."""
    tp, rig = trainer_and_rig
    rig.sink.gate = asyncio.Event()  # the receiver's load waits: the push stays in flight
    push = asyncio.ensure_future(tp.push_weights(1, TENSORS))
    await asyncio.wait_for(rig.sink.loading.wait(), 30)
    tp._peers.router.close(linger=0)  # the ROUTER goes away under the receiving task
    async with asyncio.timeout(20):  # (timeout_s is 60: the old code would still be waiting)
        with pytest.raises(PushError, match="trainer broken"):
            await push
    with pytest.raises(PushError, match="trainer broken"):
        await tp.push_weights(2, TENSORS)
    rig.sink.gate.set()
    async with asyncio.timeout(20):
        while rig.receiver.live_version != 1:
            await asyncio.sleep(0.02)
    assert sorted(rig.sink.applied) == [1]


async def wait_registered(tp: TrainerPublisher, receiver_id: str) -> None:
    async with asyncio.timeout(20):
        while receiver_id not in tp.receivers or not tp.receivers[receiver_id].joined:
            await asyncio.sleep(0.02)


async def test_a_register_for_a_live_receivers_id_from_another_connection_is_refused_and_the_receiver_keeps_its_place(
        trainer_and_rig: tuple[TrainerPublisher, Rig]) -> None:
    """Regression (without CURVE): a stranger's Register used to take over "r1" silently."""
    tp, rig = trainer_and_rig
    await wait_registered(tp, "r1")
    peer = tp.receivers["r1"].peer
    sock = dealer(tp.endpoint)
    try:
        reply = await call(sock, Register(receiver_id="r1", host_id="elsewhere", transports=["inline"],
                                          live_version=0, checksums=[CHECKSUM_NAME]), TrainerReply, 1)
    finally:
        sock.close(linger=0)
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNAUTHORIZED and reply.retry_after_s > 0, reply
    assert tp.receivers["r1"].peer == peer
    report = await tp.push_weights(1, TENSORS)
    assert report.receivers == ["r1"] and sorted(rig.sink.applied) == [1]


async def test_an_outcome_or_goodbye_from_a_connection_that_did_not_register_its_receiver_is_dropped(
        trainer_and_rig: tuple[TrainerPublisher, Rig]) -> None:
    """Regression (without CURVE): a stranger's VersionOutcome for "r1" used to decide the push; a
    stranger's Leaving for "r1" must not count it out either."""
    tp, rig = trainer_and_rig
    rig.sink.gate = asyncio.Event()
    push = asyncio.ensure_future(tp.push_weights(1, TENSORS))
    await asyncio.wait_for(rig.sink.loading.wait(), 30)
    sock = dealer(tp.endpoint)
    try:
        await sock.send_multipart(tp._peers.codec.encode(0, VersionOutcome(
            receiver_id="r1", version=1, ok=False, error_code="bad_checksum", message="forged",
            trainer_id=tp.trainer_id)))
        await sock.send_multipart(tp._peers.codec.encode(0, Leaving(receiver_id="r1")))  # a forged goodbye
        await call(sock, PullBucket(version=10**9, index=0), TrainerReply, 2)  # answered after both
    finally:
        sock.close(linger=0)
    assert not push.done() and "r1" in tp.receivers
    assert tp.counters["outcomes_dropped"] == 1 and tp.counters["leaves_dropped"] == 1
    rig.sink.gate.set()
    report = await asyncio.wait_for(push, 30)  # the in-flight push: decided by r1 itself, applied
    assert report.receivers == ["r1"] and sorted(rig.sink.applied) == [1]


async def test_a_receiver_stopping_mid_push_is_counted_out_at_once_and_its_successor_gets_the_next_push() -> None:
    """A server that stops (SIGTERM, shutdown, an actor restart) says so: the push waiting on it
    fails for it at once with the reason, long before the trainer's timeout or its liveness bound
    (both 600 s here), and its id is free for the next process, which takes the next push."""
    endpoint = free_tcp_endpoint()
    async with TrainerPublisher(endpoint, timeout_s=600, lost_after_s=600, bucket_bytes=4 << 10) as tp:
        system = ActorSystem()
        try:
            rig = await make_rig(system, endpoint=endpoint, receiver_id="r1")
            rig.sink.gate = asyncio.Event()  # version 1 stays loading until the receiver has stopped
            push = asyncio.ensure_future(tp.push_weights(1, TENSORS))
            await asyncio.wait_for(rig.sink.loading.wait(), 30)
        finally:
            await system.stop()  # the receiver stops first (reverse spawn order) and says it leaves
        with pytest.raises(PushError) as failed:
            await asyncio.wait_for(push, 30)
        assert failed.value.failures == {"r1": "left: its server is stopping"}, failed.value.failures
        assert "r1" not in tp.receivers and not tp.counters
        system = ActorSystem()
        try:
            rig = await make_rig(system, endpoint=endpoint, receiver_id="r1")  # the same id, a new connection
            report = await asyncio.wait_for(tp.push_weights(2, TENSORS), 60)
            assert report.receivers == ["r1"] and sorted(rig.sink.applied) == [2], report
        finally:
            await system.stop()
