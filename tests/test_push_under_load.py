"""20 weight pushes while 4 rollout-worker processes keep 32 requests in flight.

Version v is the tiny model built with seed v, so every output can be recomputed span by span:
a token from a half-loaded or wrong version would not match its span's greedy continuation.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import random

from rollwire.messages import GenerateDone
from rollwire.server import RolloutServer, ServerConfig
from rollwire.weightsync.publisher import TrainerPublisher
from tests.versioned import check_spans, version_state
from tests.workers import keep_in_flight

from .conftest import free_tcp_endpoint, until

PUSHES = 20
WORKERS, CONCURRENCY = 4, 8


async def test_twenty_pushes_under_load_lose_nothing_and_every_token_matches_its_version() -> None:
    rollout_ep, trainer_ep = free_tcp_endpoint(), free_tcp_endpoint()
    states = {v: version_state(v) for v in range(1, PUSHES + 1)}
    ctx = mp.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    cfg = ServerConfig(rollout_endpoint=rollout_ep, trainer_endpoint=trainer_ep, pause_policy="retract")
    loop = asyncio.get_running_loop()
    async with RolloutServer(cfg) as srv, TrainerPublisher(trainer_ep) as tp:
        procs = [ctx.Process(target=keep_in_flight, args=(rollout_ep, CONCURRENCY, 24, seed, stop, results))
                 for seed in range(WORKERS)]
        for p in procs:
            p.start()

        async def more_requests(n: int) -> None:
            """Until the workers have sent ``n`` more requests (each follows one that finished)."""
            target = srv.generation.counters.get("requests") + n
            await until(lambda: srv.generation.counters.get("requests") >= target)

        await until(lambda: len(srv.generation.in_flight) == WORKERS * CONCURRENCY)  # workers up and generating
        for v in range(1, PUSHES + 1):
            report = await tp.push_weights(version=v, tensors=states[v], transport="inline" if v % 2 else "shm")
            assert report.version == v and report.receivers
            await more_requests(WORKERS)  # requests finish (and start) under version v
        await more_requests(WORKERS * CONCURRENCY)  # a full turnover under the last version
        stop.set()
        outs = [await loop.run_in_executor(None, results.get, True, 180) for _ in procs]
        for p in procs:
            await loop.run_in_executor(None, p.join, 30)
        assert srv.generation.weight_version == PUSHES
    checked = multi_span = 0
    rng = random.Random(0)
    for out in outs:
        assert set(out["terminal"].values()) == {1}, "a request got more than one terminal reply"
        assert sorted(out["terminal"]) == sorted(out["prompts"]), "a request got no terminal reply"
        for rid, done in out["done"].items():
            assert isinstance(done, GenerateDone) and done.finish_reason == "length", done
            spans = done.weight_version_spans
            versions = [s.version for s in spans]
            assert versions == sorted(versions) and set(versions) <= set(range(PUSHES + 1))
            # every output: its spans cover its tokens, back to back, none empty
            assert spans[0].start == 0 and spans[-1].end == len(done.output_ids), spans
            assert all(a.end == b.start for a, b in itertools.pairwise(spans)) and all(x.end > x.start for x in spans)
            # recomputed token by token: multi-version outputs first (up to 150), and a sample of the rest
            if (len(versions) > 1 and multi_span < 150) or rng.random() < 0.02:
                check_spans(out["prompts"][rid], done)
                checked += 1
                multi_span += len(versions) > 1
    assert multi_span > 0  # retracts happened and were verified
    assert checked > 0
