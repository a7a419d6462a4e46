"""A hostile trainer against a whole serving RolloutServer (hf engine, tiny model): after fuzzed
messages on the trainer's PUB, its control link and as bucket replies, and while a rollout worker
keeps generating, the next good version applies, later generations report it and follow its
weights, no actor was restarted, and every request sent during the fuzzing completed.
(test_hostile_trainer_link.py runs the same fuzzing, replies to Register included, against a
receiver alone, in its own process.)"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from rollwire.clients.rollout import RolloutClient
from rollwire.messages import GenerateDone, SamplingParams
from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports.sockets import ipc_endpoint
from tests.conftest import free_tcp_endpoint
from tests.weights.harness import ScriptedTrainer
from tests.weights.procs import tiny_weights
from tests.weights.test_hostile_trainer_link import CASE, draw_cases, play

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [1, 40, 41, 42, 43]


async def push(trainer: ScriptedTrainer, version: int, weights: str) -> Any:
    plans = trainer.plan(tiny_weights(weights), bucket_bytes=64 << 10)
    return await asyncio.wait_for(await trainer.announce(version, plans), 60)


async def _keep_generating(rc: RolloutClient, stop: asyncio.Event, outs: list[Any]) -> None:
    while not stop.is_set():
        outs.append(await rc.generate(PROMPT, GREEDY))


async def test_a_fuzzed_trainer_link_leaves_the_server_serving_and_its_next_good_version_is_generated_from() -> None:
    trainer_ep, rollout_ep = free_tcp_endpoint(), ipc_endpoint("fuzz-serve")
    cfg = ServerConfig(rollout_endpoint=rollout_ep, trainer_endpoint=trainer_ep, receiver_id="srv",
                       stall_timeout_s=2.0)
    async with ScriptedTrainer(trainer_ep, free_tcp_endpoint()) as trainer, RolloutServer(cfg) as srv, \
            RolloutClient(rollout_ep, timeout=120) as rc:
        await trainer.wait_joined(timeout=60)
        before = await rc.generate(PROMPT, GREEDY)
        assert isinstance(before, GenerateDone) and before.weight_version == 0
        stop, outs = asyncio.Event(), list[Any]()
        worker = asyncio.ensure_future(_keep_generating(rc, stop, outs))
        fuzzed_versions, outcomes = 0, dict[str, int]()
        # hostile replies to Register are left to test_hostile_trainer_link.py, whose receiver waits
        # 0.2 s for a Welcome: a server's receiver waits 2 s, doubling, per dropped reply
        cases = [c for c in draw_cases(CASE, 32) if c[0] != "register"]
        for where, messages in cases:
            if where == "bucket":  # a version of the server's own weights whose bucket replies are hostile
                fuzzed_versions += 1
            outcome = await play(trainer, where, messages, "srv",
                                 functools.partial(push, trainer, fuzzed_versions, "original"))
            if outcome is not None:
                key = "ok" if outcome.ok else outcome.error_code
                outcomes[key] = outcomes.get(key, 0) + 1
        stop.set()
        await worker
        # every request sent while the link was fuzzed completed, on the original weights' tokens
        assert outs and all(isinstance(o, GenerateDone) and o.finish_reason == "length"
                            and o.output_ids == before.output_ids for o in outs), outs[:3]

        good = fuzzed_versions + 1
        outcome = await push(trainer, good, "perturbed")
        assert outcome.ok, outcome
        after = await rc.generate(PROMPT, GREEDY)
        assert isinstance(after, GenerateDone) and after.weight_version == good
        assert after.output_ids != before.output_ids  # generated from the perturbed weights
        restarts = {name: srv.system.actor(name).counters.get("restarts") for name in srv.system.names()}
        assert not any(restarts.values()), restarts
        assert srv.system.failed is not None and not srv.system.failed.done()
        print(f"{len(cases)} cases, {len(outs)} requests during them, bucket outcomes {outcomes}")
