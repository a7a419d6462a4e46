"""An shm push is announced before it is packed, and the receiver copies each piece as soon as the
trainer has written it (``weightsync/arena_header.py``). What becomes of the version, the engine and
the requests when the trainer stops writing part-way: its pack fails (it gives the version up in the
arena's header) or its process is SIGKILLed. Real server (hf engine, tiny model), trainers in real
processes; the fault is injected in the trainer after it wrote the first piece."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch

from rollwire.clients.rollout import RolloutClient
from rollwire.messages.errors import ErrorCode
from rollwire.server import RolloutServer, ServerConfig, ShmVerify
from rollwire.transports.sockets import ipc_endpoint
from rollwire.weightsync import arena_header, shm
from rollwire.weightsync.layout import StagingError, plan_buckets
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
    request is answered at once on it. ``while_loading``: the engine had copied the first piece
    into its parameters: it holds requests (health INCOMPLETE); one sent then waits, unanswered,
    and is answered by the next whole version, on that version. In both, the next push loads."""
    async with server(shm_verify, 120.0 if how == "fail" else 1.5) as (srv, rc, endpoint):
        original = await greedy(rc)
        receiver, gen = srv.system.actor("weight_receiver"), srv.system.actor("generation")
        trainer = await TrainerProcess(endpoint, bucket_bytes=SMALL_BUCKETS).start()
        try:
            trainer.commands.put(("mid_pack", how))
            if how == "fail":
                assert await trainer.push(1, "perturbed", "shm") == (
                    "error", 1, "shm", "fault injection: the pack fails at piece 1")
                code = ErrorCode.WEIGHTS_FAILED
            else:
                trainer.commands.put((1, "perturbed", "shm"))
                await until(lambda: not trainer.proc.is_alive(), "the trainer killed itself mid-pack", 30)
                code = ErrorCode.TIMEOUT
            await until(lambda: receiver.counters.get(f"rejected_{code.value}") == 1, f"version 1 failed: {code}", 30)
            held = None
            if shm_verify == "before_load":
                assert await greedy(rc) == original  # answered at once, on version 0, unharmed
                assert gen.counters.get("load_failures") == 0 and gen.counters.get("pauses_retract") == 0
                assert (await rc.health()).governor_state == "SERVING"
            else:
                assert gen.counters.get("load_failures") == 1
                assert (await rc.health()).governor_state == "INCOMPLETE"
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
