"""Which rollwire session a chat request belongs to: its id (header or body), the session opened
on first use, the cleanup of one whose first turn failed, and a session carried over a restart of
its rollout server."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from fastapi import Request

from rollwire.clients.session import Session, SessionDesynced
from rollwire.fleet.session import FleetSession
from rollwire.gateway.core import SESSION_HEADER, Gateway, close_quietly
from rollwire.gateway.errors import APIError, bad_request, from_rollwire
from rollwire.gateway.schemas import SESSION_ID_PATTERN
from rollwire.gateway.sessions import ChatSession
from rollwire.messages import RollwireError


def session_id_of(request: Request, in_body: str | None) -> str | None:
    """The request's session id (header or body; both: the same), checked like the body field: it
    goes back out in a header and in the trajectory routes' paths."""
    header = request.headers.get(SESSION_HEADER) or None  # an empty header: no session, as before
    if header is None:
        return in_body
    if not re.fullmatch(SESSION_ID_PATTERN, header):
        raise bad_request(f"{SESSION_HEADER}: 1 to 256 characters of A-Z a-z 0-9 . _ ~ : @ + = -", "session_id")
    if in_body is not None and in_body != header:
        raise bad_request(f"the {SESSION_HEADER} header and session_id disagree: send one", "session_id")
    return header


def drop_if_unused(gw: Gateway, cs: ChatSession) -> None:
    """A session whose first turn failed holds nothing worth keeping: it is not left open."""
    if not cs.messages and not cs.lock.locked():
        gw.drop_session(cs)


def unsupported_session() -> APIError:
    return APIError(400, "sessions are for /v1/chat/completions (a completion has no turns)", param="session_id",
                    code="unsupported_parameter")


async def open_chat_session(gw: Gateway, owner: str, sid: str, tools: list[dict[str, Any]] | None) -> ChatSession:
    """The caller's chat session ``sid``, opened on the server on first use (within the gateway's
    session limit); another request that opened it meanwhile wins, and ours is closed."""
    cs = gw.sessions.sessions.get((owner, sid))
    if cs is not None:
        return cs
    gw.sessions.check_room()
    session = server_session(gw)
    try:
        await session.open()
    except RollwireError as e:
        raise from_rollwire(e) from None
    if (owner, sid) in gw.sessions.sessions:  # another request opened it while we waited
        with contextlib.suppress(RollwireError):
            await session.close()
        return gw.sessions.sessions[(owner, sid)]
    cs = gw.sessions.sessions[(owner, sid)] = ChatSession((owner, sid), session, tools)
    gw.metrics.inc("sessions_opened_total")
    return cs


def server_session(gw: Gateway) -> Session | FleetSession:
    """A new rollwire session (not opened yet) with the gateway's limits."""
    return gw.client.session(max_tokens=gw.cfg.session_max_tokens, ttl_s=gw.cfg.session_ttl_s,
                             timeout=gw.cfg.request_timeout_s)


def dropped_desynced(gw: Gateway, cs: ChatSession, e: SessionDesynced) -> APIError:
    """Drop a session whose server-side history is unknown; the 503 to answer with."""
    gw.drop_session(cs)
    return APIError(503, f"{e}; the session is dropped", type="service_unavailable_error", code="session_desynced")


def on_a_restarted_server(cs: ChatSession) -> bool:
    """The session's rollout server restarted at its endpoint since the session opened there (its
    client heard a new session port): the session is gone there. (A fleet's sessions move by
    themselves.)"""
    return isinstance(cs.session, Session) and cs.session.link_retired


async def reopen_on_restarted_server(gw: Gateway, cs: ChatSession) -> None:
    """Replay the session's record into a new session on the restarted server (its next turn
    prefills the history once), as a fleet moves a session off a dead server: the trajectory goes
    on, ids, masks and logprobs as they were. Before, every later turn failed ``shutting_down``
    until the session's TTL ran out."""
    old = cs.session
    assert isinstance(old, Session)
    fresh = server_session(gw)
    assert isinstance(fresh, Session)
    try:
        await fresh.replay(old)
    except BaseException as e:  # refused, desynced or cancelled (a hang-up): the new one is not left open
        gw.spawn(close_quietly(fresh))
        if isinstance(e, SessionDesynced):  # what the server holds is unknown: the record cannot go on
            raise dropped_desynced(gw, cs, e) from None
        if isinstance(e, RollwireError):
            raise from_rollwire(e) from None
        raise
    cs.session = fresh
    cs.replays += 1
    gw.metrics.inc("session_moves_total")
