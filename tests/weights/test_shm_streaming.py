"""An shm push is announced before it is packed, and the receiver copies each piece as soon as the
trainer has written it (``weightsync/arena_header.py``). What becomes of the version, the engine and
the requests when the trainer stops writing part-way: its pack fails (it gives the version up in the
arena's header) or its process is SIGKILLed. Real server (hf engine, tiny model), trainers in real
processes; the fault is injected in the trainer after it wrote the first piece."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch

from rollwire.clients.rollout import RolloutClient
from rollwire.engines.base import EngineError
from rollwire.engines.hf.weights import WeightStore
from rollwire.messages.errors import ErrorCode
from rollwire.messages.weights import INBAND, ShmPayload, WeightsReady
from rollwire.server import RolloutServer, ServerConfig, ShmVerify
from rollwire.transports.sockets import ipc_endpoint
from rollwire.weightsync import arena_header, shm
from rollwire.weightsync.layout import StagingError, at_offsets, plan_buckets
from rollwire.weightsync.memcopy import ByteCheck
from rollwire.weightsync.staged import resolve
from tests.conftest import free_tcp_endpoint, until
from tests.weights.test_end_to_end import TrainerProcess, greedy

SMALL_BUCKETS = 64 << 10  # the tiny model in ~10 buckets of one piece each: piece 0 is a small part of it


@asynccontextmanager
async def server(shm_verify: ShmVerify, stall_timeout_s: float,
                 ) -> AsyncIterator[tuple[RolloutServer, RolloutClient, str]]:
    cfg = ServerConfig(rollout_endpoint=ipc_endpoint("shm-stream"), trainer_endpoint=free_tcp_endpoint(),
                       receiver_id="server-0", stall_timeout_s=stall_timeout_s, max_new_tokens_limit=64,
                       shm_verify=shm_verify)
    async with RolloutServer(cfg) as srv, RolloutClient(cfg.rollout_endpoint, timeout=60) as rc:
        yield srv, rc, cfg.trainer_endpoint


@pytest.mark.parametrize("shm_verify", ["while_loading", "before_load"])
@pytest.mark.parametrize("how", ["fail", "die"])
async def test_a_trainer_that_stops_writing_a_version_part_way(shm_verify: ShmVerify, how: str) -> None:
    """``fail``: the trainer's push raises its pack's error, and the receiver fails the version at
    once (``weights_failed``; its stall timeout is 120 s here, the test would time out first).
    ``die``: the receiver fails it after its stall timeout (``timeout``). ``before_load``: the
    receiver waited for the whole version before pausing anything: the old version serves on, a
    request is answered at once on it. ``while_loading``: once the engine has copied the first
    piece into its parameters (always when the trainer dies; when its pack fails, only if the
    engine got there before the failure: the tiny version is packed in under a ms, so the version
    fails at staging, in the engine before it copied anything, or after, run by run), it
    holds requests (health INCOMPLETE); one sent then waits, unanswered, and is answered by the next
    whole version, on that version; if it had copied nothing, the old version serves on. In every
    case the next push loads."""
    async with server(shm_verify, 120.0 if how == "fail" else 1.5) as (srv, rc, endpoint):
        original = await greedy(rc)
        receiver, gen = srv.system.actor("weight_receiver"), srv.system.actor("generation")
        trainer = await TrainerProcess(endpoint, bucket_bytes=SMALL_BUCKETS).start()
        try:
            trainer.commands.put(("mid_pack", how))
            if how == "fail":
                assert await trainer.push(1, "perturbed", "shm") == (
                    "error", 1, "shm", "fault injection: the pack fails after piece 0")
                code = ErrorCode.WEIGHTS_FAILED
            else:
                trainer.commands.put((1, "perturbed", "shm"))
                await until(lambda: not trainer.proc.is_alive(), "the trainer killed itself mid-pack", 30)
                code = ErrorCode.TIMEOUT
            await until(lambda: receiver.counters.get(f"rejected_{code.value}") == 1, f"version 1 failed: {code}", 30)
            held = None
            state = (await rc.health()).governor_state
            if shm_verify == "before_load":
                assert await greedy(rc) == original  # answered at once, on version 0, unharmed
                assert gen.counters.get("load_failures") == 0 and gen.counters.get("pauses_retract") == 0
                assert state == "SERVING"
            elif how == "fail" and state == "SERVING":  # failed at staging, or in the engine before a byte
                assert gen.counters.get("load_failures") in (0, 1)  # went in: either way nothing of it is loaded
                assert await greedy(rc) == original  # answered at once, on version 0, unharmed
            else:
                assert gen.counters.get("load_failures") == 1
                assert state == "INCOMPLETE"
                held = asyncio.ensure_future(greedy(rc))
                await until(lambda: len(gen.in_flight) == 1, "the request reached the generation actor", 30)
                assert not held.done()  # waiting: the parameters hold part of version 1
            if how == "die":
                await trainer.stop()
                trainer = await TrainerProcess(endpoint, bucket_bytes=SMALL_BUCKETS).start()
            assert await trainer.push(2, "perturbed", "shm") == ("ok", 2, "shm", ["server-0"])
            now = await greedy(rc)
            assert now[1] == 2 and now[0] != original[0]
            assert (await rc.health()).governor_state == "SERVING"
            if held is not None:
                assert await held == now  # the held request ran on version 2, whole
        finally:
            await trainer.stop()
        assert trainer.proc.exitcode == 0


def test_a_reader_follows_the_writer_piece_by_piece_and_fails_on_a_rewritten_or_foreign_header() -> None:
    """The header protocol itself, both halves on one real arena: a piece reads as written only
    once flagged; the checksums only once the version is complete; a newer push (another stamp),
    an abandoned one, a header for other buckets, or a stall each fail the reader with its code."""
    named = [("a", torch.arange(300_000, dtype=torch.float32)), ("b", torch.ones(10))]
    plans = plan_buckets(named, 1 << 30)
    arena = shm.ShmArena()
    try:
        offsets, writer = shm.layout_arena(arena, plans)
        nbytes = [p.nbytes for p in plans]
        attached = shm.attach(arena.name).tensor
        reader = arena_header.HeaderReader(attached, writer.stamp, nbytes, stall_timeout_s=0.2)
        assert writer.n_pieces == 2 and offsets[0] == arena_header.header_bytes(2, 1)
        with pytest.raises(StagingError) as stalled:
            reader.wait_piece(0, 0)  # nothing written yet
        assert stalled.value.code == ErrorCode.TIMEOUT
        reader = arena_header.HeaderReader(attached, writer.stamp, nbytes, stall_timeout_s=0.2)
        sums = shm.pack(arena.tensor, plans, offsets, writer)
        reader.wait_piece(0, 1)
        assert reader.checksums() == sums
        writer.give_up()  # the push failed for another receiver: this one still reads a whole version
        assert reader.checksums() == sums
        with pytest.raises(StagingError) as foreign:
            arena_header.HeaderReader(attached, writer.stamp, [nbytes[0], 8], stall_timeout_s=0.2)
        assert foreign.value.code == ErrorCode.BAD_FIELD
        newer = arena_header.HeaderWriter(arena.tensor, arena.next_stamp(), nbytes)
        with pytest.raises(StagingError) as superseded:
            reader.wait_piece(0, 0)
        assert superseded.value.code == ErrorCode.SUPERSEDED
        reader = arena_header.HeaderReader(attached, newer.stamp, nbytes, stall_timeout_s=60)
        newer.piece_written(0)
        reader.wait_piece(0, 0)
        newer.give_up()
        with pytest.raises(StagingError) as abandoned:
            reader.wait_piece(0, 1)  # fails at once, not after 60 s
        assert abandoned.value.code == ErrorCode.WEIGHTS_FAILED
        with pytest.raises(StagingError):
            reader.checksums()  # every later wait fails too
        newer.complete([0])  # a pack that ran on after its push was cancelled: still given up
        with pytest.raises(StagingError) as late:
            arena_header.HeaderReader(attached, newer.stamp, nbytes, stall_timeout_s=60)
        assert late.value.code == ErrorCode.WEIGHTS_FAILED
    finally:
        shm.detach_all()
        arena.close()


def test_a_longer_header_over_the_last_versions_bytes_reads_no_piece_as_written() -> None:
    """Regression (found by review): the piece flags of a push whose header is longer than the last
    one's lie on that push's bucket bytes; int64 values equal to the new stamp read as "written"
    before the trainer wrote anything (a correct version then failed its checksums)."""
    arena = shm.ShmArena()
    try:
        first = plan_buckets([("counts", torch.full((8192,), 2, dtype=torch.int64))], 1 << 30)
        offsets, writer = shm.layout_arena(arena, first)
        shm.pack(arena.tensor, first, offsets, writer)
        assert writer.stamp == 1  # the next push's stamp is 2: the bytes above hold 2s
        many = plan_buckets([(f"t{i}", torch.ones(2)) for i in range(600)], 8)
        offsets, writer = shm.layout_arena(arena, many)
        assert writer.stamp == 2 and offsets[0] > arena_header.header_bytes(1, 1)  # longer than before
        reader = arena_header.HeaderReader(shm.attach(arena.name).tensor, writer.stamp, [p.nbytes for p in many],
                                           stall_timeout_s=0.2)
        for bucket in (0, 550, 599):  # flags in the old header's page and over the old bucket's bytes
            with pytest.raises(StagingError) as unwritten:
                reader.wait_piece(bucket, 0)
            assert unwritten.value.code == ErrorCode.TIMEOUT
            reader.failure = None  # (the first failure fails every later wait: look at each piece anew)
    finally:
        shm.detach_all()
        arena.close()


def _streamed_checks(arena: shm.ShmArena, named: list[tuple[str, torch.Tensor]], stall_timeout_s: float,
                     ) -> tuple[Any, list[ByteCheck], list[tuple[str, torch.Tensor]]]:
    """A version laid out in ``arena`` (announced, nothing written yet): the header, the engine's
    checks and the staged tensors a receiver would hand the hf engine."""
    plans = plan_buckets(named, 1 << 30)
    offsets, writer = shm.layout_arena(arena, plans)
    attached = shm.attach(arena.name).tensor
    nbytes = [p.nbytes for p in plans]
    reader = arena_header.HeaderReader(attached, writer.stamp, nbytes, stall_timeout_s)
    checks = [ByteCheck(i, attached[o:o + n], INBAND, reader)
              for i, (o, n) in enumerate(zip(offsets, nbytes, strict=True))]
    metas = [p.meta(INBAND) for p in plans]
    return writer, checks, resolve(at_offsets(metas, offsets), [], {"shm_name": arena.name})


def test_a_version_given_up_before_the_engine_copied_a_byte_leaves_the_live_weights_serving() -> None:
    """Regression (found by review): a streamed load that failed on its first wait marked every
    parameter undefined (requests held until another whole version) though nothing was copied."""
    model = torch.nn.Linear(256, 256)
    store, before = WeightStore(model, torch.device("cpu")), model.weight.detach().clone()
    arena = shm.ShmArena()
    try:
        writer, checks, staged = _streamed_checks(arena, [(n, p.detach() + 1) for n, p in model.named_parameters()],
                                                  stall_timeout_s=30)
        writer.give_up()  # the push was cancelled right after its announcement
        with pytest.raises(EngineError) as failed:
            store.copy(store.check(staged), checks)
        assert failed.value.code == ErrorCode.WEIGHTS_FAILED and "hold part" not in failed.value.message
        assert store.undefined == 0 and torch.equal(model.weight.detach(), before)
    finally:
        shm.detach_all()
        arena.close()


class StartedPool(ThreadPoolExecutor):
    """One thread; ``started`` is set when a job begins on it."""

    def __init__(self) -> None:
        super().__init__(1)
        self.started = threading.Event()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            self.started.set()
            return fn(*args, **kwargs)

        return super().submit(run)


async def test_a_cancelled_staging_stops_waiting_for_the_trainers_bytes() -> None:
    """Regression (found by review): ``before_load`` staging waits for the whole version on a verify
    thread; cancelled (superseded, the receiver stopping), that thread polled on for the stall
    timeout. Now it stops at its next look, and the pool's only thread takes the next job."""
    model = torch.nn.Linear(64, 64)
    arena = shm.ShmArena()
    pool = StartedPool()
    try:
        plans = plan_buckets([(n, p.detach()) for n, p in model.named_parameters()], 1 << 30)
        offsets, writer = shm.layout_arena(arena, plans)
        ready = WeightsReady(trainer_id="t", version=1, step=1, n_buckets=len(plans),
                             total_bytes=sum(p.nbytes for p in plans), buckets=[p.meta(INBAND) for p in plans],
                             payload=ShmPayload(name=arena.name, offsets=offsets, stamp=writer.stamp))
        staging = asyncio.ensure_future(shm.ShmStager(verify_on_load=False).stage(ready, pool, 120.0))
        loop = asyncio.get_running_loop()
        await until(pool.started.is_set, "the wait is on the pool's thread", 10)
        staging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await staging
        assert await asyncio.wait_for(loop.run_in_executor(pool, lambda: "free"), 10) == "free"
    finally:
        pool.shutdown(wait=False)
        shm.detach_all()
        arena.close()
