"""SGLangEngine's own logic on CPU, against a stand-in for SGLang (tests/gpu/fake_sglang).

The stand-in imitates the SGLang interfaces and behaviours the adapter relies on (outputs read
through ReqState, prefix-matching aborts, fire-and-forget pauses, flush and release asserting an
idle scheduler), so these tests check the adapter's bookkeeping: versions per token, exactly one
terminal delta, eviction before release, held requests. Whether SGLang really behaves that way is
checked on a GPU by tests/gpu/run_gpu.sh (and test_sglang_gpu.py). Skipped where the real SGLang
is installed, since both are imported as ``sglang``. Pauses, loads, release and flush:
test_sglang_adapter_control.py.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch

from rollwire.engines.base import EngineDelta, EngineError, EngineRequest
from rollwire.messages.generate import SamplingParams
from tests.conftest import until as until_state
from tests.gpu.fake_engine import G, run, run_batch, start, until, weights

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is not None,
                                reason="the real sglang is installed: the stand-in would shadow it")


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


async def test_a_non_streamed_request_is_one_delta_with_every_token_and_the_same_output(eng) -> None:
    streamed = await run(eng, "s", [5, 6, 7], **G)
    batch = await run_batch(eng, "b", [5, 6, 7], **G)
    assert len(batch["deltas"]) == 1 and batch["finals"] == 1 and batch["finish"] == "length"
    assert batch["tokens"] == streamed["tokens"] and batch["lps"] == streamed["lps"]


async def test_a_chunked_stream_is_handed_over_every_chunk_tokens_with_the_same_output(eng) -> None:
    chunked = await run_batch(eng, "k", [5, 6, 7], 8, **G)
    streamed = await run(eng, "s", [5, 6, 7], **G)
    assert chunked["tokens"] == streamed["tokens"] and chunked["lps"] == streamed["lps"]
    # SGLang's stream_interval: the first token at once, then every 8 (the rest with the finish)
    assert [len(d.token_ids) for d in chunked["deltas"]] == [1, 8, 8, 8, 8, 7]
    assert chunked["finals"] == 1 and chunked["finish"] == "length"


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
    from rollwire.engines.sglang.requests import Live

    s = Live(EngineRequest("r", [1], SamplingParams(temperature=0.8, min_p=0.1, seed=3)))
    sp = e._sampling_params(s)
    assert sp["min_p"] == 0.0 and sp["custom_params"]["rw_min_p"] == 0.1 and sp["sampling_seed"] == 3
    with pytest.raises(EngineError) as err:
        e.validate(EngineRequest("r", [1], SamplingParams(temperature=0.8, min_p=0.1), return_logprob=True))
    assert err.value.code == "bad_sampling_params"


def test_the_min_p_logit_processor_keeps_what_min_p_keeps(sglang_module) -> None:
    from rollwire.engines.sglang.logits import TokenMask

    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0], [2.0, 1.0, 0.0, -3.0]])
    out = TokenMask()(logits.clone(), [{"rw_min_p": 0.3, "rw_temperature": 1.0}, {"rw_min_p": 0.3,
                                                                                  "rw_temperature": 2.0}])
    probs = [torch.softmax(logits[i] / t, -1) for i, t in enumerate((1.0, 2.0))]
    for i in range(2):
        assert torch.equal(torch.isfinite(out[i]), probs[i] >= 0.3 * probs[i].max())


def test_with_deterministic_inference_every_sampled_row_takes_sglangs_sorted_path(sglang_module) -> None:
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"enable_deterministic_inference": "true"})  # type: ignore[attr-defined]
    from rollwire.engines.sglang.requests import Live

    sp = e._sampling_params(Live(EngineRequest("r", [1], SamplingParams(temperature=1.0, seed=3))))
    assert sp["top_k"] == e.vocab_size  # keeps every token, but no longer SGLang's "all" marker
    assert e._sampling_params(Live(EngineRequest("g", [1], SamplingParams(temperature=0.0))))["top_k"] == -1


def test_checkpoint_tensors_come_from_the_index_or_skip_a_consolidated_copy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The tensors a complete version must name: the model's files (its index when it has one), not
    another copy of the weights shipped beside them (Mistral's consolidated.safetensors)."""
    import json

    from safetensors.torch import save_file

    from rollwire.engines.sglang.args import read_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8, "tie_word_embeddings": False}))
    save_file({"model.a": torch.zeros(2), "model.b": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    save_file({"tok_embeddings.weight": torch.zeros(4)}, str(tmp_path / "consolidated.safetensors"))
    ckpt = read_checkpoint(str(tmp_path))
    assert sorted(ckpt.tensors) == ["model.a", "model.b"] and ckpt.nbytes == 5 * 4
    save_file({"model.c": torch.zeros(1)}, str(tmp_path / "model-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.a": "model.safetensors", "model.c": "model-00002.safetensors"}}))
    assert sorted(read_checkpoint(str(tmp_path)).tensors) == ["model.a", "model.b", "model.c"]


async def test_an_sglang_outside_the_tested_range_is_refused_before_an_engine_is_built(sglang_module,
                                                                                      monkeypatch) -> None:
    mod, ckpt = sglang_module
    import sglang  # the stand-in (first on the path while the module fixture lives)

    monkeypatch.setattr(sglang, "__version__", "0.6.0")
    monkeypatch.delenv("ROLLWIRE_SGLANG_ANY_VERSION", raising=False)
    e = mod.SGLangEngine(ckpt)
    with pytest.raises(mod.compat.UnsupportedSGLangVersion, match=r"sglang 0\.6\.0 is not supported"):
        await e.start()
    assert e._eng is None


async def test_while_sglangs_batch_is_full_each_freed_slot_goes_to_the_client_with_fewest_inside(
        sglang_module) -> None:
    """SGLang's max_running_requests (2 here, read from its scheduler's internal state): client A
    fills the batch and queues two more, then B sends two. FIFO would run a0 a1 a2 a3 b0 b1; each
    freed slot goes to the waiting client holding fewer, so B's requests do not wait behind all of
    A's; a pause and resume meanwhile changes none of it. A request aborted while it waits for a slot
    ends at once, with no tokens."""
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"fake_step_s": "0.002", "max_running_requests": "2"})
    await e.start()
    entered: list[str] = []

    async def collect(rid: str, client: str) -> list[EngineDelta]:
        deltas = []
        req = EngineRequest(rid, [3, 4], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
                            client=client)
        async for d in e.generate(req):
            if d.token_ids and rid not in entered:
                entered.append(rid)  # its first token: the step after it entered SGLang
            deltas.append(d)
        return deltas

    try:
        assert e.info().extra["max_running_requests"] == 2
        a = [asyncio.ensure_future(collect(f"a{i}", "A")) for i in range(4)]
        await until_state(lambda: e.info().extra["waiting_for_a_slot"] == 2, "a2, a3 waiting for a slot", 30)
        b = [asyncio.ensure_future(collect(f"b{i}", "B")) for i in range(2)]
        late = asyncio.ensure_future(collect("a-late", "A"))
        await until_state(lambda: e.info().extra["waiting_for_a_slot"] == 5, "b0, b1, a-late waiting", 30)
        await e.pause("retract")  # a weight push's pause: the waiters keep their places
        await e.resume()
        assert e.info().extra["waiting_for_a_slot"] == 5
        await e.abort("a-late")
        aborted = await late
        assert [(d.token_ids, d.finish_reason) for d in aborted] == [([], "abort")]
        outs = await asyncio.gather(*a, *b)
        assert all(sum(len(d.token_ids) for d in o) == 12 and o[-1].finish_reason == "length" for o in outs)
        assert entered == ["a0", "a1", "b0", "a2", "b1", "a3"], entered
        assert e.info().extra["waiting_for_a_slot"] == 0 and e._slots.fair.total == 0
    finally:
        await e.shutdown()


async def test_a_slot_is_free_once_sglang_ended_the_request_not_once_its_consumer_reads_on(sglang_module) -> None:
    """One slot (max_running_requests 1): A's consumer takes its final delta and then stops reading
    (a slow client) without closing the generator; B still gets the slot and finishes."""
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"fake_step_s": "0.002", "max_running_requests": "1"})
    await e.start()
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    try:
        slow = e.generate(EngineRequest("a", [3, 4], sp, client="A"))
        a = [d async for d in _until_final(slow)]
        assert a[-1].finish_reason == "length"
        async with asyncio.timeout(60):  # a hang guard: B would wait for A's consumer forever
            b = [d async for d in e.generate(EngineRequest("b", [5, 6], sp, client="B"))]
        assert sum(len(d.token_ids) for d in b) == 6 and b[-1].finish_reason == "length"
        await slow.aclose()
        assert e._slots.fair.total == 0
    finally:
        await e.shutdown()


async def _until_final(gen):  # type: ignore[no-untyped-def]
    """The deltas of ``gen`` up to its final one, leaving ``gen`` suspended there (not closed)."""
    while True:
        d = await gen.__anext__()
        yield d
        if d.finish_reason is not None:
            return


async def test_a_client_below_its_share_gets_a_slot_by_evicting_the_newest_request_of_the_one_above(
        sglang_module) -> None:
    """Two slots, both held by A's long requests: B's request does not wait for them to end. A's
    newest is evicted (tokens so far kept), B runs and finishes first, and the evicted request
    continues to the same tokens it makes when it runs alone."""
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"fake_step_s": "0.002", "max_running_requests": "2"})
    await e.start()
    long = SamplingParams(max_new_tokens=150, temperature=0.0, ignore_eos=True)
    finished: list[str] = []

    async def collect(rid: str, client: str, prompt: list[int], sp: SamplingParams) -> list[int]:
        toks: list[int] = []
        async for d in e.generate(EngineRequest(rid, prompt, sp, client=client)):
            toks += d.token_ids
            if d.finish_reason is not None:
                assert d.finish_reason == "length"
                finished.append(rid)
        return toks

    try:
        alone = [await collect(f"alone{i}", "X", [i + 3, 4], long) for i in range(2)]
        finished.clear()
        a = [asyncio.ensure_future(collect(f"a{i}", "A", [i + 3, 4], long)) for i in range(2)]
        await until_state(lambda: e.info().extra["in_sglang"] == 2, "a0, a1 inside SGLang", 30)
        b = await collect("b", "B", [9, 9, 9], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
        assert len(b) == 6 and finished == ["b"]  # before either of A's
        assert e.info().extra["preempted"] == 1
        assert [await t for t in a] == alone  # the evicted one went on from where it was
        assert e._slots.fair.total == 0
    finally:
        await e.shutdown()


async def test_a_preemption_chosen_as_a_request_is_being_submitted_still_frees_a_slot(sglang_module) -> None:
    """B's request arrives in the very tick a2's segment is submitted (registered with SGLang's
    TokenizerManager only a tick later, so an abort sent now would be lost): B still gets a slot at
    once and finishes before A's two long requests."""
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"fake_step_s": "0.002", "max_running_requests": "2"})
    await e.start()
    finished: list[str] = []

    async def collect(rid: str, client: str, n: int) -> None:
        req = EngineRequest(rid, [5, 6, len(rid)], SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True),
                            client=client)
        toks = [t async for d in e.generate(req) for t in d.token_ids]
        assert len(toks) == n
        finished.append(rid)

    submit, b = e._tm.generate_request, []

    def submit_then_b(obj, request=None):  # type: ignore[no-untyped-def]
        if "a2" in e._live and obj.rid == e._live["a2"].srid and not b:  # fault injection: B in the same tick
            b.append(asyncio.ensure_future(collect("b", "B", 6)))
        return submit(obj, request)

    e._tm.generate_request = submit_then_b
    try:
        a = [asyncio.ensure_future(collect("a0", "A", 300)), asyncio.ensure_future(collect("a1", "A", 5))]
        await until_state(lambda: "a1" in finished, "a1 done", 30)
        a.append(asyncio.ensure_future(collect("a2", "A", 300)))  # takes a1's slot
        await until_state(lambda: bool(b), "b sent as a2 is submitted", 30)
        await asyncio.gather(*a, *b)
        assert finished.index("b") < finished.index("a0") and finished.index("b") < finished.index("a2"), finished
        assert e._slots.fair.total == 0
    finally:
        await e.shutdown()


def test_an_evicted_requests_last_step_may_have_ended_it(sglang_module) -> None:
    """SGLang runs the step an abort lands in and reports the abort before its EOS / stop / length
    checks: those tokens end the request instead of being continued."""
    from rollwire.engines.sglang.requests import Live

    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt)

    def live(**params: object) -> Live:
        s = Live(EngineRequest("r", [1, 2], SamplingParams(**params)))  # type: ignore[arg-type]
        s.output = [11, 12, 13]
        return s

    eos = e.eos_token_ids[0]
    assert e._finished_within(live(max_new_tokens=10, stop_token_ids=[7]), [20, 7, 21]) == (2, "stop")
    assert e._finished_within(live(max_new_tokens=10), [20, eos]) == (2, "stop")
    # with ignore_eos the stop ids are watched on the streamed path instead
    assert e._finished_within(live(max_new_tokens=10, ignore_eos=True), [20, eos]) is None
    assert e._finished_within(live(max_new_tokens=4, ignore_eos=True), [20, 21]) == (1, "length")
    assert e._finished_within(live(max_new_tokens=10), [20, 21]) is None
