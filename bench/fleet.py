"""A fleet of `rollwire serve` processes (hf, tiny model) behind one RolloutFleet.

1. aggregate: tokens/s of 1, 2 and 4 servers behind one client (closed loop, ``--per-server``
   greedy requests in flight per server, new tokens per request from bench/workload.py:
   ``--lengths mixed`` or ``fixed``), against the sum of each server measured alone with the same
   load (the floor in the same run); target >= 0.9. On a machine with fewer cores than
   servers they share the cores, and the ratio says so. A second floor for 2 and 4 servers:
   all of them busy at once, each driven by its own RolloutClient (no fleet), which tells the
   fleet's own cost from what servers sharing a machine (cores, memory bandwidth, clock) cost.
   Where the machine has a CPU to spare beyond 4 servers x ``--threads``, each server is pinned to
   its own CPUs (hyperthread siblings side by side, so an even thread count keeps whole cores
   together; an odd one splits a core between two servers), the same ones alone and in the fleet, as
   servers get their own GPUs in a real fleet, and this client to the CPUs left: unpinned, the sum
   alone moved by 10-15% between repeats on 16 cores. ``--no-pin`` leaves placement to the OS (as
   on a 2-core machine, where the client has no CPU of its own to take).
2. failover: with requests running, one server is SIGKILLed; the time from the kill until every
   request it held runs on another server, against the client's heartbeat interval (1 s); target
   <= 2 intervals. It is bounded by the fleet's liveness bound (``--liveness``).
3. fan-out: a TrainerPublisher pushing the tiny model to 1 and to 4 servers on this host, shm and
   inline: trainer bytes sent on its socket and time to all applied (medians of ``--pushes``).

    python bench/fleet.py [--quick] [--repeats 3] [--out bench/out/fleet.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from workload import LENGTHS, token_counts  # bench/workload.py (this script's folder is on the path)

from rollwire import RolloutClient, RolloutFleet, SamplingParams
from rollwire.transports.sockets import free_tcp_endpoint

MAX_TOKENS = 64
THREADS = max(1, (len(os.sched_getaffinity(0)) - 1) // 4)  # torch threads per server: 4 of them and a CPU left


def core_groups() -> list[list[int]]:
    """The CPUs this process may use, grouped by physical core (hyperthread siblings together)."""
    allowed = sorted(os.sched_getaffinity(0))
    groups: dict[str, list[int]] = {}
    for cpu in allowed:
        try:
            key = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            key = str(cpu)
        groups.setdefault(key, []).append(cpu)
    return list(groups.values())


def server_cpus(servers: int, threads: int) -> tuple[list[list[int]], list[int]] | None:
    """Disjoint sets of ``threads`` CPUs for each server (siblings of a physical core next to each
    other) and the CPUs left for the client; None when no CPU would be left."""
    order = [cpu for group in core_groups() for cpu in group]
    if servers * threads >= len(order):
        return None
    return [order[i * threads:(i + 1) * threads] for i in range(servers)], order[servers * threads:]


def serve(endpoint: str, trainer: str | None = None, rid: str = "",
          cpus: list[int] | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "rollwire.cli", "--log-level", "error", "serve", "--engine", "hf", "--model", "tiny",
           "--rollout-endpoint", endpoint]
    if trainer:
        cmd += ["--trainer-endpoint", trainer, "--receiver-id", rid]
    # every server gets the same share of the cores, alone or beside the others: torch's default
    # (all cores each) would oversubscribe a machine running 4 of them and hide what routing does
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    if cpus:  # pinned before Python starts in the child (no preexec_fn: this process has threads)
        cmd = [sys.executable, "-c", f"import os, sys; os.sched_setaffinity(0, {sorted(cpus)}); "
               "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])", *cmd[1:]]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


async def closed_loop(gen: Any, concurrency: int, seconds: float, lengths: str) -> float:
    """Tokens/s with ``concurrency`` requests always in flight through ``gen(prompt, sampling)``;
    new tokens per request as bench/workload.py gives them for ``lengths``."""
    sps = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
           for n in token_counts(MAX_TOKENS, lengths, 256)]
    tokens = 0
    end = time.monotonic() + seconds

    async def loop(i: int) -> None:
        nonlocal tokens
        k = 0
        while time.monotonic() < end:
            out = await gen([3 + i % 200, 7 + k % 50, 11], sps[(i * 31 + k) % len(sps)])
            tokens += len(out.output_ids)
            k += 1

    t0 = time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    return tokens / (time.monotonic() - t0)


async def aggregate(eps: list[str], per_server: int, seconds: float, repeats: int,
                    lengths: str) -> list[dict[str, Any]]:
    rows = []
    for n in (1, 2, 4):
        fleet_tps, alone_sum, together_sum = [], [], []
        for _ in range(repeats):
            alone = []
            for ep in eps[:n]:
                async with RolloutClient(ep) as rc:
                    alone.append(await closed_loop(rc.generate, per_server, seconds, lengths))
            async with RolloutFleet(eps[:n]) as fleet:
                await fleet.wait_ready(servers=n, timeout=120)
                fleet_tps.append(await closed_loop(fleet.generate, per_server * n, seconds, lengths))
            alone_sum.append(sum(alone))
            if n > 1:  # a second floor: the same servers all busy at once, each driven by its own client
                clients = [RolloutClient(ep) for ep in eps[:n]]
                for rc in clients:
                    await rc.__aenter__()
                try:
                    together_sum.append(sum(await asyncio.gather(
                        *(closed_loop(rc.generate, per_server, seconds, lengths) for rc in clients))))
                finally:
                    for rc in clients:
                        await rc.close()
        f, a = statistics.median(fleet_tps), statistics.median(alone_sum)
        row = {"servers": n, "fleet_tokens_s": round(f, 1), "sum_alone_tokens_s": round(a, 1),
               "ratio": round(f / a, 3), "runs_fleet": [round(x, 1) for x in fleet_tps],
               "runs_sum_alone": [round(x, 1) for x in alone_sum]}
        if together_sum:
            t = statistics.median(together_sum)
            row.update(together_tokens_s=round(t, 1), ratio_to_together=round(f / t, 3),
                       runs_together=[round(x, 1) for x in together_sum])
        rows.append(row)
    return rows


async def failover(liveness_s: float, repeats: int) -> dict[str, Any]:
    times, moved = [], []
    for _ in range(repeats):
        eps = [free_tcp_endpoint() for _ in range(3)]
        procs = [serve(ep) for ep in eps]
        try:
            async with RolloutFleet(eps, liveness_s=liveness_s, health_interval_s=0.5) as fleet:
                await fleet.wait_ready(servers=3, timeout=120)
                long = SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
                running = [asyncio.ensure_future(fleet.generate([5, i, 9], long)) for i in range(12)]
                victim = fleet.servers[0]
                deadline = time.monotonic() + 60
                while victim.tokens < 10 * max(1, victim.in_flight) or victim.in_flight == 0:
                    assert time.monotonic() < deadline, "no requests generating on the victim"
                    await asyncio.sleep(0.01)
                held = victim.in_flight
                base = fleet.failovers
                procs[0].send_signal(signal.SIGKILL)
                t0 = time.monotonic()
                while fleet.failovers - base < held:
                    assert time.monotonic() < t0 + 60, "requests did not move"
                    await asyncio.sleep(0.005)
                times.append(time.monotonic() - t0)
                moved.append(held)
                await asyncio.gather(*running)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    med = statistics.median(times)
    return {"liveness_s": liveness_s, "heartbeat_s": 1.0, "death_to_running_elsewhere_s": round(med, 3),
            "in_heartbeats": round(med / 1.0, 2), "runs_s": [round(t, 3) for t in times], "requests_moved": moved}


async def fanout(pushes: int) -> list[dict[str, Any]]:
    from rollwire.models import tiny
    from rollwire.weightsync.publisher import TrainerPublisher

    rows = []
    for n in (1, 4):
        trainer = free_tcp_endpoint()
        eps = [free_tcp_endpoint() for _ in range(n)]
        procs = [serve(ep, trainer, f"s{i}") for i, ep in enumerate(eps)]
        version = 0
        try:
            async with TrainerPublisher(trainer, min_receivers=n, timeout_s=120) as tp:
                for transport in ("shm", "inline"):
                    secs, sent = [], []
                    for _ in range(pushes):
                        version += 1
                        state = tiny(seed=version)[0].state_dict()
                        r = await tp.push_weights(version, state, transport=transport)
                        secs.append(r.seconds)
                        sent.append(r.bytes_sent)
                    rows.append({"servers": n, "transport": transport, "version_bytes": r.bytes,
                                 "trainer_bytes_sent": statistics.median(sent),
                                 "push_to_all_applied_ms": round(statistics.median(secs) * 1000, 2)})
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return rows


async def main(a: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if "aggregate" in a.parts:
        res["aggregate"] = await run_aggregate(a)
    if "failover" in a.parts:
        res["failover"] = await failover(a.liveness, a.repeats)
    if "fanout" in a.parts:
        res["fanout"] = await fanout(a.pushes)
    return res


async def run_aggregate(a: argparse.Namespace) -> list[dict[str, Any]]:
    eps = [free_tcp_endpoint() for _ in range(4)]
    placed = server_cpus(4, THREADS) if a.pin else None
    cpus: list[list[int] | None] = list(placed[0]) if placed else [None] * 4
    a.server_cpus, a.client_cpus = cpus, placed[1] if placed else None
    procs = [serve(ep, cpus=c) for ep, c in zip(eps, cpus, strict=True)]
    everywhere = os.sched_getaffinity(0)
    if placed:
        os.sched_setaffinity(0, placed[1])  # undone below: the failover and fan-out servers are not pinned
    try:
        for ep in eps:
            async with RolloutClient(ep) as rc:
                await rc.wait_ready(timeout=120)
        return await aggregate(eps, a.per_server, a.seconds, a.repeats, a.lengths)
    finally:
        os.sched_setaffinity(0, everywhere)
        for p in procs:
            p.kill()
            p.wait()


def table(res: dict[str, Any]) -> str:
    lines = [f"servers  fleet tok/s  sum alone tok/s  ratio (target >= 0.9; {THREADS} torch threads per server; "
             f"lengths {res['machine']['args']['lengths']})"]
    lines[0] += "; together: the servers busy at once, a client each, no fleet"
    lines[0] += (f"; CPUs of each server {res['machine']['args'].get('server_cpus')}, "
                 f"of the client {res['machine']['args'].get('client_cpus')}")
    lines += [f"{r['servers']:>7}  {r['fleet_tokens_s']:>11}  {r['sum_alone_tokens_s']:>15}  {r['ratio']:>5}"
              + (f"  together {r['together_tokens_s']} (fleet / together {r['ratio_to_together']})"
                 if "together_tokens_s" in r else "") for r in res.get("aggregate", [])]
    if "failover" in res:
        f = res["failover"]
        lines.append(f"failover: death -> running elsewhere {f['death_to_running_elsewhere_s']} s = "
                     f"{f['in_heartbeats']} heartbeats (target <= 2; liveness bound {f['liveness_s']} s)")
    lines.append("fan-out  servers  transport  trainer bytes sent  push to all applied (ms)")
    lines += [f"         {r['servers']:>7}  {r['transport']:>9}  {r['trainer_bytes_sent']:>18}  "
              f"{r['push_to_all_applied_ms']:>10}" for r in res.get("fanout", [])]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 3 s per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--per-server", type=int, default=8)
    ap.add_argument("--lengths", choices=LENGTHS, default="mixed",
                    help="new tokens per request: spread around 64 (mixed) or all 64 (fixed); bench/workload.py")
    ap.add_argument("--liveness", type=float, default=2.0)
    ap.add_argument("--pushes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch threads per server (default: a quarter of the CPUs but one, so 4 servers and the "
                         "client each have their own)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="pin each aggregate server to its own CPUs and the client to the rest, where a CPU is "
                         "left for the client (default; --no-pin: the OS places them)")
    ap.add_argument("--out", default="bench/out/fleet.json")
    ap.add_argument("--parts", nargs="+", default=["aggregate", "failover", "fanout"],
                    choices=["aggregate", "failover", "fanout"])
    a = ap.parse_args()
    if a.quick:
        a.repeats, a.seconds, a.pushes = 1, 3.0, 3
    THREADS = a.threads
    res = asyncio.run(main(a))
    res["machine"] = {"cpus": os.cpu_count(), "torch_threads_per_server": THREADS, "platform": platform.platform(),
                      "load_average": os.getloadavg(), "args": vars(a)}
    print(table(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
