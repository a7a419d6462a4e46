"""A rollout-worker process: prompts in, GRPO groups out, only over rollwire's ZeroMQ protocol.

Each worker keeps ``concurrency`` groups in flight on the rollout server and hands every finished
group to the trainer's experience endpoint (each group acknowledged: a credit of one per loop).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rollwire.clients.rollout import RolloutClient, RolloutError
from rollwire.demo.task import Task
from rollwire.fleet import RolloutFleet
from rollwire.messages import Ack, ErrorReply, RollwireError, Sample, SampleGroup, SamplingParams
from rollwire.models import tiny_tokenizer
from rollwire.transports.rpc import RpcClient


async def _loop(idx: int, loop_id: int, task: Task, rc: RolloutClient | RolloutFleet, exp: RpcClient[Any],
                group_size: int,
                temperature: float, stop: Any) -> None:
    seed = 1_000_000 * idx + 10_000 * loop_id
    while not stop.is_set():
        prompt = task.prompt()
        sp = SamplingParams(max_new_tokens=task.max_new_tokens, temperature=temperature, n=group_size, seed=seed,
                            allowed_token_ids=task.letter_ids, ignore_eos=True)
        seed += group_size
        t0 = time.monotonic()
        try:
            outs = await rc.generate(prompt, sp, return_logprob=True)
        except RolloutError:
            if stop.is_set():
                return
            await asyncio.sleep(0.1)  # e.g. the server is stopping; the demo ends soon
            continue
        assert isinstance(outs, list)
        group = SampleGroup(worker=idx, prompt_ids=prompt, generate_s=time.monotonic() - t0, samples=[
            Sample(output_ids=o.output_ids, output_logprobs=o.output_logprobs or [], finish_reason=o.finish_reason,
                   reward=task.reward(o.output_ids), weight_version_spans=o.weight_version_spans) for o in outs])
        try:
            reply = await exp.call(group, timeout=120)
        except (RollwireError, TimeoutError):  # an error reply, or the trainer gone: it is done with us
            return
        if not isinstance(reply.msg, Ack):
            return


async def _main(idx: int, rollout_eps: list[str], experience_ep: str, group_size: int, concurrency: int, seed: int,
                temperature: float, stop: Any) -> None:
    task = Task(tiny_tokenizer(), seed=seed * 7919 + idx)
    exp: RpcClient[Any] = RpcClient(experience_ep, Ack | ErrorReply)
    # one server: its client; several: a fleet (routing, and failover when one dies)
    client = RolloutClient(rollout_eps[0]) if len(rollout_eps) == 1 else RolloutFleet(rollout_eps)
    async with client as rc:
        if isinstance(rc, RolloutFleet):
            await rc.wait_ready(servers=len(rollout_eps), timeout=120)
        else:
            await rc.wait_ready(timeout=120)
        loops = [asyncio.ensure_future(_loop(idx, i, task, rc, exp, group_size, temperature, stop))
                 for i in range(concurrency)]
        while not stop.is_set() and not all(t.done() for t in loops):
            await asyncio.sleep(0.05)
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    await exp.close()


def worker_main(idx: int, rollout_eps: list[str], experience_ep: str, group_size: int, concurrency: int, seed: int,
                temperature: float, stop: Any) -> None:
    import uvloop

    from rollwire.demo import child_setup

    child_setup()

    from rollwire.runtime.logging import configure_logging

    configure_logging()  # the parent's level ($ROLLWIRE_LOG_LEVEL)
    uvloop.run(_main(idx, rollout_eps, experience_ep, group_size, concurrency, seed, temperature, stop))
