"""A rollout-worker process on a RolloutFleet: keeps requests in flight until told to stop and
records, per request, its prompt and its one outcome (the result, or the error code)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from rollwire import RolloutError, RolloutFleet, SamplingParams


async def _keep_in_flight(endpoints: list[str], concurrency: int, max_new_tokens: int, seed: int,
                          stop: Any) -> dict[str, Any]:
    rng = random.Random(seed)
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    prompts: dict[int, list[int]] = {}
    outcomes: dict[int, list[Any]] = {}  # rid -> every outcome it got (must be exactly one)

    async with RolloutFleet(endpoints, liveness_s=2.0, health_interval_s=0.5, timeout=240) as fleet:
        await fleet.wait_ready(servers=len(endpoints), timeout=180)

        async def loop(worker: int) -> None:
            rid = worker
            while not stop.is_set():
                prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(2, 6))]
                prompts[rid] = prompt
                try:
                    out: Any = await fleet.generate(prompt, sp)
                except RolloutError as e:
                    out = e.code.value
                outcomes.setdefault(rid, []).append(out)
                rid += concurrency

        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        return {"prompts": prompts, "outcomes": outcomes, "failovers": fleet.failovers,
                "tokens_carried": fleet.tokens_carried, "stats": fleet.stats()}


def keep_in_flight(endpoints: list[str], concurrency: int, max_new_tokens: int, seed: int, stop: Any,
                   out: Any) -> None:
    out.put(asyncio.run(_keep_in_flight(endpoints, concurrency, max_new_tokens, seed, stop)))
