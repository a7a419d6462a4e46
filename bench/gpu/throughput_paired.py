"""Issue 5's throughput figure with its floor in the same run: `rollwire serve --engine sglang` (a
child process; the client is this process, over tcp) and sglang.Engine.async_generate called
directly in this process, on the same GPU, same model and engine arguments, runs alternated
(server, direct, ...) so that drift and noise hit both alike. Both engines stay idle while the
other runs. Three more arms on the direct engine locate a gap: sglang.Engine called with exactly
the sampling parameters and cache key rollwire's adapter sends; the adapter itself in this process
(no sockets); and ``server_here``: a whole RolloutServer in this process around that same engine,
its client in a child process over tcp, as for ``server``. ``server`` against ``server_here`` is
then the cost of a second engine in another process (its own scheduler, placement, memory), not
of rollwire's actors and sockets.

Then, with --py-spy, two more server runs and two more direct runs, each sampled by py-spy (the
process and its SGLang children), written as speedscope JSON: where the server's time goes.

    python bench/gpu/throughput_paired.py --model DIR [--n 256] [--tokens 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN05B, device_info, prompts, stop_process, wait_serving  # noqa: E402
from throughput import BENCH_ARGS as KIT_BENCH_ARGS  # noqa: E402

# RW_SGLANG_LOG_LEVEL=info: both engines log their prefill and decode batches (sizes, throughput)
BENCH_ARGS = {**KIT_BENCH_ARGS, "log_level": os.environ.get("RW_SGLANG_LOG_LEVEL", "warning")}


class Borrowed:
    """An engine lent to an in-process RolloutServer, which neither starts nor shuts it down."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None


def client_proc(endpoint: str, ps: list[list[int]], tokens: int, go: Any, out: Any) -> None:
    """A rollout worker in its own process: one timed batch of all prompts per item on ``go``."""
    async def run() -> None:
        from rollwire import RolloutClient, SamplingParams

        sp = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
        loop = asyncio.get_running_loop()
        async with RolloutClient(endpoint, timeout=600) as rc:
            await rc.health()
            out.put("ready")
            while await loop.run_in_executor(None, go.get) is not None:
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(rc.generate(p, sp) for p in ps))
                out.put((time.perf_counter() - t0, sum(len(o.output_ids) for o in outs)))

    import uvloop

    uvloop.run(run())


async def main(a: argparse.Namespace) -> dict[str, Any]:
    from sglang.srt.managers.io_struct import GenerateReqInput

    from rollwire import RolloutClient, SamplingParams
    from rollwire.engines.base import EngineRequest
    from rollwire.engines.sglang import SGLangEngine
    from rollwire.server import RolloutServer, ServerConfig
    from rollwire.transports.sockets import free_tcp_endpoint

    ep = free_tcp_endpoint()
    cmd = [sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "sglang",
           "--model", a.model, "--rollout-endpoint", ep, "--max-new-tokens-limit", "4096"]
    for k, v in BENCH_ARGS.items():
        cmd += ["--engine-arg", f"{k}={v}"]
    log = open(Path(a.out).with_suffix(".server.log"), "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t = time.time()
    # the floor's engine is rollwire's adapter, so the same engine also runs the adapter arm; its
    # sglang.Engine (with the server's engine arguments) is what the direct arms call
    adapter = SGLangEngine(a.model, engine_args=BENCH_ARGS)
    await adapter.start()  # starts while the server starts
    eng = adapter._eng
    direct_start_s = time.time() - t
    ps = prompts(a.n, QWEN05B["vocab_size"], seed=5, lo=32, hi=33)
    spd = {"max_new_tokens": a.tokens, "temperature": 0.0, "ignore_eos": True}
    sp = SamplingParams(max_new_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    res: dict[str, Any] = {"n": a.n, "tokens": a.tokens, "direct_engine_start_s": round(direct_start_s, 1),
                           "engine_args": BENCH_ARGS, "device": device_info()}
    here_cfg = ServerConfig(engine="sglang", model=a.model, rollout_endpoint=free_tcp_endpoint(),
                            max_new_tokens_limit=4096)
    ctx = mp.get_context("spawn")
    go, back = ctx.Queue(), ctx.Queue()
    client = ctx.Process(target=client_proc, args=(here_cfg.rollout_endpoint, ps, a.tokens, go, back))
    loop = asyncio.get_running_loop()
    try:
        async with RolloutClient(ep, timeout=600) as rc, \
                RolloutServer(here_cfg, engine_factory=lambda: Borrowed(adapter)):
            client.start()
            assert await loop.run_in_executor(None, back.get, True, 120) == "ready"
            await wait_serving(rc, proc)
            res["server_ready_s"] = round(time.time() - t, 1)

            async def direct_once() -> tuple[float, int]:
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(eng.async_generate(input_ids=p, sampling_params=spd) for p in ps))
                return time.perf_counter() - t0, sum(len(o["output_ids"]) for o in outs)

            # what the adapter sends SGLang for these requests (its sampling parameters and cache key)
            rw_params = {**spd, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "no_stop_trim": True}

            async def direct_rw_one(p: list[int]) -> Any:
                # what Engine.async_generate does, plus the cache key it does not pass through
                obj = GenerateReqInput(input_ids=p, sampling_params=rw_params, extra_key="rw-v0", rid=uuid.uuid4().hex)
                return await eng.tokenizer_manager.generate_request(obj, None).__anext__()

            async def direct_rw_once() -> tuple[float, int]:
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(direct_rw_one(p) for p in ps))
                return time.perf_counter() - t0, sum(len(o["output_ids"]) for o in outs)

            counter = iter(range(1 << 30))

            async def adapter_one(p: list[int]) -> int:
                n = 0
                async for d in adapter.generate(EngineRequest(f"a{next(counter)}", p, sp, stream=False)):
                    n += len(d.token_ids)
                return n

            async def adapter_once() -> tuple[float, int]:
                t0 = time.perf_counter()
                got = await asyncio.gather(*(adapter_one(p) for p in ps))
                return time.perf_counter() - t0, sum(got)

            async def server_once() -> tuple[float, int]:
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(rc.generate(p, sp) for p in ps))
                elapsed = time.perf_counter() - t0
                totals = sorted(o.timings.total_s for o in outs)  # type: ignore[union-attr]
                server_s.append(totals[-1])
                return elapsed, sum(len(o.output_ids) for o in outs)  # type: ignore[union-attr]

            async def server_here_once() -> tuple[float, int]:
                go.put(1)
                return tuple(await loop.run_in_executor(None, back.get, True, 600))  # type: ignore[return-value]

            server_s: list[float] = []
            arms = {"server": server_once, "direct": direct_once, "direct_rw_params": direct_rw_once,
                    "adapter": adapter_once, "server_here": server_here_once}
            for fn in arms.values():
                await fn()
            runs: dict[str, list[tuple[float, int]]] = {k: [] for k in arms}
            for _ in range(a.repeats):
                for k, fn in arms.items():
                    runs[k].append(await fn())
            server, direct = runs["server"], runs["direct"]
            tokens = server[0][1]
            assert all(r[1] == a.n * a.tokens for v in runs.values() for r in v), "a run lost tokens"
            for k in ("direct_rw_params", "adapter", "server_here"):
                kt = [r[0] for r in runs[k]]
                res[k] = {"runs_s": [round(x, 4) for x in kt], "median_s": round(statistics.median(kt), 4),
                          "tokens_per_s": round(tokens / statistics.median(kt), 1)}
            st, dt = [r[0] for r in server], [r[0] for r in direct]
            res["server"] = {"runs_s": [round(x, 4) for x in st], "median_s": round(statistics.median(st), 4),
                             "tokens_per_s": round(tokens / statistics.median(st), 1),
                             "server_side_longest_request_s": [round(x, 4) for x in server_s[1:]]}
            res["direct"] = {"runs_s": [round(x, 4) for x in dt], "median_s": round(statistics.median(dt), 4),
                             "tokens_per_s": round(tokens / statistics.median(dt), 1)}
            res["server_over_direct_tokens_per_s"] = round(statistics.median(dt) / statistics.median(st), 4)
            res["pair_ratios"] = [round(d / s, 4) for s, d in zip(st, dt, strict=True)]
            res["median_pair_ratio"] = round(statistics.median(res["pair_ratios"]), 4)
            if a.py_spy:  # the server process and its SGLang children, then this process's engine
                res["py_spy"] = await profiled(a.py_spy, proc.pid, str(Path(a.out).with_suffix(".speedscope.json")),
                                               server_once)
                res["py_spy_direct"] = await profiled(a.py_spy, os.getpid(),
                                                      str(Path(a.out).with_suffix(".direct.speedscope.json")),
                                                      direct_once)
    finally:
        if client.pid is not None:
            go.put(None)
            client.join(30)
            if client.is_alive():
                client.kill()
        stop_process(proc)
        log.close()
        await adapter.shutdown()
    return res


async def profiled(py_spy: str, pid: int, out: str, run: Any) -> dict[str, Any]:
    """Two runs of ``run`` while py-spy samples process ``pid`` and its children (speedscope JSON)."""
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--output", out, "--format", "speedscope",
                            "--rate", "200", "--subprocesses", "--nonblocking", "--duration", "6"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    await asyncio.sleep(1.0)
    runs_s = [round((await run())[0], 4) for _ in range(2)]
    spy_out = await asyncio.get_running_loop().run_in_executor(None, lambda: spy.communicate(timeout=60))
    return {"rc": spy.returncode, "out": out, "runs_s": runs_s, "log": (spy_out[0] or b"").decode()[-1500:]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--py-spy", default=None)
    ap.add_argument("--out", default=str(Path(os.environ.get("OUT", "/tmp")) / "throughput_paired.json"))
    args = ap.parse_args()
    import uvloop

    result = uvloop.run(main(args))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"FIGURE server/direct tokens/s {result['server_over_direct_tokens_per_s']} "
          f"(server {result['server']['median_s']} s, direct {result['direct']['median_s']} s, "
          f"pairs {result['pair_ratios']}; direct with rollwire's params {result['direct_rw_params']['median_s']} s, "
          f"adapter in-process {result['adapter']['median_s']} s; a RolloutServer in-process around the direct engine, "
          f"client in a child process {result['server_here']['median_s']} s)", flush=True)
    print(json.dumps(result), flush=True)
