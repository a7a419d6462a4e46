"""The Engine contract, part 2: pause and resume in each mode, weight loads, memory release, cache
flush, on every backend (the engines and how the shared sglang one is put back after each test:
conftest.py; the rest of the contract: test_engine_contract.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rollwire.engines.base import EngineError

from .conftest import run_request
from .contract import PROMPTS, originals, perturbed, start, wait_for_tokens

# -- pause, resume, weights -----------------------------------------------------------------------


async def test_pause_abort_finishes_running_requests_and_holds_new_ones_until_resume(engine):
    a, ta = start(engine, "a", PROMPTS[2], max_new_tokens=200, temperature=0.0, ignore_eos=True)
    await wait_for_tokens(a, 3)
    await engine.pause("abort")
    await ta
    assert a.finish_reason == "abort" and 3 <= len(a.tokens) < 200  # partial output kept
    b, tb = start(engine, "b", PROMPTS[3], max_new_tokens=8, temperature=0.0)
    for _ in range(20):  # negative check: a window in which nothing may run
        await asyncio.sleep(0.005)
    assert b.tokens == [] and engine.info().extra["waiting"] == 1  # queued, not started, while paused
    await engine.resume()
    await tb
    assert len(b.tokens) > 0 and b.finish_reason in ("stop", "length")


@pytest.mark.parametrize("mode", ["retract", "in_place"])
async def test_pause_and_resume_continue_running_requests_seamlessly(engine, mode):
    refs = [await run_request(engine, f"ref{i}", p, max_new_tokens=60, temperature=0.0, ignore_eos=True)
            for i, p in enumerate(PROMPTS[2:5])]
    started = [start(engine, f"r{i}", p, max_new_tokens=60, temperature=0.0, ignore_eos=True)
               for i, p in enumerate(PROMPTS[2:5])]
    await wait_for_tokens(started[0][0], 5)
    await engine.pause(mode)
    seen = [len(r.tokens) for r, _ in started]
    assert all(0 < n < 60 for n in seen)  # every request is mid-stream
    for _ in range(10):  # negative check: a window in which nothing may run
        await asyncio.sleep(0.005)
    assert [len(r.tokens) for r, _ in started] == seen  # nothing generated while paused
    extra = engine.info().extra
    if mode == "retract":  # KV dropped, requests requeued for re-prefill
        assert extra.get("kv_bytes", 0) == 0 and extra.get("running", 0) == 0
    else:  # KV kept, requests stay in the batch
        assert extra.get("kv_bytes", 1) > 0 and extra.get("running", 3) == 3
    await engine.resume()
    for (res, task), ref in zip(started, refs, strict=True):
        await task
        assert res.tokens == ref.tokens and res.finish_reason == "length"


async def test_retracted_requests_continue_under_the_weights_loaded_while_paused(engine, reference_model):
    res, task = start(engine, "r", PROMPTS[4], max_new_tokens=40, temperature=0.0, ignore_eos=True)
    await wait_for_tokens(res, 5)
    await engine.pause("retract")
    k = len(res.tokens)
    await engine.update_weights(perturbed(reference_model), version=1)
    await engine.resume()
    await task
    assert res.versions == [0] * k + [1] * (40 - k)
    tail = await run_request(engine, "tail", PROMPTS[4] + res.tokens[:k], max_new_tokens=40 - k, temperature=0.0,
                             ignore_eos=True)
    assert res.tokens[k:] == tail.tokens  # the continuation is what version 1 says after the prefix
    assert set(tail.versions) == {1}


async def test_kv_release_while_paused_in_place_makes_requests_re_prefill_on_resume(engine):
    ref = await run_request(engine, "ref", PROMPTS[5], max_new_tokens=50, temperature=0.0, ignore_eos=True)
    res, task = start(engine, "r", PROMPTS[5], max_new_tokens=50, temperature=0.0, ignore_eos=True)
    await wait_for_tokens(res, 5)
    await engine.pause("in_place")
    await engine.release_memory(["kv_cache"])
    assert engine.info().extra.get("kv_bytes", 0) == 0
    await engine.resume()
    await task
    assert res.tokens == ref.tokens


async def test_update_weights_in_place_changes_output_and_restoring_the_originals_restores_it(engine, reference_model):
    before = await run_request(engine, "a", PROMPTS[3], max_new_tokens=24, temperature=0.0, ignore_eos=True)
    model = getattr(engine, "model", None)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()} if model is not None else None
    await engine.pause("in_place")
    await engine.update_weights(iter(perturbed(reference_model)), version=1)  # any iterable
    await engine.resume()
    changed = await run_request(engine, "b", PROMPTS[3], max_new_tokens=24, temperature=0.0, ignore_eos=True)
    assert changed.tokens != before.tokens and set(changed.versions) == {1}
    assert engine.info().weight_version == 1
    await engine.pause("in_place")
    await engine.update_weights(originals(reference_model), version=2)
    await engine.resume()
    after = await run_request(engine, "c", PROMPTS[3], max_new_tokens=24, temperature=0.0, ignore_eos=True)
    assert after.tokens == before.tokens and set(after.versions) == {2}
    if model is not None:  # no new tensors: the live parameters were written in place
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs


@pytest.mark.parametrize(("bad", "code"), [
    (("model.no_such_layer.weight", torch.zeros(3)), "unknown_tensor"),
    (("model.norm.weight", torch.zeros(65)), "shape_mismatch"),
    (("model.norm.weight", torch.zeros(64, dtype=torch.float64)), "dtype_mismatch"),
])
async def test_update_weights_rejects_a_bad_tensor_and_applies_nothing(engine, reference_model, bad, code):
    before = await run_request(engine, "a", PROMPTS[3], max_new_tokens=16, temperature=0.0, ignore_eos=True)
    await engine.pause("in_place")
    with pytest.raises(EngineError) as err:
        await engine.update_weights([*perturbed(reference_model)[:3], bad], version=5)
    assert err.value.code == code
    assert engine.info().weight_version == 0
    await engine.resume()
    after = await run_request(engine, "b", PROMPTS[3], max_new_tokens=16, temperature=0.0, ignore_eos=True)
    assert after.tokens == before.tokens and set(after.versions) == {0}


async def test_update_weights_is_refused_unless_paused(engine, reference_model):
    with pytest.raises(EngineError) as err:
        await engine.update_weights(originals(reference_model), version=1)
    assert err.value.code == "not_paused"


async def test_released_weights_free_memory_hold_requests_and_come_back_when_resent(engine, reference_model):
    ref = await run_request(engine, "ref", PROMPTS[1], max_new_tokens=16, temperature=0.0, ignore_eos=True)
    resident = engine.info().extra["weights_bytes"]
    assert resident > 0
    await engine.pause("retract")
    await engine.release_memory(["weights", "kv_cache", "cuda_graph"])
    assert engine.info().extra["weights_bytes"] == 0
    model = getattr(engine, "model", None)
    if model is not None:
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    await engine.resume()  # unpaused, but without weights nothing may run
    res, task = start(engine, "r", PROMPTS[1], max_new_tokens=16, temperature=0.0, ignore_eos=True)
    for _ in range(20):  # negative check: a window in which nothing may run
        await asyncio.sleep(0.005)
    assert res.tokens == []
    await engine.pause("in_place")
    await engine.resume_memory(["weights"])
    assert engine.info().extra["weights_bytes"] == resident
    live = engine.info().weight_version
    with pytest.raises(EngineError) as err:  # restored memory is garbage: every tensor must come again
        await engine.update_weights(originals(reference_model)[:-1], version=1)
    assert err.value.code == "incomplete_version" and engine.info().weight_version == live
    await engine.update_weights(originals(reference_model), version=1)
    await engine.resume_memory(["kv_cache", "cuda_graph"])
    await engine.resume()
    await task
    assert res.tokens == ref.tokens and set(res.versions) == {1}


async def test_flush_cache_is_refused_while_requests_run_unpaused(engine):
    res, task = start(engine, "r", PROMPTS[2], max_new_tokens=300, ignore_eos=True)
    await wait_for_tokens(res, 1)
    with pytest.raises(EngineError) as err:
        await engine.flush_cache()
    assert err.value.code == "busy"
    await engine.pause("in_place")
    await engine.flush_cache()
    await engine.abort("r")
    await engine.resume()
    await task
    assert res.finish_reason == "abort"
