"""The MemoryGovernor's pause policies with requests in flight, on the real hf engine.

A version is handed to the governor's weights port exactly as the WeightReceiverActor does
(the tensors staged in this process, one LoadVersion over inproc ZeroMQ). Each test says what happened to
every in-flight request.
"""

from __future__ import annotations

import asyncio

import pytest

from rollwire import RolloutClient, SamplingParams
from rollwire.messages import ErrorCode, GenerateDone, RemoteError, VersionApplied
from rollwire.server import RolloutServer, ServerConfig
from tests.versioned import check_spans, send_version, version_state

from .conftest import free_tcp_endpoint, until

PROMPTS = [[3 + i, 7, 11 + i] for i in range(6)]
LONG = SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True)


async def apply_version(version: int) -> VersionApplied:
    reply = await send_version(version, version_state(version))
    assert isinstance(reply, VersionApplied), reply
    return reply


async def _push_under_load(policy: str, drain_deadline_s: float = 60.0,
                           params: SamplingParams = LONG) -> tuple[list[GenerateDone], GenerateDone]:
    ep = free_tcp_endpoint()
    cfg = ServerConfig(rollout_endpoint=ep, pause_policy=policy, drain_deadline_s=drain_deadline_s)
    async with RolloutServer(cfg) as srv, RolloutClient(ep, timeout=120) as rc:
        streams = [rc.stream(p, params) for p in PROMPTS]
        firsts = [await s.__anext__() for s in streams]  # every request has produced a token
        assert all(f.token_ids for f in firsts)  # type: ignore[union-attr]
        applied = asyncio.ensure_future(apply_version(1))
        await until(lambda: srv.generation.counters.get(f"pauses_{policy}") >= 1,
                    "the generation actor paused for the load (new requests wait)", 60)
        late = asyncio.ensure_future(rc.generate([5, 5, 5], LONG))  # arrives during the pause
        outs = []
        for s in streams:
            async for item in s:
                if isinstance(item, GenerateDone):
                    outs.append(item)
        await applied
        assert srv.generation.weight_version == 1
        assert srv.governor.state == "SERVING"
        late_out = await late
    return outs, late_out  # type: ignore[return-value]


async def test_abort_policy_ends_every_in_flight_request_with_its_partial_output() -> None:
    outs, late = await _push_under_load("abort")
    for prompt, o in zip(PROMPTS, outs, strict=True):
        assert o.finish_reason == "abort" and 1 <= len(o.output_ids) < 48
        assert [s.version for s in o.weight_version_spans] == [0]
        check_spans(prompt, o)
    assert late.finish_reason == "length" and [s.version for s in late.weight_version_spans] == [1]
    check_spans([5, 5, 5], late)


async def test_retract_policy_continues_every_request_under_the_new_weights_with_two_spans() -> None:
    outs, late = await _push_under_load("retract")
    for prompt, o in zip(PROMPTS, outs, strict=True):
        assert o.finish_reason == "length" and len(o.output_ids) == 48
        assert [s.version for s in o.weight_version_spans] == [0, 1]  # its first token came before the push
        check_spans(prompt, o)  # tokens after the retract are exactly version 1's continuation
    assert [s.version for s in late.weight_version_spans] == [1]


async def test_in_place_policy_keeps_every_request_and_continues_it_after_the_load() -> None:
    outs, late = await _push_under_load("in_place")
    for o in outs:
        assert o.finish_reason == "length" and len(o.output_ids) == 48
        assert [s.version for s in o.weight_version_spans][-1] == 1
        assert o.weight_version_spans[0].version == 0 and o.weight_version_spans[0].end >= 1
    check_spans([5, 5, 5], late)


async def test_drain_policy_finishes_every_request_on_the_old_version_before_loading() -> None:
    outs, late = await _push_under_load("drain")
    for prompt, o in zip(PROMPTS, outs, strict=True):
        assert o.finish_reason == "length" and len(o.output_ids) == 48
        assert [s.version for s in o.weight_version_spans] == [0]
        check_spans(prompt, o)
    assert [s.version for s in late.weight_version_spans] == [1]
    check_spans([5, 5, 5], late)


async def test_drain_policy_aborts_what_is_still_running_at_the_deadline_with_its_partial_output() -> None:
    endless = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)  # cannot finish in 0.3 s
    outs, late = await _push_under_load("drain", drain_deadline_s=0.3, params=endless)
    for prompt, o in zip(PROMPTS, outs, strict=True):  # each: one done, aborted, every token from version 0
        assert o.finish_reason == "abort" and 1 <= len(o.output_ids) < 4000
        assert [s.version for s in o.weight_version_spans] == [0]
        check_spans(prompt, o)
    assert late.finish_reason == "length" and [s.version for s in late.weight_version_spans] == [1]
    check_spans([5, 5, 5], late)


@pytest.mark.parametrize("policy", ["retract"])
async def test_a_version_with_a_wrong_shape_is_rejected_and_the_old_version_keeps_serving(policy: str) -> None:
    ep = free_tcp_endpoint()
    async with RolloutServer(ServerConfig(rollout_endpoint=ep, pause_policy=policy)) as srv:
        state = version_state(1)
        state["lm_head.weight"] = state["lm_head.weight"][:-1]
        with pytest.raises(RemoteError) as refused:
            await send_version(1, state)
        assert refused.value.code == ErrorCode.SHAPE_MISMATCH, refused.value
        assert srv.generation.weight_version == 0 and srv.governor.state == "SERVING"
        async with RolloutClient(ep, timeout=60) as rc:
            out = await rc.generate([1, 2, 3], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
        check_spans([1, 2, 3], out)  # type: ignore[arg-type]
