"""The Engine contract, part 1 (generation: greedy, sampling, logprobs, masks, finishing, validation),
run against every backend on the tiny model (real weights, no mocks).

Greedy references come from the engine running a request alone, from ``model.generate`` and
from direct forward passes of a bit-identical copy of the model.

The ``sglang`` variant (conftest's ``engine_kind``) runs where SGLang and a CUDA GPU are there and
skips with the reason elsewhere (CI). An SGLang engine takes about a minute to start, so its
tests share one, driven on its own event loop (``tests/gpu/engine_thread.py``: sglang.Engine keeps
the loop it was built on) and put back after each test: requests aborted, memory resumed, the
original weights as version 0, cache flushed, running. On a machine whose SGLang lacks some
kernels, name working ones in ``ROLLWIRE_SGLANG_ENGINE_ARGS`` (e.g.
``attention_backend=triton,sampling_backend=pytorch``).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from rollwire.engines.base import EngineError, EngineRequest
from rollwire.messages.generate import SamplingParams
from tests.conftest import until

from .conftest import forget_shared_sglang, make_engine, run_request, shared_sglang, tiny_checkpoint
from .contract import LOGPROB_ATOL, PROMPTS, forward_logprobs, start, wait_for_tokens

# -- greedy and batching ---------------------------------------------------------------------------


async def test_greedy_output_is_identical_alone_and_inside_a_batch_of_eight_mixed_length_requests(engine):
    lengths = [24, 40, 8, 33, 40, 16, 29, 40]
    alone = [await run_request(engine, f"a{i}", p, max_new_tokens=n, temperature=0.0, ignore_eos=True)
             for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))]
    tasks, results = [], []
    for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True)):  # half join a batch that is already running
        res, task = start(engine, f"b{i}", p, max_new_tokens=n, temperature=0.0, ignore_eos=True)
        results.append(res)
        tasks.append(task)
        if i == 3:
            await until(lambda: all(r.tokens or r.finish_reason for r in results), "the first four generating", 60)
    batched = await asyncio.gather(*tasks)
    for a, b, n in zip(alone, batched, lengths, strict=True):
        assert len(a.tokens) == n and a.finish_reason == "length"
        assert b.tokens == a.tokens


async def test_greedy_output_equals_transformers_generate(engine, reference_model):
    for i, prompt in enumerate(PROMPTS[:4]):
        ours = await run_request(engine, f"r{i}", prompt, max_new_tokens=20, temperature=0.0)
        with torch.no_grad():
            ids = torch.tensor([prompt])
            ref = reference_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=20)
        assert ours.tokens == ref[0, len(prompt):].tolist()


async def test_the_same_seed_gives_the_same_sampled_tokens_alone_and_in_a_batch(engine):
    params = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.2, top_k=20),
              dict(temperature=1.0, min_p=0.05)]
    alone = [await run_request(engine, f"a{i}", PROMPTS[i], max_new_tokens=24, seed=100 + i, ignore_eos=True, **kw)
             for i, kw in enumerate(params)]
    together = await asyncio.gather(*(run_request(engine, f"b{i}", PROMPTS[i], max_new_tokens=24, seed=100 + i,
                                                  ignore_eos=True, **kw) for i, kw in enumerate(params)))
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    other_seed = await run_request(engine, "c", PROMPTS[0], max_new_tokens=24, seed=7, ignore_eos=True, **params[0])
    assert other_seed.tokens != alone[0].tokens


@pytest.mark.parametrize("truncation", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)])
async def test_truncation_to_the_top_token_samples_the_greedy_output(engine, truncation):
    greedy = await run_request(engine, "g", PROMPTS[4], max_new_tokens=16, temperature=0.0, ignore_eos=True)
    sampled = await run_request(engine, "s", PROMPTS[4], max_new_tokens=16, temperature=1.0, seed=3,
                                ignore_eos=True, **truncation)
    assert sampled.tokens == greedy.tokens


# -- logprobs and masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.7])
async def test_logprobs_match_a_direct_forward_pass_at_the_request_temperature(engine, engine_kind, reference_model,
                                                                               temperature):
    results = await asyncio.gather(*(run_request(engine, f"r{i}", p, max_new_tokens=24, temperature=temperature,
                                                 top_p=0.95, seed=i, ignore_eos=True, return_logprob=True)
                                     for i, p in enumerate(PROMPTS[:4])))
    for prompt, res in zip(PROMPTS[:4], results, strict=True):
        assert len(res.logprobs) == len(res.tokens) == 24
        ref = forward_logprobs(reference_model, prompt, res.tokens, temperature or 1.0)
        torch.testing.assert_close(torch.tensor(res.logprobs), ref, atol=LOGPROB_ATOL[engine_kind], rtol=0)


async def test_allowed_token_ids_restrict_sampling_and_logprobs_are_taken_under_the_mask(engine, engine_kind,
                                                                                         reference_model):
    allowed = list(range(60, 80))
    res = await run_request(engine, "r", PROMPTS[2], max_new_tokens=32, temperature=0.7, seed=5, ignore_eos=True,
                            allowed_token_ids=allowed, return_logprob=True)
    assert set(res.tokens) <= set(allowed)
    ref = forward_logprobs(reference_model, PROMPTS[2], res.tokens, 0.7, allowed=allowed)
    torch.testing.assert_close(torch.tensor(res.logprobs), ref, atol=LOGPROB_ATOL[engine_kind], rtol=0)


async def test_disallowed_token_ids_are_never_produced_and_logprobs_are_taken_under_the_mask(engine, engine_kind,
                                                                                             reference_model):
    free = await run_request(engine, "free", PROMPTS[3], max_new_tokens=24, temperature=0.0, ignore_eos=True)
    banned = sorted(set(free.tokens))
    res = await run_request(engine, "r", PROMPTS[3], max_new_tokens=24, temperature=0.0, ignore_eos=True,
                            disallowed_token_ids=banned, return_logprob=True)
    assert not set(res.tokens) & set(banned)
    ref = forward_logprobs(reference_model, PROMPTS[3], res.tokens, 1.0, disallowed=banned)
    torch.testing.assert_close(torch.tensor(res.logprobs), ref, atol=LOGPROB_ATOL[engine_kind], rtol=0)


# -- finishing -------------------------------------------------------------------------------------


async def test_generation_stops_after_emitting_a_stop_token_which_is_included(engine):
    ref = await run_request(engine, "ref", PROMPTS[5], max_new_tokens=30, temperature=0.0, ignore_eos=True)
    stop = ref.tokens[10]
    res = await run_request(engine, "r", PROMPTS[5], max_new_tokens=30, temperature=0.0, ignore_eos=True,
                            stop_token_ids=[stop])
    k = ref.tokens.index(stop)
    assert res.tokens == ref.tokens[: k + 1] and res.finish_reason == "stop"


async def test_eos_finishes_with_stop_unless_ignore_eos_is_set(engine):
    eos = engine.info().eos_token_ids[0]
    res = await run_request(engine, "r", PROMPTS[0], max_new_tokens=5, allowed_token_ids=[eos])
    assert res.tokens == [eos] and res.finish_reason == "stop"
    res = await run_request(engine, "s", PROMPTS[0], max_new_tokens=5, allowed_token_ids=[eos], ignore_eos=True)
    assert res.tokens == [eos] * 5 and res.finish_reason == "length"


async def test_abort_mid_stream_keeps_the_partial_output_and_finishes_with_abort(engine):
    other_ref = await run_request(engine, "ref", PROMPTS[1], max_new_tokens=30, temperature=0.0, ignore_eos=True)
    res, task = start(engine, "long", PROMPTS[6], max_new_tokens=500, temperature=0.0, ignore_eos=True)
    other = asyncio.create_task(run_request(engine, "other", PROMPTS[1], max_new_tokens=30, temperature=0.0,
                                            ignore_eos=True))
    await wait_for_tokens(res, 3)
    await engine.abort("long")
    await task
    assert res.finish_reason == "abort" and 3 <= len(res.tokens) < 500
    assert (await other).tokens == other_ref.tokens  # a batch mate is unaffected
    await engine.abort("long")  # already finished: no-op
    await engine.abort("never-existed")  # unknown: no-op


async def test_closing_a_stream_early_aborts_its_request(engine):
    req = EngineRequest(rid="r", input_ids=PROMPTS[2], params=SamplingParams(max_new_tokens=500, ignore_eos=True))
    stream = engine.generate(req)
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    res = await run_request(engine, "r", PROMPTS[2], max_new_tokens=2)  # the rid is free again
    assert len(res.tokens) == 2


async def test_shutdown_aborts_every_request_still_running_or_queued(engine_kind):
    if engine_kind == "sglang":  # the shared one goes; the next test starts another
        eng = await shared_sglang()
        forget_shared_sglang()
    else:
        eng = make_engine(engine_kind)
        await eng.start()
    started = [start(eng, f"r{i}", p, max_new_tokens=500, ignore_eos=True) for i, p in enumerate(PROMPTS[:3])]
    await wait_for_tokens(started[0][0], 2)
    await eng.shutdown()
    for res, task in started:
        await task
        assert res.finish_reason == "abort"


# -- validation and info ---------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "params", "code"), [
    ([], {}, "empty_input"),
    ([512], {}, "token_out_of_range"),
    ([-1], {}, "token_out_of_range"),
    ([5], {"max_new_tokens": 0}, "bad_sampling_params"),
    ([5], {"temperature": -0.5}, "bad_sampling_params"),
    ([5], {"top_p": 0.0}, "bad_sampling_params"),
    ([5], {"top_p": 1.5}, "bad_sampling_params"),
    ([5], {"min_p": 1.0}, "bad_sampling_params"),
    ([5], {"top_k": 0}, "bad_sampling_params"),
    ([5], {"top_k": -2}, "bad_sampling_params"),
    ([5], {"allowed_token_ids": []}, "bad_sampling_params"),
    ([5], {"allowed_token_ids": [512]}, "bad_sampling_params"),
    ([5], {"disallowed_token_ids": [-3]}, "bad_sampling_params"),
    ([5], {"allowed_token_ids": [7], "disallowed_token_ids": [7]}, "bad_sampling_params"),
    ([5] * 100, {"max_new_tokens": 4000}, "too_long"),
])
async def test_invalid_requests_are_refused_with_a_code_before_anything_runs(engine, prompt, params, code):
    req = EngineRequest(rid="bad", input_ids=prompt, params=SamplingParams(**params))
    with pytest.raises(EngineError) as err:
        engine.validate(req)
    assert err.value.code == code
    with pytest.raises(EngineError) as err:
        async for _ in engine.generate(req):
            pass
    assert err.value.code == code
    assert len((await run_request(engine, "bad", [5], max_new_tokens=1)).tokens) == 1  # still serving


async def test_info_reports_the_model_vocab_eos_length_limit_and_live_version(engine):
    info = engine.info()
    assert info.vocab_size == 512 and info.eos_token_ids == [2] and info.max_model_len == 4096
    assert info.weight_version == 0 and info.dtype == "float32"


async def test_an_hf_engine_loaded_from_a_saved_checkpoint_generates_what_the_built_model_does(engine):
    from rollwire.engines.hf import HFEngine

    loaded = HFEngine.from_spec(tiny_checkpoint())
    await loaded.start()
    try:
        assert loaded.tokenizer is not None and loaded.tokenizer("Hi!")["input_ids"] == [48, 81, 9]
        ours = await run_request(loaded, "r", PROMPTS[3], max_new_tokens=16, temperature=0.0, ignore_eos=True)
    finally:
        await loaded.shutdown()
    ref = await run_request(engine, "r", PROMPTS[3], max_new_tokens=16, temperature=0.0, ignore_eos=True)
    assert ours.tokens == ref.tokens
