"""Weight sync through the real RolloutServer (hf engine, tiny model), trainers in real processes."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rollwire.clients.rollout import RolloutClient
from rollwire.fleet.client import RolloutFleet
from rollwire.messages import SamplingParams
from rollwire.server import RolloutServer, ServerConfig, ShmVerify
from rollwire.transports.security import CurveClient, KeyPair, create_keys
from rollwire.transports.sockets import ipc_endpoint
from tests.conftest import free_tcp_endpoint, until
from tests.weights.procs import tiny_weights, trainer_main

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = [1, 40, 41, 42, 43]


class TrainerProcess:
    """A trainer in its own process, driven by commands: (version, weights kind, transport)."""

    def __init__(self, endpoint: str, **kw: Any) -> None:
        ctx = mp.get_context("spawn")
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        weights = {kind: tiny_weights(kind) for kind in ("original", "perturbed", "partial", "bad_shape",
                                                          "bad_dtype", "unknown")}
        self.proc = ctx.Process(target=trainer_main, args=(endpoint, weights, self.commands, self.results), kwargs=kw)

    async def get(self, timeout: float = 120.0) -> tuple:
        return await asyncio.get_running_loop().run_in_executor(None, self.results.get, True, timeout)

    async def start(self) -> TrainerProcess:
        self.proc.start()
        assert (await self.get())[0] == "started"
        return self

    async def push(self, version: int, kind: str, transport: str) -> tuple:
        self.commands.put((version, kind, transport))
        return await self.get()

    async def stop(self) -> None:
        if self.proc.is_alive():
            self.commands.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self.proc.join, 30)


@pytest.fixture(params=["plain", "curve"])
async def served(request: pytest.FixtureRequest, tmp_path: Path,
                 ) -> AsyncIterator[tuple[RolloutServer, RolloutClient, str, dict[str, Any]]]:
    """A server with its trainer endpoint; "curve": CURVE on every socket (the server's rollout
    socket, the trainer's ROUTER and PUB, the receiver's DEALERs and SUB), real key files. The last
    item is what a TrainerProcess needs to be let in."""
    trainer_endpoint = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ipc_endpoint("e2e"), trainer_endpoint=trainer_endpoint,
                       receiver_id="server-0", stall_timeout_s=1.5, max_new_tokens_limit=64)
    trainer_kw: dict[str, Any] = {}
    client_kw: dict[str, Any] = {}
    if request.param == "curve":
        keys = {name: create_keys(tmp_path, name) for name in ("server", "trainer", "worker")}
        cfg.secret_key, cfg.trainer_keys = str(keys["server"][1]), [str(keys["trainer"][0])]
        cfg.client_keys = [str(keys["worker"][0])]
        trainer_kw["curve_files"] = (str(keys["trainer"][1]), [str(keys["server"][0])])
        client_kw["curve"] = CurveClient(KeyPair.load(keys["worker"][1]), KeyPair.load(keys["server"][0]).public)
    async with RolloutServer(cfg) as srv, RolloutClient(cfg.rollout_endpoint, timeout=60, **client_kw) as rc:
        yield srv, rc, trainer_endpoint, trainer_kw


async def greedy(rc: RolloutClient) -> tuple[list[int], int]:
    out = await rc.generate(PROMPT, GREEDY)
    return out.output_ids, out.weight_version


async def test_greedy_output_follows_each_version_pushed_from_a_trainer_process_over_inline_shm_and_gloo(
        served: tuple[RolloutServer, RolloutClient, str, dict[str, Any]]) -> None:
    _, rc, endpoint, kw = served
    original, v0 = await greedy(rc)
    assert v0 == 0
    trainer = await TrainerProcess(endpoint, **kw).start()
    try:
        version = 0
        for transport in ("inline", "shm", "gloo"):
            version += 1
            assert await trainer.push(version, "perturbed", transport) == ("ok", version, transport, ["server-0"])
            changed, live = await greedy(rc)
            assert live == version and changed != original, transport
            version += 1
            assert await trainer.push(version, "original", transport) == ("ok", version, transport, ["server-0"])
            assert await greedy(rc) == (original, version), transport  # exactly back
    finally:
        await trainer.stop()
    assert trainer.proc.exitcode == 0


async def test_each_bad_version_from_a_trainer_process_is_refused_with_its_code_and_the_old_version_keeps_serving(
        served: tuple[RolloutServer, RolloutClient, str, dict[str, Any]]) -> None:
    """Wrong shape, wrong dtype, an unknown name, then (from a restarted trainer) a version not above
    the live one: each is refused with its typed code, in the trainer process's PushError, while the
    server keeps serving the old version. (A corrupted shm bucket: the test below.)"""
    srv, rc, endpoint, kw = served
    original = await greedy(rc)
    trainer = await TrainerProcess(endpoint, **kw).start()
    try:
        for version, kind, transport, code in ((1, "bad_shape", "inline", "shape_mismatch"),
                                               (2, "bad_dtype", "shm", "dtype_mismatch"),
                                               (3, "unknown", "inline", "unknown_tensor")):
            failed = await trainer.push(version, kind, transport)
            assert failed[:3] == ("failed", version, transport), failed
            assert failed[3]["server-0"].startswith(f"{code}:"), failed
            assert await greedy(rc) == original, code  # version 0, unharmed
        assert await trainer.push(5, "perturbed", "shm") == ("ok", 5, "shm", ["server-0"])  # the next good one loads
    finally:
        await trainer.stop()
    restarted = await TrainerProcess(endpoint, **kw).start()  # knows nothing of version 5
    try:
        failed = await restarted.push(3, "original", "inline")
        assert failed[:3] == ("failed", 3, "inline")
        assert failed[3]["server-0"] == "bad_version: version 3 is not above the live version 5"
    finally:
        await restarted.stop()
    changed, live = await greedy(rc)
    assert live == 5 and changed != original[0]
    assert srv.system.actor("weight_receiver").counters.get("versions_applied") == 1


@pytest.mark.parametrize("shm_verify", ["while_loading", "before_load"])
async def test_a_corrupted_shm_bucket_is_bad_checksum_and_nothing_is_generated_on_its_bytes(
        shm_verify: ShmVerify) -> None:
    """The trainer process flips a byte of its shm arena after checksumming it. ``before_load``: the
    receiver's hash pass finds it before the engine is paused, and the old version keeps serving.
    ``while_loading`` (the default with the hf engine on a CPU): the engine finds it as it copies,
    when its parameters already hold part of the version, so it holds requests: one sent then waits,
    unanswered, and is answered by the next whole version, on that version, with that version's
    output. The fate of each request is asserted."""
    cfg = ServerConfig(rollout_endpoint=ipc_endpoint("e2e-shm"), trainer_endpoint=free_tcp_endpoint(),
                       receiver_id="server-0", stall_timeout_s=1.5, max_new_tokens_limit=64, shm_verify=shm_verify)
    async with RolloutServer(cfg) as srv, RolloutClient(cfg.rollout_endpoint, timeout=60) as rc, \
            RolloutFleet([cfg.rollout_endpoint], health_interval_s=0.05) as fleet:
        original = await greedy(rc)
        await fleet.wait_ready(timeout=30)
        trainer = await TrainerProcess(cfg.trainer_endpoint).start()
        try:
            trainer.commands.put(("corrupt_next",))
            failed = await trainer.push(1, "perturbed", "shm")
            assert failed[:3] == ("failed", 1, "shm") and failed[3]["server-0"].startswith("bad_checksum:"), failed
            gen = srv.system.actor("generation")
            if shm_verify == "before_load":
                assert await greedy(rc) == original  # answered at once, on version 0, unharmed
                assert gen.counters.get("load_failures") == 0  # never reached the engine
                assert (await rc.health()).governor_state == "SERVING"
            else:
                assert gen.counters.get("load_failures") == 1
                assert (await rc.health()).governor_state == "INCOMPLETE"  # health says requests wait
                server = fleet.servers[0]  # and a fleet stops routing there until a whole version loads
                await until(lambda: not server.alive, "the fleet took the incomplete server out", 30)
                held = asyncio.ensure_future(greedy(rc))
                await until(lambda: len(gen.in_flight) == 1, "the request reached the generation actor", 30)
                assert not held.done()  # waiting: the parameters hold part of a version
            assert await trainer.push(2, "perturbed", "shm") == ("ok", 2, "shm", ["server-0"])
            now = await greedy(rc)
            assert now[1] == 2 and now[0] != original[0]
            assert (await rc.health()).governor_state == "SERVING"
            await until(lambda: fleet.servers[0].alive and fleet.servers[0].version == 2, "re-admitted at v2", 30)
            if shm_verify == "while_loading":
                assert await held == now  # the held request ran on version 2, whole
        finally:
            await trainer.stop()
        assert trainer.proc.exitcode == 0


async def test_a_trainer_sigkilled_mid_push_leaves_the_old_version_serving_and_a_restarted_trainer_pushes(
        served: tuple[RolloutServer, RolloutClient, str, dict[str, Any]]) -> None:
    srv, rc, endpoint, kw = served
    original = await greedy(rc)
    receiver = srv.system.actor("weight_receiver")
    # small buckets, so the push is many pulls; the trainer kills itself when bucket 3 is asked for
    dying = await TrainerProcess(endpoint, die_at=3, bucket_bytes=16 << 10, **kw).start()
    dying.commands.put((1, "perturbed", "inline"))
    await asyncio.get_running_loop().run_in_executor(None, dying.proc.join, 60)
    assert dying.proc.exitcode == -9
    async with asyncio.timeout(10):  # stall_timeout_s=1.5: the partial version is dropped
        while receiver.counters.get("versions_stalled") < 1:
            await asyncio.sleep(0.05)
    assert receiver.live_version == 0
    assert await greedy(rc) == original  # still serving version 0, unharmed
    restarted = await TrainerProcess(endpoint, **kw).start()
    try:
        assert await restarted.push(1, "perturbed", "inline") == ("ok", 1, "inline", ["server-0"])
        changed, live = await greedy(rc)
        assert live == 1 and changed != original[0]
    finally:
        await restarted.stop()
    assert receiver.counters.get("trainer_restarts_seen") >= 1


async def test_colocated_after_train_start_a_dead_trainer_and_a_partial_version_leave_requests_held_not_garbage(
        ) -> None:
    """Colocated: train_start released the weights, so there is no old version to fall back on. A
    trainer SIGKILLed mid-push, then a version missing tensors (refused: incomplete_version), must not
    let anything run on restored-but-unloaded memory; a request sent meanwhile waits, and runs on the
    first complete version."""
    endpoint = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ipc_endpoint("colo"), trainer_endpoint=endpoint, receiver_id="server-0",
                       mode="colocated", stall_timeout_s=1.5, max_new_tokens_limit=64)
    async with RolloutServer(cfg) as srv, RolloutClient(cfg.rollout_endpoint, timeout=120) as rc:
        receiver = srv.system.actor("weight_receiver")
        reference = await greedy(rc)
        dying = await TrainerProcess(endpoint, die_at=3, bucket_bytes=16 << 10).start()
        dying.commands.put(("step", 1, "train_start"))
        assert await dying.get() == ("stepped", ["server-0"])
        assert srv.governor.state.startswith("RELEASED")
        held = asyncio.ensure_future(rc.generate(PROMPT, GREEDY))
        dying.commands.put((1, "original", "inline"))  # dies when bucket 3 is asked for
        await asyncio.get_running_loop().run_in_executor(None, dying.proc.join, 60)
        assert dying.proc.exitcode == -9
        async with asyncio.timeout(10):
            while receiver.counters.get("versions_stalled") < 1:
                await asyncio.sleep(0.05)
        restarted = await TrainerProcess(endpoint).start()
        try:
            failed = await restarted.push(1, "partial", "shm")
            assert failed[:3] == ("failed", 1, "shm") and failed[3]["server-0"].startswith("incomplete_version:")
            await asyncio.sleep(0.3)  # negative check (state settled at the push reply): nothing may run in it
            assert not held.done() and srv.governor.state.startswith("RELEASED")  # held, nothing generated
            assert srv.generation.engine.info().extra["weights_bytes"] == 0  # woken for the load, released again
            assert await restarted.push(2, "original", "shm") == ("ok", 2, "shm", ["server-0"])
        finally:
            await restarted.stop()
        out = await asyncio.wait_for(held, 60)  # its one terminal reply: a whole run on version 2
        assert (out.output_ids, out.finish_reason) == (reference[0], "length")
        assert [(s.version, s.start, s.end) for s in out.weight_version_spans] == [(2, 0, len(reference[0]))]
        assert srv.governor.state == "SERVING" and receiver.live_version == 2
