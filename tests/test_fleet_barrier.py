"""Barrier pushes (strictly on-policy): two `rollwire serve` processes under load; with
``push_weights(barrier=True)`` no server serves a version before every server has loaded it, and a
server whose trainer never releases the barrier resumes by itself at its barrier timeout."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time

from rollwire import RolloutClient, RolloutFleet, SamplingParams
from rollwire.transports.sockets import free_tcp_endpoint
from rollwire.weightsync.publisher import TrainerPublisher
from tests.versioned import check_spans, version_state

SP = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)


def serve(endpoint: str, trainer: str, rid: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "hf",
                             "--model", "tiny", "--rollout-endpoint", endpoint, "--trainer-endpoint", trainer,
                             "--receiver-id", rid, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_under_a_barrier_no_server_serves_a_version_before_every_server_has_it() -> None:
    trainer, eps = free_tcp_endpoint(), [free_tcp_endpoint(), free_tcp_endpoint()]
    procs = [serve(ep, trainer, f"s{i}") for i, ep in enumerate(eps)]
    observed: list[tuple[int, str, int]] = []  # (server, governor state, weight version), in poll order
    stop = asyncio.Event()
    try:
        async with TrainerPublisher(trainer, min_receivers=2, timeout_s=60) as tp, \
                RolloutFleet(eps, health_interval_s=0.5) as fleet, \
                RolloutClient(eps[0]) as a, RolloutClient(eps[1]) as b:
            await fleet.wait_ready(servers=2, timeout=180)

            async def poll() -> None:
                while not stop.is_set():
                    for i, c in enumerate((a, b)):
                        h = await c.health(timeout=10)
                        observed.append((i, h.governor_state, h.weight_version))

            async def load() -> list:
                outs = []
                while not stop.is_set():
                    prompt = [3 + len(outs) % 50, 7, 9]
                    outs.append((prompt, await fleet.generate(prompt, SP)))
                return outs

            poller = asyncio.ensure_future(poll())
            loaders = [asyncio.ensure_future(load()) for _ in range(6)]
            reports = [await tp.push_weights(v, version_state(v), transport="shm", barrier=True) for v in (1, 2, 3)]
            stop.set()
            await poller
            outs = [o for t in loaders for o in await t]
            counters = [(await c.status()).counters for c in (a, b)]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(r.receivers == ["s0", "s1"] for r in reports)
    # each server loaded every version under the barrier and stayed paused until released (a held
    # window lasts milliseconds here, so the poll below may or may not land in one)
    assert [c.get("barrier_holds", 0) for c in counters] == [3, 3], counters
    # one server SERVING version v, then the other polled right after at an older version: a version
    # served before every server had it (the other's version only grows, so it was older then too)
    for (i, state, v), (j, _, w) in itertools.pairwise(observed):
        assert not (i != j and state == "SERVING" and w < v), (i, state, v, j, w)
    assert all(c.get("requests", 0) > 0 for c in counters)
    for prompt, out in outs[::7]:  # every token recomputed with the version its span names
        check_spans(prompt, out)


async def test_a_server_held_at_a_barrier_nobody_releases_resumes_at_its_barrier_timeout() -> None:
    trainer, ep = free_tcp_endpoint(), free_tcp_endpoint()
    proc = serve(ep, trainer, "s0", "--barrier-timeout", "5.0")  # long enough to be seen HELD on a slow machine
    try:
        async with TrainerPublisher(trainer, timeout_s=60) as tp, RolloutClient(ep, timeout=120) as rc:
            await rc.wait_ready(timeout=180)
            tp._release_barrier = _never  # type: ignore[method-assign,assignment]  # fault injection: the release is lost
            await tp.push_weights(1, version_state(1), transport="shm", barrier=True)
            pushed = time.monotonic()
            assert (await rc.health()).governor_state == "HELD"
            held = asyncio.ensure_future(rc.generate([1, 2, 3], SP))  # waits while held
            t0 = time.monotonic()
            while (await rc.health()).governor_state == "HELD":
                assert time.monotonic() - t0 < 30
                await asyncio.sleep(0.05)
            resumed_after = time.monotonic() - pushed
            out = await held
            holds = (await rc.status()).counters.get("barrier_holds", 0)
        # held until its own 5 s timeout (the push returned once it had loaded), then it served v1
        assert 1 < resumed_after < 60, resumed_after
        assert holds == 1
        assert out.weight_version_spans[0].version == 1 and out.finish_reason == "length"  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()


async def _never(*args: object, **kw: object) -> list[str]:
    return []
