"""A weight push in the middle of an agent's episode, through the OpenAI face: the turn that was
generating continues under the new version, and every model token of the trajectory carries the
version that produced it (its logprob is that version's own log-softmax over the trajectory)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch

from rollwire import RolloutClient
from rollwire.gateway.client import afetch_trajectory
from rollwire.weightsync.publisher import TrainerPublisher
from tests.gateway_stack import TASK, TOOLS, Stack, model_logprobs, scripted_state, stack


@pytest.fixture(scope="module")
def gw() -> Iterator[Stack]:
    with stack(versions=[(1, scripted_state())]) as s:
        yield s


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


async def test_a_push_during_an_episode_gives_each_model_token_its_versions_span(gw: Stack) -> None:
    v2 = perturbed(scripted_state(), 2)
    sid = "pushed-episode"
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=300) as client, \
            RolloutClient(gw.rollout, timeout=60) as rc, TrainerPublisher(gw.trainer) as tp:
        async def turn(messages: list[dict[str, Any]], **kw: Any) -> Any:
            return await client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                                        extra_headers={"X-Session-ID": sid}, **kw)

        messages: list[dict[str, Any]] = [{"role": "user", "content": TASK}]
        r1 = await turn(messages, temperature=0)
        call = r1.choices[0].message.tool_calls[0]
        messages += [r1.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "5"}]
        # the server's receiver joins this trainer before the turn starts, so the push lands mid-turn
        deadline = asyncio.get_running_loop().time() + 120
        while not any(r.joined for r in tp.receivers.values()):
            assert asyncio.get_running_loop().time() < deadline, "the server never joined the trainer"
            await asyncio.sleep(0.01)
        # a long sampled turn (not ended by <|im_end|>); version 2 arrives while it generates
        long_turn = asyncio.ensure_future(turn(messages, temperature=1.0, seed=3, max_tokens=1500,
                                               extra_body={"ignore_eos": True}))
        deadline = asyncio.get_running_loop().time() + 60
        while (await rc.status()).in_flight == 0:  # the turn is generating on the server
            assert asyncio.get_running_loop().time() < deadline and not long_turn.done()
            await asyncio.sleep(0.01)
        await tp.push_weights(version=2, tensors=v2, transport="inline")
        r2 = await long_turn
        assert r2.usage.completion_tokens == 1500 and r2.choices[0].finish_reason == "length"
        spans = r2.model_extra["rollwire"]["weight_version_spans"][0]
        assert [s["version"] for s in spans] == [1, 2], spans  # the push landed mid-turn
        messages += [r2.choices[0].message.model_dump(exclude_none=True),
                     {"role": "user", "content": json.dumps({"note": "go on"})}]
        r3 = await turn(messages, temperature=0, max_tokens=8)
        assert [s["version"] for s in r3.model_extra["rollwire"]["weight_version_spans"][0]] == [2]
        traj = await afetch_trajectory(gw.base_url, sid, close=True)
    model_turns = [t for t in traj.turns if t.role == "model"]
    assert [t.weight_version for t in model_turns] == [1, 2, 2]
    # the spans tile exactly the model positions, each token once, versions in order
    covered = [i for s in traj.weight_version_spans for i in range(s.start, s.end)]
    assert covered == [i for i, m in enumerate(traj.loss_mask) if m]
    assert [s.version for s in traj.weight_version_spans] == [1, 1, 2, 2]
    mid = traj.weight_version_spans[1].end
    assert model_turns[1].start < mid < model_turns[1].end
    states = {1: scripted_state(), 2: v2}
    logp = {v: model_logprobs(st, traj.token_ids) for v, st in states.items()}
    differs = 0
    for s in traj.weight_version_spans:
        for i in range(s.start, s.end):
            t = traj.token_ids[i]
            assert abs(traj.logprobs[i] - float(logp[s.version][i - 1, t])) < 1e-3, (i, s)
            differs += abs(float(logp[1][i - 1, t]) - float(logp[2][i - 1, t])) > 1e-2
    assert differs > 100  # the versions are told apart by the check, not by luck
