"""RolloutFleet at its edges, against real `rollwire serve` processes: every server full, one
sample of a moved request refused, and the fleet closed with requests running. Each test says what
became of every request it started, on the client and on the servers."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from rollwire import GenerateDone, RolloutClient, RolloutFleet, SamplingParams
from rollwire.clients.session import SessionDesynced
from rollwire.messages import ErrorCode, RollwireError
from rollwire.transports.sockets import free_tcp_endpoint
from rollwire.weightsync.publisher import TrainerPublisher
from tests.versioned import version_state

from .conftest import kill_all, until

LONG = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)


def serve(endpoint: str, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "hf",
                             "--model", "tiny", "--rollout-endpoint", endpoint, *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def two_servers(request: pytest.FixtureRequest) -> Iterator[tuple[list[str], list[subprocess.Popen[bytes]]]]:
    """Two servers; ``request.param``: each one's extra flags."""
    eps = [free_tcp_endpoint() for _ in range(2)]
    procs = [serve(ep, *flags) for ep, flags in zip(eps, request.param, strict=True)]
    try:
        yield eps, procs
    finally:
        kill_all(procs)


async def samples_running(endpoint: str) -> float:
    async with RolloutClient(endpoint, timeout=30) as rc:
        return (await rc.status()).counters.get("samples_in_flight", 0)


@pytest.mark.parametrize("two_servers", [(("--max-in-flight", "2", "--retry-after", "0.7"),) * 2], indirect=True)
async def test_with_every_server_full_a_request_gets_overloaded_and_its_retry_hint(two_servers) -> None:  # type: ignore[no-untyped-def]
    """4 long requests fill both servers (2 each): a fifth is refused overloaded by one, then by the
    other, and its caller gets that (with the servers' retry hint), not "no live server" (both are
    alive). The 4 are then aborted and each ends with "abort"."""
    eps, _ = two_servers
    async with RolloutFleet(eps, health_interval_s=0.3) as fleet:
        await fleet.wait_ready(servers=2, timeout=180)
        running = []
        for i in range(4):  # one after the other: each is counted (and generating) before the next is routed
            running.append(fleet.stream([7, i, 3], LONG))
            assert not isinstance(await running[-1].__anext__(), GenerateDone)
        with pytest.raises(RollwireError) as err:
            await fleet.generate([9, 9, 9], SamplingParams(max_new_tokens=4))
        assert err.value.code == ErrorCode.OVERLOADED and err.value.retry_after_s == pytest.approx(0.7), err.value
        assert all(s.alive for s in fleet.servers), fleet.stats()  # full is not gone
        for s in running:
            await s.abort()
        reasons = []
        for s in running:
            reasons.append([m.finish_reason async for m in s if isinstance(m, GenerateDone)])
        assert reasons == [["abort"]] * 4


@pytest.mark.parametrize("two_servers", [((), ("--max-client-in-flight", "2"))], indirect=True)
async def test_when_one_sample_of_a_moved_request_is_refused_its_other_samples_stop_too(two_servers) -> None:  # type: ignore[no-untyped-def]
    """n=3 on the first server, which is then SIGKILLed: the 3 samples move to the second, which
    takes 2 from this client and refuses the third (client_limit). No server is left for it, so the
    request ends with client_limit, and the 2 samples admitted are aborted there (before, they ran
    on as orphans for their 4000 tokens)."""
    eps, procs = two_servers
    async with RolloutFleet(eps, liveness_s=2.0, health_interval_s=0.3) as fleet:
        await fleet.wait_ready(servers=2, timeout=180)
        first, second = fleet.servers
        second.alive = False  # the request must start on the first server (the health loop re-admits the second)
        request = asyncio.ensure_future(fleet.generate([5, 6, 7], msgspec_n(3)))
        await until(lambda: first.in_flight == 3 and first.tokens >= 3, "the 3 samples generating on the first")
        await until(lambda: second.alive, "the second server admitted again")
        procs[0].send_signal(signal.SIGKILL)
        with pytest.raises(RollwireError) as err:
            await asyncio.wait_for(request, 120)
        assert err.value.code == ErrorCode.CLIENT_LIMIT, err.value
        assert second.in_flight == 0
        async with asyncio.timeout(60):  # the 2 admitted samples were aborted on the second server
            while await samples_running(eps[1]) > 0:
                await asyncio.sleep(0.05)


def msgspec_n(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=4000, temperature=1.0, ignore_eos=True, n=n)


@pytest.mark.parametrize("two_servers", [((), ())], indirect=True)
async def test_closing_the_fleet_with_requests_running_moves_none_and_aborts_them_on_their_servers(two_servers) -> None:  # type: ignore[no-untyped-def]
    """Before: close() marked the servers gone one by one, so running requests failed over to the
    server not yet closed and kept running there, and callers got "no live server"."""
    eps, _ = two_servers
    fleet = RolloutFleet(eps, health_interval_s=0.3)
    await fleet.start()
    try:
        await fleet.wait_ready(servers=2, timeout=180)
        running = [asyncio.ensure_future(fleet.generate([4, i, 8], LONG)) for i in range(4)]
        await until(lambda: all(s.in_flight >= 1 and s.tokens >= 4 for s in fleet.servers), "both servers generating")
    finally:
        await fleet.close()
    ends = await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 60)
    for e in ends:  # each ended here: aborted, or shutting_down as its client closed; none moved
        ok = (isinstance(e, GenerateDone) and e.finish_reason == "abort") or (
            isinstance(e, RollwireError) and e.code == ErrorCode.SHUTTING_DOWN)
        assert ok, ends
    assert fleet.failovers == 0 and all(s.failures == 0 for s in fleet.servers), fleet.stats()
    aborts = 0
    for ep in eps:
        async with asyncio.timeout(60):  # nothing of them runs on the servers
            while await samples_running(ep) > 0:
                await asyncio.sleep(0.05)
        async with RolloutClient(ep, timeout=30) as rc:
            aborts += int((await rc.status()).counters.get("abort_requests", 0))
    assert aborts == 4  # one abort each: the clients' close does not send the fleet's again


async def test_a_server_behind_the_fleets_version_is_kept_out_and_one_left_behind_is_evicted() -> None:
    """Server "a" gets no pushes; "b" is pushed version 1 (the tiny model's seed-1 weights). A
    fleet made then never admits "a" (five fresh fleets: before, "a" could be admitted when its first
    health answer came before "b"'s, and served version 0 to half the requests). A fleet made
    before the push admits both; once "b" is at version 1, "a" is evicted after ``max_lag_s``, and
    every request after that runs on version 1."""
    trainer = free_tcp_endpoint()
    a, b = free_tcp_endpoint(), free_tcp_endpoint()
    procs = [serve(a), serve(b, "--trainer-endpoint", trainer, "--receiver-id", "b")]
    try:
        async with TrainerPublisher(trainer, timeout_s=120) as tp:
            async with RolloutFleet([a, b], health_interval_s=0.2, max_lag_s=1.0) as early:
                await early.wait_ready(servers=2, timeout=180)
                await until(lambda: "b" in tp.receivers and tp.receivers["b"].joined, "b joined the trainer")
                await tp.push_weights(1, version_state(1))
                await until(lambda: not early.servers[0].alive, "a, left behind, evicted", timeout=30)
                assert "the fleet has been at 1" in early.servers[0].why_out, early.stats()
                outs = await asyncio.gather(*(early.generate([3, i, 5], SamplingParams(max_new_tokens=4))
                                              for i in range(8)))
                assert all(o.weight_version == 1 for o in outs)  # type: ignore[union-attr]
            for _ in range(5):
                async with RolloutFleet([a, b], health_interval_s=0.2) as fresh:
                    await fresh.wait_ready(servers=1, timeout=60)
                    await until(lambda f=fresh: "the fleet is at 1" in f.servers[0].why_out, "a judged", timeout=30)
                    assert [s.alive for s in fresh.servers] == [False, True], fresh.stats()
    finally:
        for p in procs:
            p.kill()
            p.wait()


async def test_a_fleet_session_whose_reply_was_lost_goes_on_from_the_clients_record() -> None:
    """A turn on a SIGSTOPped server times out and its abort is not answered: SessionDesynced (the
    server's copy is unknown). Before, every later call raised SessionDesynced too, and the
    trajectory was unreadable. Now the next call replays the client's record into a fresh session
    (here on the same server, the fleet's only one, which stayed admitted) and runs; the trajectory
    is the history the caller saw, without the lost turn. The server allows one session: the old copy
    is closed before the fresh one opens."""
    ep = free_tcp_endpoint()
    proc = serve(ep, "--max-sessions", "1")
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    try:
        async with RolloutFleet([ep], liveness_s=30.0, health_interval_s=0.3, health_timeout_s=60.0) as fleet:
            await fleet.wait_ready(timeout=180)
            async with fleet.session(timeout=1.0) as s:
                first = await s.generate([5, 6, 7], greedy)
                old_id = s.id
                proc.send_signal(signal.SIGSTOP)
                try:
                    with pytest.raises(SessionDesynced):
                        await asyncio.wait_for(s.generate([8], greedy), 30)  # (a hang guard)
                finally:
                    proc.send_signal(signal.SIGCONT)
                again = await s.generate([9], greedy)
                assert s.id != old_id and s.endpoint == ep
                traj = s.trajectory()
                assert traj.token_ids == [5, 6, 7, *first.output_ids, 9, *again.output_ids]
                assert traj.loss_mask == [0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1]
            async with RolloutClient(ep, timeout=30) as rc:  # --max-sessions 1: the fresh copy opened, so the
                await until(lambda: _one_opens(rc), "a session opens again", 30)  # old one was closed; now both are
    finally:
        kill_all([proc])


async def _one_opens(rc: RolloutClient) -> bool:
    one = rc.session()
    try:
        await one.open()
    except RollwireError as e:
        assert e.code in (ErrorCode.TOO_MANY_SESSIONS, ErrorCode.CLIENT_LIMIT), e
        return False
    await one.close()
    return True


@pytest.mark.parametrize("two_servers", [((), ())], indirect=True)
async def test_closing_the_fleet_during_a_session_turn_moves_nothing_and_aborts_the_turn_on_its_server(
        two_servers) -> None:  # type: ignore[no-untyped-def]
    """A FleetSession turn running when the fleet closes ends here (aborted, its partial output
    kept, or shutting_down as its client closed); the session does not move to the other server,
    and the turn is aborted on its server (before, it ran on there until the server took the
    client for gone, or to its end: ``RolloutClient.close`` now aborts what still runs)."""
    eps, _ = two_servers
    fleet = RolloutFleet(eps, health_interval_s=0.3)
    await fleet.start()
    try:
        await fleet.wait_ready(servers=2, timeout=180)
        async with fleet.session(max_tokens=8192) as session:
            await session.append([4, 5, 6])
            turn = asyncio.ensure_future(session.generate(sampling_params=LONG))
            await until(lambda: samples_running(session.endpoint), "the turn is generating on its server")
            turn_endpoint = session.endpoint
            await fleet.close()
            end = await asyncio.wait_for(asyncio.gather(turn, return_exceptions=True), 60)
        # the block was left without an error: the closed fleet has nothing to free (before, closing
        # the session on its closed client raised ConnectionClosed here)
    finally:
        await fleet.close()
    ok = (isinstance(end[0], GenerateDone) and end[0].finish_reason == "abort") or (
        isinstance(end[0], RollwireError) and end[0].code == ErrorCode.SHUTTING_DOWN)
    assert ok, end
    assert session.moves == 0 and fleet.failovers == 0, fleet.stats()
    for ep in eps:
        async with asyncio.timeout(60):  # nothing of it runs on the servers
            while await samples_running(ep) > 0:
                await asyncio.sleep(0.05)
        async with RolloutClient(ep, timeout=30) as rc:
            counters = (await rc.status()).counters
        if ep == turn_endpoint:  # aborted there at once (before, it ran on to its 4000 tokens)
            assert counters.get("finish_abort") == 1 and not counters.get("finish_length"), counters
        else:
            assert not counters.get("requests"), counters


@pytest.mark.parametrize("two_servers", [((), ())], indirect=True)
async def test_a_stream_closed_from_another_task_ends_its_reader_and_is_aborted_on_its_server(two_servers) -> None:  # type: ignore[no-untyped-def]
    """One task reads a long stream, another calls ``aclose()`` on it: the reader's iteration ends
    (no GenerateDone: it stopped reading) and the server aborts the request. Before (an adversarial
    try found both): a client's stream left its reader waiting for good, and a fleet's stream's
    ``aclose`` raised "asynchronous generator is already running" and the request ran on to its
    4000 tokens."""
    eps, _ = two_servers
    async with RolloutFleet(eps, health_interval_s=0.3) as fleet, RolloutClient(eps[0], timeout=120) as rc:
        await fleet.wait_ready(servers=2, timeout=180)
        for stream in (rc.stream([1, 2, 3], LONG), fleet.stream([1, 2, 3], LONG)):
            got: list[object] = []

            async def read(s=stream, into=got) -> None:  # type: ignore[no-untyped-def]
                async for m in s:
                    into.append(m)

            reader = asyncio.ensure_future(read())
            await until(lambda got=got: len(got) >= 3, "the stream is generating")
            await stream.aclose()
            await asyncio.wait_for(reader, 30)  # (a hang guard) it ends by itself
            assert not any(isinstance(m, GenerateDone) for m in got)
        await until(lambda: _all_idle(eps), "nothing runs on either server")
        counters = [(await _status(ep)) for ep in eps]
        assert sum(c.get("finish_abort", 0) for c in counters) == 2, counters
        assert not any(c.get("finish_length") for c in counters), counters


async def _status(endpoint: str) -> dict[str, float]:
    async with RolloutClient(endpoint, timeout=30) as rc:
        return (await rc.status()).counters


async def _all_idle(endpoints: list[str]) -> bool:
    return not any([(await _status(ep)).get("samples_in_flight") for ep in endpoints])


@pytest.mark.parametrize("two_servers", [((), ())], indirect=True)
async def test_a_request_moved_off_a_stalled_server_is_aborted_there_once_it_answers(two_servers) -> None:  # type: ignore[no-untyped-def]
    """A long request's server is SIGSTOPped: the fleet gives up on it (server_unavailable) and
    continues the request on the other server, where it completes once, spans whole. The stalled
    server is then SIGCONTed: the request it still held is aborted there (one abort_requests, one
    ``abort`` finish, no ``length``) as soon as the fleet's health check hears it again. Before (an
    adversarial try), it generated on there to its end: the server kept the client, whose fresh
    socket had the same identity."""
    eps, procs = two_servers
    long = SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)
    async with RolloutFleet(eps, liveness_s=3.0, health_interval_s=0.3, health_timeout_s=3.0) as fleet:
        await fleet.wait_ready(servers=2, timeout=180)
        task = asyncio.ensure_future(fleet.generate([3, 4, 5], long))
        await until(lambda: any(s.in_flight and s.tokens > 20 for s in fleet.servers), "the request is generating")
        stalled = next(i for i, s in enumerate(fleet.servers) if s.in_flight)
        counters = await _stall_until(procs[stalled], eps[stalled], lambda: fleet.failovers >= 1, "the request moved")
        assert counters.get("abort_requests") == 1 and counters.get("finish_abort") == 1, counters
        assert not counters.get("finish_length"), counters
        out = await asyncio.wait_for(task, 240)  # (a hang guard)
        assert out.finish_reason == "length" and len(out.output_ids) == 1500
        spans = out.weight_version_spans
        assert spans[0].start == 0 and spans[-1].end == 1500
        assert all(a.end == b.start for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize("two_servers", [((), ())], indirect=True)
async def test_a_session_turn_moved_off_a_stalled_server_is_aborted_there_once_it_answers(two_servers) -> None:  # type: ignore[no-untyped-def]
    """As above for a FleetSession's turn: its server is SIGSTOPped, the session moves (replayed)
    and the turn runs again on the other server, once; the stalled server, SIGCONTed, aborts the
    turn it still held (one ``abort`` finish, no ``length``). Before, it generated on there."""
    eps, procs = two_servers
    long = SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)
    async with RolloutFleet(eps, liveness_s=3.0, health_interval_s=0.3, health_timeout_s=3.0) as fleet:
        await fleet.wait_ready(servers=2, timeout=180)
        async with fleet.session(timeout=240) as s:
            turn = asyncio.ensure_future(s.generate([3, 4, 5], long))
            stalled = eps.index(s.endpoint)
            await until(lambda: _samples(eps[stalled], 1), "the turn is generating")
            counters = await _stall_until(procs[stalled], eps[stalled], lambda: s.moves >= 1, "the session moved")
            assert counters.get("finish_abort") == 1 and not counters.get("finish_length"), counters
            out = await asyncio.wait_for(turn, 240)  # (a hang guard)
            assert out.finish_reason == "length" and len(out.output_ids) == 1500 and s.endpoint != eps[stalled]
            assert s.trajectory().token_ids == [3, 4, 5, *out.output_ids]


async def _samples(endpoint: str, n: int) -> bool:
    return (await _status(endpoint)).get("samples_in_flight", 0) == n


async def _stall_until(proc: subprocess.Popen[bytes], endpoint: str, moved: Callable[[], bool],
                       why: str) -> dict[str, float]:
    """SIGSTOP a server until ``moved``, SIGCONT it, and return its counters once nothing runs there."""
    proc.send_signal(signal.SIGSTOP)
    try:
        await until(moved, why, 60)
    finally:
        proc.send_signal(signal.SIGCONT)
    await until(lambda: _all_idle([endpoint]), "the stalled server let its work go", 60)
    return await _status(endpoint)
