"""``rollwire bench``: requests through rollwire from another process vs the hf engine called
directly, on the embedded engine (CPU, no GPU needed); bench/e2e.py is the same benchmark.

Measures tokens/s for N requests x T tokens (greedy, ignore_eos) at several concurrencies:
  direct   - HFEngine.generate in this process (the floor: no sockets, no actors)
  rollwire - `rollwire serve` in a child process, RolloutClient here, over tcp
Runs alternate direct and rollwire, repeated; medians reported with the ratio rollwire/direct.
Prints a table, writes JSON. The other benchmarks (weights, pause, sessions, RPC, GPU) live in
the repository's bench/ folder.

    rollwire bench [--quick] [--repeats 3] [--out bench/out/e2e.json]
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
from typing import TYPE_CHECKING

from rollwire.clients.rollout import RolloutClient
from rollwire.engines.base import EngineRequest
from rollwire.messages import SamplingParams
from rollwire.transports.sockets import free_tcp_endpoint

if TYPE_CHECKING:  # imported when the benchmark runs: the CLI builds its parser from this module
    from rollwire.engines.hf import HFEngine


def _prompts(n: int) -> list[list[int]]:
    return [[1 + (i * 7) % 90, 5 + i % 11, 9, 3 + i % 5] for i in range(n)]


def _tokens_per_s(total: int, want: int, seconds: float) -> float:
    if total != want:  # ignore_eos: every request runs to max_new_tokens
        raise RuntimeError(f"a run produced {total} tokens, expected {want}")
    return total / seconds


async def _run_direct(engine: HFEngine, n: int, tokens: int, concurrency: int) -> float:
    sp = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    sem = asyncio.Semaphore(concurrency)
    counter = iter(range(1 << 30))

    async def one(p: list[int]) -> int:
        async with sem:
            got = 0
            async for d in engine.generate(EngineRequest(f"d{next(counter)}", p, sp)):
                got += len(d.token_ids)
            return got

    t0 = time.perf_counter()
    total = sum(await asyncio.gather(*(one(p) for p in _prompts(n))))
    return _tokens_per_s(total, n * tokens, time.perf_counter() - t0)


async def _run_rollwire(rc: RolloutClient, n: int, tokens: int, concurrency: int) -> float:
    sp = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    sem = asyncio.Semaphore(concurrency)

    async def one(p: list[int]) -> int:
        async with sem:
            out = await rc.generate(p, sp)
            return len(out.output_ids)  # type: ignore[union-attr]

    t0 = time.perf_counter()
    total = sum(await asyncio.gather(*(one(p) for p in _prompts(n))))
    return _tokens_per_s(total, n * tokens, time.perf_counter() - t0)


async def main(args: argparse.Namespace) -> dict[str, object]:
    from rollwire.engines.hf import HFEngine

    engine = HFEngine.from_spec("tiny", max_batch_size=64)
    ep = free_tcp_endpoint()
    server = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                               "--rollout-endpoint", ep, "--max-batch-size", "64"])
    results: dict[str, dict[str, list[float]]] = {}
    try:
        await engine.start()
        async with RolloutClient(ep) as rc:
            await rc.wait_ready(timeout=120)
            await _run_rollwire(rc, 8, 8, 8)  # warm-up both paths
            await _run_direct(engine, 8, 8, 8)
            for conc in args.concurrency:
                r = results.setdefault(str(conc), {"direct": [], "rollwire": []})
                for _ in range(args.repeats):
                    r["direct"].append(await _run_direct(engine, args.requests, args.tokens, conc))
                    r["rollwire"].append(await _run_rollwire(rc, args.requests, args.tokens, conc))
    finally:
        await engine.shutdown()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    table = []
    for conc, r in results.items():
        d, w = statistics.median(r["direct"]), statistics.median(r["rollwire"])
        table.append({"concurrency": int(conc), "direct_tok_s": d, "rollwire_tok_s": w, "ratio": w / d,
                      "direct_runs": r["direct"], "rollwire_runs": r["rollwire"]})
    return {"requests": args.requests, "tokens": args.tokens, "repeats": args.repeats, "cpu_count": os.cpu_count(),
            "rows": table}


def print_table(res: dict[str, object]) -> None:
    print(f"\n{res['requests']} requests x {res['tokens']} tokens, medians of {res['repeats']} runs (tokens/s)")
    print(f"{'concurrency':>11} {'direct':>10} {'rollwire':>10} {'ratio':>7}")
    for row in res["rows"]:  # type: ignore[attr-defined]
        print(f"{row['concurrency']:>11} {row['direct_tok_s']:>10.0f} {row['rollwire_tok_s']:>10.0f} "
              f"{row['ratio']:>7.3f}")


def add_bench_args(ap: argparse.ArgumentParser) -> None:
    from rollwire.cli import positive_int

    ap.add_argument("--quick", action="store_true", help="16 requests x 16 tokens, concurrency 1 and 16, one run")
    ap.add_argument("--requests", type=positive_int, default=64)
    ap.add_argument("--tokens", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--out", default="bench/out/e2e.json")


def run_bench(a: argparse.Namespace) -> int:
    if a.quick:
        a.requests, a.tokens, a.repeats, a.concurrency = 16, 16, 1, [1, 16]
    import uvloop

    res = uvloop.run(main(a))
    print_table(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")
    return 0
