"""SessionActor: multi-turn sessions (agentic rollouts) whose token history lives in the server.

Owns the session table: each session's token history, turn count, limits, TTL and last weight
version. A model turn (``SessionGenerate``) is forwarded to the GenerationActor as an ordinary
``GenerateRequest`` over the whole history, tagged with the session id so the engine reuses its
cached KV prefix; the reply (``GenerateDone``) extends the history and goes back to the worker.
An environment turn (``AppendTokens``) only extends the history. So a session turn is paused,
retracted, aborted and version-stamped exactly as a plain request is.

Rules: one turn at a time per session (SESSION_BUSY); a turn that could take the history past
``max_tokens`` is refused (SESSION_LIMIT), never truncated; an aborted turn's partial output is
kept in the history (the next turn continues from it); a failed turn leaves the history as it
was. Closing or expiring a session (idle past ``ttl_s``) frees the engine's cached prefix
(``ForgetSession``). A restart of this actor loses the table: workers then get UNKNOWN_SESSION.

Ownership. A session belongs to the client that opened it (``Origin.client``: its CURVE key, else
its connection). Any other client that names the session (use, append, close) gets
UNKNOWN_SESSION, exactly as for an id that never existed, closed and expired ids included: an
UNAUTHORIZED would confirm to a stranger that a leaked or guessed id is live. Aborts address the
sender's own request ids, so nobody can abort another client's turn.

Limits. At most ``max_sessions`` open sessions, at most ``max_client_sessions`` per client
(default half the table, as the GenerationActor's per-client share of its slots: one client never
locks a newcomer out); beyond either an open is refused (TOO_MANY_SESSIONS / CLIENT_LIMIT, with
``retry_after_s``) before anything is recorded. A turn is forwarded with the client's name, so the
GenerationActor counts it against that client's caps and batch share.

A gone client (``on_client_gone``: silent for ``client_timeout_s`` after it spoke liveness) has its
sessions closed: running turns aborted (their terminal reply goes out, likely undelivered), the
engine's cached prefixes forgotten. Under CURVE an identity may hold several connections (several
processes with one key, or a client that reconnected): its sessions go only when the last of its
connections that beat is gone, since any of them may use them.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rollwire.messages import (
    AbortRequest,
    Appended,
    AppendTokens,
    CloseSession,
    ControlReply,
    ErrorCode,
    ErrorReply,
    ForgetSession,
    GenerateChunk,
    GenerateDone,
    GenerateRequest,
    OpenSession,
    RolloutReply,
    SessionClosed,
    SessionGenerate,
    SessionOpened,
    SessionRequest,
    StatusReply,
    StatusRequest,
)
from rollwire.runtime import Actor, Origin, Port, RollwireError, handles
from rollwire.transports.rpc import ConnectionClosed, RpcClient

SESSIONS = "sessions"
MAX_TOMBSTONES = 65536  # closed/expired ids remembered, so late users get the precise error
MAX_EARLY_ABORTS = 4096  # aborts that overtook their turn's registration, kept until it registers
MAX_ABORT_WAIT_S = 30.0  # close() waits this long for an aborted turn to end
MAX_TTL_S = 86400.0  # a day: an idle session lives at most this long (ttl_s=inf would pin its slot forever)


@dataclass(eq=False)
class _Turn:
    origin: Origin  # the worker's SessionGenerate
    forward_rid: int  # our GenerateRequest's rid at the GenerationActor
    abort_sent: bool = False
    answered_elsewhere: bool = False  # the supervisor answered it (restart)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # its reply is recorded


@dataclass(eq=False)
class _Session:
    id: str
    owner: str  # Origin.client of the opener: only it may use, append to or close the session
    max_tokens: int
    ttl_s: float
    keep_stale_prefix: bool
    history: list[int] = field(default_factory=list)
    turns: int = 0
    last_version: int = -1
    last_used: float = field(default_factory=time.monotonic)
    turn: _Turn | None = None  # the model turn running now
    closed: bool = False


class SessionActor(Actor):
    ports = {"sessions": Port(SessionRequest)}

    def __init__(self, *, generation_rollout: str, generation_control: str, max_sessions: int = 4096,
                 max_session_tokens: int = 32768, sweep_interval_s: float = 1.0, name: str = SESSIONS,
                 client_timeout_s: float = Actor.client_timeout_s, max_client_sessions: int | None = None,
                 retry_after_s: float = 1.0) -> None:
        super().__init__(name)
        self.client_timeout_s = client_timeout_s
        self._rollout_endpoint = generation_rollout
        self._control_endpoint = generation_control
        self.max_sessions = max_sessions
        # per client (None: half the table, so one client never takes every slot)
        self.max_client_sessions = max_client_sessions if max_client_sessions is not None else max(1, max_sessions // 2)
        self.retry_after_s = retry_after_s  # told to refused opens (too_many_sessions, client_limit)
        self.max_session_tokens = max_session_tokens
        self.sweep_interval_s = sweep_interval_s
        self.sessions: dict[str, _Session] = {}
        self._client_sessions: collections.Counter[str] = collections.Counter()  # owner -> open sessions
        self._gone: OrderedDict[str, tuple[ErrorCode, str]] = OrderedDict()  # closed / expired id -> (code, owner)
        self._turns: dict[tuple[bytes, int], _Turn] = {}  # (worker, its rid) -> running turn
        self._early_aborts: OrderedDict[tuple[bytes, int], None] = OrderedDict()
        self._arriving: Counter[tuple[bytes, int]] = Counter()  # turns received, not yet ended
        self._orphans: list[_Turn] = []  # turns the supervisor answered: on_stop aborts them
        self._vocab_size = 0

    @property
    def _generation(self) -> RpcClient[Any]:
        return self.peer(self._rollout_endpoint, RolloutReply)

    async def on_start(self) -> None:
        self.spawn(self._sweep(), name=f"{self.name}:sweep")

    def take_held_requests(self) -> list[Origin]:
        """On a crash: the supervisor answers the running turns; ``on_stop`` then stops their
        engine work and frees the engine state of every session (the successor starts empty)."""
        held = list(self._turns.values())
        for t in held:
            t.answered_elsewhere = True
        self._turns.clear()
        self._orphans = held
        return [t.origin for t in held]

    async def on_stop(self) -> None:
        if not self._orphans:  # a clean stop: the GenerationActor has stopped and aborted everything
            return
        jobs = [self._abort(t) for t in self._orphans] + [self._forget(sid) for sid in self.sessions]
        await asyncio.wait([asyncio.ensure_future(j) for j in jobs], timeout=5.0)

    # -- handlers -------------------------------------------------------------------------
    @handles(OpenSession)
    def on_open(self, origin: Origin, msg: OpenSession, payload: Sequence[Any]) -> None:
        if not 0 < msg.max_tokens <= self.max_session_tokens:
            raise RollwireError(ErrorCode.BAD_FIELD,
                                f"max_tokens={msg.max_tokens} must be in [1, {self.max_session_tokens}]")
        if not 0 < msg.ttl_s <= MAX_TTL_S:  # bounded: a session nobody closes must expire some day
            raise RollwireError(ErrorCode.BAD_FIELD, f"ttl_s={msg.ttl_s} must be in (0, {MAX_TTL_S:g}]")
        if self._client_sessions[origin.client] >= self.max_client_sessions:
            self._refuse(origin, ErrorCode.CLIENT_LIMIT,
                         f"this client has {self.max_client_sessions} sessions open (its limit)")
            return
        if len(self.sessions) >= self.max_sessions:
            self._refuse(origin, ErrorCode.TOO_MANY_SESSIONS, f"{len(self.sessions)} sessions are open (the limit)")
            return
        sid = uuid.uuid4().hex
        self.sessions[sid] = _Session(sid, origin.client, msg.max_tokens, msg.ttl_s, msg.keep_stale_prefix)
        self._client_sessions[origin.client] += 1
        self.counters.inc("sessions_opened")
        self._gauges()
        self.reply_nowait(origin, SessionOpened(session_id=sid, max_tokens=msg.max_tokens, ttl_s=msg.ttl_s))

    @handles(AppendTokens)
    async def on_append(self, origin: Origin, msg: AppendTokens, payload: Sequence[Any]) -> None:
        self._idle_session(origin, msg.session_id)
        if not msg.token_ids:
            raise RollwireError(ErrorCode.EMPTY_INPUT, "token_ids is empty")
        await self._check_tokens(msg.token_ids)
        s = self._idle_session(origin, msg.session_id)  # again: the vocab check may have waited
        self._check_room(s, len(msg.token_ids), 0)
        s.history.extend(msg.token_ids)
        s.last_used = time.monotonic()
        await self.reply(origin, Appended(session_id=s.id, length=len(s.history)))

    @handles(SessionGenerate)
    def on_generate(self, origin: Origin, msg: SessionGenerate, payload: Sequence[Any]) -> Any:
        # counted as it arrives, before its checks run: an abort that overtakes them is kept for it,
        # and one for a turn not arriving (over, or never sent) is dropped, never kept for a later
        # turn that reuses the rid
        key = (origin.conn, origin.rid)
        self._arriving[key] += 1
        return self._turn_of(origin, msg, key)

    async def _turn_of(self, origin: Origin, msg: SessionGenerate, key: tuple[bytes, int]) -> None:
        try:
            await self._run_turn(origin, msg)
        finally:
            self._ended(key)

    def on_refused(self, origin: Origin, msg: Any) -> None:
        if isinstance(msg, SessionGenerate):  # refused overloaded: its turn never runs, nor its finally
            self._ended((origin.conn, origin.rid))

    def _ended(self, key: tuple[bytes, int]) -> None:
        self._arriving[key] -= 1
        if self._arriving[key] <= 0:
            del self._arriving[key]
            self._early_aborts.pop(key, None)

    async def _run_turn(self, origin: Origin, msg: SessionGenerate) -> None:
        self._idle_session(origin, msg.session_id)
        sp = msg.sampling_params
        if sp.n != 1:
            raise RollwireError(ErrorCode.BAD_SAMPLING_PARAMS, f"n={sp.n}: a session turn is one sample (n=1)")
        if msg.input_ids:
            await self._check_tokens(msg.input_ids)
        s = self._idle_session(origin, msg.session_id)  # again: the vocab check may have waited
        if not s.history and not msg.input_ids:
            raise RollwireError(ErrorCode.EMPTY_INPUT, "the session is empty and input_ids is empty")
        if (origin.conn, origin.rid) in self._turns:
            raise RollwireError(ErrorCode.DUPLICATE_REQUEST, f"request {origin.rid} is already in flight")
        self._check_room(s, len(msg.input_ids), sp.max_new_tokens)
        rpc = self._generation
        turn = _Turn(origin, rpc.next_rid())
        s.turn = self._turns[(origin.conn, origin.rid)] = turn
        prompt = s.history + list(msg.input_ids)
        queue = rpc.open_stream(turn.forward_rid)
        try:
            await rpc.send(turn.forward_rid, GenerateRequest(
                input_ids=prompt, sampling_params=sp, return_logprob=msg.return_logprob, stream=msg.stream,
                min_version=msg.min_version, session_id=s.id, keep_stale_prefix=s.keep_stale_prefix,
                client=origin.client, chunk_tokens=msg.chunk_tokens))
            if (origin.conn, origin.rid) in self._early_aborts:  # the worker's abort overtook the turn
                del self._early_aborts[(origin.conn, origin.rid)]
                await self._abort(turn)
            item = await queue.get()
            while not isinstance(item, BaseException) and isinstance(item.msg, GenerateChunk):
                if not turn.answered_elsewhere:  # streamed: each delta goes on as it comes
                    await self.reply(origin, item.msg)
                item = await queue.get()
        finally:
            rpc.close_stream(turn.forward_rid)
            s.turn = None
            s.last_used = time.monotonic()
            self._turns.pop((origin.conn, origin.rid), None)
        reply = item.msg if not isinstance(item, BaseException) else ErrorReply(
            code=ErrorCode.SHUTTING_DOWN if isinstance(item, ConnectionClosed) else ErrorCode.INTERNAL,
            message=f"generation did not answer the turn: {item!r}", origin=self.name)
        if isinstance(reply, GenerateDone):
            s.history = prompt + reply.output_ids  # an aborted turn's partial output stays too
            s.turns += 1
            s.last_version = reply.weight_version
            self.counters.inc("turns")
        turn.ended.set()
        if s.closed:  # closed while the turn ran: the turn's new prefix must go as well
            self.spawn(self._forget(s.id))
        if not turn.answered_elsewhere:
            if isinstance(reply, (GenerateDone, ErrorReply)):
                await self.reply(origin, reply)
            else:
                raise RollwireError(ErrorCode.INTERNAL, f"unexpected reply {type(reply).__name__}")

    @handles(AbortRequest)
    def on_abort(self, origin: Origin, msg: AbortRequest, payload: Sequence[Any]) -> None:
        turn = self._turns.get((origin.conn, msg.target_rid))
        if turn is not None:
            self.spawn(self._abort(turn))
            return
        if (origin.conn, msg.target_rid) not in self._arriving:
            return  # over already (its terminal reply is on the way or delivered), or never sent
        # arrived, still being checked before it registers: kept until it does
        self._early_aborts[(origin.conn, msg.target_rid)] = None
        while len(self._early_aborts) > MAX_EARLY_ABORTS:
            self._early_aborts.popitem(last=False)

    @handles(CloseSession)
    async def on_close(self, origin: Origin, msg: CloseSession, payload: Sequence[Any]) -> None:
        s = self._session(origin, msg.session_id)
        self._drop(s, ErrorCode.SESSION_CLOSED)
        self.counters.inc("sessions_closed")
        await self._end(s)
        await self.reply(origin, SessionClosed(session_id=s.id, length=len(s.history), turns=s.turns))

    def on_client_gone(self, sock: str, peer: bytes, client: str) -> None:
        """Close the gone client's sessions, unless another connection of the same identity (a
        CURVE key) still beats: any of its connections may use them."""
        if self.has_live_connection(client):
            return
        mine = [s for s in self.sessions.values() if s.owner == client]
        for s in mine:
            self._drop(s, ErrorCode.SESSION_EXPIRED)
            self.spawn(self._end(s))
        self.counters.inc("client_gone_sessions", len(mine))
        if mine:
            self.log.info("client_gone_sessions_closed", client=client, sessions=len(mine),
                          turns_aborted=sum(s.turn is not None for s in mine))

    # -- internals ------------------------------------------------------------------------
    def _refuse(self, origin: Origin, code: ErrorCode, message: str) -> None:
        """An open refused before anything was recorded: the same request may be sent again."""
        self.counters.inc(f"refused_{code.value}")
        self.reply_nowait(origin, ErrorReply(code=code, message=message, origin=self.name,
                                             retry_after_s=self.retry_after_s))

    def _session(self, origin: Origin, session_id: str) -> _Session:
        """The sender's session; another client's (open or gone) is as unknown as a made-up id."""
        s = self.sessions.get(session_id)
        if s is not None and s.owner == origin.client:
            return s
        code, owner = self._gone.get(session_id, (ErrorCode.UNKNOWN_SESSION, origin.client))
        if s is not None or owner != origin.client:
            self.counters.inc("not_owner")
            code = ErrorCode.UNKNOWN_SESSION
        if code is ErrorCode.SESSION_EXPIRED:
            raise RollwireError(code, f"session {session_id} expired (idle past its ttl_s, or its client went silent)")
        if code is ErrorCode.SESSION_CLOSED:
            raise RollwireError(code, f"session {session_id} is closed")
        raise RollwireError(ErrorCode.UNKNOWN_SESSION, f"no session {session_id!r} on this server")

    def _drop(self, s: _Session, code: ErrorCode) -> None:
        """Remove ``s`` from the table (no one can use it from here on); ``_end`` frees its engine state."""
        s.closed = True
        del self.sessions[s.id]
        self._client_sessions[s.owner] -= 1
        if not self._client_sessions[s.owner]:
            del self._client_sessions[s.owner]
        self._remember_gone(s.id, code, s.owner)
        self._gauges()

    def _gauges(self) -> None:
        self.counters.set("sessions_open", len(self.sessions))
        self.counters.set("clients_with_sessions", len(self._client_sessions))

    async def _end(self, s: _Session) -> None:
        """Free a dropped session's engine state: a running turn is aborted (its reply reaches the
        worker, then the turn's end forgets the prefix), else the prefix is forgotten now."""
        if s.turn is not None:
            turn = s.turn
            await self._abort(turn)
            await asyncio.wait([asyncio.ensure_future(turn.ended.wait())], timeout=MAX_ABORT_WAIT_S)
        else:
            await self._forget(s.id)

    def _idle_session(self, origin: Origin, session_id: str) -> _Session:
        s = self._session(origin, session_id)
        if s.turn is not None:
            raise RollwireError(ErrorCode.SESSION_BUSY, f"session {session_id} has a turn running")
        return s

    @staticmethod
    def _check_room(s: _Session, new_input: int, max_new_tokens: int) -> None:
        need = len(s.history) + new_input + max_new_tokens
        if need > s.max_tokens:
            raise RollwireError(ErrorCode.SESSION_LIMIT, (
                f"history {len(s.history)} + input {new_input} + max_new_tokens {max_new_tokens} = {need} "
                f"exceeds the session's max_tokens {s.max_tokens}"))

    async def _check_tokens(self, ids: Sequence[int]) -> None:
        if not self._vocab_size:
            try:
                reply = (await self._generation.call(StatusRequest(), timeout=10.0)).msg
            except (TimeoutError, ConnectionClosed) as e:
                raise RollwireError(ErrorCode.TIMEOUT, f"generation status unavailable: {e!r}") from None
            if not isinstance(reply, StatusReply):
                raise RollwireError(ErrorCode.INTERNAL, f"generation status failed: {reply}")
            self._vocab_size = reply.vocab_size
        if min(ids) < 0 or max(ids) >= self._vocab_size:
            raise RollwireError(ErrorCode.TOKEN_OUT_OF_RANGE, f"token ids must lie in [0, {self._vocab_size})")

    async def _abort(self, turn: _Turn) -> None:
        if not turn.abort_sent:
            turn.abort_sent = True
            await self._generation.send(0, AbortRequest(target_rid=turn.forward_rid))

    async def _forget(self, session_id: str) -> None:
        """Free the engine's state of the session; a failure is logged (the engine's prefix cache
        is bounded and evicts on its own), never fatal."""
        try:
            await self.peer(self._control_endpoint, ControlReply).call(ForgetSession(session_id=session_id),
                                                                       timeout=30.0)
        except Exception as e:  # a failed forget must never take the actor down
            self.counters.inc("forget_failed")
            self.log.warning("forget_session_failed", session_id=session_id, error=repr(e)[:300])

    def _remember_gone(self, session_id: str, code: ErrorCode, owner: str) -> None:
        self._gone[session_id] = (code, owner)
        while len(self._gone) > MAX_TOMBSTONES:
            self._gone.popitem(last=False)

    async def _sweep(self) -> None:
        """Expire sessions idle past their ttl_s (a session with a turn running is not idle). All
        are removed before any engine state is freed, so no session is used in between."""
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            now = time.monotonic()
            expired = [s for s in self.sessions.values() if s.turn is None and now - s.last_used > s.ttl_s]
            for s in expired:
                self._drop(s, ErrorCode.SESSION_EXPIRED)
                self.counters.inc("sessions_expired")
                self.log.info("session_expired", session_id=s.id, tokens=len(s.history), turns=s.turns)
            for s in expired:
                await self._forget(s.id)
