"""Soak: rollout workers generating, a trainer pushing a version every few seconds, and random
kills of workers and of the server, for minutes. Not in CI (it takes minutes); run it by hand.

Every request a surviving worker made must end exactly once: a GenerateDone or a typed error
(server_unavailable while the server is down, overloaded/client_limit when refused). The table
counts each outcome, late or duplicate replies the clients dropped, pushes applied and failed,
and the server's RSS growth per minute (a least-squares slope per server incarnation, after a
warm-up minute share is dropped).

    python bench/soak.py [--minutes 3] [--workers 4] [--concurrency 8] [--push-every 3]
                         [--kill-every 20] [--seed 0] [--curve] [--out bench/out/soak.json]

--curve runs every link with CurveZMQ (Ironhouse): fresh key files for the server, the workers
and the trainer; the server allow-lists the worker key for rollouts and the trainer key.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rollwire.transports.sockets import free_tcp_endpoint


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_min(samples: list[tuple[float, float]]) -> float | None:
    if len(samples) < 4:
        return None
    samples = samples[len(samples) // 4:]  # drop the warm-up quarter (allocator, caches)
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return None if var == 0 else 60 * sum((t - mt) * (r - mr) for t, r in samples) / var


# -- a worker process -------------------------------------------------------------------------
def worker_main(endpoint: str, concurrency: int, seed: int, out_path: str, keydir: str | None) -> None:
    from rollwire.server import run

    run(_worker(endpoint, concurrency, seed, out_path, keydir))


async def _worker(endpoint: str, concurrency: int, seed: int, out_path: str, keydir: str | None) -> None:
    from rollwire import RolloutClient, SamplingParams
    from rollwire.clients.rollout import RolloutError
    from rollwire.transports.security import CurveClient, KeyPair

    curve = None
    if keydir is not None:
        curve = CurveClient(KeyPair.load(f"{keydir}/worker.key_secret"), KeyPair.load(f"{keydir}/server.key").public)

    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with RolloutClient(endpoint, curve=curve) as rc:
        async def loop() -> None:
            while not stop.is_set():
                sp = SamplingParams(max_new_tokens=rng.randint(8, 96), temperature=1.0, seed=rng.randint(0, 1 << 30))
                try:
                    out = await rc.generate([rng.randint(3, 400) for _ in range(rng.randint(2, 24))], sp)
                    outcomes[f"done:{out.finish_reason}"] += 1  # type: ignore[union-attr]
                except RolloutError as e:
                    outcomes[f"error:{e.code.value}"] += 1
                    if e.code.value in ("server_unavailable", "overloaded", "client_limit"):
                        await asyncio.sleep(0.2)  # back off while the server is away or full

        tasks = [asyncio.ensure_future(loop()) for _ in range(concurrency)]
        await stop.wait()
        await asyncio.gather(*tasks)  # each finishes its call in flight: every request ends once
        dropped = rc._rpc.dropped_replies
    Path(out_path).write_text(json.dumps({"outcomes": dict(outcomes), "dropped_replies": dropped}))


# -- the orchestrator ---------------------------------------------------------------------------
def start_server(rollout_ep: str, trainer_ep: str, keydir: str | None) -> subprocess.Popen[bytes]:
    keys = [] if keydir is None else ["--secret-key", f"{keydir}/server.key_secret", "--client-keys",
                                      f"{keydir}/worker.key", "--trainer-keys", f"{keydir}/trainer.key"]
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "error", "serve",
                             "--rollout-endpoint", rollout_ep, "--trainer-endpoint", trainer_ep,
                             "--max-new-tokens-limit", "512", *keys], stdout=subprocess.DEVNULL)


async def soak(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from rollwire.models import tiny
    from rollwire.runtime.logging import configure_logging
    from rollwire.transports.security import KeyPair, create_keys
    from rollwire.weightsync.publisher import TrainerPublisher

    configure_logging(level="warning")
    rng = random.Random(a.seed)
    rollout_ep, trainer_ep = free_tcp_endpoint(), free_tcp_endpoint()
    ctx = mp.get_context("spawn")
    outdir = Path(a.out).parent / "soak-workers"
    outdir.mkdir(parents=True, exist_ok=True)
    model, _ = tiny(0)
    named = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keydir: str | None = None
    trainer_curve: dict[str, Any] = {}
    if a.curve:
        keydir = str(Path(a.out).parent / "soak-keys")
        for name in ("server", "worker", "trainer"):
            create_keys(keydir, name)
        trainer_curve = {"keys": KeyPair.load(f"{keydir}/trainer.key_secret"),
                         "receiver_keys": {KeyPair.load(f"{keydir}/server.key").public}}
    server = start_server(rollout_ep, trainer_ep, keydir)
    incarnations: list[list[tuple[float, float]]] = [[]]
    workers: dict[int, tuple[Any, str]] = {}
    next_worker = 0
    kills: collections.Counter[str] = collections.Counter()
    pushes: collections.Counter[str] = collections.Counter()

    def spawn_worker() -> None:
        nonlocal next_worker
        path = str(outdir / f"w{next_worker}.json")
        Path(path).unlink(missing_ok=True)
        p = ctx.Process(target=worker_main, args=(rollout_ep, a.concurrency, a.seed * 1000 + next_worker, path, keydir))
        p.start()
        workers[next_worker] = (p, path)
        next_worker += 1

    for _ in range(a.workers):
        spawn_worker()
    t0 = time.monotonic()
    end = t0 + 60 * a.minutes
    next_push, next_kill, next_rss = t0 + a.push_every, t0 + a.kill_every, t0
    version = 0
    async with TrainerPublisher(trainer_ep, timeout_s=30.0, **trainer_curve) as trainer:
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_rss:
                r = rss_mb(server.pid)
                if r is not None:
                    incarnations[-1].append((now - t0, r))
                next_rss = now + 2.0
            if now >= next_kill:
                next_kill = now + a.kill_every
                if rng.random() < 0.5:
                    wid = rng.choice(list(workers))
                    os.kill(workers[wid][0].pid, signal.SIGKILL)
                    workers[wid][0].join()
                    del workers[wid]  # its client died with it: its requests have no one to answer
                    kills["worker"] += 1
                    spawn_worker()
                else:
                    server.kill()
                    server.wait()
                    kills["server"] += 1
                    server = start_server(rollout_ep, trainer_ep, keydir)
                    incarnations.append([])
            if now >= next_push:
                next_push = now + a.push_every
                version += 1
                for t in named.values():
                    if t.is_floating_point():
                        t.add_(torch.randn_like(t) * 1e-3)
                try:
                    await trainer.push_weights(version, named)
                    pushes["applied"] += 1
                except Exception as e:  # a push during a server kill: the trainer names why
                    pushes[f"failed:{type(e).__name__}"] += 1
            await asyncio.sleep(0.2)
    for p, _ in workers.values():
        p.terminate()
    results = []
    for p, path in workers.values():
        p.join(120)
        results.append(json.loads(Path(path).read_text()) if Path(path).exists() else {"outcomes": {"lost": 1}})
    server.terminate()
    server_exit = server.wait(60)
    outcomes: collections.Counter[str] = collections.Counter()
    for r in results:
        outcomes.update(r["outcomes"])
    slopes = [s for s in (slope_per_min(inc) for inc in incarnations) if s is not None]
    return {"minutes": a.minutes, "curve": a.curve, "workers_at_end": len(results), "kills": dict(kills),
            "pushes": dict(pushes),
            "versions": version, "outcomes": dict(outcomes),
            "dropped_replies": sum(r.get("dropped_replies", 0) for r in results),
            "rss_mb_per_min": slopes, "rss_mb_end": incarnations[-1][-1][1] if incarnations[-1] else None,
            "server_exit_on_sigterm": server_exit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight per worker")
    ap.add_argument("--push-every", type=float, default=3.0)
    ap.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills (worker or server)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curve", action="store_true", help="CurveZMQ on every link (fresh key files)")
    ap.add_argument("--out", default="bench/out/soak.json")
    a = ap.parse_args()
    command = " ".join(["python", "bench/soak.py", *sys.argv[1:]])
    from rollwire.server import run

    res: dict[str, Any] = run(soak(a))  # type: ignore[assignment]
    res["command"] = command
    print(f"$ {command}")
    print(f"{'outcome':<28} {'requests':>10}")
    for k, v in sorted(res["outcomes"].items()):
        print(f"{k:<28} {v:>10}")
    print(f"kills {res['kills']}, pushes {res['pushes']} (versions {res['versions']}), "
          f"late/duplicate replies dropped by clients {res['dropped_replies']}")
    print("server RSS growth per incarnation (MB/min, warm-up quarter dropped): "
          + ", ".join(f"{s:+.2f}" for s in res["rss_mb_per_min"]) + f"; RSS at end {res['rss_mb_end']} MB")
    print(f"server exit status on SIGTERM: {res['server_exit_on_sigterm']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
