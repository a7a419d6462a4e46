"""SGLangEngine's control logic on CPU, against the SGLang stand-in (tests/gpu/fake_sglang): pauses
in each mode, weight loads (tensors and NCCL), memory release, cache flush, and the versions of
tokens around a switch. The rest of the adapter's logic, and what the stand-in imitates:
test_sglang_adapter_logic.py. Skipped where the real SGLang is installed."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util

import pytest
import torch

from rollwire.engines.base import EngineError
from rollwire.engines.sglang import compat
from tests.gpu.fake_engine import G, rounds, run, run_batch, start, until, weights

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is not None,
                                reason="the real sglang is installed: the stand-in would shadow it")


@pytest.mark.parametrize("mode", ["retract", "in_place"])
async def test_tokens_after_a_load_while_paused_carry_the_new_version(eng, sglang_module, mode) -> None:
    _, ckpt = sglang_module
    started = [start(eng, f"r{i}", [i + 3, 4], **G) for i in range(4)]
    for res, _ in started:
        await until(res, 3)
    await eng.pause(mode)
    seen = [len(r["tokens"]) for r, _ in started]
    await rounds(eng)
    assert [len(r["tokens"]) for r, _ in started] == seen  # nothing while paused
    await eng.update_weights(weights(ckpt, 1.5), version=1)
    await eng.resume()
    for (_, task), k in zip(started, seen, strict=True):
        out = await task
        assert out["finals"] == 1 and out["finish"] == "length" and len(out["tokens"]) == 40
        assert out["versions"] == [0] * k + [1] * (40 - k)
    assert eng.info().weight_version == 1


async def test_pause_abort_ends_running_requests_and_holds_new_ones(eng) -> None:
    a, ta = start(eng, "a", [1, 2, 3], max_new_tokens=500, ignore_eos=True)
    await until(a, 3)
    await eng.pause("abort")
    out = await ta
    assert out["finish"] == "abort" and out["finals"] == 1 and 3 <= len(out["tokens"]) < 500
    b, tb = start(eng, "b", [4, 5], max_new_tokens=8)
    for _ in range(5000):  # b reaches the engine and is held there
        if eng.info().extra["waiting"] == 1:
            break
        await asyncio.sleep(0.001)
    await rounds(eng)
    assert b["tokens"] == [] and eng.info().extra["waiting"] == 1
    await eng.resume()
    assert (await tb)["finish"] in ("stop", "length")


async def test_release_with_requests_inside_sglang_evicts_them_and_they_continue_after_resume(eng,
                                                                                              sglang_module) -> None:
    _, ckpt = sglang_module
    started = [start(eng, f"r{i}", [i + 7, 1], **G) for i in range(3)]
    for res, _ in started:
        await until(res, 2)
    await eng.pause("in_place")
    await eng.release_memory(["weights", "kv_cache", "cuda_graph"])  # the stand-in asserts an idle scheduler
    assert eng.info().extra["weights_bytes"] == 0 and eng.info().extra["in_sglang"] == 0
    await eng.resume()
    await rounds(eng)
    assert all(not t.done() for _, t in started)  # held: nothing runs without weights
    await eng.pause("retract")
    await eng.resume_memory(["weights"])
    await eng.update_weights(weights(ckpt), version=1)
    await eng.resume_memory(["kv_cache", "cuda_graph"])
    await eng.resume()
    for _, task in started:
        out = await task
        assert out["finals"] == 1 and out["finish"] == "length" and len(out["tokens"]) == 40
        assert out["versions"] == sorted(out["versions"]) and out["versions"][-1] == 1


async def test_update_weights_checks_names_shapes_dtypes_and_needs_a_pause(eng, sglang_module) -> None:
    _, ckpt = sglang_module
    w = weights(ckpt)
    with pytest.raises(EngineError) as err:
        await eng.update_weights(w, version=1)
    assert err.value.code == "not_paused"
    await eng.pause("in_place")
    for bad, code in ((("nope", torch.zeros(2)), "unknown_tensor"),
                      (("model.norm.weight", torch.zeros(3, dtype=torch.bfloat16)), "shape_mismatch"),
                      (("model.norm.weight", torch.zeros(32, dtype=torch.float64)), "dtype_mismatch")):
        with pytest.raises(EngineError) as err:
            await eng.update_weights([*w[:2], bad], version=1)
        assert err.value.code == code
    assert eng.info().weight_version == 0
    await eng.resume()


async def test_flush_is_refused_while_running_and_evicts_when_paused(eng) -> None:
    res, task = start(eng, "f", [2, 2], max_new_tokens=3000, ignore_eos=True)
    await until(res, 2)
    with pytest.raises(EngineError) as err:
        await eng.flush_cache()
    assert err.value.code == "busy"
    await eng.pause("in_place")
    await eng.flush_cache()
    n = len(res["tokens"])
    await eng.resume()
    await until(res, n + 5)
    await eng.abort("f")
    out = await task
    assert out["finish"] == "abort" and out["finals"] == 1


@pytest.mark.parametrize("chunk_tokens", [None, 8], ids=["non_streamed", "chunked_stream"])
@pytest.mark.parametrize("mode", ["retract", "in_place"])
async def test_non_streamed_and_chunked_requests_across_a_version_switch_get_exact_spans(eng, sglang_module, mode,
                                                                                        chunk_tokens) -> None:
    """SGLang holds back tokens of both (until the finish / every stream_interval): the switch
    evicts them, so each token's version is still exact."""
    _, ckpt = sglang_module
    tasks = [asyncio.ensure_future(run_batch(eng, f"n{i}", [i + 3, 4], chunk_tokens, **G)) for i in range(4)]
    for _ in range(200):  # some tokens produced (inside the stand-in scheduler)
        await asyncio.sleep(0.002)
        running = eng._tm._running  # type: ignore[attr-defined]
        if len(running) == 4 and all(len(r.out) >= 11 for r in running):
            break
    await eng.pause(mode)
    await eng.update_weights(weights(ckpt, 1.5), version=1)
    await eng.resume()
    for i, task in enumerate(tasks):
        out = await task
        assert out["finals"] == 1 and out["finish"] == "length" and len(out["tokens"]) == 40
        k = out["versions"].count(0)
        assert out["versions"] == [0] * k + [1] * (40 - k) and k >= 8  # what reached the TM before the switch
        # the tokens tagged 1 are what version 1 makes after the tokens tagged 0
        tail = await run(eng, f"tail{i}", [i + 3, 4, *out["tokens"][:k]], **{**G, "max_new_tokens": 40 - k})
        assert tail["tokens"] == out["tokens"][k:]


async def test_an_nccl_push_loads_a_version_and_a_hung_one_times_out_tears_the_group_down(eng, sglang_module) -> None:
    _, ckpt = sglang_module
    specs = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in weights(ckpt)]
    await eng.pause("retract")
    with pytest.raises(EngineError) as err:
        await eng.update_weights_from_distributed(specs, version=1, group_name="g")
    assert "join_weight_group" in err.value.message
    await eng.join_weight_group("127.0.0.1", 29500, group_name="g")
    with pytest.raises(EngineError) as err:
        await eng.update_weights_from_distributed([("nope", "bfloat16", [3])], version=1, group_name="g")
    assert err.value.code == "unknown_tensor"
    await eng.update_weights_from_distributed(specs, version=1, group_name="g")
    assert eng.info().weight_version == 1
    eng._tm.fake_nccl_hang = True  # type: ignore[attr-defined]  # the trainer died mid-broadcast
    with pytest.raises(EngineError) as err:
        await eng.update_weights_from_distributed(specs, version=2, group_name="g", timeout_s=0.2)
    assert err.value.code == "weights_failed" and "torn down" in err.value.message
    assert eng.info().weight_version == 1 and eng.info().extra["weight_groups"] == []
    eng._tm.fake_nccl_hang = False  # type: ignore[attr-defined]
    await eng.resume()
    r = await run(eng, "after", [3, 3], max_new_tokens=4)  # the old version serves
    assert set(r["versions"]) == {1}
    await eng.pause("retract")
    await eng.join_weight_group("127.0.0.1", 29501, group_name="g")  # a new trainer, a new group
    await eng.update_weights_from_distributed(specs, version=3, group_name="g")
    assert eng.info().weight_version == 3
    await eng.resume()


async def test_resume_after_a_kv_release_takes_the_kv_back_and_requests_continue(eng) -> None:
    ref = await run(eng, "ref", [6, 6], **G)
    res, task = start(eng, "r", [6, 6], **G)
    await until(res, 3)
    await eng.pause("in_place")
    await eng.release_memory(["kv_cache"])
    await eng.resume()
    out = await asyncio.wait_for(task, 10)
    assert out["tokens"] == ref["tokens"] and eng.info().extra["released"] == []


@pytest.mark.parametrize("mode", ["retract", "in_place"])
async def test_after_a_retract_switch_requests_resume_under_the_new_cache_key_only(eng, sglang_module, mode) -> None:
    _, ckpt = sglang_module
    res, task = start(eng, "k", [8, 8], **G)
    await until(res, 3)
    await eng.pause(mode)
    await eng.update_weights(weights(ckpt, 1.5), version=1)
    await eng.resume()
    await task
    keys = [key for kind, _, key in (e for e in eng._tm.log if e[0] == "req")]  # type: ignore[attr-defined]
    # retract: re-submitted (no stale radix-cache prefix of v0); in_place: kept inside SGLang, KV and all
    assert keys == (["rw-v0", "rw-v1"] if mode == "retract" else ["rw-v0"])


async def test_a_request_whose_consumer_left_keeps_the_cache_unflushed_until_sglang_ended_it(eng) -> None:
    """SGLang asserts an idle scheduler when it flushes after a load: a request aborted because its
    consumer went away may still be in SGLang's batch, so the adapter must not ask for a flush yet."""
    res, task = start(eng, "gone", [5, 6, 7], max_new_tokens=2000, temperature=0.0, ignore_eos=True)
    await until(res, 2)
    srid = next(iter(eng._live.values())).srid
    task.cancel()  # the consumer goes away: generate() aborts the request inside SGLang and forgets it
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not eng._live and srid in eng._leaving
    assert compat.is_live(eng._tm, srid)  # the abort is on its way to the scheduler: not ended yet
    assert eng._flush_after_load() is False
    for _ in range(1000):  # the abort comes back
        if not compat.is_live(eng._tm, srid):
            break
        await asyncio.sleep(0.002)
    assert eng._flush_after_load() is True and not eng._leaving


@pytest.mark.parametrize("failure", ["refused", "raised"])
async def test_a_load_failing_after_its_first_bucket_holds_requests_until_a_complete_version(eng, sglang_module,
                                                                                              failure) -> None:
    """SGLang took bucket 1 of a version, then refused bucket 2 (or the call raised): it holds a mix
    of two versions, so nothing may run on it; a partial version is refused, a complete one releases
    the held requests."""
    _, ckpt = sglang_module
    started = [start(eng, f"h{i}", [i + 2, 9], **G) for i in range(3)]
    for res, _ in started:
        await until(res, 2)
    await eng.pause("retract")
    eng.weight_bucket_bytes = 1  # one tensor per bucket: the load takes several calls
    second = {eng._tm._weight_calls + 2}
    if failure == "refused":
        eng._tm.fake_fail_weight_calls = second
        with pytest.raises(EngineError) as err:
            await eng.update_weights(weights(ckpt, 1.5), version=1)
        assert err.value.code == "weights_failed" and "bucket 2/" in err.value.message
    else:
        eng._tm.fake_raise_weight_calls = second
        with pytest.raises(RuntimeError, match="injected crash"):
            await eng.update_weights(weights(ckpt, 1.5), version=1)
    assert eng.info().weight_version == 0 and eng.info().extra["weights_sent"] is False
    await eng.resume()
    held = [len(r["tokens"]) for r, _ in started]
    await rounds(eng, 20)
    assert [len(r["tokens"]) for r, _ in started] == held and all(not t.done() for _, t in started)
    await eng.pause("retract")
    with pytest.raises(EngineError) as err:
        await eng.update_weights(weights(ckpt)[:-1], version=2)
    assert err.value.code == "incomplete_version"
    await eng.update_weights(weights(ckpt), version=2)
    await eng.resume()
    for (_, task), k in zip(started, held, strict=True):  # each: one terminal reply, old tokens then v2's
        out = await asyncio.wait_for(task, 10)
        assert out["finals"] == 1 and out["finish"] == "length" and len(out["tokens"]) == 40
        assert out["versions"] == [0] * k + [2] * (40 - k)


async def test_a_pause_in_the_tick_a_request_is_submitted_still_lets_release_evict_it(eng) -> None:
    """The pause comes as SGLang's TokenizerManager registers a request, before it sends it to the
    scheduler (fault injection: the pause starts from inside the submission). The request still
    reaches the scheduler, so release_memory evicts it (it used to wait 60 s for an abort that went
    nowhere, then fail), and it finishes whole after resume."""
    submit, paused = eng._tm.generate_request, []  # type: ignore[attr-defined]

    def submit_then_pause(obj, request=None):  # type: ignore[no-untyped-def]
        if not paused:
            paused.append(asyncio.ensure_future(eng.pause("retract")))
        return submit(obj, request)

    eng._tm.generate_request = submit_then_pause  # type: ignore[attr-defined]
    _, task = start(eng, "r", [5, 6], **G)
    async with asyncio.timeout(60):  # hang guards
        while not paused:
            await asyncio.sleep(0.001)
        await paused[0]
        await eng.release_memory(["kv_cache"])
    await eng.resume_memory(["kv_cache"])
    await eng.resume()
    out = await task
    assert out["finals"] == 1 and out["finish"] == "length" and len(out["tokens"]) == 40
