"""SGLangEngine (rollwire's adapter) on the GPU, then the same engine inside a RolloutServer with a
rollout-worker process pushing requests and versions pushed through the MemoryGovernor
(adapter_e2e.py).

    python tests/gpu/adapter_checks.py MODEL_DIR REF_JSON     # writes $OUT/adapter_checks.json

REF_JSON is direct_sglang.py's greedy reference (sglang.Engine called directly, same inputs).
Every check prints PASS/FAIL and goes on: one broken call must not hide the others.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from adapter_e2e import e2e  # noqa: E402
from common import CHECK_ENGINE_ARGS, Report, device_info, gib_free  # noqa: E402


async def run(eng: Any, rid: str, prompt: list[int], *, logprob: bool = False, res: dict | None = None,
              stream: bool = True, chunk_tokens: int = 1, **params: Any) -> dict[str, Any]:
    from rollwire.engines.base import EngineRequest
    from rollwire.messages.generate import SamplingParams

    out = res if res is not None else {}
    out.update(tokens=[], logprobs=[], versions=[], finish=None, finals=0, deltas=0)
    req = EngineRequest(rid, list(prompt), SamplingParams(**params), logprob, stream=stream, chunk_tokens=chunk_tokens)
    async for d in eng.generate(req):
        out["deltas"] += 1
        out["tokens"] += d.token_ids
        out["logprobs"] += d.logprobs or []
        out["versions"] += [d.weight_version] * len(d.token_ids)
        if d.finish_reason is not None:
            out["finish"] = d.finish_reason
            out["finals"] += 1
    return out


def start(eng: Any, rid: str, prompt: list[int], **params: Any) -> tuple[dict[str, Any], asyncio.Task]:
    res: dict[str, Any] = {"tokens": []}
    return res, asyncio.ensure_future(run(eng, rid, prompt, res=res, **params))


def first_diff(a: list, b: list) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


async def until(res: dict[str, Any], n: int, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while len(res["tokens"]) < n and res.get("finish") is None:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"no {n} tokens in {timeout}s")
        await asyncio.sleep(0.002)


async def main(model: str, ref_path: str) -> int:
    import torch
    from safetensors.torch import load_file

    from rollwire.engines.base import EngineError
    from rollwire.engines.sglang import SGLangEngine

    rep = Report("adapter_checks")
    ref = json.loads(Path(ref_path).read_text())
    ps, refs, ref_lp = ref["prompts"], ref["greedy"], ref["logprobs"]
    n_new = ref["max_new_tokens"]
    G = dict(max_new_tokens=n_new, temperature=0.0, ignore_eos=True)

    eng = SGLangEngine(model, engine_args=dict(CHECK_ENGINE_ARGS))
    t0 = time.time()
    await eng.start()
    rep.figure("engine_start_s", round(time.time() - t0, 1))
    rep.check("sglang.Engine built in start() keeps the actor's running loop (eng.loop)",
              eng._eng.loop is asyncio.get_running_loop(), loop=type(asyncio.get_running_loop()).__name__)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rep.check("info", eng.info().vocab_size == vocab,
              info=vars(eng.info()))
    cap = eng.info().extra.get("max_running_requests")
    rep.check("SGLang's max_running_requests read from its scheduler (fair admission on)",
              isinstance(cap, int) and cap > 0, max_running_requests=cap)

    sd = load_file(f"{model}/model.safetensors")
    cpu = list(sd.items())
    cuda = [(k, v.cuda()) for k, v in cpu]

    def perturbed(scale: float) -> list:
        return [(k, v * scale + 0.01) for k, v in cuda]

    async def step(name: str, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, 120)
        except Exception as e:
            rep.fail(name, e)
            return None

    # -- greedy parity with sglang.Engine called directly ----------------------------------------
    async def parity() -> None:
        for i, p in enumerate(ps):  # warm, as the reference was
            await run(eng, f"warm{i}", p, **G)
        alone = [(await run(eng, f"a{i}", p, logprob=True, **G)) for i, p in enumerate(ps)]
        same = sum(a["tokens"] == r for a, r in zip(alone, refs, strict=True))
        rep.check("greedy alone == direct sglang.Engine", same == len(ps), same=same, of=len(ps))
        batched = await asyncio.gather(*(run(eng, f"b{i}", p, **G) for i, p in enumerate(ps)))
        same_b = sum(b["tokens"] == r for b, r in zip(batched, refs, strict=True))
        rep.check("greedy batched == direct (alone)", same_b == len(ps), same=same_b, of=len(ps))
        err = max(abs(x - y) for a, r in zip(alone, ref_lp, strict=True) for x, y in zip(a["logprobs"], r, strict=True))
        rep.check("logprobs == direct sglang's", err < 1e-3 and all(len(a["logprobs"]) == n_new for a in alone),
                  max_abs_diff=err)
        rep.check("one terminal delta per request", all(a["finals"] == 1 and a["finish"] == "length" for a in alone))
        chunked = [(await run(eng, f"k{i}", p, logprob=True, chunk_tokens=8, **G)) for i, p in enumerate(ps)]
        rep.check("a chunked stream (stream_interval 8) == direct, one delta per chunk",
                  all(c["tokens"] == r and c["finals"] == 1 for c, r in zip(chunked, refs, strict=True))
                  and all(c["deltas"] <= 2 + n_new // 8 for c in chunked),
                  deltas=[c["deltas"] for c in chunked], per_token=[a["deltas"] for a in alone])
    await step("parity", parity())

    # -- sampling parameters -----------------------------------------------------------------------
    async def sampling() -> None:
        allowed = list(range(100, 120))
        r = await run(eng, "m1", ps[2], logprob=True, max_new_tokens=32, temperature=0.7, ignore_eos=True,
                      allowed_token_ids=allowed)
        rep.check("allowed_token_ids (custom logit processor)",
                  set(r["tokens"]) <= set(allowed) and len(r["tokens"]) == 32,
                  tokens=r["tokens"][:8], lp=r["logprobs"][:3])
        banned = sorted(set(refs[3]))
        r = await run(eng, "m2", ps[3], logprob=True, disallowed_token_ids=banned, **G)
        rep.check("disallowed_token_ids never produced",
                  not set(r["tokens"]) & set(banned) and len(r["tokens"]) == n_new)
        eos = eng.info().eos_token_ids[0]
        r = await run(eng, "m3", ps[0], max_new_tokens=5, allowed_token_ids=[eos])
        r2 = await run(eng, "m4", ps[0], max_new_tokens=5, allowed_token_ids=[eos], ignore_eos=True)
        rep.check("eos stops unless ignore_eos", r["tokens"] == [eos] and r["finish"] == "stop"
                  and r2["tokens"] == [eos] * 5 and r2["finish"] == "length", a=r, b=r2["tokens"])
        stop = refs[5][10]
        r = await run(eng, "m5", ps[5], stop_token_ids=[stop], **G)
        k = refs[5].index(stop)
        rep.check("stop token included and finishes with stop",
                  r["tokens"] == refs[5][: k + 1] and r["finish"] == "stop",
                  got=r["tokens"], k=k)
        for trunc in (dict(top_k=1), dict(top_p=1e-6)):
            r = await run(eng, "t", ps[4], max_new_tokens=n_new, temperature=1.0, ignore_eos=True, **trunc)
            rep.check(f"truncation {trunc} samples the greedy output", r["tokens"] == refs[4])
        # min_p=0.999 keeps every token within 0.1% of the top one. SGLang's logits come from a bf16
        # matmul (cast to float32 after), so exact ties at the top happen, and min_p then samples among
        # the tied tokens while greedy takes the lowest id. The check: where a min_p run first leaves the
        # greedy output, its token's logprob equals (within 0.1%) the greedy token's at that step; both
        # runs computed that step from the same prefix on the same (decode) path.
        for i in (4, 0, 1, 2, 3, 5, 6, 7):
            g = await run(eng, f"g{i}", ps[i], logprob=True, **G)
            r = await run(eng, f"mp{i}", ps[i], logprob=True, max_new_tokens=n_new, temperature=1.0, ignore_eos=True,
                          min_p=0.999)
            j = first_diff(r["tokens"], g["tokens"])
            gap = None if j is None else r["logprobs"][j] - g["logprobs"][j]
            rep.check(f"min_p=0.999 (prompt {i}) follows greedy until an exact tie at the top",
                      j is None or gap >= math.log(0.999) - 1e-6, first_difference_at=j,
                      logprob_gap_there=gap, tokens_there=None if j is None else (r["tokens"][j], g["tokens"][j]))
        try:
            await run(eng, "s", ps[0], max_new_tokens=4, temperature=1.0, seed=3)
            rep.check("seed refused without deterministic inference", False)
        except EngineError as e:
            rep.check("seed refused without deterministic inference", e.code == "bad_sampling_params", msg=e.message)
        sampled = await asyncio.gather(*(run(eng, f"x{i}", ps[1], max_new_tokens=16, temperature=1.0, ignore_eos=True)
                                         for i in range(4)))
        rep.check("temperature 1 samples differ", len({tuple(s["tokens"]) for s in sampled}) > 1)
    await step("sampling", sampling())

    # -- abort ---------------------------------------------------------------------------------------
    async def aborts() -> None:
        res, task = start(eng, "long", ps[6], max_new_tokens=2000, temperature=0.0, ignore_eos=True)
        other = asyncio.ensure_future(run(eng, "other", ps[1], **G))
        await until(res, 3)
        await eng.abort("long")
        out = await task
        rep.check("abort mid-stream keeps partial output", out["finish"] == "abort" and 3 <= len(out["tokens"]) < 2000
                  and out["finals"] == 1, n=len(out["tokens"]))
        rep.check("batch mate unaffected by abort", (await other)["tokens"] == refs[1])
        await eng.abort("long")
        await eng.abort("never")
        # consumer going away aborts, rid is free again
        from rollwire.engines.base import EngineRequest
        from rollwire.messages.generate import SamplingParams
        stream = eng.generate(EngineRequest("gone", ps[2], SamplingParams(max_new_tokens=1000, ignore_eos=True)))
        async for _ in stream:
            break
        await stream.aclose()
        r = await run(eng, "gone", ps[2], max_new_tokens=2)
        rep.check("closing a stream early frees its rid", len(r["tokens"]) == 2)
        await asyncio.sleep(0.3)
        rep.check("nothing left inside sglang", eng.info().extra["in_sglang"] == 0, info=eng.info().extra)
    await step("aborts", aborts())

    # -- fair share: a client below its share takes a slot from the one above it -------------------
    async def fair_share() -> None:
        """SGLang's limit is far above what this check runs, so the adapter's capacity is set to 2
        for it (the admission logic is the same at any capacity): A's two long requests hold both
        slots, B's short one preempts A's newest (a real SGLang abort of a running request), B ends
        first, and the evicted request continues to the tokens it makes alone."""
        from rollwire.engines.base import EngineRequest
        from rollwire.messages.generate import SamplingParams

        long = SamplingParams(max_new_tokens=600, temperature=0.0, ignore_eos=True)
        order: list[str] = []

        async def collect(rid: str, client: str, prompt: list[int], sp: SamplingParams) -> list[int]:
            toks: list[int] = []
            async for d in eng.generate(EngineRequest(rid, prompt, sp, client=client)):
                toks += d.token_ids
                if d.finish_reason is not None:
                    order.append(f"{rid}:{d.finish_reason}")
            return toks

        alone = [await collect(f"fa{i}", "X", ps[i], long) for i in range(2)]
        order.clear()
        fair = eng._slots.fair
        saved, before = fair.capacity, fair.preempted
        fair.capacity = 2
        try:
            a = [asyncio.ensure_future(collect(f"fb{i}", "A", ps[i], long)) for i in range(2)]
            t0 = time.monotonic()
            while eng.info().extra["in_sglang"] < 2 and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.002)
            b = await collect("fc", "B", ps[3], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
            outs = [await t for t in a]
        finally:
            fair.capacity = saved
        rep.check("fair share on SGLang: B's request preempts A's newest, ends first; A's continue exactly",
                  len(b) == 6 and order[0] == "fc:length" and fair.preempted - before >= 1
                  and outs == alone and sorted(order[1:]) == ["fb0:length", "fb1:length"] and fair.total == 0,
                  order=order, preempted=fair.preempted - before,
                  same=[o == x for o, x in zip(outs, alone, strict=True)],
                  first_difference=[first_diff(o, x) for o, x in zip(outs, alone, strict=True)])
    await step("fair_share", fair_share())

    # -- weight updates ---------------------------------------------------------------------------------
    async def weights() -> None:
        try:
            await eng.update_weights(cpu, version=9)
            rep.check("update_weights refused unless paused", False)
        except EngineError as e:
            rep.check("update_weights refused unless paused", e.code == "not_paused")
        await eng.pause("in_place")
        for bad, code in ((("model.nope.weight", torch.zeros(3)), "unknown_tensor"),
                          (("model.norm.weight", torch.zeros(7, dtype=torch.bfloat16)), "shape_mismatch"),
                          (("model.norm.weight", torch.zeros(sd["model.norm.weight"].shape, dtype=torch.float64)),
                           "dtype_mismatch")):
            try:
                await eng.update_weights([*perturbed(1.5)[:3], bad], version=5)
                rep.check(f"bad tensor -> {code}", False)
            except EngineError as e:
                rep.check(f"bad tensor -> {code}", e.code == code and eng.info().weight_version == 0, msg=e.message)
        t = time.perf_counter()
        await eng.update_weights(perturbed(1.5), version=1)
        rep.figure("adapter_update_all_cuda_s", round(time.perf_counter() - t, 4))
        await eng.resume()
        changed = await run(eng, "w1", ps[3], **G)
        rep.check("perturbed weights change output, tagged v1", changed["tokens"] != refs[3]
                  and set(changed["versions"]) == {1})
        await eng.pause("retract")
        t = time.perf_counter()
        await eng.update_weights(cpu, version=2)
        rep.figure("adapter_update_all_cpu_s", round(time.perf_counter() - t, 4))
        await eng.resume()
        after = await run(eng, "w2", ps[3], **G)
        rep.check("originals (CPU tensors) restore output, tagged v2", after["tokens"] == refs[3]
                  and set(after["versions"]) == {2})
        eng.weight_bucket_bytes = 64 << 10
        await eng.pause("in_place")
        t = time.perf_counter()
        await eng.update_weights(cuda, version=3)
        rep.figure("adapter_update_all_cuda_64KiB_buckets_s", round(time.perf_counter() - t, 4))
        eng.weight_bucket_bytes = 512 << 20
        await eng.resume()
        after = await run(eng, "w3", ps[3], **G)
        rep.check("originals in 64 KiB buckets restore output", after["tokens"] == refs[3])
    await step("weights", weights())

    # -- pause modes under load, with a version change while paused --------------------------------------
    async def pauses() -> None:
        for mode in ("abort", "retract", "in_place"):
            v0 = eng.info().weight_version
            started = [start(eng, f"{mode}{i}", p, max_new_tokens=200, temperature=0.0, ignore_eos=True)
                       for i, p in enumerate(ps)]
            for res, _ in started:
                await until(res, 5)
            t = time.perf_counter()
            await eng.pause(mode)
            pause_s = time.perf_counter() - t
            seen = [len(r["tokens"]) for r, _ in started]
            await asyncio.sleep(0.3)
            still = [len(r["tokens"]) for r, _ in started]
            await eng.update_weights(perturbed(1.5), version=v0 + 1)
            await eng.resume()
            outs = await asyncio.gather(*(t for _, t in started))
            finals = [o["finals"] for o in outs]
            fins = [o["finish"] for o in outs]
            ok = all(f == 1 for f in finals)
            if mode == "abort":
                ok &= all(f == "abort" for f in fins) and all(set(o["versions"]) <= {v0} for o in outs)
            else:
                ok &= all(f == "length" and len(o["tokens"]) == 200 for f, o in zip(fins, outs, strict=True))
                ok &= all(o["versions"] == sorted(o["versions"]) and set(o["versions"]) <= {v0, v0 + 1} for o in outs)
            rep.check(f"pause({mode}) under load: one terminal each, versions in order", ok and seen == still,
                      pause_s=round(pause_s, 3), finish=fins, grew_while_paused=seen != still,
                      spans=[(o["versions"].count(v0), o["versions"].count(v0 + 1)) for o in outs])
            if mode != "abort":
                # the tokens tagged v0+1 must be v0+1's greedy continuation of prompt + tokens before
                o, p = outs[0], ps[0]
                k = o["versions"].count(v0)
                tail = await run(eng, f"{mode}-tail", p + o["tokens"][:k], max_new_tokens=200 - k, temperature=0.0,
                                 ignore_eos=True)
                fd = first_diff(tail["tokens"], o["tokens"][k:])
                fd1 = None
                if mode == "in_place":  # SGLang's overlap scheduler: the step launched before the
                    # pause may come out after it, one token of the old weights tagged new
                    tail1 = await run(eng, f"{mode}-tail1", p + o["tokens"][: k + 1], max_new_tokens=199 - k,
                                      temperature=0.0, ignore_eos=True)
                    fd1 = first_diff(tail1["tokens"], o["tokens"][k + 1:])
                ok = fd is None or fd >= 16  # strict: no token of the old weights tagged new
                rep.check(f"pause({mode}): the first 16 tokens after the switch are the new version's continuation",
                          ok, k=k, first_difference_at=fd, first_difference_if_one_old_token=fd1, of=200 - k,
                          overlap_schedule=eng.info().extra.get("overlap_schedule"))
            await eng.pause("in_place")
            await eng.update_weights(cuda, version=v0 + 2)
            await eng.resume()
    await step("pauses", pauses())

    # -- non-streamed requests (one SGLang request each) across a version switch ---------------------------
    async def batch_pauses() -> None:
        for mode in ("retract", "in_place"):
            v0 = eng.info().weight_version
            tasks = [asyncio.ensure_future(run(eng, f"nb{mode}{i}", p, stream=False, max_new_tokens=200,
                                               temperature=0.0, ignore_eos=True)) for i, p in enumerate(ps)]
            await asyncio.sleep(0.1)
            await eng.pause(mode)
            await eng.update_weights(perturbed(1.5), version=v0 + 1)
            await eng.resume()
            outs = await asyncio.gather(*tasks)
            ks = [o["versions"].count(v0) for o in outs]
            ok = all(o["finals"] == 1 and o["finish"] == "length" and len(o["tokens"]) == 200 for o in outs)
            ok &= all(o["versions"] == [v0] * k + [v0 + 1] * (200 - k) for o, k in zip(outs, ks, strict=True))
            diffs = []
            for o, p, k in [x for x in zip(outs, ps, ks, strict=True) if x[2] < 200][:3]:  # v0+1's continuation
                tail = await run(eng, f"nbt{mode}", p + o["tokens"][:k], max_new_tokens=200 - k, temperature=0.0,
                                 ignore_eos=True)
                diffs.append(first_diff(tail["tokens"], o["tokens"][k:]))
            ok &= all(d is None or d >= 16 for d in diffs) and all(0 < k < 200 for k in ks)
            rep.check(f"non-streamed requests across pause({mode}) + load: one terminal each, exact spans", ok,
                      tokens_before_switch=ks, deltas=[o["deltas"] for o in outs], first_difference_at=diffs)
            await eng.pause("in_place")
            await eng.update_weights(cuda, version=v0 + 2)
            await eng.resume()
    await step("batch_pauses", batch_pauses())

    # -- flush -----------------------------------------------------------------------------------------
    async def flush() -> None:
        res, task = start(eng, "f", ps[2], max_new_tokens=3000, ignore_eos=True)
        await until(res, 1)
        try:
            await eng.flush_cache()
            rep.check("flush_cache refused while running unpaused", False)
        except EngineError as e:
            rep.check("flush_cache refused while running unpaused", e.code == "busy")
        await eng.pause("in_place")
        await eng.flush_cache()
        rep.check("flush_cache while paused (request evicted, kept)", eng.info().extra["waiting"] == 1,
                  extra=eng.info().extra)
        await eng.resume()
        await until(res, len(res["tokens"]) + 5)
        await eng.abort("f")
        out = await task
        rep.check("evicted request continued after flush, then aborted",
                  out["finish"] == "abort" and out["finals"] == 1)
    await step("flush", flush())

    # -- colocated memory cycles with requests in flight (evicted, then continued) ---------------------------
    async def memory() -> None:
        cycles = []
        version = eng.info().weight_version
        for c in range(int(os.environ.get("RW_MEM_CYCLES", "5"))):
            started = [start(eng, f"mem{c}-{i}", p, **G) for i, p in enumerate(ps[:4])]
            for res, _ in started:
                await until(res, 2)
            await eng.pause("retract")
            f0 = gib_free()
            t = time.perf_counter()
            await eng.release_memory(["weights", "kv_cache", "cuda_graph"])
            t_rel = time.perf_counter() - t
            f1 = gib_free()
            t = time.perf_counter()
            await eng.resume_memory(["weights"])
            version += 1
            await eng.update_weights(cuda, version=version)
            await eng.resume_memory(["kv_cache", "cuda_graph"])
            t_res = time.perf_counter() - t
            f2 = gib_free()
            await eng.resume()
            outs = await asyncio.gather(*(t for _, t in started))
            same = sum(o["tokens"] == r for o, r in zip(outs, refs, strict=False))
            cycles.append({"freed_gib": round(f1 - f0, 3), "free_after_resume_gib": round(f2, 3),
                           "release_s": round(t_rel, 4), "resume_and_load_s": round(t_res, 4),
                           "in_flight_equal_ref": same, "finish": [o["finish"] for o in outs]})
        rep.figure("memory_cycles", cycles)
        free_after = [c["free_after_resume_gib"] for c in cycles]
        rep.check("release frees GPU memory, resume takes it back, no growth over 5 cycles",
                  all(c["freed_gib"] > 1 for c in cycles) and max(free_after) - min(free_after) < 0.25,
                  freed=[c["freed_gib"] for c in cycles], free_after=free_after)
        rep.check("requests in flight across release/resume continue to the same greedy output",
                  all(c["in_flight_equal_ref"] == 4 and c["finish"] == ["length"] * 4 for c in cycles),
                  same=[c["in_flight_equal_ref"] for c in cycles])
    await step("memory", memory())

    await e2e(eng, rep, ps, refs, cuda, perturbed)
    rep.write({"device": device_info(), "model": model, "engine_info": vars(eng.info())})
    return 0


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main(sys.argv[1], sys.argv[2])))
