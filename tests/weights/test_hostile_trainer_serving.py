"""A hostile trainer against a whole serving RolloutServer (hf engine, tiny model): after fuzzed
replies on every part of the trainer link, and while a rollout worker keeps generating, the next
good version applies, later generations report it and follow its weights, no actor was restarted,
and every request sent during the fuzzing completed. (test_hostile_trainer_link.py runs the same
fuzzing against a receiver alone, in its own process.)"""

from __future__ import annotations

import asyncio
from typing import Any

from rollwire.clients.rollout import RolloutClient
from rollwire.messages import GenerateDone, SamplingParams
from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports.sockets import ipc_endpoint
from tests.conftest import free_tcp_endpoint
from tests.weights.harness import ScriptedTrainer
from tests.weights.procs import tiny_weights
from tests.weights.test_hostile_trainer_link import CASE, CODES, draw_cases, register_again

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [1, 40, 41, 42, 43]


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
        stop, outs = asyncio.Event(), []
        worker = asyncio.ensure_future(_keep_generating(rc, stop, outs))
        fuzzed_versions, outcomes = 0, {}
        cases = draw_cases(CASE, 24)
        for where, messages in cases:
            if where == "register":
                await register_again(trainer, messages)
            elif where in ("pub", "control"):
                for frames in messages:
                    if where == "pub":
                        await trainer.publish_raw(frames)
                    else:
                        await trainer.send_raw(trainer.peers["srv"], 0, frames)
                await trainer.wait_beacon_acks(1)
            else:  # a version of the server's own weights whose bucket replies are hostile
                trainer.pull_script = list(messages)
                fuzzed_versions += 1
                plans = trainer.plan(tiny_weights("original"), bucket_bytes=64 << 10)
                outcome = await asyncio.wait_for(await trainer.announce(fuzzed_versions, plans), 60)
                assert outcome.ok or outcome.error_code in CODES, outcome
                key = "ok" if outcome.ok else outcome.error_code
                outcomes[key] = outcomes.get(key, 0) + 1
                trainer.pull_script = []
        stop.set()
        await worker
        # every request sent while the link was fuzzed completed, on the original weights' tokens
        assert outs and all(isinstance(o, GenerateDone) and o.finish_reason == "length"
                            and o.output_ids == before.output_ids for o in outs), outs[:3]

        good = fuzzed_versions + 1
        plans = trainer.plan(tiny_weights("perturbed"), bucket_bytes=64 << 10)
        outcome = await asyncio.wait_for(await trainer.announce(good, plans), 60)
        assert outcome.ok, outcome
        after = await rc.generate(PROMPT, GREEDY)
        assert isinstance(after, GenerateDone) and after.weight_version == good
        assert after.output_ids != before.output_ids  # generated from the perturbed weights
        restarts = {name: srv.system.actor(name).counters.get("restarts") for name in srv.system.names()}
        assert not any(restarts.values()), restarts
        assert srv.system.failed is not None and not srv.system.failed.done()
        print(f"{len(cases)} cases, {len(outs)} requests during them, bucket outcomes {outcomes}")
