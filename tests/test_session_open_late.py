"""An OpenSession whose caller stopped waiting is still answered, and the session the
server opened anyway is closed there: it used to hold its slot until its ttl (600 s), so with
`--max-sessions 1` nobody else could open one."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from rollwire import RolloutClient, SamplingParams
from rollwire.clients.session import SessionDesynced
from rollwire.messages import ErrorCode, RollwireError
from rollwire.transports.sockets import free_tcp_endpoint


async def test_a_session_opened_after_its_caller_gave_up_is_closed_on_the_server() -> None:
    endpoint = free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "hf",
                             "--model", "tiny", "--rollout-endpoint", endpoint, "--max-sessions", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with RolloutClient(endpoint, timeout=120) as rc, RolloutClient(endpoint, timeout=120) as other:
            await rc.wait_ready(timeout=180)
            async with rc.session():  # the session link is up: the next OpenSession goes straight out
                pass
            proc.send_signal(signal.SIGSTOP)  # shorter than the client's liveness bound (3 s)
            try:
                with pytest.raises(TimeoutError):  # the caller gives up (as a fleet's move does at its deadline)
                    await asyncio.wait_for(rc.session().open(), 0.5)
            finally:
                proc.send_signal(signal.SIGCONT)
            opened: list[str] = []

            async def other_opens() -> None:
                try:
                    s = other.session()
                    await s.open()
                except RollwireError as e:
                    assert e.code == ErrorCode.TOO_MANY_SESSIONS, e  # the late one still holds the slot
                    return
                opened.append(s.id)
                await s.close()

            try:
                async with asyncio.timeout(30):  # polls the server's state until the late session is closed
                    while not opened:
                        await other_opens()
                        await asyncio.sleep(0.05)
            except TimeoutError:
                raise AssertionError("the late session still holds the only slot") from None
    finally:
        proc.kill()
        proc.wait()


async def test_a_session_call_on_a_stalled_server_ends_with_its_own_timeout() -> None:
    """A SIGSTOPped server, a client whose liveness bound (20 s) is far above the calls' timeout
    (1 s): opening a session on it (the first call asks where its sessions are) ends with timeout,
    not server_unavailable at the liveness bound (before: the port lookup was outside the bound); a
    turn already open when the server stalls ends with SessionDesynced once its abort has had as
    long as its timeout to be answered (before: 30 s more)."""
    endpoint = free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve", "--engine", "hf",
                             "--model", "tiny", "--rollout-endpoint", endpoint],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with RolloutClient(endpoint, timeout=120) as ready:
            await ready.wait_ready(timeout=180)
        async with RolloutClient(endpoint, liveness_s=20.0) as rc:
            turn_session = rc.session(timeout=1.0)
            await turn_session.open()
            fresh = RolloutClient(endpoint, liveness_s=20.0)
            async with fresh:
                proc.send_signal(signal.SIGSTOP)
                try:
                    with pytest.raises(RollwireError) as err:
                        await asyncio.wait_for(fresh.session(timeout=1.0).open(), 10)  # (a hang guard)
                    assert err.value.code == ErrorCode.TIMEOUT, err.value
                    with pytest.raises(SessionDesynced):
                        await asyncio.wait_for(turn_session.generate([1, 2, 3], SamplingParams(max_new_tokens=8)),
                                               10)  # (a hang guard: 1 s timeout + 1 s for the abort's answer)
                finally:
                    proc.send_signal(signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
