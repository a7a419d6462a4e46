"""SGLangEngine's own logic on CPU, against a stand-in for SGLang (tests/gpu/fake_sglang).

The stand-in imitates the SGLang interfaces and behaviours the adapter relies on (outputs read
through ReqState, prefix-matching aborts, fire-and-forget pauses, flush and release asserting an
idle scheduler), so these tests check the adapter's bookkeeping: versions per token, exactly one
terminal delta, eviction before release, held requests. Whether SGLang really behaves that way is
checked on a GPU by tests/gpu/run_gpu.sh (and test_sglang_gpu.py). Skipped where the real SGLang
is installed, since both are imported as ``sglang``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from rollwire.engines.base import EngineDelta, EngineError, EngineRequest
from rollwire.messages.generate import SamplingParams

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is not None,
                                reason="the real sglang is installed: the stand-in would shadow it")

FAKE = str(Path(__file__).parent / "fake_sglang")
SHAPE = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def sglang_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, str]]:
    from tests.gpu.common import write_qwen2

    ckpt = write_qwen2(str(tmp_path_factory.mktemp("ckpt")), SHAPE, dtype="bfloat16")
    sys.path.insert(0, FAKE)
    try:
        import rollwire.engines.sglang as mod

        yield mod, ckpt
    finally:
        sys.path.remove(FAKE)
        ours = ("sglang", "rollwire.engines.sglang")
        for name in [n for n in sys.modules if n in ours or n.startswith("sglang.")]:
            del sys.modules[name]


@pytest.fixture
async def eng(sglang_module: tuple[object, str]) -> AsyncIterator[object]:
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"fake_step_s": "0.002"})  # type: ignore[attr-defined]
    await e.start()
    yield e
    await e.shutdown()


def weights(ckpt: str, scale: float = 1.0) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [(k, (v.float() * scale).to(v.dtype)) for k, v in load_file(f"{ckpt}/model.safetensors").items()]


async def run(e: object, rid: str, prompt: list[int], out: dict | None = None, **params: object) -> dict:
    res = out if out is not None else {}
    res.update(tokens=[], versions=[], finals=0, finish=None, lps=[])
    async for d in e.generate(EngineRequest(rid, prompt, SamplingParams(**params), return_logprob=True)):  # type: ignore[attr-defined]
        res["tokens"] += d.token_ids
        res["lps"] += d.logprobs or []
        res["versions"] += [d.weight_version] * len(d.token_ids)
        if d.finish_reason is not None:
            res["finals"] += 1
            res["finish"] = d.finish_reason
    return res


def start(e: object, rid: str, prompt: list[int], **params: object) -> tuple[dict, asyncio.Task]:
    res: dict = {"tokens": []}
    return res, asyncio.ensure_future(run(e, rid, prompt, res, **params))


async def until(res: dict, n: int) -> None:
    for _ in range(5000):
        if len(res["tokens"]) >= n or res.get("finish"):
            return
        await asyncio.sleep(0.001)
    raise TimeoutError


G = dict(max_new_tokens=40, temperature=0.0, ignore_eos=True)


def test_engine_args_are_converted_from_strings_by_the_server_args_field_types(sglang_module) -> None:
    mod, _ = sglang_module
    got = mod.convert_engine_args({"mem-fraction-static": "0.5", "tp_size": "2", "enable_memory_saver": "false",
                                   "attention_backend": "triton", "context_length": "none"})
    assert got == {"mem_fraction_static": 0.5, "tp_size": 2, "enable_memory_saver": False,
                   "attention_backend": "triton", "context_length": None}
    with pytest.raises(ValueError, match="unknown sglang engine argument"):
        mod.convert_engine_args({"no_such_arg": "1"})
    with pytest.raises(ValueError, match="expected int"):
        mod.convert_engine_args({"tp_size": "two"})


def test_skip_tokenizer_init_cannot_be_turned_off(sglang_module) -> None:
    mod, ckpt = sglang_module
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        mod.SGLangEngine(ckpt, engine_args={"skip_tokenizer_init": "false"})


async def test_greedy_streams_every_token_with_logprobs_and_one_terminal_delta(eng) -> None:
    a = await run(eng, "a", [5, 6, 7], **G)
    b = await run(eng, "b", [5, 6, 7], **G)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 40 and len(a["lps"]) == 40
    assert a["finals"] == 1 and a["finish"] == "length" and set(a["versions"]) == {0}
    assert eng.loop_is_engine_loop


async def test_aborting_one_rid_leaves_a_rid_it_is_a_prefix_of_running(eng) -> None:
    r1, t1 = start(eng, "p:1", [9, 9], max_new_tokens=3000, ignore_eos=True)
    _, t10 = start(eng, "p:10", [9, 8], max_new_tokens=60, ignore_eos=True)
    await until(r1, 3)
    await eng.abort("p:1")
    assert (await t1)["finish"] == "abort"
    out = await t10
    assert out["finish"] == "length" and len(out["tokens"]) == 60


async def test_masks_and_stop_tokens_reach_sglang(eng) -> None:
    r = await run(eng, "m", [3, 4], max_new_tokens=20, ignore_eos=True, allowed_token_ids=[100, 101])
    assert set(r["tokens"]) <= {100, 101}
    ref = await run(eng, "r", [3, 4], **G)
    stop = ref["tokens"][5]
    r = await run(eng, "s", [3, 4], stop_token_ids=[stop], **G)
    assert r["tokens"] == ref["tokens"][: ref["tokens"].index(stop) + 1] and r["finish"] == "stop"


async def test_a_seed_is_refused_unless_deterministic_inference_is_on(eng) -> None:
    with pytest.raises(EngineError) as err:
        await run(eng, "s", [1, 2], max_new_tokens=3, seed=4)
    assert err.value.code == "bad_sampling_params"


@pytest.mark.parametrize("mode", ["retract", "in_place"])
async def test_tokens_after_a_load_while_paused_carry_the_new_version(eng, sglang_module, mode) -> None:
    _, ckpt = sglang_module
    started = [start(eng, f"r{i}", [i + 3, 4], **G) for i in range(4)]
    for res, _ in started:
        await until(res, 3)
    await eng.pause(mode)
    seen = [len(r["tokens"]) for r, _ in started]
    await asyncio.sleep(0.05)
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
    await asyncio.sleep(0.05)
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
    await asyncio.sleep(0.05)
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


async def test_shutdown_aborts_what_runs(sglang_module) -> None:
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"fake_step_s": "0.002"})
    await e.start()
    started = [start(e, f"r{i}", [i + 1], max_new_tokens=3000, ignore_eos=True) for i in range(3)]
    await until(started[0][0], 2)
    await e.shutdown()
    for _, task in started:
        out = await asyncio.wait_for(task, 10)
        assert out["finish"] == "abort" and out["finals"] == 1


# -- non-streamed requests, sessions, NCCL, deterministic min_p ---------------------------------------


async def run_batch(e: object, rid: str, prompt: list[int], **params: object) -> dict:
    """A non-streamed request (EngineRequest.stream=False): every delta it yields, as a list."""
    deltas = [d async for d in e.generate(EngineRequest(rid, prompt, SamplingParams(**params),  # type: ignore[attr-defined]
                                                          return_logprob=True, stream=False))]
    return {"deltas": deltas, "tokens": [t for d in deltas for t in d.token_ids],
            "versions": [d.weight_version for d in deltas for _ in d.token_ids],
            "lps": [x for d in deltas for x in d.logprobs or []],
            "finish": deltas[-1].finish_reason, "finals": sum(d.finish_reason is not None for d in deltas)}


async def test_a_non_streamed_request_is_one_delta_with_every_token_and_the_same_output(eng) -> None:
    streamed = await run(eng, "s", [5, 6, 7], **G)
    batch = await run_batch(eng, "b", [5, 6, 7], **G)
    assert len(batch["deltas"]) == 1 and batch["finals"] == 1 and batch["finish"] == "length"
    assert batch["tokens"] == streamed["tokens"] and batch["lps"] == streamed["lps"]


@pytest.mark.parametrize("mode", ["retract", "in_place"])
async def test_non_streamed_requests_across_a_version_switch_get_exact_spans(eng, sglang_module, mode) -> None:
    _, ckpt = sglang_module
    tasks = [asyncio.ensure_future(run_batch(eng, f"n{i}", [i + 3, 4], **G)) for i in range(4)]
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


async def test_cached_tokens_are_reported_once_on_the_first_delta(eng) -> None:
    first = await run_batch(eng, "a", [7, 8, 9, 10], **G)
    again = await run_batch(eng, "b", [7, 8, 9, 10] + first["tokens"] + [11], **G)
    assert first["deltas"][0].cached_tokens == 0
    assert again["deltas"][0].cached_tokens == 4 + 40  # the whole earlier history
    streamed = [d async for d in eng.generate(EngineRequest("c", [7, 8, 9, 10, 1], SamplingParams(**G)))]
    assert streamed[0].cached_tokens == 4 and all(d.cached_tokens == 0 for d in streamed[1:])


async def test_a_session_keeps_its_stale_prefix_only_when_asked_and_close_session_forgets_it(eng,
                                                                                             sglang_module) -> None:
    _, ckpt = sglang_module

    async def turn(rid: str, prompt: list[int], stale: bool) -> EngineDelta:
        req = EngineRequest(rid, prompt, SamplingParams(**G), stream=False, session_id="s1", keep_stale_prefix=stale)
        deltas = [d async for d in eng.generate(req)]
        assert len(deltas) == 1
        return deltas[0]

    first = await turn("t1", [4, 4, 4], stale=True)
    await eng.pause("retract")
    await eng.update_weights(weights(ckpt, 1.5), version=1)
    await eng.resume()
    history = [4, 4, 4, *first.token_ids]
    stale = await turn("t2", [*history, 5], stale=True)
    assert stale.cached_tokens == len(history)  # the v0 history, reused under v1 because the session asked
    fresh = await turn("t3", [*history, 5], stale=False)
    assert fresh.cached_tokens == 0  # not asked: recomputed under v1
    await eng.close_session("s1")
    assert eng.info().extra["sessions"] == 0
    await eng.close_session("never-opened")


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


def test_engine_arg_defaults_come_from_the_environment(sglang_module, monkeypatch) -> None:
    mod, ckpt = sglang_module
    monkeypatch.setenv("ROLLWIRE_SGLANG_ENGINE_ARGS", "attention_backend=triton,mem_fraction_static=0.25")
    e = mod.SGLangEngine(ckpt, engine_args={"mem_fraction_static": "0.4"})  # type: ignore[attr-defined]
    assert e.server_kwargs["attention_backend"] == "triton" and e.server_kwargs["mem_fraction_static"] == 0.4
    monkeypatch.setenv("ROLLWIRE_SGLANG_ENGINE_ARGS", '{"sampling_backend": "pytorch"}')
    assert mod.SGLangEngine(ckpt).server_kwargs["sampling_backend"] == "pytorch"  # type: ignore[attr-defined]


async def test_with_deterministic_inference_min_p_goes_to_the_logit_processor_and_refuses_logprobs(
        sglang_module) -> None:
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"enable_deterministic_inference": "true"})  # type: ignore[attr-defined]
    from rollwire.engines.sglang_requests import Live

    s = Live(EngineRequest("r", [1], SamplingParams(temperature=0.8, min_p=0.1, seed=3)))
    sp = e._sampling_params(s)
    assert sp["min_p"] == 0.0 and sp["custom_params"]["rw_min_p"] == 0.1 and sp["sampling_seed"] == 3
    with pytest.raises(EngineError) as err:
        e.validate(EngineRequest("r", [1], SamplingParams(temperature=0.8, min_p=0.1), return_logprob=True))
    assert err.value.code == "bad_sampling_params"


def test_the_min_p_logit_processor_keeps_what_min_p_keeps(sglang_module) -> None:
    from rollwire.engines.sglang_logits import TokenMask

    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0], [2.0, 1.0, 0.0, -3.0]])
    out = TokenMask()(logits.clone(), [{"rw_min_p": 0.3, "rw_temperature": 1.0}, {"rw_min_p": 0.3,
                                                                                  "rw_temperature": 2.0}])
    probs = [torch.softmax(logits[i] / t, -1) for i, t in enumerate((1.0, 2.0))]
    for i in range(2):
        assert torch.equal(torch.isfinite(out[i]), probs[i] >= 0.3 * probs[i].max())


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


def test_with_deterministic_inference_every_sampled_row_takes_sglangs_sorted_path(sglang_module) -> None:
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"enable_deterministic_inference": "true"})  # type: ignore[attr-defined]
    from rollwire.engines.sglang_requests import Live

    sp = e._sampling_params(Live(EngineRequest("r", [1], SamplingParams(temperature=1.0, seed=3))))
    assert sp["top_k"] == e.vocab_size  # keeps every token, but no longer SGLang's "all" marker
    assert e._sampling_params(Live(EngineRequest("g", [1], SamplingParams(temperature=0.0))))["top_k"] == -1


async def test_a_request_whose_consumer_left_keeps_the_cache_unflushed_until_sglang_ended_it(eng) -> None:
    """SGLang asserts an idle scheduler when it flushes after a load: a request aborted because its
    consumer went away may still be in SGLang's batch, so the adapter must not ask for a flush yet."""
    res, task = start(eng, "gone", [5, 6, 7], max_new_tokens=2000, temperature=0.0, ignore_eos=True)
    while len(res["tokens"]) < 2:
        await asyncio.sleep(0.002)
    srid = next(iter(eng._live.values())).srid
    task.cancel()  # the consumer goes away: generate() aborts the request inside SGLang and forgets it
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not eng._live and srid in eng._leaving
    assert srid in eng._tm.rid_to_state  # the abort is on its way to the scheduler: not ended yet
    assert eng._flush_after_load() is False
    for _ in range(1000):  # the abort comes back
        if srid not in eng._tm.rid_to_state:
            break
        await asyncio.sleep(0.002)
    assert eng._flush_after_load() is True and not eng._leaving
