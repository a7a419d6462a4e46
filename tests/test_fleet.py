"""RolloutFleet against real `rollwire serve` processes on localhost: routing, eviction, failover
of in-flight requests when a server is SIGKILLed, and re-admission of the restarted server."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from rollwire import GenerateDone, RolloutClient, RolloutFleet, SamplingParams
from rollwire.fleet.routing import SERVER_GONE, Router, ServerView
from rollwire.messages import GenerateChunk, RollwireError
from rollwire.transports.sockets import free_tcp_endpoint

from .conftest import kill_all, until

GREEDY = SamplingParams(max_new_tokens=160, temperature=0.0, ignore_eos=True)


def serve(endpoint: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "hf",
                             "--model", "tiny", "--rollout-endpoint", endpoint],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def fleet_servers() -> Iterator[tuple[list[str], list[subprocess.Popen[bytes]]]]:
    """Three serve processes for the module (starting them is most of these tests' time)."""
    eps = [free_tcp_endpoint() for _ in range(3)]
    procs = [serve(ep) for ep in eps]
    try:
        yield eps, procs
    finally:
        kill_all(procs)


@pytest.fixture
def servers(fleet_servers: tuple[list[str], list[subprocess.Popen[bytes]]],
            ) -> tuple[list[str], list[subprocess.Popen[bytes]]]:
    """The module's servers, any that an earlier test killed started again (same endpoint)."""
    eps, procs = fleet_servers
    for i, p in enumerate(procs):
        if p.poll() is not None:
            procs[i] = serve(eps[i])
        else:
            p.send_signal(signal.SIGCONT)  # never left stopped
    return eps, procs


def check_spans(out: GenerateDone) -> None:
    """Spans are contiguous from 0 and cover every token."""
    assert out.weight_version_spans and out.weight_version_spans[0].start == 0, out.weight_version_spans
    for a, b in zip(out.weight_version_spans, out.weight_version_spans[1:], strict=False):
        assert a.end == b.start, out.weight_version_spans
    assert out.weight_version_spans[-1].end == len(out.output_ids)


async def test_requests_on_a_killed_server_continue_elsewhere_and_the_restarted_server_rejoins(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    eps, procs = servers
    prompts = [[3 + i % 11, 7, 11 + i] for i in range(18)]
    async with RolloutFleet(eps, liveness_s=2.0, health_interval_s=0.5, health_timeout_s=10.0) as fleet:
        await fleet.wait_ready(servers=3, timeout=180)
        # the reference: each prompt's greedy output on one server, uninterrupted
        ref = await asyncio.gather(*(fleet.generate(p, GREEDY) for p in prompts))
        victim = fleet.servers[0]
        before = victim.tokens
        running = [asyncio.ensure_future(fleet.generate(p, GREEDY, return_logprob=True)) for p in prompts]
        await until(lambda: victim.in_flight >= 3 and victim.tokens - before >= 40 * victim.in_flight,
                    "requests generating on the victim", timeout=120)
        on_victim = victim.in_flight
        procs[0].send_signal(signal.SIGKILL)
        outs = await asyncio.wait_for(asyncio.gather(*running), 240)
        # every request: exactly one result, complete, its spans cover every token
        assert len(outs) == len(prompts)
        for out in outs:
            assert isinstance(out, GenerateDone) and out.finish_reason == "length", out
            assert len(out.output_ids) == GREEDY.max_new_tokens
            assert len(out.output_logprobs or []) == len(out.output_ids)
            assert out.usage.prompt_tokens == 3
            check_spans(out)
        # continued from prompt + the tokens it had: the same greedy tokens as uninterrupted
        for out, want in zip(outs, ref, strict=True):
            assert out.output_ids == want.output_ids  # type: ignore[union-attr]
        # (a reply already on its way when the server died completes normally: at most on_victim move)
        assert not victim.alive and victim.evictions == 1 and 1 <= victim.failures <= on_victim, fleet.stats()
        assert fleet.failovers == victim.failures
        assert fleet.tokens_carried > 0  # they went on from their tokens, not from scratch
        print(f"fleet: {on_victim} requests moved off the killed server; stats {fleet.stats()}")
        # restarted at the same endpoint: admitted again (it serves the fleet's version, 0)
        procs[0] = serve(eps[0])
        await until(lambda: victim.alive, "the restarted server re-admitted", timeout=180)
        again = await fleet.generate(prompts[0], GREEDY)
        assert again.output_ids == ref[0].output_ids  # type: ignore[union-attr]


async def test_requests_on_a_server_stopped_by_sigterm_continue_elsewhere(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    """A clean stop (SIGTERM, as the Ray launcher stops a server) cuts its requests with
    shutting_down, so the fleet continues them elsewhere (before: they came back as Dones with
    "abort" and a part of their tokens, and the fleet passed them on as results)."""
    eps, procs = servers
    prompts = [[5 + i, 9, 2] for i in range(6)]
    async with RolloutFleet(eps, liveness_s=2.0, health_interval_s=0.5, health_timeout_s=10.0) as fleet:
        await fleet.wait_ready(servers=3, timeout=180)
        ref = await asyncio.gather(*(fleet.generate(p, GREEDY) for p in prompts))
        victim = fleet.servers[1]
        before = victim.tokens
        running = [asyncio.ensure_future(fleet.generate(p, GREEDY)) for p in prompts]
        await until(lambda: victim.in_flight >= 1 and victim.tokens - before >= 20 * victim.in_flight,
                    "requests generating on the victim", timeout=120)
        procs[1].send_signal(signal.SIGTERM)
        outs = await asyncio.wait_for(asyncio.gather(*running), 240)
        for out, want in zip(outs, ref, strict=True):  # each: one complete result, the uninterrupted tokens
            assert isinstance(out, GenerateDone) and out.finish_reason == "length", out
            assert out.output_ids == want.output_ids  # type: ignore[union-attr]
            check_spans(out)
        assert not victim.alive and victim.failures >= 1 and fleet.tokens_carried > 0, fleet.stats()
        assert procs[1].wait(timeout=60) == 0  # it stopped cleanly


async def test_a_request_fails_typed_when_no_server_is_left() -> None:
    ep = free_tcp_endpoint()
    proc = serve(ep)
    try:
        async with RolloutFleet([ep], liveness_s=2.0, health_interval_s=0.5) as fleet:
            await fleet.wait_ready(timeout=180)
            running = asyncio.ensure_future(fleet.generate([1, 2, 3], SamplingParams(max_new_tokens=4000,
                                                                                  ignore_eos=True)))
            await until(lambda: fleet.servers[0].in_flight == 1, "the request running", timeout=120)
            proc.send_signal(signal.SIGKILL)
            with pytest.raises(Exception) as err:
                await asyncio.wait_for(running, 60)
            assert getattr(err.value, "code", None) is not None and err.value.code.value == "server_unavailable"
    finally:
        proc.kill()
        proc.wait()


def test_power_of_two_choices_spreads_a_burst_and_the_prefix_policy_holds_only_under_its_load_gate() -> None:
    views = [ServerView(f"s{i}", RolloutClient(f"tcp://127.0.0.1:{9000 + i}"), alive=True) for i in range(4)]
    router = Router(views)
    for _ in range(400):  # a burst: each choice adds one in flight
        router.choose([1, 2, 3]).in_flight += 1  # type: ignore[union-attr]
    loads = [v.in_flight for v in views]
    assert max(loads) - min(loads) <= 12, loads  # p2c: within a few of each other, never all on one
    sticky = Router(views, "prefix", prefix_tokens=2)
    owner = sticky.choose([5, 6, 99])
    assert all(sticky.choose([5, 6, i]) is owner for i in range(20))  # same prefix, same server
    assert owner is not None
    owner.in_flight += 200  # far above the gate: the prefix yields to the load
    assert sticky.choose([5, 6, 7]) is not owner
    views[1].alive = False
    assert all(router.choose([1]) is not views[1] for _ in range(50))  # evicted: never chosen


async def test_a_session_whose_server_dies_moves_by_replaying_its_history_and_its_trajectory_goes_on(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    eps, procs = servers
    turn = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)

    async def episode(fleet: RolloutFleet, kill: bool) -> tuple[list[int], list[int], list[float], int]:
        async with fleet.session(max_tokens=1024) as s:
            await s.generate([5, 6, 7], turn)
            await s.append([9, 9])
            await s.generate([], turn)
            if kill:  # then the turn is streamed: it moves before its first chunk, like any call
                procs[eps.index(s.endpoint)].send_signal(signal.SIGKILL)
                items = [m async for m in s.stream([4], turn)]
                assert [t for c in items[:-1] for t in c.token_ids] == list(items[-1].output_ids)
            else:
                await s.generate([4], turn)  # on another server after a replay, if its own died
            t = s.trajectory()
            return t.token_ids, t.loss_mask, t.logprobs, s.moves

    async with RolloutFleet(eps, liveness_s=2.0, health_interval_s=0.5) as fleet:
        await fleet.wait_ready(servers=3, timeout=180)
        want_ids, want_mask, want_lps, _ = await episode(fleet, kill=False)
        ids, mask, lps, moves = await episode(fleet, kill=True)
    assert moves == 1
    assert ids == want_ids and mask == want_mask  # the same greedy turns, roles and mask as uninterrupted
    assert len(ids) == 3 + 24 + 2 + 24 + 1 + 24 and sum(mask) == 72
    assert all(abs(a - b) < 1e-3 for a, b in zip(lps, want_lps, strict=True))


async def test_a_streamed_session_turn_whose_server_stops_mid_stream_ends_typed_and_the_session_moves_intact(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    """The session's server is SIGSTOPped once the turn's first chunk arrived: the stream ends with a
    typed server-gone error within the liveness bound (the chunks already sent came first), the turn
    is not recorded, and the next turn moves the session, its history replayed, to a live server."""
    eps, procs = servers
    turn = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    long = SamplingParams(max_new_tokens=3000, temperature=0.0, ignore_eos=True)
    async with RolloutFleet(eps, liveness_s=1.0, health_interval_s=0.25) as fleet:
        await fleet.wait_ready(servers=3, timeout=180)
        async with fleet.session(max_tokens=4096) as s:
            await s.generate([5, 6, 7], turn)
            before = s.trajectory().token_ids
            victim = procs[eps.index(s.endpoint)]
            chunks = 0
            with pytest.raises(RollwireError) as err:
                async for m in s.stream([4], long, timeout=60):
                    assert isinstance(m, GenerateChunk)  # never the Done: the server stops first
                    chunks += 1
                    if chunks == 1:
                        victim.send_signal(signal.SIGSTOP)
            assert err.value.code in SERVER_GONE, err.value
            assert chunks >= 1 and s.trajectory().token_ids == before  # the cut turn is not recorded
            done = await s.generate([4], turn)
            assert s.moves == 1 and len(done.output_ids) == 24
            assert s.trajectory().token_ids == [*before, 4, *done.output_ids]
    victim.send_signal(signal.SIGCONT)


async def test_a_stream_with_chunk_tokens_sends_chunks_of_that_many_tokens_and_refuses_a_bad_value() -> None:
    from rollwire import RolloutError
    from rollwire.server import RolloutServer, ServerConfig

    ep = free_tcp_endpoint()
    sp = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    async with RolloutServer(ServerConfig(rollout_endpoint=ep)), RolloutClient(ep, timeout=60) as rc:
        msgs = [m async for m in rc.stream([3, 7, 11], sp, return_logprob=True, chunk_tokens=8)]
        chunks, done = msgs[:-1], msgs[-1]
        assert [len(c.token_ids) for c in chunks] == [8, 8, 4]  # type: ignore[union-attr]
        assert isinstance(done, GenerateDone)
        assert [t for c in chunks for t in c.token_ids] == done.output_ids  # type: ignore[union-attr]
        assert [x for c in chunks for x in c.logprobs] == done.output_logprobs  # type: ignore[union-attr]
        for bad in (0, 21):
            with pytest.raises(RolloutError) as err:
                _ = [m async for m in rc.stream([3], sp, chunk_tokens=bad)]
            assert err.value.code.value == "bad_field"


async def test_with_one_server_made_slow_the_others_take_the_load(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    """The slow server is SIGSTOPped 80% of every 250 ms (alive: it answers within the liveness
    bound). Power of two choices on the client's in-flight counts sends it less, and no server ever
    holds more than twice its fair share (concurrency / servers) of the requests in flight."""
    eps, procs = servers
    concurrency, sp = 24, SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    async with RolloutFleet(eps, health_interval_s=0.5, health_timeout_s=5.0) as fleet:
        await fleet.wait_ready(servers=3, timeout=180)
        slow, stop = fleet.servers[0], asyncio.Event()
        peak = dict.fromkeys(eps, 0)

        async def throttle() -> None:
            while not stop.is_set():
                procs[0].send_signal(signal.SIGSTOP)
                await asyncio.sleep(0.2)
                procs[0].send_signal(signal.SIGCONT)
                await asyncio.sleep(0.05)

        async def sample() -> None:
            while not stop.is_set():
                for s in fleet.servers:
                    peak[s.endpoint] = max(peak[s.endpoint], s.in_flight)
                await asyncio.sleep(0.01)

        async def worker(i: int) -> int:
            done = 0
            while not stop.is_set():
                await fleet.generate([3 + i, 5, 7 + done % 9], sp)
                done += 1
            return done

        bg = [asyncio.ensure_future(throttle()), asyncio.ensure_future(sample())]
        work = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
        await until(lambda: sum(s.routed for s in fleet.servers) >= 300, "300 requests routed", timeout=240)
        stop.set()
        finished = sum(await asyncio.gather(*work))
        await asyncio.gather(*bg)
        procs[0].send_signal(signal.SIGCONT)
    fast = [s.routed for s in fleet.servers[1:]]
    print(f"slow server: {slow.routed} requests, fast ones {fast}; peak in flight {peak}; {finished} finished")
    assert slow.alive and slow.evictions == 0  # slow, not dead
    assert slow.routed < 0.5 * min(fast), (slow.routed, fast)
    assert max(peak.values()) <= 2 * concurrency // len(eps), peak


async def test_sessions_work_again_on_a_server_restarted_at_its_endpoint(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    """A restarted server binds a fresh session port. Before, clients kept the old port for ever:
    plain requests worked again but every session failed server_unavailable, and a fleet kept
    choosing the server for sessions. Now a plain client's next session opens on the new port, and
    once the fleet re-admits the server, sessions opened there work."""
    eps, procs = servers
    turn = SamplingParams(max_new_tokens=4, temperature=0.0)
    async with RolloutClient(eps[0], liveness_s=1.0) as rc, \
            RolloutFleet([eps[0]], liveness_s=1.0, health_interval_s=0.2) as fleet:
        await fleet.wait_ready(servers=1, timeout=180)
        for open_session in (rc.session, fleet.session):  # each learns the session port
            async with open_session() as s:
                assert (await s.generate([1, 2], turn)).finish_reason == "length"
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        procs[0] = serve(eps[0])
        await rc.wait_ready(timeout=120)
        async with rc.session() as s:
            assert (await s.generate([1, 2], turn)).finish_reason == "length"
        restarted = fleet.servers[0]
        await until(lambda: restarted.alive, "the restarted server re-admitted", 120)
        for _ in range(3):
            async with fleet.session() as fs:
                assert (await fs.generate([3, 4], turn)).finish_reason == "length"


async def test_a_session_opened_on_a_server_just_killed_opens_on_another(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    """The fleet has not noticed the kill yet (health every 30 s): an open that lands on the dead
    server evicts it and opens on a live one (before, it failed server_unavailable)."""
    eps, procs = servers
    turn = SamplingParams(max_new_tokens=4, temperature=0.0)
    async with RolloutFleet(eps, liveness_s=1.0, health_interval_s=30.0) as fleet:
        await fleet.wait_ready(servers=3, timeout=180)
        procs[1].send_signal(signal.SIGKILL)
        dead = next(v for v in fleet.servers if v.endpoint == eps[1])
        for _ in range(20):  # until an open has tried the dead server (two choices: soon)
            async with fleet.session() as fs:
                assert fs.endpoint != eps[1]
                assert (await fs.generate([3, 4], turn)).finish_reason == "length"
            if not dead.alive:
                break
        assert not dead.alive and "session open failed" in dead.why_out


async def test_a_move_whose_target_is_stopped_goes_on_to_the_next_server(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    """The session's server is killed and one of the two others stopped (SIGSTOP), both unnoticed
    by health: the turn moves, and if the replay lands on the stopped server, that server is
    evicted and the move goes on to the third (before, the turn failed server_unavailable)."""
    eps, procs = servers
    turn = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    async with RolloutFleet(eps, liveness_s=1.0, health_interval_s=30.0) as fleet:
        await fleet.wait_ready(servers=3, timeout=180)
        async with fleet.session(max_tokens=1024) as s:
            await s.generate([5, 6, 7], turn)
            home = eps.index(s.endpoint)
            stopped = (home + 1) % 3
            procs[home].send_signal(signal.SIGKILL)
            procs[stopped].send_signal(signal.SIGSTOP)
            try:
                done = await s.generate([8], turn)
            finally:
                procs[stopped].send_signal(signal.SIGCONT)
            assert done.finish_reason == "length" and s.endpoint == eps[(home + 2) % 3]
            t = s.trajectory()
            assert len(t.token_ids) == 3 + 8 + 1 + 8 and sum(t.loss_mask) == 16


async def test_the_bodys_own_error_comes_out_of_a_session_whose_server_died(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    eps, procs = servers
    async with RolloutFleet(eps, liveness_s=1.0, health_interval_s=0.2) as fleet:
        await fleet.wait_ready(servers=3, timeout=180)
        with pytest.raises(ValueError, match="the agent's own bug"):
            async with fleet.session() as s:
                await s.generate([1, 2], SamplingParams(max_new_tokens=2))
                procs[eps.index(s.endpoint)].send_signal(signal.SIGKILL)
                raise ValueError("the agent's own bug")


async def test_a_fleet_session_turn_that_times_out_keeps_its_partial_output_like_a_plain_session(
        servers: tuple[list[str], list[subprocess.Popen[bytes]]]) -> None:
    """``timeout`` on a FleetSession turn: the turn is aborted and its partial output kept in the
    history, as on a plain Session (an outer timer once cancelled it first and left the session
    desynced), and the session goes on."""
    eps, _ = servers
    async with RolloutFleet(eps, liveness_s=2.0, health_interval_s=0.5) as fleet:
        await fleet.wait_ready(servers=1, timeout=180)
        async with fleet.session(max_tokens=4096) as s:
            with pytest.raises(RollwireError) as err:
                await s.generate([1, 2, 3], SamplingParams(max_new_tokens=3000, temperature=0.0, ignore_eos=True),
                                 timeout=1.0)
            assert err.value.code.value == "timeout"
            kept = len(s.trajectory().token_ids)  # readable: the record is in sync
            assert 3 < kept < 3 + 3000
            done = await s.generate([4], SamplingParams(max_new_tokens=2, temperature=0.0))
            assert done.finish_reason == "length" and len(s.trajectory().token_ids) == kept + 1 + 2
