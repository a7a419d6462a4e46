"""RayLauncher on a real local Ray cluster: two CPU `rollwire serve` servers as actors in a placement
group; one loses its server process and one its actor process to SIGKILL, Ray restarts both at their
endpoints, a client generates on each again, a RolloutFleet built from the launcher's endpoints
evicts and re-admits both, and teardown leaves no server process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'rollwire[ray]'")

from rollwire import RolloutClient, SamplingParams  # noqa: E402
from rollwire.fleet import RolloutFleet  # noqa: E402
from rollwire.fleet.ray_launcher import RayLauncher, ServerInfo  # noqa: E402

# Local, quiet, no phoning home; set before ray.init so the raylet and workers inherit them.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True)
        try:
            yield
        finally:
            ray.shutdown()


def _serve_pids(endpoints: list[str]) -> list[int]:
    """Live `rollwire serve` processes bound to any of ``endpoints`` (zombies excluded)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and b"serve" in argv and any(ep.encode() in argv for ep in endpoints):
            pids.append(int(proc.name))
    return pids


async def _restarted(launcher: RayLauncher, timeout: float) -> list[ServerInfo]:
    """Poll the actors until every one is in its second incarnation with a live server."""
    deadline = time.monotonic() + timeout
    while True:
        infos = await asyncio.to_thread(launcher.servers, 5.0)
        if all(s.alive and s.incarnation == 1 for s in infos):
            return infos
        assert time.monotonic() < deadline, f"servers not restarted in {timeout}s: {infos}"
        await asyncio.sleep(0.2)


async def _generate(rc: RolloutClient | RolloutFleet) -> list[int]:
    out = await rc.generate([1, 5, 9], SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))
    assert out.finish_reason == "length"
    return out.output_ids


@pytest.mark.slow
async def test_ray_restarts_a_killed_server_at_its_endpoint_and_shutdown_leaves_no_process(ray_cluster) -> None:  # type: ignore[no-untyped-def]
    launcher = RayLauncher(2, host="127.0.0.1", max_restarts=2, num_cpus=1, log_level="warning")
    endpoints: list[str] = []
    try:
        endpoints = await asyncio.to_thread(launcher.start, 120.0)
        assert len(set(endpoints)) == 2 and all(ep.startswith("tcp://127.0.0.1:") for ep in endpoints)
        first = await asyncio.to_thread(launcher.servers)
        assert [s.incarnation for s in first] == [0, 0] and len(_serve_pids(endpoints)) == 2

        async with RolloutClient(endpoints[0], timeout=60) as rc0, RolloutClient(endpoints[1], timeout=60) as rc1, \
                RolloutFleet(endpoints, liveness_s=2.0, health_interval_s=0.5) as fleet:
            before = [await _generate(rc0), await _generate(rc1)]
            assert before[0] == before[1]  # the same tiny model, greedy
            await fleet.wait_ready(servers=2, timeout=30)

            os.kill(first[0].pid, signal.SIGKILL)  # type: ignore[arg-type]  # server 0's `rollwire serve`
            os.kill(first[1].actor_pid, signal.SIGKILL)  # type: ignore[arg-type]  # server 1's Ray worker
            again = await _restarted(launcher, 60.0)
            assert [s.endpoint for s in again] == endpoints  # same endpoints: a fleet client re-admits them
            assert again[0].last_exit == -signal.SIGKILL  # the actor saw its server's exit status
            assert {s.pid for s in again}.isdisjoint({s.pid for s in first})
            assert first[1].pid not in _serve_pids(endpoints)  # died with its actor's process (pdeathsig)

            for rc in (rc0, rc1):  # the clients that were connected before reach the restarted servers
                await rc.wait_ready(timeout=60)
            assert [await _generate(rc0), await _generate(rc1)] == before
            await fleet.wait_ready(servers=2, timeout=30)  # evicted while down, re-admitted at the fleet's version
            assert all(s.evictions == 1 for s in fleet.servers), fleet.stats()
            assert (await _generate(fleet)) == before[0]
    finally:
        statuses = await asyncio.to_thread(launcher.shutdown, 20.0)
    assert statuses == [0, 0]  # SIGTERM: each server stopped cleanly
    deadline = time.monotonic() + 10
    while (left := _serve_pids(endpoints)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert left == [], f"rollwire serve processes left after shutdown: {left}"


def test_a_launcher_refuses_to_bind_the_node_ip_without_keys_or_insecure_and_picks_endpoints_itself() -> None:
    with pytest.raises(ValueError, match="without CURVE keys"):
        RayLauncher(2)
    with pytest.raises(ValueError, match="curve="):
        RayLauncher(2, serve_args=["--secret-key", "keys/server.key_secret"])
    with pytest.raises(ValueError, match="--rollout-endpoint"):
        RayLauncher(2, host="127.0.0.1", serve_args=["--rollout-endpoint=tcp://127.0.0.1:7500"])
    assert RayLauncher(1, insecure=True).serve_argv[-1] == "--insecure"


@pytest.mark.slow
async def test_a_server_that_fails_its_first_start_is_not_restarted_and_start_raises_with_its_status(  # type: ignore[no-untyped-def]
        ray_cluster, tmp_path) -> None:
    launcher = RayLauncher(1, host="127.0.0.1", model=str(tmp_path / "no-such-checkpoint"), log_level="error")
    # a checkpoint that is not there is the user's error: `rollwire serve` says so in one line, status 2
    with pytest.raises(RuntimeError, match="exited with status 2 before it was ready"):
        await asyncio.to_thread(launcher.start, 60.0)
    assert launcher.shutdown() == []  # start tore it down already
