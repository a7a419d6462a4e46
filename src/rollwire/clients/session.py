"""Client side of sessions: ``async with rc.session(...) as s`` and the trajectory it records.

The server (SessionActor) owns the history; the client mirrors it turn by turn from what it sent
and what came back, so ``trajectory()`` costs no round trip. Every reply is checked against the
mirror (``Appended.length``, a turn's ``usage.prompt_tokens``); a call whose outcome is unknown
(cancelled, or an append that timed out) or a mismatch makes the session *desynced*: further
calls and ``trajectory()`` raise ``SessionDesynced`` (close the session; its record is lost).
``loss_mask`` is 1 exactly on the tokens the model generated; ``logprobs`` is aligned with
``token_ids`` (0.0 on masked tokens, NaN on model tokens of a turn run without
``return_logprob``); ``weight_version_spans`` are in trajectory positions.

A session belongs to the client that opened it: its CURVE key, or without keys the RolloutClient's
one session connection (all its sessions share it). Another client naming the id gets
unknown_session; a RolloutClient silent past the server's ``--client-timeout`` loses its sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from rollwire.messages import (
    AbortRequest,
    Appended,
    AppendTokens,
    CloseSession,
    ErrorCode,
    GenerateChunk,
    GenerateDone,
    OpenSession,
    RollwireError,
    SamplingParams,
    SessionClosed,
    SessionGenerate,
    SessionOpened,
    VersionSpan,
)
from rollwire.runtime.deadlines import deadline_in, time_left
from rollwire.transports.rpc import RequestTimeout, RpcClient, unwrap

if TYPE_CHECKING:
    from rollwire.clients.rollout import RolloutClient

ABORT_GRACE_S = 30.0  # after a timeout: how long to wait for the aborted turn's terminal reply, at most


def abort_grace(timeout: float) -> float:
    """How long a turn that timed out waits for its abort's answer (its partial output, which keeps
    the session in step with the server): as long as the timeout itself, at least 1 s, at most
    ABORT_GRACE_S. So a call with ``timeout`` ends within about twice that, even on a wedged server
    (then with SessionDesynced)."""
    return min(ABORT_GRACE_S, max(1.0, timeout))


@dataclass
class TurnRecord:
    role: Literal["prompt", "model", "env"]  # prompt: input_ids of a generate; env: append()
    start: int  # positions [start, end) in the trajectory's token_ids
    end: int
    finish_reason: str | None = None  # model turns
    weight_version: int | None = None  # model turns: the version of their last token
    weight_version_spans: list[VersionSpan] = field(default_factory=list)  # model turns, trajectory positions
    cached_tokens: int = 0  # model turns: history tokens the engine did not recompute


@dataclass
class Trajectory:
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    weight_version_spans: list[VersionSpan]
    turns: list[TurnRecord]


class SessionDesynced(Exception):
    """A turn's reply never came back (even after an abort): the mirror of the history is unknown."""


class Session:
    def __init__(self, client: RolloutClient, *, max_tokens: int, ttl_s: float, keep_stale_prefix: bool,
                 timeout: float | None) -> None:
        self._client = client
        self._open = OpenSession(max_tokens=max_tokens, ttl_s=ttl_s, keep_stale_prefix=keep_stale_prefix)
        self.timeout = timeout
        self.id = ""
        self._rpc: RpcClient[Any] | None = None
        self._ids: list[int] = []
        self._mask: list[int] = []
        self._lps: list[float] = []
        self._turns: list[TurnRecord] = []
        self._desynced = False

    async def __aenter__(self) -> Session:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:

        try:
            await self.close()
        except RollwireError as e:  # already gone: nothing left to free
            if e.code not in (ErrorCode.SESSION_EXPIRED, ErrorCode.SESSION_CLOSED, ErrorCode.UNKNOWN_SESSION):
                raise

    async def open(self) -> SessionOpened:
        """Open the session on the server, within the session's ``timeout`` in all (the retry on
        a restarted server's new session port included)."""
        deadline = deadline_in(self.timeout)
        try:  # (asking the server for its session port is part of the bound too)
            async with asyncio.timeout_at(deadline):
                self._rpc = await self._client._sessions()
        except TimeoutError:
            raise RequestTimeout(f"the server did not say where its sessions are within {self.timeout}s") from None
        try:
            opened = await self._open_once(time_left(deadline))
        except RollwireError as e:
            if e.code not in (ErrorCode.SERVER_UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN):
                raise  # (shutting_down: the link was retired for a new session port meanwhile)
            # the session port did not answer: a server restarted at the same rollout endpoint
            # listens on a fresh one. Ask again, and open there if it moved
            try:
                async with asyncio.timeout_at(deadline):
                    fresh = await self._client._sessions(refresh=True)
            except (RollwireError, TimeoutError):
                raise e from None
            if fresh is self._rpc:  # the same port: the server is gone
                raise
            self._rpc = fresh
            opened = await self._open_once(time_left(deadline))
        self.id = opened.session_id
        return opened

    async def _open_once(self, timeout: float | None) -> SessionOpened:
        """One OpenSession. If this call stops waiting (``timeout``, or the caller cancelled) the
        request is still answered in the background, and a session the server opened anyway is
        closed there rather than left to hold a slot until its ttl."""
        assert self._rpc is not None
        rpc = self._rpc
        late = None if timeout is None else timeout + ABORT_GRACE_S  # how long a late reply may come
        attempt = asyncio.ensure_future(rpc.call(self._open, timeout=late))
        try:
            reply = await asyncio.wait_for(asyncio.shield(attempt), timeout)
        except BaseException as e:  # (a reply landing with the deadline is dropped by wait_for: closed too)
            self._client._background.spawn(_close_when_opened(attempt, rpc))
            if isinstance(e, TimeoutError):
                raise RequestTimeout(f"no reply to OpenSession within {self.timeout}s") from None
            raise
        opened: SessionOpened = unwrap(reply)
        return opened

    @property
    def link_retired(self) -> bool:
        """This session's link is no longer its client's session link: a health reply named a new
        session port (the server restarted at the same rollout endpoint), so the link was closed
        here, and an error on it says nothing about the server."""
        return self._rpc is not None and self._rpc is not self._client._session_rpc

    @property
    def desynced(self) -> bool:
        """An earlier call's reply was lost: the server's copy is unknown (this client's record is
        still what every call it saw complete made of it)."""
        return self._desynced

    async def replay(self, record: Session, *, from_desynced: bool = False) -> None:
        """Open this session and give it ``record``'s whole history in one append, so the next turn
        prefills it once; the trajectory then goes on from ``record``'s, roles and all. How a session
        moves to another server when its own died (``rollwire.fleet``). ``from_desynced``: ``record``
        may be desynced (its record, not its server's copy, is what goes on)."""
        if not from_desynced:
            record._check_synced()
        await self.open()
        if record._ids:
            done: Appended = await self._call(AppendTokens(session_id=self.id, token_ids=list(record._ids)))
            if done.length != len(record._ids):
                self._desynced = True
                raise SessionDesynced(f"session {self.id}: replayed {len(record._ids)} tokens, the server "
                                      f"holds {done.length}")
        self._ids, self._mask, self._lps = list(record._ids), list(record._mask), list(record._lps)
        self._turns = list(record._turns)

    async def append(self, token_ids: Sequence[int]) -> int:
        """An environment turn (loss_mask 0); returns the history length."""

        self._check_synced()
        ids = list(token_ids)
        try:
            done: Appended = await self._call(AppendTokens(session_id=self.id, token_ids=ids))
        except RollwireError as e:
            if e.code == ErrorCode.TIMEOUT:  # it may have been applied: the mirror is unknown
                self._desynced = True
            raise
        except asyncio.CancelledError:  # cancelled: the same (an error encoding the ids sent nothing)
            self._desynced = True
            raise
        self._add("env", ids, 0, [0.0] * len(ids))
        self._expect_length(done.length, "append")
        return done.length

    async def generate(self, input_ids: Sequence[int] = (), sampling_params: SamplingParams | None = None, *,
                       return_logprob: bool = True, min_version: int = 0, timeout: float | None = None,
                       ) -> GenerateDone:
        """A model turn on the whole history (``input_ids``, if any, is appended first as a prompt
        turn). A timeout aborts the turn, records its partial output, then raises RequestTimeout."""
        done = None
        async for item in self._turn(input_ids, sampling_params, return_logprob, min_version, timeout, None):
            done = item
        assert isinstance(done, GenerateDone)
        return done

    def stream(self, input_ids: Sequence[int] = (), sampling_params: SamplingParams | None = None, *,
               return_logprob: bool = True, min_version: int = 0, timeout: float | None = None,
               chunk_tokens: int = 1) -> AsyncGenerator[GenerateChunk | GenerateDone, None]:
        """``generate``, streamed: ``GenerateChunk`` deltas as the tokens come (``chunk_tokens``: at
        least this many per chunk), then the turn's ``GenerateDone``, which the history records.
        ``timeout`` bounds the whole turn. Leaving the iteration before the ``GenerateDone`` aborts
        the turn and, as a cancelled ``generate`` does, leaves the session unusable here (its
        history on the server is no longer known): read the stream to its end."""
        return self._turn(input_ids, sampling_params, return_logprob, min_version, timeout, chunk_tokens)

    async def _turn(self, input_ids: Sequence[int], sampling_params: SamplingParams | None, return_logprob: bool,
                    min_version: int, timeout: float | None, chunk_tokens: int | None,
                    ) -> AsyncGenerator[GenerateChunk | GenerateDone, None]:
        """One model turn; ``chunk_tokens`` None: not streamed (one GenerateDone)."""
        rpc = self._rpc_or_raise()
        self._check_synced()
        prompt = list(input_ids)
        msg = SessionGenerate(session_id=self.id, input_ids=prompt, sampling_params=sampling_params or SamplingParams(),
                              return_logprob=return_logprob, min_version=min_version, stream=chunk_tokens is not None,
                              chunk_tokens=chunk_tokens or 1)
        rid = rpc.next_rid()
        queue = rpc.open_stream(rid)
        timeout = timeout if timeout is not None else self.timeout
        deadline = deadline_in(timeout)
        timed_out = False
        abort_deadline = 0.0
        try:
            await rpc.send(rid, msg)
            while True:
                if timed_out:  # aborted: its remaining chunks, then its terminal reply, within the grace
                    item = await self._after_abort(queue, abort_deadline)
                else:
                    try:
                        async with asyncio.timeout(time_left(deadline, at_least=0.0)):
                            item = await queue.get()
                    except TimeoutError:
                        timed_out = True
                        assert timeout is not None  # (a deadline passed)
                        abort_deadline = asyncio.get_running_loop().time() + abort_grace(timeout)
                        await rpc.send(0, AbortRequest(target_rid=rid))
                        continue
                reply = unwrap(item)
                if isinstance(reply, GenerateChunk):
                    if not timed_out:
                        yield reply
                    continue
                done: GenerateDone = reply
                break
        except (asyncio.CancelledError, GeneratorExit):  # the turn goes on without us: stop it; the mirror is unknown
            self._desynced = True
            self._client._background.spawn(_send_quietly(rpc, AbortRequest(target_rid=rid)))  # best effort
            raise
        finally:
            rpc.close_stream(rid)
        self._expect_length(done.usage.prompt_tokens - len(prompt), "turn")
        self._record(prompt, done)
        if timed_out:
            raise RequestTimeout(f"session {self.id}: turn took over {timeout}s; aborted after "
                                 f"{len(done.output_ids)} tokens (kept in the history)")
        yield done

    async def _after_abort(self, queue: asyncio.Queue[Any], deadline: float) -> Any:
        """The next reply of an aborted turn (its chunks, then its terminal reply, all by
        ``deadline``), or desync."""
        try:
            async with asyncio.timeout_at(deadline):
                return await queue.get()
        except TimeoutError:
            self._desynced = True
            raise SessionDesynced(f"session {self.id}: no reply to an aborted turn") from None

    def trajectory(self) -> Trajectory:
        self._check_synced()
        spans = [sp for t in self._turns for sp in t.weight_version_spans]
        return Trajectory(token_ids=list(self._ids), loss_mask=list(self._mask), logprobs=list(self._lps),
                          weight_version_spans=spans, turns=list(self._turns))

    async def close(self) -> SessionClosed:
        closed: SessionClosed = await self._call(CloseSession(session_id=self.id))
        return closed

    # -- internals ------------------------------------------------------------------------
    def _check_synced(self) -> None:
        if self._desynced:
            raise SessionDesynced(f"session {self.id}: the server's history is no longer known here "
                                  "(a call was cancelled or timed out); close the session")

    def _expect_length(self, server_length: int, what: str) -> None:
        """The server's history length must be the mirror's (after an append; before a turn)."""
        mine = len(self._ids)
        if server_length != mine:
            self._desynced = True
            raise SessionDesynced(f"session {self.id}: after {what} the server holds {server_length} tokens, "
                                  f"this client {mine}")

    def _rpc_or_raise(self) -> RpcClient[Any]:
        if self._rpc is None or not self.id:
            raise RuntimeError("session is not open: use `async with rc.session() as s` or `await s.open()`")
        return self._rpc

    async def _call(self, msg: Any) -> Any:

        rpc = self._rpc if self._rpc is not None else await self._client._sessions()
        try:
            reply = await rpc.call(msg, timeout=self.timeout)
        except TimeoutError:
            raise RequestTimeout(f"no reply to {type(msg).__name__} within {self.timeout}s") from None
        return unwrap(reply)

    def _add(self, role: Literal["prompt", "model", "env"], ids: list[int], mask: int, lps: list[float]) -> TurnRecord:
        turn = TurnRecord(role=role, start=len(self._ids), end=len(self._ids) + len(ids))
        self._ids += ids
        self._mask += [mask] * len(ids)
        self._lps += lps
        self._turns.append(turn)
        return turn

    def _record(self, prompt: list[int], done: GenerateDone) -> None:
        if prompt:
            self._add("prompt", prompt, 0, [0.0] * len(prompt))
        out = list(done.output_ids)
        lps = list(done.output_logprobs) if done.output_logprobs is not None else [math.nan] * len(out)
        turn = self._add("model", out, 1, lps)
        turn.finish_reason = done.finish_reason
        turn.weight_version = done.weight_version
        turn.cached_tokens = done.usage.cached_tokens
        turn.weight_version_spans = [VersionSpan(version=s.version, start=turn.start + s.start, end=turn.start + s.end)
                                     for s in done.weight_version_spans]


async def _close_when_opened(attempt: asyncio.Future[Any], rpc: RpcClient[Any]) -> None:
    """An OpenSession nobody waits for any more: close the session if the server opened it."""
    try:
        opened = unwrap(await attempt)
    except Exception:  # refused, or the link failed: nothing was opened for us
        return
    if isinstance(opened, SessionOpened):
        with contextlib.suppress(Exception):
            await rpc.call(CloseSession(session_id=opened.session_id), timeout=ABORT_GRACE_S)


async def _send_quietly(rpc: RpcClient[Any], msg: Any) -> None:
    with contextlib.suppress(Exception):
        await rpc.send(0, msg)
