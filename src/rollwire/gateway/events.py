"""How a request's samples run: the events (one per delta) that the routes render as JSON or SSE.

A plain request is one token request for all ``n`` choices; a session request is its session's
next turn. Every layer closes the one below it when it ends early (``aclosing``), and the HTTP
stream is closed as soon as its response ends (``ClosingStreamingResponse``), so a client that
goes away aborts its requests on the server and releases its session turn at once, not when the
garbage collector gets to the abandoned generators.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, cast

from fastapi.responses import StreamingResponse

from rollwire.clients.session import SessionDesynced
from rollwire.fleet.session import FleetSession
from rollwire.gateway.chat import Canonical
from rollwire.gateway.choices import Choice
from rollwire.gateway.errors import from_rollwire
from rollwire.gateway.sessions import ChatSession
from rollwire.messages import GenerateChunk, GenerateDone, RollwireError, SamplingParams

if TYPE_CHECKING:
    from rollwire.gateway.core import Gateway

Event = tuple[int, list[dict[str, Any]], list[int], int]  # (choice index, deltas, tokens covered, first token pos)
Events = AsyncGenerator[Event, None]  # closed by whoever stops reading early (aclosing)


async def plain_events(gw: Gateway, prompt: list[int], sp: SamplingParams, choices: list[Choice],
                        streamed: bool) -> Events:
    """One token request for all n choices; streamed when asked (or to cut at stop strings)."""
    if not streamed:
        outs = await gw.client.generate(prompt, sp, return_logprob=True)
        for done in outs if isinstance(outs, list) else [outs]:
            c = choices[done.index]
            deltas, taken = c.feed(done.output_ids, done.output_logprobs)
            yield c.index, deltas + c.finish(done), taken, 0
        return
    stream = gw.client.stream(prompt, sp, return_logprob=True)
    aborted = False
    try:
        async for msg in stream:  # (its own finally aborts what is still running)
            c = choices[msg.index]
            if isinstance(msg, GenerateChunk):
                start = len(c.ids)
                deltas, taken = c.feed(msg.token_ids, msg.logprobs)
                if deltas or taken:
                    yield c.index, deltas, taken, start
            elif isinstance(msg, GenerateDone):
                yield c.index, c.finish(msg), [], len(c.ids)
            if not aborted and all(ch.stopped or ch.done is not None for ch in choices) and \
                    any(ch.done is None for ch in choices):
                aborted = True  # every choice hit a stop string: stop the engine, wait for the Dones
                await stream.abort()
    finally:
        if not all(ch.done is not None for ch in choices):  # the caller went away: free the engine
            with contextlib.suppress(Exception):
                await stream.aclose()  # aborts what still runs, once


async def session_turn(gw: Gateway, cs: ChatSession, messages: list[Canonical], prompt: list[int],
                        prompt_text: str, sp: SamplingParams, choice: Choice, streamed: bool)\
        -> Events:
    """One turn in the chat's session: token by token when ``streamed``. The chat record is extended
    as soon as the turn's GenerateDone is in, before its last event goes out; the session's lock
    (taken by the caller) is released however the turn ends. A turn that changed the rollwire
    session's history without reaching this record (a timeout keeps its partial output there; a
    cut-off stream leaves it unknown) drops the chat session: its record no longer matches the
    server's, and the id starts afresh, rather than building a trajectory on a wrong history."""
    moves = cs.session.moves if isinstance(cs.session, FleetSession) else 0
    before = history_length(cs)
    recorded = False

    def record() -> None:
        nonlocal recorded
        assert choice.done is not None
        cs.record(gw.chat, messages, choice.message(), prompt_text, list(choice.done.output_ids),
                  prompt_turn=bool(prompt))
        recorded = True
        gw.metrics.inc("session_turns_total")

    try:
        if not streamed:
            done = await cs.session.generate(prompt, sp, return_logprob=True, timeout=gw.cfg.request_timeout_s)
            deltas, taken = choice.feed(done.output_ids, done.output_logprobs)
            last = deltas + choice.finish(done)
            record()
            yield choice.index, last, taken, 0
        else:
            turn = cs.session.stream(prompt, sp, return_logprob=True, timeout=gw.cfg.request_timeout_s)
            async with contextlib.aclosing(turn):  # left early: the turn is aborted, the session desynced
                async for msg in turn:
                    if isinstance(msg, GenerateChunk):
                        start = len(choice.ids)
                        deltas, taken = choice.feed(msg.token_ids, msg.logprobs)
                        if deltas or taken:
                            yield choice.index, deltas, taken, start
                    else:
                        last = choice.finish(msg)
                        record()
                        yield choice.index, last, [], len(choice.ids)
    except BaseException:
        # a changed history this record lacks: nobody can use the session any more; a first turn
        # that failed (after its first event too: a stream cut by the server's death) leaves none
        if not recorded and (history_length(cs) != before or not cs.messages):
            gw.drop_session(cs)  # and freed on the server
        raise
    finally:
        cs.lock.release()
        if isinstance(cs.session, FleetSession) and cs.session.moves > moves:
            gw.metrics.inc("session_moves_total", cs.session.moves - moves)


def history_length(cs: ChatSession) -> int | None:
    """Tokens in the rollwire session's history as this client knows it; None once unknown."""
    try:
        return len(cs.session.trajectory().token_ids)
    except SessionDesynced:
        return None


async def first_event(events: Events) -> tuple[Event | None, Events]:
    """Await the first event (so refusals become HTTP errors), then hand back the rest."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        return None, events
    except RollwireError as e:
        raise from_rollwire(e) from None
    return first, events



async def replay(first: Event | None, rest: Events) -> Events:
    async with contextlib.aclosing(rest):
        if first is not None:
            yield first
        async for e in rest:
            yield e


async def merge(streams: list[Events], bases: list[int]) -> Events:
    """Several prompts' events as one stream (their choice indices are already global)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):
            async for e in streams[0]:
                yield e
        return
    queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()

    async def pump(s: Events) -> None:
        try:
            async with contextlib.aclosing(s):
                async for e in s:
                    await queue.put(e)
        except BaseException as e:
            await queue.put(e)
        else:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each pump has closed its stream



class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body when the response ends, however it ends.
    Starlette stops iterating a body whose client went away but leaves the generator suspended
    for the garbage collector; closing it here runs every layer's cleanup (aborts, the session's
    lock and record) right away."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await cast(Any, close)()
