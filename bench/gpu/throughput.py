"""Issue 5's throughput benchmark on a GPU: N requests x T new tokens on a random-weight model of
Qwen2-0.5B's shape, through rollwire vs sglang.Engine called directly.

  direct   sglang.Engine.async_generate in this process (asyncio.gather of all N); also times
           update_weights_from_tensor of the whole model (CPU and CUDA tensors)
  server   `rollwire serve --engine sglang` in a child process, RolloutClient here over tcp
           (the client in another process than the engine, as the issue asks)
  adapter  rollwire's SGLangEngine in this process (no sockets): where the server's overhead goes;
           non-streamed requests (as RolloutClient.generate sends them) and streamed ones, each
           interleaved with direct async_generate on the same engine (non-streamed and streamed);
           also times SGLangEngine.update_weights (512 MiB buckets) with CPU and CUDA tensors and
           checks cached_tokens of a resent session history

Greedy (temperature 0), ignore_eos, every request of a run sent at once. Each mode warms up once
and then runs --repeats times; the median is reported. Each mode starts its own engine.

    python bench/gpu/throughput.py --mode direct|server|adapter|combine --model DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
from common import (  # noqa: E402
    DIRECT_ENGINE_KWARGS,
    KIT_ENGINE_ARGS,
    QWEN05B,
    device_info,
    prompts,
    stop_process,
    wait_serving,
    write_qwen2,
)

BENCH_ARGS = {**KIT_ENGINE_ARGS, "cuda_graph_max_bs_decode": "256"}
BENCH_DIRECT = {**DIRECT_ENGINE_KWARGS, "cuda_graph_max_bs_decode": 256}


def _prompts(n: int) -> list[list[int]]:
    return prompts(n, QWEN05B["vocab_size"], seed=5, lo=32, hi=33)


def _times(ts: list[float]) -> dict[str, Any]:
    return {"runs_s": [round(x, 4) for x in ts], "median_s": round(statistics.median(ts), 4)}


def _median_run(times: list[float], tokens: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {"runs_s": [round(t, 4) for t in times], "median_s": round(med, 4), "tokens": tokens,
            "tokens_per_s": round(tokens / med, 1)}


async def bench_direct(a: argparse.Namespace) -> dict[str, Any]:
    import sglang
    import torch
    from safetensors.torch import load_file

    t = time.time()
    eng = sglang.Engine(model_path=a.model, **BENCH_DIRECT)
    start_s = time.time() - t
    ps = _prompts(a.n)
    sp = {"max_new_tokens": a.tokens, "temperature": 0.0, "ignore_eos": True}

    async def once() -> tuple[float, int]:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(eng.async_generate(input_ids=p, sampling_params=sp) for p in ps))
        return time.perf_counter() - t0, sum(len(o["output_ids"]) for o in outs)

    await once()
    runs = [await once() for _ in range(a.repeats)]
    res: dict[str, Any] = {"engine_start_s": round(start_s, 1), **_median_run([r[0] for r in runs], runs[0][1])}
    sd = load_file(f"{a.model}/model.safetensors")
    cpu = list(sd.items())
    cuda = [(k, v.cuda()) for k, v in cpu]
    res["weights_bytes"] = sum(v.numel() * v.element_size() for _, v in cpu)
    for name, tensors in (("cuda", cuda), ("cpu", cpu)):
        ts = []
        for _ in range(a.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            await eng.tokenizer_manager.update_weights_from_tensor(_direct_update(eng, tensors), None)
            ts.append(time.perf_counter() - t0)
        res[f"update_weights_{name}"] = _times(ts)
    eng.shutdown()
    return res


def _direct_update(eng: Any, tensors: list) -> Any:
    """What Engine.update_weights_from_tensor builds (it cannot be called inside a running loop)."""
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput
    from sglang.srt.utils import MultiprocessingSerializer

    return UpdateWeightsFromTensorReqInput(serialized_named_tensors=[MultiprocessingSerializer.serialize(tensors)],
                                           flush_cache=True)


async def bench_adapter(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from rollwire.engines.base import EngineRequest
    from rollwire.engines.sglang import SGLangEngine
    from rollwire.messages.generate import SamplingParams

    eng = SGLangEngine(a.model, engine_args=BENCH_ARGS)
    t = time.time()
    await eng.start()
    start_s = time.time() - t
    ps = _prompts(a.n)
    sp = SamplingParams(max_new_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    counter = iter(range(1 << 30))

    async def one(p: list[int], stream: bool) -> int:
        n = 0
        async for d in eng.generate(EngineRequest(f"r{next(counter)}", p, sp, stream=stream)):
            n += len(d.token_ids)
        return n

    async def once(stream: bool = False) -> tuple[float, int]:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(p, stream) for p in ps))
        return time.perf_counter() - t0, sum(got)

    spd = {"max_new_tokens": a.tokens, "temperature": 0.0, "ignore_eos": True}

    async def direct_once(stream: bool) -> tuple[float, int]:
        """sglang.Engine.async_generate on the same engine, without the adapter."""
        async def one_direct(p: list[int]) -> int:
            if not stream:
                return len((await eng._eng.async_generate(input_ids=p, sampling_params=spd))["output_ids"])
            n = 0
            async for chunk in await eng._eng.async_generate(input_ids=p, sampling_params=spd, stream=True):
                n = len(chunk["output_ids"])  # cumulative
            return n

        t0 = time.perf_counter()
        got = await asyncio.gather(*(one_direct(p) for p in ps))
        return time.perf_counter() - t0, sum(got)

    await once()
    await direct_once(False)
    runs, plain, streamed, adapter_streamed = [], [], [], []
    for _ in range(a.repeats):  # interleaved, so drift hits all four alike
        runs.append(await once())
        plain.append(await direct_once(False))
        streamed.append(await direct_once(True))
        adapter_streamed.append(await once(stream=True))
    res: dict[str, Any] = {"engine_start_s": round(start_s, 1), "stream": False,
                           **_median_run([r[0] for r in runs], runs[0][1]),
                           "same_engine_direct": _median_run([r[0] for r in plain], plain[0][1]),
                           "same_engine_direct_stream": _median_run([r[0] for r in streamed], streamed[0][1]),
                           "adapter_stream": _median_run([r[0] for r in adapter_streamed], adapter_streamed[0][1])}
    res["adapter_over_same_engine_direct"] = round(res["tokens_per_s"] / res["same_engine_direct"]["tokens_per_s"], 4)
    res["adapter_stream_over_same_engine_direct_stream"] = round(
        res["adapter_stream"]["tokens_per_s"] / res["same_engine_direct_stream"]["tokens_per_s"], 4)
    res["sessions"] = await session_checks(eng, ps[0])
    sd = load_file(f"{a.model}/model.safetensors")
    cpu = list(sd.items())
    cuda = [(k, v.cuda()) for k, v in cpu]
    version = 0
    for name, tensors in (("cuda", cuda), ("cpu", cpu)):
        ts = []
        for _ in range(a.repeats):
            await eng.pause("retract")
            torch.cuda.synchronize()
            version += 1
            t0 = time.perf_counter()
            await eng.update_weights(tensors, version=version)
            ts.append(time.perf_counter() - t0)
            await eng.resume()
        res[f"update_weights_{name}"] = _times(ts)
    res["sessions"].update(await session_checks(eng, ps[0], after_update=True))
    await eng.shutdown()
    return res


async def session_checks(eng: Any, prompt: list[int], after_update: bool = False) -> dict[str, Any]:
    """cached_tokens from SGLang's radix cache for a resent history (the bench engine has it on)."""
    from rollwire.engines.base import EngineRequest
    from rollwire.messages.generate import SamplingParams

    sp = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)

    async def turn(rid: str, ids: list[int], stale: bool = False) -> Any:
        deltas = [d async for d in eng.generate(EngineRequest(rid, ids, sp, stream=False, session_id="bench-s",
                                                              keep_stale_prefix=stale))]
        return deltas[0].cached_tokens, [t for d in deltas for t in d.token_ids]

    if not after_update:
        c1, out1 = await turn("s1", prompt)
        history = prompt + out1
        c2, out2 = await turn("s2", [*history, 7])
        session_checks.history = [*history, 7, *out2]  # type: ignore[attr-defined]
        return {"turn1_cached": c1, "turn2_cached": c2, "turn2_history": len(history) + 1,
                "ok_turn2_reuses_history": c2 >= len(history) - 1}
    history = session_checks.history  # type: ignore[attr-defined]
    stale, _ = await turn("s3", [*history, 9], stale=True)
    fresh, _ = await turn("s4", [*history, 9], stale=False)
    await eng.close_session("bench-s")
    return {"after_update_stale_cached": stale, "after_update_fresh_cached": fresh, "history": len(history),
            "ok_stale_reused_fresh_not": stale >= len(history) - 1 and fresh == 0,
            "sessions_after_close": eng.info().extra["sessions"]}


async def bench_server(a: argparse.Namespace) -> dict[str, Any]:
    from rollwire import RolloutClient, SamplingParams
    from rollwire.transports.sockets import free_tcp_endpoint

    ep = free_tcp_endpoint()
    prof = ["-m", "cProfile", "-o", a.profile] if a.profile else []
    cmd = [sys.executable, *prof, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "sglang",
           "--model", a.model, "--rollout-endpoint", ep, "--max-new-tokens-limit", "4096"]
    for k, v in BENCH_ARGS.items():
        cmd += ["--engine-arg", f"{k}={v}"]
    log = open(Path(a.out).with_suffix(".server.log"), "w")  # noqa: SIM115 - closed in the finally below
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        async with RolloutClient(ep, timeout=600) as rc:
            await wait_serving(rc, proc)
            status = await rc.status()
            start_s = time.time() - t
            ps = _prompts(a.n)
            sp = SamplingParams(max_new_tokens=a.tokens, temperature=0.0, ignore_eos=True)

            last: dict[str, Any] = {}

            async def once() -> tuple[float, int]:
                t0 = time.perf_counter()

                async def one(p: list[int]) -> Any:
                    o = await rc.generate(p, sp)
                    return o, time.perf_counter() - t0

                outs = await asyncio.gather(*(one(p) for p in ps))
                elapsed = time.perf_counter() - t0
                q = sorted(o.timings.queued_s for o, _ in outs)  # type: ignore[union-attr]
                tot = sorted(o.timings.total_s for o, _ in outs)  # type: ignore[union-attr]
                done = sorted(t for _, t in outs)
                last.update(client_elapsed_s=round(elapsed, 4), server_queued_s_max=round(q[-1], 4),
                            server_total_s_min=round(tot[0], 4), server_total_s_max=round(tot[-1], 4),
                            client_done_s_first=round(done[0], 4), client_done_s_median=round(done[len(done) // 2], 4))
                return elapsed, sum(len(o.output_ids) for o, _ in outs)  # type: ignore[union-attr]

            await once()
            spy = None
            if a.py_spy:  # sample the server (and its SGLang children) while the timed runs go
                spy = subprocess.Popen([a.py_spy, "record", "--pid", str(proc.pid), "--output", a.py_spy_out,
                                        "--format", "speedscope", "--rate", "250", "--subprocesses", "--nonblocking",
                                        "--duration", str(int(2 * a.repeats + 2))],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                await asyncio.sleep(1.0)
            runs = [await once() for _ in range(a.repeats)]
            if spy is not None:
                spy.wait(60)
        return {"engine_start_s": round(start_s, 1), "engine": status.engine, "profiled": bool(a.profile or a.py_spy),
                "last_run_timings": last, **_median_run([r[0] for r in runs], runs[0][1])}
    finally:
        stop_process(proc)  # SIGTERM: the adapter turns SGLang's handler into SIGINT, serve stops cleanly
        log.close()


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return round(a["tokens_per_s"] / b["tokens_per_s"], 4)


def combine(a: argparse.Namespace) -> dict[str, Any]:
    d = Path(a.out).parent
    parts = {m: json.loads((d / f"throughput_{m}.json").read_text()) for m in ("direct", "server", "adapter")
             if (d / f"throughput_{m}.json").exists()}
    if a.direct_json:
        parts["direct"] = json.loads(Path(a.direct_json).read_text())
    out: dict[str, Any] = {"benchmark": "throughput", "n_requests": a.n, "new_tokens": a.tokens,
                           "model": "Qwen2-0.5B shape, random bf16",
                           "device": device_info(), "modes": parts}
    if "direct" in parts and "server" in parts:
        out["server_over_direct_tokens_per_s"] = _ratio(parts["server"], parts["direct"])
    if "adapter" in parts and "server" in parts:  # direct async_generate measured in the adapter run's process
        out["server_over_adapter_run_direct_tokens_per_s"] = _ratio(parts["server"],
                                                                     parts["adapter"]["same_engine_direct"])
    if "direct" in parts and "adapter" in parts:
        out["adapter_over_direct_tokens_per_s"] = _ratio(parts["adapter"], parts["direct"])
        for k in ("cuda", "cpu"):
            dk, ak = parts["direct"].get(f"update_weights_{k}"), parts["adapter"].get(f"update_weights_{k}")
            if dk and ak:
                out[f"adapter_update_over_direct_{k}"] = round(ak["median_s"] / dk["median_s"], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", required=True, choices=["direct", "server", "adapter", "combine", "write-model"])
    p.add_argument("--model", default="/tmp/qwen05b-random")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--direct-json", default=None, help="combine: the direct run's JSON, if it is elsewhere")
    p.add_argument("--profile", default=None, help="server: run `rollwire serve` under cProfile, stats to this file")
    p.add_argument("--py-spy", default=None, help="server: py-spy binary; samples the server during the timed runs")
    p.add_argument("--py-spy-out", default="/tmp/serve.speedscope.json")
    a = p.parse_args()
    a.out = a.out or str(Path(os.environ.get("OUT", "/tmp")) / f"throughput_{a.mode}.json")
    if a.mode == "write-model":
        t = time.time()
        write_qwen2(a.model, QWEN05B, seed=0)
        print(f"wrote {a.model} in {time.time() - t:.1f}s")
        return 0
    if a.mode == "combine":
        res = combine(a)
    else:
        import uvloop

        fn = {"direct": bench_direct, "server": bench_server, "adapter": bench_adapter}[a.mode]
        res = {"mode": a.mode, "n": a.n, "tokens": a.tokens, **uvloop.run(fn(a))}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
