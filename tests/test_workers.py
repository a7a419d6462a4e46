"""Many rollout-worker processes against one server: nothing lost, nothing duplicated."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

from rollwire.server import RolloutServer, ServerConfig
from tests.workers import count_replies

from .conftest import free_tcp_endpoint


async def test_four_worker_processes_with_50_concurrent_requests_each_get_exactly_one_terminal_reply() -> None:
    endpoint = free_tcp_endpoint()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    cfg = ServerConfig(rollout_endpoint=endpoint, max_batch_size=64)
    async with RolloutServer(cfg):
        procs = [ctx.Process(target=count_replies, args=(endpoint, 50, 8, 1.0, results)) for _ in range(4)]
        for p in procs:
            p.start()
        loop = asyncio.get_running_loop()
        outs = [await loop.run_in_executor(None, results.get, True, 240) for _ in procs]
        for p in procs:
            await loop.run_in_executor(None, p.join, 30)
    for out in outs:
        # each of the 50 request ids got exactly one terminal reply, and it is a finished output
        assert sorted(out["terminal"]) == list(range(1, 51))
        assert set(out["terminal"].values()) == {1}
        assert set(out["kinds"].values()) == {"length"}
    assert all(p.exitcode == 0 for p in procs)
