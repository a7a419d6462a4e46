"""Sessions are owned, capped per client, and freed when their client is gone: real `rollwire serve`
processes (hf engine, tiny model), each test saying what happened to every turn it started.

* Another client that knows a session id can neither use, append to, close, nor abort a turn of it:
  it gets unknown_session (as for an id that never existed), and the owner's session goes on.
* One client cannot open every session slot: beyond its cap it gets client_limit with
  retry_after_s, another client still opens sessions, and refused opens leave nothing behind.
* A SIGKILLed worker's sessions are closed once it is silent for --client-timeout: its running
  turn is aborted in the engine, the engine's cached prefixes are forgotten, and the slots it
  held open for others.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable
from typing import Any

import pytest

from rollwire import RolloutClient, RolloutError, SamplingParams
from rollwire.clients.session import Session
from rollwire.messages import (
    AbortRequest,
    Appended,
    AppendTokens,
    ErrorCode,
    GenerateDone,
    Heartbeat,
    OpenSession,
    RemoteError,
    SessionGenerate,
    StatusReply,
)

from .conftest import free_tcp_endpoint, until
from .test_engine_faults import stop

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)


def serve_sessions(endpoint: str, *extra: str) -> subprocess.Popen[bytes]:
    """`rollwire serve` in a child process (hf engine, tiny model)."""
    script = ("import sys\n"
              "from rollwire.cli import main\n"
              f"sys.exit(main(['--log-level', 'warning', 'serve', '--rollout-endpoint', {endpoint!r}, "
              f"'--max-new-tokens-limit', '4000', *{list(extra)!r}]))\n")
    return subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def expect(code: ErrorCode, call: Awaitable[Any]) -> RolloutError:
    with pytest.raises(RolloutError) as info:
        await call
    assert info.value.code == code, info.value
    return info.value


async def refused_open(rc: RolloutClient) -> RemoteError:
    """An open that must be refused (the refusal carries code, message and retry_after_s)."""
    with pytest.raises(RemoteError) as refused:
        await (await rc._sessions()).call(OpenSession(), timeout=30)
    return refused.value


def impostor(rc: RolloutClient, session_id: str) -> Session:
    """A Session object of ``rc`` that names someone else's session id."""
    s = rc.session()
    s.id = session_id
    return s


async def test_another_client_that_knows_a_session_id_can_neither_use_append_abort_nor_close_it() -> None:
    ep = free_tcp_endpoint()
    proc = serve_sessions(ep)
    try:
        async with RolloutClient(ep, timeout=120) as owner, RolloutClient(ep, timeout=120) as other:
            await owner.wait_ready(timeout=120)
            s = owner.session(max_tokens=8192)
            await s.open()
            first = await s.generate([5, 6, 7], GREEDY)
            thief = impostor(other, s.id)
            thief._rpc = await other._sessions()
            await expect(ErrorCode.UNKNOWN_SESSION, thief.generate([1], GREEDY))
            await expect(ErrorCode.UNKNOWN_SESSION, thief.append([1, 2]))
            await expect(ErrorCode.UNKNOWN_SESSION, thief.close())
            # the owner's turn runs; the other client aborts "its" rid: it names only its own requests
            turn = asyncio.ensure_future(s.generate([8], LONG))
            await until(lambda: _engine(owner, "running", 1), "the owner's long turn runs")
            for rid in range(1, 64):  # whatever rid the owner used, the other client cannot reach it
                await thief._rpc.send(0, AbortRequest(target_rid=rid))
            await expect(ErrorCode.UNKNOWN_SESSION, thief.generate([1], GREEDY))  # a fence after the aborts
            await expect(ErrorCode.UNKNOWN_SESSION, thief.append([3]))
            assert not turn.done()
            done = await turn
            assert done.finish_reason == "length" and len(done.output_ids) == 4000  # the other's aborts did nothing
            traj = s.trajectory()
            assert traj.token_ids == [5, 6, 7, *first.output_ids, 8, *done.output_ids]  # nothing of the thief's
            closed = await s.close()
            assert closed.length == len(traj.token_ids) and closed.turns == 2
            # a closed session is as unknown to the other client as one that never existed
            await expect(ErrorCode.UNKNOWN_SESSION, thief.generate([1], GREEDY))
            await expect(ErrorCode.SESSION_CLOSED, s.append([1]))  # its owner is told the truth
            assert (await owner.status()).in_flight == 0
        assert proc.poll() is None
    finally:
        stop(proc)


async def test_one_client_cannot_open_every_session_slot_and_refused_opens_leave_nothing() -> None:
    """--max-sessions 8: the default per-client cap is half the table (4)."""
    ep = free_tcp_endpoint()
    proc = serve_sessions(ep, "--max-sessions", "8")
    try:
        async with RolloutClient(ep, timeout=120) as a, RolloutClient(ep, timeout=120) as b, \
                RolloutClient(ep, timeout=120) as c:
            await a.wait_ready(timeout=120)
            mine = [a.session() for _ in range(4)]
            for s in mine:
                await s.open()
            for _ in range(20):  # a flood of refused opens records nothing
                err = await refused_open(a)
                assert err.code == ErrorCode.CLIENT_LIMIT and err.retry_after_s > 0 and "limit" in err.message, err
            theirs = [b.session() for _ in range(4)]
            for s in theirs:  # the other client gets its share
                await s.open()
            await expect(ErrorCode.CLIENT_LIMIT, b.session().open())
            err = await refused_open(c)  # the table is full: 8
            assert err.code == ErrorCode.TOO_MANY_SESSIONS and err.retry_after_s > 0, err
            await mine[0].close()  # one slot back: the refused flood did not hold it
            extra = c.session()
            await extra.open()
            await expect(ErrorCode.TOO_MANY_SESSIONS, a.session().open())
            for s in (*mine[1:], *theirs, extra):  # every open session works
                out = await s.generate([3, 4], GREEDY)
                assert isinstance(out, GenerateDone) and out.finish_reason == "length"
        assert proc.poll() is None
    finally:
        stop(proc)


WORKER = """
import asyncio, sys
from rollwire import RolloutClient, SamplingParams
from rollwire.messages import Heartbeat
SP = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)
async def main():
    async with RolloutClient(sys.argv[1], heartbeat_s=0.2) as rc:  # beats well inside --client-timeout
        await rc.wait_ready(timeout=120)
        done, running, idle = rc.session(max_tokens=8192), rc.session(max_tokens=8192), rc.session()
        for s in (done, running, idle):
            await s.open()
        await done.generate([5, 6, 7], SP)  # its KV prefix stays cached in the engine
        await running.generate([9, 9], SP)
        turn = asyncio.ensure_future(running.generate([8], LONG))
        await (await rc._sessions()).send(0, Heartbeat())  # liveness spoken on the session link
        print("ready", flush=True)
        await turn
asyncio.run(main())
"""


async def test_a_sigkilled_workers_sessions_are_closed_its_turn_aborted_and_its_kv_freed() -> None:
    """The worker holds 3 of the 4 slots: one session with a finished turn, one with a 4000-token turn
    running, one never used. After SIGKILL and --client-timeout 1: the running turn ends aborted in
    the engine (finish_abort), no request is left in flight, the engine's prefixes of both used
    sessions are forgotten, and another client opens all 4 slots."""
    ep = free_tcp_endpoint()
    # a short timeout, so the gone worker's 4000-token turn is still running when it is called gone
    # (it takes seconds on a CPU; finish_length below would catch it ending first); live clients
    # here beat every 0.2-0.3 s, so none is called gone while it lives
    proc = serve_sessions(ep, "--max-sessions", "4", "--max-client-sessions", "4", "--client-timeout", "1")
    worker = subprocess.Popen([sys.executable, "-c", WORKER, ep], stdout=subprocess.PIPE)
    try:
        async with RolloutClient(ep, timeout=120, heartbeat_s=0.2) as rc:
            await rc.wait_ready(timeout=120)
            assert worker.stdout is not None
            line = await asyncio.get_running_loop().run_in_executor(None, worker.stdout.readline)
            assert line.strip() == b"ready", line
            await until(lambda: _engine(rc, "running", 1), "the worker's long turn runs in the engine")
            await until(lambda: _engine(rc, "prefix_sessions", 2), "both used sessions hold cached KV")
            probe = rc.session()
            await probe.open()  # 3 + 1: the table is full
            await expect(ErrorCode.TOO_MANY_SESSIONS, rc.session().open())
            await probe.close()
            before = await rc.status()
            assert before.in_flight == 1 and before.counters.get("finish_abort", 0) == 0
            worker.send_signal(signal.SIGKILL)
            worker.wait()

            async def freed() -> bool:
                st = await rc.status()
                c = st.counters
                return st.in_flight == 0 and c["engine.running"] == 0 and c["engine.prefix_sessions"] == 0

            await until(freed, "the gone worker's turn aborted and its sessions forgotten")
            st = await rc.status()
            assert st.counters["finish_abort"] == 1  # the running turn: aborted in the engine, not finished
            assert st.counters.get("finish_length", 0) == before.counters.get("finish_length", 0)
            assert st.counters.get("restarts", 0) == 0
            mine = [rc.session() for _ in range(4)]
            for s in mine:  # every slot the worker held is free again
                await s.open()
            for s in mine:
                assert (await s.generate([3, 4], GREEDY)).finish_reason == "length"
        assert proc.poll() is None
    finally:
        stop(worker)
        stop(proc)


async def _engine(rc: RolloutClient, key: str, value: float) -> bool:
    st: StatusReply = await rc.status()
    return st.counters.get(f"engine.{key}") == value


async def test_under_curve_a_session_belongs_to_its_key_and_goes_when_the_keys_last_connection_is_gone(
        tmp_path: Any) -> None:
    """Alice's key has two connections: either may use her session, Bob's key may not. Alice's first
    connection and then Bob go silent; once the server has called Bob gone (his session's KV is
    forgotten) it has called Alice's first connection gone too, yet her session stays: her second
    connection still beats. When that one goes, her session goes, and a new connection with her key
    is told it expired."""
    from rollwire.transports.security import CurveClient, KeyPair, create_keys

    server_pub, server_secret = create_keys(tmp_path, "server")
    alice_pub, alice_secret = create_keys(tmp_path, "alice")
    bob_pub, bob_secret = create_keys(tmp_path, "bob")
    server_key = KeyPair.load(server_pub).public

    def client(secret: Any) -> RolloutClient:
        return RolloutClient(ep, timeout=120, curve=CurveClient(KeyPair.load(secret), server_key))

    ep = free_tcp_endpoint()
    proc = serve_sessions(ep, "--secret-key", str(server_secret), "--client-keys", str(alice_pub),
                          "--client-keys", str(bob_pub), "--client-timeout", "3")  # live clients beat every 1-1.5 s
    try:
        async with client(alice_secret) as a2, client(bob_secret) as b:
            a1 = client(alice_secret)
            await a1.wait_ready(timeout=120)
            s = a1.session(max_tokens=8192, ttl_s=3600)
            await s.open()
            first = await s.generate([5, 6, 7], GREEDY)
            a2_rpc = await a2._sessions()
            appended = (await a2_rpc.call(AppendTokens(session_id=s.id, token_ids=[1, 2]), timeout=60)).msg
            assert isinstance(appended, Appended) and appended.length == 3 + len(first.output_ids) + 2, appended
            thief = impostor(b, s.id)
            thief._rpc = await b._sessions()
            await expect(ErrorCode.UNKNOWN_SESSION, thief.generate([1], GREEDY))
            await expect(ErrorCode.UNKNOWN_SESSION, thief.append([1]))
            await expect(ErrorCode.UNKNOWN_SESSION, thief.close())
            bobs = b.session(ttl_s=3600)
            await bobs.open()
            await bobs.generate([9, 9], GREEDY)
            await until(lambda: _engine(a2, "prefix_sessions", 2), "both sessions hold cached KV")
            for rc in (a1, a2, b):  # liveness spoken on every session link
                await (await rc._sessions()).send(0, Heartbeat())
            await (await a1._sessions()).call(Heartbeat(), timeout=30)
            await a1.close()  # alice's first connection goes silent
            await (await b._sessions()).call(Heartbeat(), timeout=30)  # bob's last word comes after it
            await b.close()
            await until(lambda: _engine(a2, "prefix_sessions", 1), "bob called gone, his session's KV forgotten")
            nxt = (await a2_rpc.call(SessionGenerate(session_id=s.id, sampling_params=GREEDY), timeout=60)).msg
            assert isinstance(nxt, GenerateDone) and nxt.usage.prompt_tokens == appended.length, nxt
        # a2 closed: alice has no connection left
        async with client(alice_secret) as a3:
            await until(lambda: _engine(a3, "prefix_sessions", 0), "alice called gone, her session's KV forgotten")
            again = impostor(a3, s.id)
            again._rpc = await a3._sessions()
            await expect(ErrorCode.SESSION_EXPIRED, again.append([1]))  # her key is told the truth
            st = await a3.status()
            assert st.in_flight == 0 and st.counters.get("restarts", 0) == 0
        assert proc.poll() is None
    finally:
        stop(proc)
