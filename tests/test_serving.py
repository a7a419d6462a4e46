"""Rollouts served end to end: real ZeroMQ (ipc and tcp), the hf engine, the tiny model."""

from __future__ import annotations

import asyncio

import torch

from rollwire import RolloutClient, SamplingParams
from rollwire.engines.base import EngineRequest
from rollwire.models import tiny
from rollwire.server import RolloutServer

PROMPTS = [[1 + i, 5 + 2 * i, 9] * (1 + i % 4) for i in range(8)]  # 8 prompts of mixed length
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


async def _direct(srv: RolloutServer, prompt: list[int], sp: SamplingParams, rid: str) -> list[int]:
    out: list[int] = []
    async for d in srv.generation.engine.generate(EngineRequest(rid, prompt, sp)):
        out.extend(d.token_ids)
    return out


async def test_greedy_output_is_identical_alone_in_a_batch_of_8_and_on_the_engine_directly(
        server: RolloutServer, endpoint: str) -> None:
    async with RolloutClient(endpoint) as rc:
        alone = [(await rc.generate(p, GREEDY)).output_ids for p in PROMPTS]  # type: ignore[union-attr]
        batched = await asyncio.gather(*(rc.generate(p, GREEDY) for p in PROMPTS))
    direct = [await _direct(server, p, GREEDY, f"direct-{i}") for i, p in enumerate(PROMPTS)]
    assert [b.output_ids for b in batched] == alone  # type: ignore[union-attr]
    assert direct == alone
    assert all(len(a) == 12 for a in alone)


async def test_same_seed_gives_same_sampled_tokens_and_logprobs_match_a_forward_pass(
        server: RolloutServer, endpoint: str) -> None:
    sp = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    async with RolloutClient(endpoint) as rc:
        a, b = await asyncio.gather(*(rc.generate([1, 5, 9], sp, return_logprob=True) for _ in range(2)))
        c = await rc.generate([1, 5, 9], sp, return_logprob=True)
        other = await rc.generate([1, 5, 9], SamplingParams(max_new_tokens=16, temperature=0.8, seed=8,
                                                            ignore_eos=True))
    assert a.output_ids == b.output_ids == c.output_ids  # type: ignore[union-attr]
    assert other.output_ids != a.output_ids  # type: ignore[union-attr]
    model, _ = tiny(seed=0)
    ids = torch.tensor([[1, 5, 9, *a.output_ids]])  # type: ignore[union-attr]
    with torch.no_grad():
        logits = model(ids).logits[0, 2:-1] / 0.8
    expected = torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 3:, None]).squeeze(-1)
    got = torch.tensor(a.output_logprobs, dtype=torch.float64)  # type: ignore[union-attr]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


async def test_abort_mid_stream_returns_the_partial_output_with_finish_reason_abort(
        server: RolloutServer, endpoint: str) -> None:
    async with RolloutClient(endpoint) as rc:
        stream = rc.stream([1, 5, 9], SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True))
        chunks = []
        async for item in stream:
            if hasattr(item, "finish_reason"):
                done = item
                break
            chunks.append(item)
            if len(chunks) == 3:
                await stream.abort()
        streamed = [t for c in chunks for t in c.token_ids]  # type: ignore[attr-defined]
        assert done.finish_reason == "abort"
        assert 3 <= len(done.output_ids) < 200
        assert done.output_ids[: len(streamed)] == streamed
        # the server keeps serving
        ok = await rc.generate([2, 3], SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))
        assert ok.finish_reason == "length"  # type: ignore[union-attr]


async def test_n_samples_come_back_as_a_list_with_distinct_seeds(server: RolloutServer, endpoint: str) -> None:
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, n=4, ignore_eos=True)
    async with RolloutClient(endpoint) as rc:
        outs = await rc.generate([4, 4, 4], sp)
        single = await rc.generate([4, 4, 4], SamplingParams(max_new_tokens=8, temperature=1.0, seed=4,
                                                             ignore_eos=True))
    assert isinstance(outs, list) and [o.index for o in outs] == [0, 1, 2, 3]
    assert outs[1].output_ids == single.output_ids  # type: ignore[union-attr]  # sample i uses seed + i
    assert all(o.weight_version_spans[0].end == 8 for o in outs)
