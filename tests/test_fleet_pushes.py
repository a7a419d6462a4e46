"""Four `rollwire serve` processes, four rollout-worker processes on RolloutFleet, a trainer pushing
a version every step to all of them; one server is SIGKILLed mid-run, then restarted.

Version v is the tiny model built with seed v, so every output is recomputed span by span: a token
continued on another server, or made by a half-loaded or wrong version, would not match."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import random
import signal
import subprocess
import sys

from rollwire import GenerateDone, RolloutFleet
from rollwire.transports.sockets import free_tcp_endpoint
from rollwire.weightsync.publisher import TrainerPublisher
from tests.fleet_workers import keep_in_flight
from tests.versioned import check_spans, version_state

from .conftest import until

SERVERS, WORKERS, CONCURRENCY, PUSHES, KILL_AFTER = 4, 4, 4, 6, 3


def serve(endpoint: str, trainer: str, receiver_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "hf",
                             "--model", "tiny", "--rollout-endpoint", endpoint, "--trainer-endpoint", trainer,
                             "--receiver-id", receiver_id, "--pause-policy", "retract"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_a_fleet_under_pushes_loses_nothing_when_a_server_dies_and_the_restarted_one_rejoins() -> None:
    trainer = free_tcp_endpoint()
    eps = [free_tcp_endpoint() for _ in range(SERVERS)]
    ids = [f"server-{i}" for i in range(SERVERS)]
    procs = [serve(ep, trainer, rid) for ep, rid in zip(eps, ids, strict=True)]
    states = {v: version_state(v) for v in range(1, PUSHES + 1)}
    ctx = mp.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    loop = asyncio.get_running_loop()
    workers = []
    try:
        async with TrainerPublisher(trainer, min_receivers=SERVERS, lost_after_s=6.0, timeout_s=60) as tp, \
                RolloutFleet(eps, health_interval_s=0.5) as fleet:
            await fleet.wait_ready(servers=SERVERS, timeout=180)
            workers = [ctx.Process(target=keep_in_flight, args=(eps, CONCURRENCY, 48, seed, stop, results))
                       for seed in range(WORKERS)]
            for w in workers:
                w.start()
            await until(lambda: len(tp.receivers) == SERVERS, "every server registered", timeout=180)
            reports = []
            for v in range(1, PUSHES + 1):
                if v == KILL_AFTER + 1:
                    victim = fleet.servers[0].client
                    async with asyncio.timeout(120):  # the workers' requests generating on it
                        while (await victim.status()).counters.get("samples_in_flight", 0) < 2:
                            await asyncio.sleep(0.02)
                    procs[0].send_signal(signal.SIGKILL)
                reports.append(await tp.push_weights(v, states[v], transport="shm", require_all=False))
                tp.min_receivers = len(reports[-1].receivers)
            # the push during the kill names the dead server (lost: no beacon acknowledged); the next
            # pushes went to the three left
            assert all(r.receivers == ids and not r.failed for r in reports[:KILL_AFTER]), reports[:KILL_AFTER]
            during = reports[KILL_AFTER]
            assert during.receivers == ids[1:] and list(during.failed) == ["server-0"], during
            assert "lost" in during.failed["server-0"], during.failed
            assert all(r.receivers == ids[1:] and not r.failed for r in reports[KILL_AFTER + 1:]), reports
            assert all(r.bytes_sent == 0 for r in reports)  # shm: one arena for the host, nothing on the socket
            # restarted: it registers, takes the next version, and the fleet admits it again
            procs[0] = serve(eps[0], trainer, ids[0])
            tp.min_receivers = SERVERS
            await until(lambda: "server-0" in tp.receivers and tp.receivers["server-0"].joined, "server-0 back",
                        timeout=180)
            last = await tp.push_weights(PUSHES + 1, version_state(PUSHES + 1), transport="shm", require_all=False)
            assert last.receivers == ids, last
            await until(lambda: fleet.servers[0].alive and fleet.servers[0].version == PUSHES + 1,
                        "the fleet re-admitted server-0", timeout=180)
            # the same fan-out as one broadcast group (trainer rank 0 + the 4 receivers; gloo here,
            # nccl on GPUs through the same code)
            group = await tp.push_weights(PUSHES + 2, version_state(PUSHES + 2), transport="gloo", require_all=False)
            assert group.receivers == ids and not group.failed, group
            stop.set()
            outs = [await loop.run_in_executor(None, results.get, True, 240) for _ in workers]
    finally:
        stop.set()
        for w in workers:
            w.join(30)
        for p in procs:
            p.kill()
            p.wait()
    moved = sum(o["failovers"] for o in outs)
    print(f"fleet under pushes: {sum(len(o['outcomes']) for o in outs)} requests, {moved} samples moved "
          f"({sum(o['tokens_carried'] for o in outs)} tokens carried over)")
    assert moved > 0  # the kill hit requests in flight, and they went on elsewhere
    rng = random.Random(0)
    checked = 0
    for out in outs:
        for rid, got in out["outcomes"].items():
            assert len(got) == 1, (rid, got)  # exactly one outcome per request
            done = got[0]
            assert isinstance(done, GenerateDone) and done.finish_reason == "length", (rid, done)
            spans = done.weight_version_spans
            assert spans[0].start == 0 and spans[-1].end == len(done.output_ids) == 48, spans
            assert all(a.end == b.start for a, b in itertools.pairwise(spans))
            if len(spans) > 1 or rng.random() < 0.05:  # recomputed token by token, version by version
                check_spans(out["prompts"][rid], done)
                checked += 1
    assert checked > 0
