"""A hostile trainer against a real receiver process: whatever comes back on the registration
exchange, the control link, the PUB or a bucket reply, the WeightReceiverActor keeps running (no
restart, supervision never gives up), drops or refuses it with a typed code, and applies the next
good version. The receiver runs in its own process (``procs.receiver_main``); the trainer is the
scripted one of ``harness.py``, told what to send."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing as mp
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rollwire.messages import ErrorCode
from rollwire.messages.weights import Beacon, Welcome
from rollwire.transports import pubsub
from rollwire.weightsync.checksum import NAME as CHECKSUM_NAME
from tests.conftest import free_tcp_endpoint
from tests.weights.harness import ScriptedTrainer
from tests.weights.hostile import header, hostile_frames, nested
from tests.weights.procs import receiver_main

CODES = {c.value for c in ErrorCode}
CONTROL_MAX_FRAME = getattr(pubsub, "CONTROL_MAX_FRAME", 1 << 20)  # (getattr: the regressions also run on older code)
TENSORS = {"w": torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32), "b": torch.ones(64)}


class ReceiverProcess:
    def __init__(self, endpoint: str, receiver_id: str = "r1", curve_files: Any = None) -> None:
        ctx = mp.get_context("spawn")
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=receiver_main, args=(endpoint, receiver_id, self.commands, self.results,
                                                            curve_files))

    async def get(self, timeout: float = 60.0) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.results.get, True, timeout)

    async def start(self) -> ReceiverProcess:
        self.proc.start()
        assert await self.get() == ("started",)
        return self

    async def report(self) -> dict[str, Any]:
        self.commands.put(("report",))
        _, counters, restarts, applied, steps, gave_up = await self.get()
        return {"counters": counters, "restarts": restarts, "applied": applied, "steps": steps, "gave_up": gave_up}

    async def stop(self) -> int | None:
        if self.proc.is_alive():
            self.commands.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self.proc.join, 30)
        return self.proc.exitcode


@pytest.fixture
async def link() -> AsyncIterator[tuple[ScriptedTrainer, ReceiverProcess]]:
    endpoint = free_tcp_endpoint()
    async with ScriptedTrainer(endpoint, free_tcp_endpoint()) as trainer:
        receiver = await ReceiverProcess(endpoint).start()
        try:
            await trainer.wait_joined()
            yield trainer, receiver
        finally:
            assert await receiver.stop() == 0  # it stops cleanly: supervision never gave up


async def good_push(trainer: ScriptedTrainer, version: int) -> Any:
    plans = trainer.plan(TENSORS, bucket_bytes=4 << 10)
    return await asyncio.wait_for(await trainer.announce(version, plans), 30)


async def assert_unharmed(trainer: ScriptedTrainer, receiver: ReceiverProcess, version: int) -> dict[str, Any]:
    """A good version applies whole, and the receiver was never restarted."""
    outcome = await good_push(trainer, version)
    assert outcome.ok, outcome
    report = await receiver.report()
    assert report["restarts"] == 0 and not report["gave_up"], report
    assert report["applied"][version] == {k: float(t.double().sum()) for k, t in TENSORS.items()}
    return report


async def register_again(trainer: ScriptedTrainer, script: list[list[bytes]]) -> None:
    """An announcement from "another trainer" makes the receiver register again: each of ``script``
    answers one Register, then the real Welcome; returns once it acknowledges beacons again."""
    trainer.register_script = list(script)
    await trainer.pub.publish(Beacon(trainer_id="not-" + trainer.trainer_id, seq=1))
    async with asyncio.timeout(120):
        while trainer.register_script:
            await trainer.wait_beacon_acks(1, timeout=60)
    await trainer.wait_beacon_acks(1)


def draw_cases(strategy: Any, n: int) -> list[Any]:
    """``n`` examples drawn by hypothesis (replayed against the live processes afterwards: the
    processes outlive the examples, so there is no shrinking)."""
    cases: list[Any] = []

    @settings(max_examples=n, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case: Any) -> None:
        cases.append(case)

    collect()
    return cases


async def play(trainer: ScriptedTrainer, where: str, messages: list[list[bytes]], receiver_id: str,
               push: Callable[[], Awaitable[Any]]) -> Any:
    """One fuzz case: hostile replies to Register, unasked messages on the PUB or the control link
    (after which the receiver still acknowledges beacons), or hostile bucket replies to the version
    ``push`` announces: returns its outcome (ok, or refused with a typed code); otherwise None."""
    if where == "register":
        await register_again(trainer, messages)
    elif where in ("pub", "control"):
        for frames in messages:
            if where == "pub":
                await trainer.publish_raw(frames)
            else:
                await trainer.send_raw(trainer.peers[receiver_id], 0, frames)
        await trainer.wait_beacon_acks(1)
    else:
        trainer.pull_script = list(messages)
        try:
            outcome = await push()
        finally:
            trainer.pull_script = []
        assert outcome.ok or outcome.error_code in CODES, outcome
        return outcome
    return None


CASE = st.tuples(st.sampled_from(["register", "pub", "control", "bucket"]),
                 st.lists(hostile_frames(oversize=CONTROL_MAX_FRAME), min_size=1, max_size=3))


async def test_a_fuzzed_trainer_never_stops_a_receiver_process_and_its_next_good_version_applies(
        link: tuple[ScriptedTrainer, ReceiverProcess]) -> None:
    """Random, truncated, deeply nested, wrong-kind, wrong-field and oversize messages as replies to
    Register, unasked on the control link, on the PUB, and as bucket replies. After each case the
    receiver still acknowledges beacons (register/pub/control) or reports the version it was pulling,
    ok or with a typed code (bucket); at the end a good version applies and there was no restart."""
    trainer, receiver = link
    version = 0
    outcomes: dict[str, int] = {}
    for where, messages in draw_cases(CASE, 50):
        if where == "bucket":
            version += 1
        outcome = await play(trainer, where, messages, "r1", functools.partial(good_push, trainer, version))
        if outcome is not None:
            key = "ok" if outcome.ok else outcome.error_code
            outcomes[key] = outcomes.get(key, 0) + 1
    report = await assert_unharmed(trainer, receiver, version + 1)
    counters = report["counters"]
    assert counters.get("bad_replies", 0) + counters.get("link_failures", 0) > 0, counters
    print("bucket outcomes", outcomes, "counters", {k: v for k, v in counters.items() if v})


async def test_deeply_nested_replies_to_register_are_dropped_and_the_receiver_takes_the_real_welcome(
        link: tuple[ScriptedTrainer, ReceiverProcess]) -> None:
    """Regression: each one used to crash the actor (RecursionError out of the codec); six in a row
    made supervision give up."""
    trainer, receiver = link
    await register_again(trainer, [[header(0), nested(100_000)] for _ in range(6)])
    await assert_unharmed(trainer, receiver, 1)


@pytest.mark.parametrize("pub", ["tcp://*:notaport", "tcp://[::1", "nonsense", ""])
async def test_a_welcome_naming_an_unusable_pub_endpoint_is_dropped_and_the_receiver_registers_again(
        link: tuple[ScriptedTrainer, ReceiverProcess], pub: str) -> None:
    """Regression: urlparse's ValueError or ZeroMQ's EINVAL escaped _register and crashed the actor."""
    trainer, receiver = link
    codec_frames = trainer.codec.encode(0, Welcome(trainer_id=trainer.trainer_id, pub_endpoint=pub,
                                                   checksum=CHECKSUM_NAME))
    await register_again(trainer, [list(codec_frames)])
    await assert_unharmed(trainer, receiver, 1)


async def test_deeply_nested_announcements_are_counted_and_dropped(
        link: tuple[ScriptedTrainer, ReceiverProcess]) -> None:
    """Regression: the SUB's decoder raised RecursionError (not a ProtocolError) into the actor."""
    trainer, receiver = link
    for prefix in (b"", b"\x92\xa6beacon", b"\x81\xa4type"):
        await trainer.publish_raw([header(0), prefix + nested(100_000)])
    await trainer.wait_beacon_acks(1)
    report = await assert_unharmed(trainer, receiver, 1)
    assert report["steps"] == []


async def test_a_deeply_nested_bucket_reply_fails_only_its_version_with_a_typed_code(
        link: tuple[ScriptedTrainer, ReceiverProcess]) -> None:
    """Regression: the reply killed the link's receiving task, and reporting the outcome on the dead
    link crashed the actor. Now the version is refused (typed) and the next one applies."""
    trainer, receiver = link
    trainer.pull_script = [[header(0), nested(100_000)]]
    outcome = await good_push(trainer, 1)
    assert not outcome.ok and outcome.error_code in CODES, outcome
    await assert_unharmed(trainer, receiver, 2)
