"""`rollwire demo --servers N`: the GRPO demo on a fleet of N `rollwire serve` processes.

The rollout workers use a ``RolloutFleet`` over the N servers; the trainer pushes every version to
all of them (``require_all=False``: a dead server is named in the push report, not a failure).
Halfway through, one server is SIGKILLed: the requests it held go on at the others, the trainer's
next pushes go to the ones left; three steps later it is started again at the same endpoint, takes
the next version and the fleet admits it back. ``fleet.png`` shows each server's load over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rollwire.clients.rollout import RolloutClient, RolloutError
from rollwire.transports.sockets import ipc_endpoint

RESTART_AFTER_STEPS = 3


def _serve(a: argparse.Namespace, endpoint: str, trainer_ep: str, i: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "error", "serve", "--engine", "hf",
                             "--model", "tiny", "--rollout-endpoint", endpoint, "--trainer-endpoint", trainer_ep,
                             "--receiver-id", f"server-{i}", "--pause-policy", a.pause_policy,
                             "--max-batch-size", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def fleet_demo(a: argparse.Namespace, steps: int, out: Path) -> int:
    from rollwire.demo import _finish_fleet, start_processes, stop_processes
    from rollwire.demo.trainer import TrainConfig
    from rollwire.demo.view import View

    eps = [ipc_endpoint(f"roll{i}") for i in range(a.servers)]
    trainer_ep, exp_ep = ipc_endpoint("train"), ipc_endpoint("exp")
    servers = [_serve(a, ep, trainer_ep, i) for i, ep in enumerate(eps)]
    ctx = mp.get_context("spawn")
    stop, metrics_q = ctx.Event(), ctx.Queue()
    view = View(steps, plain=a.plain, config=vars(a) | {"steps": steps, "out": str(out)})
    events: list[tuple[float, str]] = []  # (time, what happened to which server)
    load: list[tuple[float, list[float]]] = []  # (time, samples in flight per server)
    clients = [RolloutClient(ep) for ep in eps]
    procs: list[Any] = []
    try:
        for c in clients:
            await c.__aenter__()
            await c.wait_ready(timeout=120)
        tcfg = TrainConfig(trainer_endpoint=trainer_ep, experience_endpoint=exp_ep, steps=steps,
                           groups_per_step=a.groups_per_step, lr=a.lr, clip=0.2, updates_per_step=a.updates,
                           temperature=a.temperature, max_staleness=a.max_staleness, transport=a.transport,
                           seed=a.seed, servers=a.servers)
        procs = start_processes(ctx, a, tcfg, eps, exp_ep, metrics_q, stop)
        sampler = asyncio.ensure_future(_sample_load(clients, load))
        try:
            rows = await _follow(a, steps, eps, trainer_ep, servers, metrics_q, view, events, procs[0])
        finally:  # a signal cancels the demo here: its processes stop with it
            sampler.cancel()
            await stop_processes(procs, stop)
    finally:
        for c in clients:
            await c.close()
        for s in servers:
            s.terminate()
        for s in servers:
            try:
                s.wait(10)
            except subprocess.TimeoutExpired:
                s.kill()
    view.close()
    return _finish_fleet(out, rows, load, events, eps, view, procs[0].exitcode if procs else None)


async def _sample_load(clients: list[RolloutClient], load: list[tuple[float, list[float]]]) -> None:
    """Each server's samples in flight, every 250 ms (a dead one counts 0)."""
    while True:
        row = []
        for c in clients:
            try:
                row.append((await c.status(timeout=0.5)).counters.get("samples_in_flight", 0.0))
            except RolloutError:
                row.append(0.0)
        load.append((time.time(), row))
        await asyncio.sleep(0.25)


async def _follow(a: argparse.Namespace, steps: int, eps: list[str], trainer_ep: str,
                  servers: list[subprocess.Popen[bytes]], metrics_q: Any, view: Any, events: list[tuple[float, str]],
                  trainer: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    kill_at, victim = max(2, steps // 2), 1 % len(eps)
    while True:
        try:
            row = await loop.run_in_executor(None, metrics_q.get, True, 0.1)
        except Exception:  # queue.Empty
            if not trainer.is_alive() and metrics_q.empty():
                return rows
            continue
        if row is None:
            return rows
        row["pause_s"] = 0.0
        row["live_version"] = row["weight_version"]
        rows.append(row)
        view.update(row)
        if row["step"] == kill_at:
            servers[victim].send_signal(signal.SIGKILL)
            events.append((time.time(), f"server-{victim} killed"))
            print(f"  step {kill_at}: server-{victim} SIGKILLed; its requests go on at the others", flush=True)
        if row["step"] == kill_at + RESTART_AFTER_STEPS:
            servers[victim] = _serve(a, eps[victim], trainer_ep, victim)
            events.append((time.time(), f"server-{victim} restarted"))
            print(f"  step {row['step']}: server-{victim} restarted; it rejoins at the next version", flush=True)
