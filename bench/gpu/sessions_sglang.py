"""Session turn latency on SGLang (GPU): a 2k-token history with prefix reuse vs a full prefill.

Random-weight model of Qwen2-0.5B's shape. Each repeat runs turn 1 on a fresh ``--history``-token
prompt, then times turn 2 on prompt + turn 1 + an 8-token environment turn (``reuse``: SGLang's
radix cache holds the history), and times the same request length on a history sharing no
prefix with anything cached (``full``: a full prefill).
  direct   sglang.Engine.async_generate in this process (the floor)
  server   `rollwire serve --engine sglang` in a child process; a RolloutClient session here
           (reuse) against a plain generate of a fresh history of the same length (full)
Medians of --repeats (the first repeat warms up and is dropped).

    python bench/gpu/sessions_sglang.py --model DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
from common import DIRECT_ENGINE_KWARGS, KIT_ENGINE_ARGS, QWEN05B, device_info, write_qwen2  # noqa: E402

ENV_TURN = [7, 8, 9, 10, 11, 12, 13, 14]


def _history(rng: random.Random, n: int) -> list[int]:
    return [1] + [rng.randrange(100, QWEN05B["vocab_size"]) for _ in range(n - 1)]


async def bench_direct(a: argparse.Namespace) -> dict[str, Any]:
    import sglang

    eng = sglang.Engine(model_path=a.model, **DIRECT_ENGINE_KWARGS)
    sp = {"max_new_tokens": a.tokens, "temperature": 0.0, "ignore_eos": True}
    rng = random.Random(0)
    runs: dict[str, list[float]] = {"reuse": [], "full": []}
    cached = []
    try:
        for r in range(a.repeats + 1):
            prompt = _history(rng, a.history)
            t1 = await eng.async_generate(input_ids=prompt, sampling_params=sp)
            history = prompt + t1["output_ids"] + ENV_TURN
            t0 = time.perf_counter()
            t2 = await eng.async_generate(input_ids=history, sampling_params=sp)
            reuse_s = time.perf_counter() - t0
            fresh = _history(rng, len(history))
            t0 = time.perf_counter()
            await eng.async_generate(input_ids=fresh, sampling_params=sp)
            full_s = time.perf_counter() - t0
            if r:
                runs["reuse"].append(reuse_s)
                runs["full"].append(full_s)
                cached.append(t2["meta_info"].get("cached_tokens"))
    finally:
        eng.shutdown()
    return {"runs_s": runs, "cached_tokens": cached, **_medians(runs)}


async def bench_server(a: argparse.Namespace) -> dict[str, Any]:
    from rollwire import RolloutClient, SamplingParams
    from rollwire.transports.sockets import free_tcp_endpoint

    ep = free_tcp_endpoint(span=2)  # sessions on the next port
    port = int(ep.rpartition(":")[2])
    args = [sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "sglang",
            "--model", a.model, "--rollout-endpoint", ep, "--session-endpoint", f"tcp://127.0.0.1:{port + 1}"]
    for k, v in KIT_ENGINE_ARGS.items():
        args += ["--engine-arg", f"{k}={v}"]
    server = subprocess.Popen(args)
    sp = SamplingParams(max_new_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    runs: dict[str, list[float]] = {"reuse": [], "full": []}
    cached = []
    try:
        async with RolloutClient(ep, timeout=600) as rc:
            await rc.wait_ready(timeout=600)
            for r in range(a.repeats + 1):
                async with rc.session(max_tokens=a.history + 2 * a.tokens + 64) as s:
                    t1 = await s.generate(_history(rng, a.history), sp)
                    await s.append(ENV_TURN)
                    t0 = time.perf_counter()
                    t2 = await s.generate(sampling_params=sp)
                    reuse_s = time.perf_counter() - t0
                fresh = _history(rng, a.history + len(t1.output_ids) + len(ENV_TURN))
                t0 = time.perf_counter()
                await rc.generate(fresh, sp)
                full_s = time.perf_counter() - t0
                if r:
                    runs["reuse"].append(reuse_s)
                    runs["full"].append(full_s)
                    cached.append(t2.usage.cached_tokens)
    finally:
        server.terminate()
        server.wait(60)
    return {"runs_s": runs, "cached_tokens": cached, **_medians(runs)}


def _medians(runs: dict[str, list[float]]) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"median_s": med, "speedup": med["full"] / med["reuse"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="checkpoint dir (written here if missing)")
    ap.add_argument("--history", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="bench/results/sessions_sglang.json")
    a = ap.parse_args()
    write_qwen2(a.model, QWEN05B)
    res: dict[str, Any] = {"device": device_info(), "history": a.history, "new_tokens": a.tokens,
                           "repeats": a.repeats, "model": "random Qwen2-0.5B shape, bf16"}
    res["direct"] = asyncio.run(bench_direct(a))
    res["server"] = asyncio.run(bench_server(a))
    res["server_reuse_over_direct_reuse"] = res["server"]["median_s"]["reuse"] / res["direct"]["median_s"]["reuse"]
    print(f"\nturn 2, history ~{a.history + a.tokens + len(ENV_TURN)} tokens, {a.tokens} new; medians (ms)")
    print(f"{'path':<22}{'reuse':>9}{'full':>9}{'speedup':>9}")
    for name in ("server", "direct"):
        m = res[name]["median_s"]
        print(f"FIGURE {name:<15}{m['reuse'] * 1e3:>9.1f}{m['full'] * 1e3:>9.1f}{res[name]['speedup']:>9.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
