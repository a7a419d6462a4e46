"""FleetSession when its server comes back as a new process, or when a server's session table is
full, against real `rollwire serve` processes (found by an adversarial try). Each test says where
every turn ran and what became of the servers: a restarted server is not evicted for it."""

from __future__ import annotations

import subprocess

from rollwire import RolloutClient, RolloutFleet, SamplingParams
from rollwire.transports.sockets import free_tcp_endpoint

from .conftest import kill_all, until
from .test_fleet_edges import serve

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)


async def _session_restart(fixed_session_port: bool, servers: int = 2) -> None:
    """Two servers; the session's server is SIGKILLed between two turns and restarted at the same
    rollout endpoint (and, ``fixed_session_port``, the same session endpoint, as RayLauncher does),
    then re-admitted. The next turn runs (the record replayed on a live server, one move), the
    trajectory is whole, and every server is still admitted."""
    eps = [free_tcp_endpoint() for _ in range(servers)]
    sess = [free_tcp_endpoint() for _ in range(servers)]

    def start(i: int) -> subprocess.Popen[bytes]:
        return serve(eps[i], *(("--session-endpoint", sess[i]) if fixed_session_port else ()))

    procs = [start(i) for i in range(servers)]
    try:
        async with RolloutFleet(eps, liveness_s=2.0, health_interval_s=0.3, health_timeout_s=2.0) as fleet:
            await fleet.wait_ready(servers=servers, timeout=180)
            async with fleet.session(timeout=60) as s:
                first = await s.generate([5, 6, 7], GREEDY)
                i = eps.index(s.endpoint)
                view = fleet.servers[i]
                procs[i].kill()
                procs[i].wait()
                await until(lambda: not view.alive, "the killed server is evicted", 30)
                procs[i] = start(i)
                await until(lambda: view.alive, "the restarted server is re-admitted", 120)
                again = await s.generate([8], GREEDY)
                assert again.finish_reason == "length" and s.moves == 1
                assert s.trajectory().token_ids == [5, 6, 7, *first.output_ids, 8, *again.output_ids]
                assert all(v.alive for v in fleet.servers), fleet.stats()  # the restarted one was not evicted
    finally:
        kill_all(procs)


async def test_a_session_whose_server_restarted_at_fixed_endpoints_replays_instead_of_unknown_session() -> None:
    """Before: the turn raised ``unknown_session`` (the new process never had the session)."""
    await _session_restart(fixed_session_port=True)


async def test_a_session_whose_server_restarted_on_a_new_session_port_moves_without_evicting_it() -> None:
    """Before: the turn moved, but the error of the retired link to the old session port evicted the
    server just re-admitted."""
    await _session_restart(fixed_session_port=False)


async def test_a_one_server_fleets_session_goes_on_on_its_restarted_server() -> None:
    """One server, restarted on a new session port: the record is replayed onto it (before the
    review of the change above, the move excluded the session's own server, so the turn failed
    with "no live server" though the server was live), and leaving the session is quiet."""
    await _session_restart(fixed_session_port=False, servers=1)


async def test_opening_a_session_skips_a_server_whose_session_table_is_full() -> None:
    """Server B allows one session and holds one (opened by another client); server A has room.
    Six fleet sessions open, each on A (before, each that the router sent to B failed with
    ``too_many_sessions``); B stays admitted (full is not gone) and keeps its own session."""
    eps = [free_tcp_endpoint() for _ in range(2)]
    procs = [serve(eps[0]), serve(eps[1], "--max-sessions", "1")]
    try:
        async with RolloutClient(eps[1], timeout=60) as other:
            await other.wait_ready(timeout=180)
            async with other.session() as held:
                async with RolloutFleet(eps, health_interval_s=0.3) as fleet:
                    await fleet.wait_ready(servers=2, timeout=180)
                    for k in range(6):
                        async with fleet.session(timeout=60) as s:
                            assert s.endpoint == eps[0], k
                            assert (await s.generate([3, k], GREEDY)).finish_reason == "length"
                    assert all(v.alive for v in fleet.servers), fleet.stats()
                assert (await held.generate([1, 2], GREEDY)).finish_reason == "length"
    finally:
        kill_all(procs)
