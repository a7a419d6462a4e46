"""FleetSession: a session of a ``RolloutFleet`` that moves to another server when its own dies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from rollwire.clients.session import Session
from rollwire.fleet.routing import SERVER_GONE, ServerView
from rollwire.messages import ErrorCode, GenerateChunk, GenerateDone, RollwireError, SamplingParams
from rollwire.runtime.deadlines import deadline_in, time_left
from rollwire.runtime.logging import get_logger
from rollwire.runtime.tasks import BackgroundTasks
from rollwire.transports.rpc import RequestTimeout

if TYPE_CHECKING:
    from rollwire.fleet.client import RolloutFleet

log = get_logger("rollwire.fleet")


class FleetSession:
    """A ``Session`` that survives its server: ``open``, ``append``, ``generate``, ``trajectory``,
    ``close`` as on ``Session``. When a call fails because the server is gone, the session opens on
    another live server, replays the whole history there in one append (one prefill on the next
    turn), and the call runs again; the trajectory, roles and loss mask included, goes on unbroken.
    A call that the dead server may have half done (a turn's output) is lost with it: the turn runs
    again on the new server. After a call whose reply was lost (a stalled server, a turn whose
    abort was not answered: SessionDesynced), the next call first replays this client's record into
    a fresh session on a live server (its own one included), so the session goes on as the caller
    saw it. A call made after the fleet has evicted the session's server (health
    missed) moves first instead of waiting out the liveness bound there; the copy left on that
    server, if it still lives, expires by its ttl. A server that answers ``unknown_session`` (it
    was restarted at the same endpoints, as Ray restarts a server) gets the record replayed like a
    move, on any live server, its own included (once per call). Opening or moving onto a server
    whose session table is full tries the next one."""

    def __init__(self, fleet: RolloutFleet, kw: dict[str, Any]) -> None:
        self._fleet = fleet
        self._kw = kw
        self._session: Session | None = None
        self._server: ServerView | None = None
        self.moves = 0  # servers it moved away from
        self._closed = False  # closed by its caller: never replayed again
        self._closing = BackgroundTasks()  # half-made sessions being closed (_discard)

    async def __aenter__(self) -> FleetSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is None:
            return
        # the body's own error goes out as it is; a gone server, or a closed fleet, has nothing left to free
        quiet = exc[0] is not None or not self.server_alive or self._fleet.closing or self._session.link_retired
        with contextlib.suppress(*((RollwireError,) if quiet else ())):
            await self._session.__aexit__(*exc)

    @property
    def id(self) -> str:
        return self._session.id if self._session is not None else ""

    @property
    def endpoint(self) -> str:
        return self._server.endpoint if self._server is not None else ""

    async def open(self) -> None:
        """Open on a live server; one that is gone when asked is evicted and the next is tried
        (at most ``max_failovers`` times)."""
        self._server, self._session = await self._place([], lambda s: s.open(), "open",
                                                        deadline_in(self._kw.get("timeout")))

    async def append(self, token_ids: Sequence[int]) -> int:
        return await self._moving(lambda s: s.append(token_ids))  # type: ignore[no-any-return]

    def _deadline(self, kw: dict[str, Any]) -> float | None:
        """The call's ``timeout`` (or the session's) as a deadline on the loop's clock."""
        timeout = kw.pop("timeout", None)
        if timeout is None:
            timeout = self._kw.get("timeout")
        return deadline_in(timeout)

    async def generate(self, input_ids: Sequence[int] = (), sampling_params: SamplingParams | None = None,
                       **kw: Any) -> GenerateDone:
        """``Session.generate``; its ``timeout`` bounds the whole call, moves included (each turn
        gets what is left, and times out as ``Session.generate`` does: aborted, partial output kept)."""
        deadline = self._deadline(kw)

        def attempt(s: Session) -> Any:
            return s.generate(input_ids, sampling_params, timeout=time_left(deadline), **kw)

        return await self._moving(attempt, deadline)  # type: ignore[no-any-return]

    async def stream(self, input_ids: Sequence[int] = (), sampling_params: SamplingParams | None = None,
                     **kw: Any) -> AsyncGenerator[GenerateChunk | GenerateDone, None]:
        """``Session.stream`` on the session's server. Before the first chunk it moves like any call
        (server evicted, or gone when asked); a server that dies after chunks went out ends the
        stream with its typed error (``server_unavailable``...): the turn is not recorded, and the
        next call moves the session, history intact, to a live server. ``timeout`` bounds the whole
        call, moves included, as for ``generate``."""
        assert self._session is not None and self._server is not None, "session is not open"
        deadline = self._deadline(kw)
        await self._resync_if_needed(deadline)
        tried, forgotten = [self._server], [False]
        if not self._server.alive and self._fleet.max_failovers > 0 and self._fleet.router.live(exclude=tried):
            await self._move(tried, f"server evicted ({self._server.why_out})", deadline)
        while True:
            streamed = False
            try:
                turn = self._session.stream(input_ids, sampling_params, timeout=time_left(deadline), **kw)
                async with contextlib.aclosing(turn):  # left early: the turn is aborted there too
                    async for item in turn:
                        streamed = True
                        yield item
                return
            except RollwireError as e:
                if streamed:  # chunks went out: the turn cannot run again unseen
                    if e.code in SERVER_GONE and not self._fleet.closing and not self._session.link_retired:
                        self._fleet._evict(self._server, f"session stream failed: {e.code.value}")
                    raise
                await self._after_failure(e, tried, forgotten, deadline)

    def trajectory(self) -> Any:
        assert self._session is not None, "session is not open"
        return self._session.trajectory()

    async def close(self) -> Any:
        assert self._session is not None, "session is not open"
        self._closed = True
        return await self._session.close()

    @property
    def server_alive(self) -> bool:
        """Whether the fleet still counts this session's server as live (not evicted)."""
        return self._server is not None and self._server.alive

    async def _resync_if_needed(self, deadline: float | None) -> None:
        """An earlier call's reply was lost (a stalled server, a call timed out): the server's copy is
        unknown, so the session goes on from this client's record, replayed into a fresh session on
        a live server (its own one included), once the old copy is closed (if its server answers)."""
        assert self._session is not None and self._server is not None
        if not self._session.desynced:
            return
        old, was = self._session, self._server
        with contextlib.suppress(Exception):  # first: a server at its session limit then has room for the fresh one
            async with asyncio.timeout_at(deadline):
                await old.close()
        server, fresh = await self._place([], lambda s: s.replay(old, from_desynced=True), "resync", deadline)
        log.warning("session_resynced", frm=was.endpoint, to=server.endpoint, tokens=len(old._ids))
        self._session, self._server = fresh, server

    async def _moving(self, call: Any, deadline: float | None = None) -> Any:
        assert self._session is not None and self._server is not None, "session is not open"
        await self._resync_if_needed(deadline)
        tried, forgotten = [self._server], [False]
        if not self._server.alive and self._fleet.max_failovers > 0 and self._fleet.router.live(exclude=tried):
            # the fleet already took its server for dead: move now rather than wait out the
            # liveness bound on a call to it
            await self._move(tried, f"server evicted ({self._server.why_out})", deadline)
        while True:
            try:
                return await call(self._session)
            except RollwireError as e:
                await self._after_failure(e, tried, forgotten, deadline)

    async def _after_failure(self, e: RollwireError, tried: list[ServerView], forgotten: list[bool],
                             deadline: float | None) -> None:
        """After a failed call: move the session (the call then runs again), or raise ``e``. A server
        gone is evicted. A server that no longer has the session (it answers ``unknown_session``,
        or the error only says this session's link to it was retired: it restarted at the same
        rollout endpoint on a fresh session port, and the fleet has just re-admitted it) is not
        evicted: the record is replayed on any live server, its own included, once per call
        (``forgotten``). A session its caller closed is never replayed."""
        assert self._session is not None and self._server is not None
        if self._fleet.closing or self._closed:
            raise e
        retired = e.code in SERVER_GONE and self._session.link_retired
        if (e.code == ErrorCode.UNKNOWN_SESSION or retired) and not forgotten[0] and self._fleet.max_failovers > 0:
            forgotten[0] = True
            await self._move([], "its server no longer has the session (restarted)", deadline)
            return
        if e.code not in SERVER_GONE or len(tried) > self._fleet.max_failovers:
            raise e
        self._fleet._evict(self._server, f"session call failed: {e.code.value}")
        await self._move(tried, e.code.value, deadline)

    async def _move(self, tried: list[ServerView], why: str, deadline: float | None = None) -> None:
        """Reopen on another live server and replay the history there (one append), by ``deadline``
        (loop time)."""
        assert self._session is not None and self._server is not None
        old = self._session
        server, moved = await self._place(tried, lambda s: s.replay(old), "replay", deadline)
        log.warning("session_moved", frm=self._server.endpoint, to=server.endpoint, why=why,
                    tokens=len(old.trajectory().token_ids))
        self._session, self._server = moved, server
        self.moves += 1

    async def _place(self, tried: list[ServerView], start: Callable[[Session], Awaitable[Any]], what: str,
                     deadline: float | None = None) -> tuple[ServerView, Session]:
        """A session on a live server not in ``tried``, ``start`` run on it by ``deadline`` (loop
        time). A server that is gone when asked is evicted and the next one tried; after
        ``max_failovers`` servers in ``tried`` the error goes out. A session left half-made on a
        server is closed there."""
        full: RollwireError | None = None  # the last server's "too_many_sessions", if none is left after it
        skipped = 0  # servers tried that were only full: not failovers
        while True:
            if full is not None and not self._fleet.router.live(exclude=tried):
                raise full
            server = self._fleet._choose([], 1, 0, exclude=tried)
            tried.append(server)
            session = server.client.session(**self._kw)
            try:
                async with asyncio.timeout_at(deadline):
                    await start(session)
                return server, session
            except TimeoutError:
                self._discard(session)
                raise RequestTimeout(f"session {what} on {server.endpoint} outlived the call's timeout") from None
            except RollwireError as e:
                self._discard(session)
                if e.code == ErrorCode.TOO_MANY_SESSIONS and not self._fleet.closing:
                    full, skipped = e, skipped + 1  # that server is well, only full: the next one is tried
                    continue
                if e.code not in SERVER_GONE or self._fleet.closing or len(tried) - skipped > self._fleet.max_failovers:
                    raise
                self._fleet._evict(server, f"session {what} failed: {e.code.value}")
            except BaseException:
                self._discard(session)
                raise

    def _discard(self, session: Session) -> None:
        """Close, in the background, a session opened on a server but not taken into use."""
        if not session.id:
            return

        async def close() -> None:
            with contextlib.suppress(Exception):
                await session.close()

        self._closing.spawn(close())
