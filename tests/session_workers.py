"""Rollout-worker processes running multi-turn sessions (tests of SessionActor under load)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec

from rollwire import RolloutClient, SamplingParams


async def _run_sessions(endpoint: str, worker: int, n_sessions: int, turns: int, started: Any,
                        last_push: Any) -> list[dict[str, Any]]:
    """Each session runs its last turn only after the trainer's last push (``last_push``), so
    every trajectory spans versions, however fast the machine."""
    rng = random.Random(worker)
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    pushed = asyncio.Event()

    async def watch() -> None:
        while not last_push.is_set():
            await asyncio.sleep(0.05)
        pushed.set()

    async def one(index: int) -> dict[str, Any]:
        async with rc.session(max_tokens=1024) as s:
            prompt = [1, 10 + worker, 20 + index % 50, 30 + rng.randrange(40)]
            for turn in range(turns):
                if turn == turns - 1:
                    await pushed.wait()
                await s.generate(prompt if turn == 0 else [], sp)
                if turn < turns - 1:  # an environment answer of 1-9 tokens
                    await s.append([rng.randrange(3, 100) for _ in range(rng.randrange(1, 10))])
            return {"session": s.id, "trajectory": msgspec.to_builtins(s.trajectory())}

    async with RolloutClient(endpoint, timeout=300) as rc:
        await rc.wait_ready()
        watcher = asyncio.ensure_future(watch())
        started.set()
        out = list(await asyncio.gather(*(one(i) for i in range(n_sessions))))
        await watcher
        return out


def run_sessions(endpoint: str, worker: int, n_sessions: int, turns: int, started: Any, last_push: Any,
                 out: Any) -> None:
    out.put((worker, asyncio.run(_run_sessions(endpoint, worker, n_sessions, turns, started, last_push))))
