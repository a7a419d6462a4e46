"""`rollwire demo`: a real async GRPO loop on the embedded engine, on a CPU, in minutes.

One rollout server (all actors, hf engine, tiny model) runs in this process; a trainer process
and several rollout-worker processes talk to it only through rollwire's ZeroMQ protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports.sockets import ipc_endpoint

if TYPE_CHECKING:
    from rollwire.demo.view import View


def add_demo_args(p: argparse.ArgumentParser) -> None:
    from rollwire.cli import positive_int

    p.add_argument("--quick", action="store_true", help="a short run (CI): fewer steps")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default 80, quick 20)")
    p.add_argument("--workers", type=positive_int, default=3, help="rollout-worker processes")
    p.add_argument("--group-size", type=positive_int, default=8, help="samples per prompt (GRPO group)")
    p.add_argument("--groups-per-step", type=positive_int, default=8)
    p.add_argument("--pause-policy", default="retract", choices=["abort", "retract", "drain", "in_place"])
    p.add_argument("--transport", default="shm", choices=["shm", "inline", "auto"])
    p.add_argument("--max-staleness", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--updates", type=positive_int, default=2, help="optimizer steps per batch (PPO epochs)")
    p.add_argument("--seed", type=int, default=0)
    # the tiny model's random logits have a std of ~4 (clear greedy margins for the tests); sampling
    # at T=4 gives the policy enough entropy to explore. Trainer and server use the same T.
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--out", default=None, help="output folder (default: a new ./rollwire-demo-<time>)")
    p.add_argument("--plain", action="store_true", help="plain lines instead of the live view")
    p.add_argument("--servers", type=positive_int, default=1,
                   help="rollout servers; more than 1 runs a fleet (`rollwire serve` processes behind a "
                        "RolloutFleet) and kills one halfway (it restarts 3 steps later)")


def run_demo(a: argparse.Namespace) -> int:
    import uvloop

    return uvloop.run(_until_signal(a))


async def _until_signal(a: argparse.Namespace) -> int:
    """The demo; SIGTERM or Ctrl-C stop it and its processes (exit status 128 + the signal)."""
    loop, task, got = asyncio.get_running_loop(), asyncio.current_task(), []

    def on_signal(sig: int) -> None:
        got.append(sig)
        if task is not None:
            task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _demo(a)
    except asyncio.CancelledError:
        if not got:
            raise
        print(f"rollwire demo: stopped by {signal.Signals(got[0]).name}", file=sys.stderr)
        return 128 + got[0]


def child_setup() -> None:
    """In each demo process: Ctrl-C goes to the parent alone (it stops the children), and a child
    whose parent died (SIGKILL) exits instead of running on as an orphan."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-guard", daemon=True).start()


async def _demo(a: argparse.Namespace) -> int:
    from rollwire.demo.trainer import TrainConfig
    from rollwire.demo.view import View

    steps = a.steps or (20 if a.quick else 80)
    out = Path(a.out or f"rollwire-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if a.servers > 1:
        from rollwire.demo.fleet import fleet_demo

        return await fleet_demo(a, steps, out)
    rollout_ep, trainer_ep, exp_ep = ipc_endpoint("roll"), ipc_endpoint("train"), ipc_endpoint("exp")
    cfg = ServerConfig(rollout_endpoint=rollout_ep, trainer_endpoint=trainer_ep, pause_policy=a.pause_policy,
                       max_batch_size=64, max_staleness=None)
    ctx = mp.get_context("spawn")
    stop, metrics_q = ctx.Event(), ctx.Queue()
    view = View(steps, plain=a.plain, config=vars(a) | {"steps": steps, "out": str(out)})
    activity: list[tuple[float, int, str]] = []  # (time, requests in flight, governor state)
    async with RolloutServer(cfg) as srv:
        tcfg = TrainConfig(trainer_endpoint=trainer_ep, experience_endpoint=exp_ep, steps=steps,
                           groups_per_step=a.groups_per_step, lr=a.lr, clip=0.2, updates_per_step=a.updates,
                           temperature=a.temperature, max_staleness=a.max_staleness,
                           transport=a.transport, seed=a.seed)
        procs = start_processes(ctx, a, tcfg, [rollout_ep], exp_ep, metrics_q, stop)
        try:
            rows = await _follow(srv, metrics_q, view, activity, procs[0])
        finally:  # a signal cancels the demo here: its processes stop with it
            await stop_processes(procs, stop)
        timeline = list(srv.governor.timeline)
    view.close()
    return _finish(out, rows, timeline, activity, view, procs[0].exitcode)


def start_processes(ctx: Any, a: argparse.Namespace, tcfg: Any, rollout_eps: list[str], exp_ep: str, metrics_q: Any,
                    stop: Any) -> list[Any]:
    """The trainer process (first) and the rollout-worker processes, started."""
    from rollwire.demo.trainer import trainer_main
    from rollwire.demo.worker import worker_main

    procs = [ctx.Process(target=trainer_main, args=(tcfg, metrics_q, stop), name="trainer")]
    procs += [ctx.Process(target=worker_main, name=f"worker-{i}", args=(
        i, rollout_eps, exp_ep, a.group_size, 2, a.seed, a.temperature, stop)) for i in range(a.workers)]
    for p in procs:
        p.start()
    return procs


async def stop_processes(procs: list[Any], stop: Any) -> None:
    stop.set()
    loop = asyncio.get_running_loop()
    for p in procs:
        await loop.run_in_executor(None, p.join, 10)
        if p.is_alive():
            p.terminate()
            await loop.run_in_executor(None, p.join, 5)


async def _follow(srv: RolloutServer, metrics_q: Any, view: View, activity: list[tuple[float, int, str]],
                  trainer: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    pause_before = 0.0
    while True:
        activity.append((time.time(), len(srv.generation.in_flight), srv.governor.state))
        try:
            row = await loop.run_in_executor(None, metrics_q.get, True, 0.05)
        except Exception:  # queue.Empty: sample activity and wait again
            if not trainer.is_alive() and metrics_q.empty():
                return rows
            continue
        if row is None:
            return rows
        pause_total = srv.governor.counters.get("pause_seconds")
        row["pause_s"], pause_before = pause_total - pause_before, pause_total
        row["live_version"] = srv.generation.weight_version
        rows.append(row)
        view.update(row)


def _write_rows(out: Path, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    with (out / "metrics.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if not rows:
        return None
    k = max(1, len(rows) // 5)
    first = sum(r["reward_mean"] for r in rows[:k]) / k
    last = sum(r["reward_mean"] for r in rows[-k:]) / k
    return {"steps": len(rows), "reward_first": first, "reward_last": last,
            "weight_version": rows[-1]["weight_version"], "out": str(out)}


def _finish_fleet(out: Path, rows: list[dict[str, Any]], load: list[tuple[float, list[float]]],
                  events: list[tuple[float, str]], eps: list[str], view: View, trainer_exit: int | None) -> int:
    from rollwire.demo.plots import plot_fleet, plot_reward

    summary = _write_rows(out, rows)
    if summary is None:
        print(f"demo failed: the trainer produced no steps (exit code {trainer_exit})")
        return 1
    plot_reward(rows, out / "reward.png")
    plot_fleet(load, events, rows, len(eps), out / "fleet.png")
    summary |= {"servers": len(eps), "events": [e for _, e in events],
                "servers_applied": [r["servers_applied"] for r in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    view.summary(summary, out)
    return 0 if trainer_exit == 0 else 1


def _finish(out: Path, rows: list[dict[str, Any]], timeline: list[tuple[float, str]],
            activity: list[tuple[float, int, str]], view: View, trainer_exit: int | None) -> int:
    from rollwire.demo.plots import plot_reward, plot_timeline

    summary = _write_rows(out, rows)
    if summary is None:
        print(f"demo failed: the trainer produced no steps (exit code {trainer_exit})")
        return 1
    plot_reward(rows, out / "reward.png")
    plot_timeline(timeline, activity, rows, out / "timeline.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    view.summary(summary, out)
    return 0 if trainer_exit == 0 else 1
