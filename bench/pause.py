"""Pause and resume latency per pause policy, under load, with the engine called directly as floor.

For each policy (abort, retract, drain, in_place): a server (hf engine, tiny model) in this process
with 32 non-streamed requests kept in flight by a client task; ``--pushes`` versions are handed to
the MemoryGovernor exactly as the WeightReceiverActor does (ApplyVersion over inproc ZeroMQ). From
the governor's timeline, per push: pausing (PAUSING -> PAUSED), loading, resuming (RESUMING ->
SERVING) and the whole pause (PAUSING -> SERVING). The floor: the same engine called directly
(HFEngine.pause(mode) + resume(), 32 requests running; drain's floor is pause("abort") after the
running requests finish, which is what drain waits for).

    python bench/pause.py [--pushes 10] [--out bench/out/pause.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rollwire import RolloutClient, SamplingParams
from rollwire.engines.base import EngineRequest
from rollwire.engines.hf import HFEngine
from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports.sockets import ipc_endpoint
from tests.versioned import send_version, version_state

POLICIES = ("abort", "retract", "drain", "in_place")
SP = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
IN_FLIGHT = 32


async def _keep_busy(rc: RolloutClient, stop: asyncio.Event) -> int:
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        while not stop.is_set():
            await rc.generate([1 + i % 90, 5, 9], SP)
            done += 1

    await asyncio.gather(*(one(i) for i in range(IN_FLIGHT)))
    return done


def _phases(timeline: list[tuple[float, str]]) -> list[dict[str, float]]:
    """Per push: durations between the governor's transitions."""
    out, t = [], dict[str, float]()
    for when, state in timeline:
        key = state.split("(")[0]
        t[key] = when
        if key == "SERVING" and "PAUSING" in t:
            out.append({"pausing_s": t["PAUSED"] - t["PAUSING"], "loading_s": t["RESUMING"] - t["LOADING"],
                        "resuming_s": when - t["RESUMING"], "paused_total_s": when - t["PAUSING"]})
            t = {}
    return out


async def server_runs(policy: str, pushes: int) -> list[dict[str, float]]:
    ep = ipc_endpoint(f"pause-{policy}")
    states = {v: version_state(v) for v in range(1, pushes + 1)}
    async with RolloutServer(ServerConfig(rollout_endpoint=ep, pause_policy=policy)) as srv, \
            RolloutClient(ep, timeout=120) as rc:
        stop = asyncio.Event()
        busy = asyncio.ensure_future(_keep_busy(rc, stop))
        await asyncio.sleep(1.0)
        for v in range(1, pushes + 1):
            await send_version(v, states[v])
            await asyncio.sleep(0.2)
        stop.set()
        await busy
        return _phases(srv.governor.timeline)


async def floor_runs(policy: str, pushes: int) -> list[float]:
    eng = HFEngine.from_spec("tiny")
    await eng.start()
    times, n = [], 0
    try:
        for _ in range(pushes):
            tasks = []
            for i in range(IN_FLIGHT):
                n += 1
                tasks.append(asyncio.ensure_future(_drain(eng.generate(EngineRequest(f"f{n}", [1 + i, 5, 9], SP)))))
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            if policy == "drain":
                await asyncio.gather(*tasks)
                await eng.pause("abort")
            else:
                await eng.pause(policy)  # type: ignore[arg-type]
            await eng.resume()
            times.append(time.perf_counter() - t0)
            await asyncio.gather(*tasks)
    finally:
        await eng.shutdown()
    return times


async def _drain(it: Any) -> None:
    async for _ in it:
        pass


async def main(a: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"pushes": a.pushes, "in_flight": IN_FLIGHT, "policies": {}}
    for policy in POLICIES:
        phases = await server_runs(policy, a.pushes)
        floor = await floor_runs(policy, a.pushes)
        med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
        res["policies"][policy] = {"median_s": med, "floor_pause_resume_s": statistics.median(floor),
                                   "pushes_seen": len(phases), "runs": phases, "floor_runs_s": floor}
    return res


def _print(res: dict[str, Any]) -> None:
    print(f"\n{res['in_flight']} requests in flight, {res['pushes']} pushes per policy, tiny model; medians (ms)")
    print(f"{'policy':<10}{'pausing':>9}{'loading':>9}{'resuming':>10}{'paused total':>14}{'engine floor':>14}")
    for policy, r in res["policies"].items():
        m = r["median_s"]
        print(f"{policy:<10}{m['pausing_s'] * 1e3:>9.1f}{m['loading_s'] * 1e3:>9.1f}{m['resuming_s'] * 1e3:>10.1f}"
              f"{m['paused_total_s'] * 1e3:>14.1f}{r['floor_pause_resume_s'] * 1e3:>14.1f}")
    print("(engine floor: HFEngine.pause(policy) + resume() called directly, same load; drain: wait for the "
          "running requests, then pause)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pushes", type=int, default=10)
    ap.add_argument("--out", default="bench/out/pause.json")
    args = ap.parse_args()
    import uvloop

    result = uvloop.run(main(args))
    _print(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
