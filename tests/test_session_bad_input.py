"""Bad session input gets a typed error; the session (and every other one) keeps working."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rollwire import RolloutClient, RolloutError, SamplingParams
from rollwire.clients.session import Session
from rollwire.messages import (
    AppendTokens,
    Codec,
    ErrorCode,
    ErrorReply,
    GenerateChunk,
    GenerateDone,
    RemoteError,
    SessionGenerate,
    SessionReply,
)
from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports.rpc import RpcClient
from rollwire.transports.sockets import ipc_endpoint
from tests.conftest import until

SP = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


async def expect(code: ErrorCode, coro: Any) -> None:
    with pytest.raises(RolloutError) as info:
        await coro
    assert info.value.code == code, info.value


@pytest.fixture
async def rc() -> Any:
    ep = ipc_endpoint("sess-bad")
    async with RolloutServer(ServerConfig(rollout_endpoint=ep, max_sessions=3, max_session_tokens=16384)) as srv, \
            RolloutClient(ep, timeout=60) as client:
        srv.sessions.max_client_sessions = 4  # above the table: this client fills it (caps: test_session_fairness)
        await client.generate([1, 2], SP)  # warm: the timed tests below need tokens within their bound
        yield client


async def _one_in_flight(rc: RolloutClient) -> bool:
    return (await rc.status()).in_flight == 1


async def test_each_bad_request_gets_its_typed_error_and_the_good_session_is_unaffected(rc: RolloutClient) -> None:
    good = rc.session(max_tokens=256)
    await good.open()
    await good.generate([5, 6, 7], SP)
    bad = rc.session(max_tokens=40)
    await bad.open()
    await expect(ErrorCode.SESSION_LIMIT, bad.generate(list(range(10, 45)), SP))  # 35 + 8 > 40
    await expect(ErrorCode.SESSION_LIMIT, bad.append(list(range(10, 51))))  # 41 > 40
    await expect(ErrorCode.BAD_SAMPLING_PARAMS, bad.generate([5], SamplingParams(n=2, max_new_tokens=8)))
    await expect(ErrorCode.EMPTY_INPUT, bad.generate([], SP))  # empty session, no input
    await expect(ErrorCode.EMPTY_INPUT, bad.append([]))
    await expect(ErrorCode.TOKEN_OUT_OF_RANGE, bad.append([5, 100_000]))
    await expect(ErrorCode.TOKEN_OUT_OF_RANGE, bad.generate([-1], SP))
    await expect(ErrorCode.BAD_SAMPLING_PARAMS, bad.generate([5], SamplingParams(temperature=-1.0, max_new_tokens=8)))
    assert bad.trajectory().token_ids == []  # nothing above touched the history
    await bad.generate([5, 6], SP)  # still usable
    await expect(ErrorCode.BAD_FIELD, rc.session(max_tokens=10**9).open())
    await expect(ErrorCode.BAD_FIELD, rc.session(ttl_s=0).open())
    third = rc.session()
    await third.open()
    await expect(ErrorCode.TOO_MANY_SESSIONS, rc.session().open())  # max_sessions=3
    await third.close()
    await expect(ErrorCode.SESSION_CLOSED, third.append([5]))
    await expect(ErrorCode.SESSION_CLOSED, third.generate([5], SP))
    await expect(ErrorCode.SESSION_CLOSED, third.close())
    ghost = Session(rc, max_tokens=10, ttl_s=1, keep_stale_prefix=False, timeout=10)
    ghost._rpc, ghost.id = await rc._sessions(), "no-such-session"
    await expect(ErrorCode.UNKNOWN_SESSION, ghost.generate([5], SP))
    await expect(ErrorCode.UNKNOWN_SESSION, ghost.append([5]))
    t2 = await good.generate([8], SP)  # the good session went on as if nothing happened
    assert t2.usage.cached_tokens == 3 + 8 - 1 and t2.finish_reason == "length"
    assert [t.role for t in good.trajectory().turns] == ["prompt", "model", "prompt", "model"]


async def test_a_second_generate_or_append_while_a_turn_runs_is_busy_and_the_turn_completes(
        rc: RolloutClient) -> None:
    s = rc.session(max_tokens=4096)
    await s.open()
    long_turn = asyncio.ensure_future(s.generate([5, 6], SamplingParams(max_new_tokens=3000, ignore_eos=True)))
    await until(lambda: _one_in_flight(rc), "the turn at the generation actor")
    rpc = await rc._sessions()
    for msg in (SessionGenerate(session_id=s.id, input_ids=[7], sampling_params=SP),
                AppendTokens(session_id=s.id, token_ids=[7])):
        with pytest.raises(RemoteError) as busy:
            await rpc.call(msg, timeout=10)
        assert busy.value.code == ErrorCode.SESSION_BUSY, busy.value
    done = await long_turn  # the running turn: untouched, complete
    assert done.finish_reason == "length" and len(done.output_ids) == 3000
    assert s.trajectory().token_ids == [5, 6, *done.output_ids]


async def test_undecodable_and_unknown_messages_on_the_session_socket_get_typed_errors(rc: RolloutClient) -> None:
    rpc = await rc._sessions()
    raw: RpcClient[Any] = RpcClient(rpc.endpoint, SessionReply)
    try:
        codec: Codec[Any] = Codec(SessionReply)  # any struct encodes
        frames = codec.encode(7, SessionGenerate(session_id="x"), ())
        await raw._sock.send_multipart([frames[0], b"\x93\xa3bad"])  # a body that is not msgpack of the union
        reply = await asyncio.wait_for(raw._sock.recv_multipart(), 10)
        _, msg, _ = codec.decode(reply)
        assert isinstance(msg, ErrorReply) and msg.code in (ErrorCode.BAD_FRAME, ErrorCode.BAD_FIELD,
                                                           ErrorCode.UNKNOWN_KIND)
    finally:
        await raw.close()
    s = rc.session()  # the socket keeps serving
    await s.open()
    assert (await s.generate([5], SP)).finish_reason == "length"


async def test_a_timed_out_turn_is_aborted_its_partial_output_kept_and_the_session_continues(
        rc: RolloutClient) -> None:
    from rollwire import RequestTimeout

    s = rc.session(max_tokens=4096)
    await s.open()
    with pytest.raises(RequestTimeout):
        await s.generate([5, 6], SamplingParams(max_new_tokens=4000, ignore_eos=True), timeout=2.0)
    turn = s.trajectory().turns[-1]
    assert turn.role == "model" and turn.finish_reason == "abort" and 0 < turn.end - turn.start < 4000
    nxt = await s.generate(sampling_params=SP)  # continues from the partial output
    assert nxt.finish_reason == "length" and nxt.usage.prompt_tokens == turn.end


async def test_a_timed_out_streamed_turn_keeps_what_it_streamed_and_the_session_continues(
        rc: RolloutClient) -> None:
    """``timeout`` bounds the whole streamed turn: the chunks before it came through, then the turn
    is aborted, its partial output (at least what was streamed) recorded, and RequestTimeout raised."""
    from rollwire import RequestTimeout

    s = rc.session(max_tokens=4096)
    await s.open()
    streamed: list[int] = []
    with pytest.raises(RequestTimeout):
        async for m in s.stream([5, 6], SamplingParams(max_new_tokens=4000, ignore_eos=True), timeout=2.0):
            streamed += m.token_ids  # type: ignore[union-attr]  (chunks only: the Done never comes)
    turn = s.trajectory().turns[-1]
    assert turn.role == "model" and turn.finish_reason == "abort" and 0 < turn.end - turn.start < 4000
    assert s.trajectory().token_ids[turn.start:turn.start + len(streamed)] == streamed
    nxt = await s.generate(sampling_params=SP)
    assert nxt.finish_reason == "length" and nxt.usage.prompt_tokens == turn.end


async def test_a_cancelled_turn_is_aborted_on_the_server_and_the_trajectory_refuses_to_lie(
        rc: RolloutClient) -> None:
    from rollwire.clients.session import SessionDesynced

    s = rc.session(max_tokens=4096)
    await s.open()
    with pytest.raises(TimeoutError):  # the caller's own timeout cancels the turn
        await asyncio.wait_for(s.generate([5, 6], SamplingParams(max_new_tokens=4000, ignore_eos=True)), 2.0)
    with pytest.raises(SessionDesynced):  # the server kept the partial turn; this client cannot know it
        s.trajectory()
    with pytest.raises(SessionDesynced):
        await s.generate(sampling_params=SP)
    for _ in range(100):  # the abort reached the engine: nothing keeps running for a gone caller
        if (await rc.status()).in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert (await rc.status()).in_flight == 0
    closed = await s.close()
    assert closed.turns == 1 and 2 < closed.length < 4002  # the aborted turn, partial output kept


async def test_closing_a_session_during_a_turn_aborts_the_turn_and_counts_it(rc: RolloutClient) -> None:
    s = rc.session(max_tokens=4096)
    await s.open()
    turn = s.stream([5, 6], SamplingParams(max_new_tokens=3000, ignore_eos=True))
    first = await turn.__anext__()  # a chunk: the turn is generating
    closed = await s.close()
    rest = [m async for m in turn]
    done = rest[-1]  # the turn's one terminal reply: aborted, with its partial output
    assert isinstance(first, GenerateChunk) and isinstance(done, GenerateDone)
    assert done.finish_reason == "abort" and 0 < len(done.output_ids) < 3000
    assert closed.turns == 1 and closed.length == 2 + len(done.output_ids)


async def test_a_late_abort_is_dropped_not_kept_for_a_later_turn_that_reuses_its_rid(rc: RolloutClient) -> None:
    """Over one raw session connection: turn rid 5 ends, then an abort for rid 5 arrives (late),
    then a new turn with rid 5. The new turn runs to its end (before, the late abort was kept as an
    "early" one and killed it at once with no output)."""
    import uuid

    import zmq
    import zmq.asyncio

    from rollwire.messages import AbortRequest, OpenSession

    endpoint = (await rc._sessions()).endpoint
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    codec: Codec[Any] = Codec(SessionReply)

    async def ask(rid: int, msg: Any) -> Any:
        await sock.send_multipart(codec.encode(rid, msg, ()))
        while True:
            got_rid, reply, _ = codec.decode(await asyncio.wait_for(sock.recv_multipart(), 30))
            if got_rid == rid and not isinstance(reply, GenerateChunk):
                return reply

    try:
        sid = (await ask(1, OpenSession(max_tokens=256))).session_id
        turn = SessionGenerate(session_id=sid, input_ids=[5, 6], sampling_params=SP)
        first = await ask(5, turn)
        assert isinstance(first, GenerateDone) and first.finish_reason == "length"
        await sock.send_multipart(codec.encode(0, AbortRequest(target_rid=5), ()))
        second = await ask(5, turn)
        assert isinstance(second, GenerateDone) and second.finish_reason == "length" and len(second.output_ids) == 8
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_turns_refused_overloaded_leave_nothing_behind_in_the_session_actor() -> None:
    """Two turns wait for a version no trainer will push, then the session actor is made full
    (its pending-task bound set to what it holds), and 50 more turns, each with a rid of its own,
    are refused ``overloaded``. Each refused turn's arrival is forgotten (an adversarial try found
    one entry kept per refused turn, for good: ~270 B each, 108 MB after 400k). The two waiting
    turns are then cancelled by their caller, which aborts them on the server: nothing is left in
    flight there."""
    ep = ipc_endpoint("sess-over")
    async with RolloutServer(ServerConfig(rollout_endpoint=ep)) as srv, RolloutClient(ep, timeout=60) as rc:
        waiting = [rc.session() for _ in range(2)]
        for s in waiting:
            await s.open()
        turns = [asyncio.ensure_future(s.generate([5, 6], SP, min_version=10**9)) for s in waiting]
        await until(lambda: len(srv.sessions._arriving) == 2, "both turns pending at the session actor")
        srv.sessions.max_pending = len(srv.sessions._tasks)
        rpc = await rc._sessions()
        for _ in range(50):
            with pytest.raises(RemoteError) as refused:
                await rpc.call(SessionGenerate(session_id=waiting[0].id, input_ids=[7], sampling_params=SP), timeout=10)
            assert refused.value.code == ErrorCode.OVERLOADED, refused.value
        assert len(srv.sessions._arriving) == 2  # the two waiting turns, nothing of the 50
        for t in turns:
            t.cancel()  # a cancelled turn is aborted on the server
        await asyncio.gather(*turns, return_exceptions=True)
        await until(lambda: not srv.sessions._arriving, "both waiting turns ended")
        assert srv.sessions.counters.snapshot().get("overloaded") == 50
        assert all(t.cancelled() for t in turns)
        await until(lambda: _none_in_flight(rc), "the aborted turns left the generation actor")


async def _none_in_flight(rc: RolloutClient) -> bool:
    return (await rc.status()).in_flight == 0
