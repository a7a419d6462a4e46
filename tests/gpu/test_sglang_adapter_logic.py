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
import importlib.util
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from rollwire.engines.base import EngineError, EngineRequest
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
