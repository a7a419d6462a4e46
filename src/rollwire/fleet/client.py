"""RolloutFleet: many rollout servers behind one client, with routing, health and failover.

    async with RolloutFleet(["tcp://10.0.0.1:7500", "tcp://10.0.0.2:7500"]) as fleet:
        out = await fleet.generate(prompt_ids, SamplingParams(max_new_tokens=256))

One ``RolloutClient`` (one DEALER socket) per server: no extra hop. ``fleet/routing.py`` picks the
server; all ``n`` samples of a prompt go to the same one; sessions stay on theirs.

Health. Every ``health_interval_s`` each server is asked for health (version, governor state); a
server that does not answer within ``health_timeout_s``, or whose calls fail with
``server_unavailable`` (the client's liveness bound: nothing heard for ``liveness_s``), is evicted.
It is re-admitted once it answers again *and* serves the fleet's current version (the highest any
server reported; each round's answers raise it before any server is judged), so a restarted server
does not serve stale weights to the fleet. An admitted server whose version goes down (it restarted
between two checks) is evicted at once; one left behind the current version for ``max_lag_s`` (a
push that never reaches it) is evicted until it catches up. A server
whose health says ``INCOMPLETE`` (a weight load failed part-way: it holds requests until a whole
version loads) is taken out the same way until its next version.

Failover. A non-streamed request runs as a stream inside this client, so it knows every token it
has. When its server dies (``server_unavailable``, ``shutting_down``, ``engine_dead``,
``actor_restarted``), each unfinished sample continues on another live server from its prompt plus
the tokens it already had, for the tokens it still may produce; its ``weight_version_spans`` cover
every token, each with the version that made it, and ``usage`` counts the original prompt. Each
request gets exactly one result or one typed error: no live server left, more than
``max_failovers`` moves, or the caller's ``timeout`` (``RequestTimeout``; the request is aborted).
A streamed request (``stream``) is not continued: it ends with the typed error, since its chunks
were already delivered from the dead server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from rollwire.clients.rollout import GenerationStream, RolloutClient
from rollwire.fleet.routing import SERVER_GONE, Policy, Router, ServerView
from rollwire.fleet.session import FleetSession
from rollwire.messages import (
    ErrorCode,
    GenerateChunk,
    GenerateDone,
    RemoteError,
    RollwireError,
    SamplingParams,
    Timings,
    Usage,
    VersionSpan,
)
from rollwire.runtime.logging import get_logger
from rollwire.transports.rpc import DEFAULT_LIVENESS_S, ConnectionClosed, RequestTimeout
from rollwire.transports.security import CurveClient

log = get_logger("rollwire.fleet")

BUSY = frozenset({ErrorCode.OVERLOADED, ErrorCode.CLIENT_LIMIT})  # that server is full (for us): try another
# a reply that did not decode here (ProtocolError): that server is broken (it is evicted), the work may
# run elsewhere
BROKEN = frozenset({ErrorCode.BAD_FRAME})
TRY_ELSEWHERE = SERVER_GONE | BUSY | BROKEN | {ErrorCode.ACTOR_RESTARTED}


class NoLiveServer(RollwireError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.SERVER_UNAVAILABLE, message)


@dataclass
class _Sample:
    """One sample's output so far, across the servers it ran on."""

    index: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[VersionSpan] = field(default_factory=list)
    done: GenerateDone | None = None


def _spans_before(spans: list[VersionSpan], end: int) -> list[VersionSpan]:
    """The spans cut at token ``end``: what covers the tokens kept from earlier servers."""
    return [VersionSpan(sp.version, sp.start, min(sp.end, end)) for sp in spans if sp.start < end]


def _extend_spans(spans: list[VersionSpan], more: Sequence[VersionSpan], offset: int) -> list[VersionSpan]:
    out = list(spans)
    for s in more:
        if out and out[-1].version == s.version and out[-1].end == s.start + offset:
            out[-1] = VersionSpan(s.version, out[-1].start, s.end + offset)
        else:
            out.append(VersionSpan(s.version, s.start + offset, s.end + offset))
    return out


class RolloutFleet:
    def __init__(self, endpoints: Sequence[str], *, policy: Policy = "least_loaded", timeout: float | None = None,
                 curve: CurveClient | None = None, liveness_s: float = DEFAULT_LIVENESS_S,
                 health_interval_s: float = 1.0, health_timeout_s: float = 2.0, max_failovers: int = 3,
                 prefix_tokens: int = 32, load_factor: float = 1.25, chunk_tokens: int = 16,
                 max_lag_s: float = 60.0) -> None:
        """``chunk_tokens``: how often a server reports a non-streamed request's progress; on a
        failover up to ``chunk_tokens - 1`` tokens it made are generated again elsewhere.
        ``max_lag_s``: an admitted server behind the fleet's current version for longer than this
        (no push reaches it) is evicted until it catches up; long enough for a push of a large
        model over tcp to reach every server (each applies a version on its own)."""
        if not endpoints:
            raise ValueError("a fleet needs at least one endpoint")
        self.timeout = timeout
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.max_failovers = max_failovers
        self.max_lag_s = max_lag_s
        self.chunk_tokens = chunk_tokens
        self.servers = [ServerView(ep, RolloutClient(ep, curve=curve, liveness_s=liveness_s)) for ep in endpoints]
        self.router = Router(self.servers, policy, prefix_tokens=prefix_tokens, load_factor=load_factor)
        self.current_version = 0  # the highest version a live server reported
        self.failovers = 0  # samples continued on another server
        self.tokens_carried = 0  # tokens those samples had when their server died
        self._health_task: asyncio.Task[None] | None = None
        self._admitted = asyncio.Event()
        self._closing = False  # requests then end with their error here, none moves to another server
        self._running: set[GenerationStream] = set()  # requests running on a server, to abort on close

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> RolloutFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> RolloutFleet:
        for s in self.servers:
            await s.client.__aenter__()
        if self._health_task is None:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="fleet-health")
        return self

    async def close(self) -> None:
        """Requests still running are aborted on their servers and end here (a Done with "abort",
        or shutting_down once the clients close); none moves to another server."""
        self._closing = True
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        for stream in list(self._running):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.abort(), 1.0)
        for s in self.servers:
            await s.client.close()

    @property
    def closing(self) -> bool:
        """``close`` was called: a call failing now fails here; nothing moves to another server."""
        return self._closing

    async def wait_ready(self, servers: int = 1, timeout: float = 60.0) -> list[str]:
        """Until ``servers`` servers are admitted; their endpoints."""
        async with asyncio.timeout(timeout):
            while len(self.router.live()) < servers:
                self._admitted.clear()
                await self._admitted.wait()
        return [s.endpoint for s in self.router.live()]

    # -- health ----------------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:  # one server's odd answer costs that server its place, never this loop
            answers = await asyncio.gather(*(self._ask(s) for s in self.servers))
            # the round's versions first: a server answering first at an old version is not admitted
            # before the one at the current version has answered
            for h in answers:
                if h is not None and h.governor_state != "INCOMPLETE":
                    self.current_version = max(self.current_version, h.weight_version)
            for s, h in zip(self.servers, answers, strict=True):
                if h is not None:
                    self._judge(s, h)
            await asyncio.sleep(self.health_interval_s)

    async def _ask(self, s: ServerView) -> Any:
        """Its health reply; None (and it is evicted) if it did not give one."""
        try:
            return await s.client.health(timeout=self.health_timeout_s)
        except RollwireError as e:  # a reply of the wrong kind included (bad_frame)
            self._evict(s, f"health: {e.code.value}")
        except Exception as e:  # whatever else its answer did: that server is out
            log.warning("health_check_failed", endpoint=s.endpoint, error=repr(e)[:200])
            self._evict(s, f"health: {type(e).__name__}")
        return None

    def _judge(self, s: ServerView, h: Any) -> None:
        previous, now = s.version, time.monotonic()
        bad, s.bad_replies = s.client._rpc.bad_replies - s.bad_replies, s.client._rpc.bad_replies
        if bad:  # replies no request of ours can have (wrong kind, unknown sample): a broken server
            self._evict(s, f"sent {bad} reply(s) no request can have")
            return
        s.version, s.last_ok = h.weight_version, now
        if h.weight_version >= self.current_version:
            s.behind_since = None
        elif s.behind_since is None:
            s.behind_since = now
        if h.governor_state == "INCOMPLETE":  # a load failed part-way: it holds requests until a whole version
            self._evict(s, "a weight load failed part-way; requests wait there for a whole version")
        elif s.alive and h.weight_version < previous:
            self._evict(s, f"restarted: serves version {h.weight_version}, it served {previous}")
        elif s.alive and s.behind_since is not None and now - s.behind_since > self.max_lag_s:
            self._evict(s, f"serves version {h.weight_version}, the fleet has been at {self.current_version} "
                           f"for over {self.max_lag_s}s")
        elif s.alive:
            pass  # behind for less than max_lag_s: a push still on its way there (each applies on its own)
        elif h.weight_version >= self.current_version:
            s.alive, s.why_out = True, ""
            log.info("server_admitted", endpoint=s.endpoint, version=h.weight_version)
            self._admitted.set()
        else:
            s.why_out = f"serves version {h.weight_version}, the fleet is at {self.current_version}"

    def _evict(self, s: ServerView, why: str) -> None:
        if s.alive:
            s.alive, s.evictions = False, s.evictions + 1
            log.warning("server_evicted", endpoint=s.endpoint, reason=why)
        s.why_out = why

    # -- requests --------------------------------------------------------------------------------
    def _choose(self, input_ids: Sequence[int], samples: int, min_version: int,
                exclude: Sequence[ServerView] = (), failure: RollwireError | None = None) -> ServerView:
        """The server for a request. None left: ``failure`` (what the last one said) if that server
        was only full (overloaded, client_limit: its retry hint is the caller's best advice), else
        NoLiveServer."""
        if self._closing:
            raise ConnectionClosed("the fleet client is closed")
        s = self.router.choose(input_ids, samples, min_version, exclude)
        if s is None:
            if failure is not None and failure.code in BUSY:
                raise failure
            out = {v.endpoint: v.why_out for v in self.servers}
            raise NoLiveServer(f"no live server to run on ({out})")
        return s

    async def generate(self, input_ids: Sequence[int], sampling_params: SamplingParams | None = None, *,
                       return_logprob: bool = False, min_version: int = 0, timeout: float | None = None,
                       ) -> GenerateDone | list[GenerateDone]:
        """As ``RolloutClient.generate``, continued on another server if its server dies."""
        sp = sampling_params or SamplingParams()
        limit = timeout if timeout is not None else self.timeout
        samples = [_Sample(i) for i in range(sp.n)]
        run = self._run(list(input_ids), sp, samples, return_logprob, min_version)
        try:
            async with asyncio.timeout(limit):
                outs = await run
        except TimeoutError:
            raise RequestTimeout(f"no result within {limit}s") from None
        return outs[0] if sp.n == 1 else outs

    async def _run(self, prompt: list[int], sp: SamplingParams, samples: list[_Sample], return_logprob: bool,
                   min_version: int) -> list[GenerateDone]:
        server = self._choose(prompt, sp.n, min_version)
        failed_on = []  # servers this request died on: never chosen for it again
        failure = await self._attempt(server, prompt, sp, samples, return_logprob, min_version)
        if failure is not None:
            failed_on.append(server)
        moves = 0
        while failure is not None:
            moves += 1
            if moves > self.max_failovers:
                raise failure
            # each unfinished sample goes on by itself, from its prompt plus the tokens it has
            plan = []
            for s in samples:
                if s.done is not None:
                    continue
                remaining = sp.max_new_tokens - len(s.ids)
                if remaining <= 0:
                    s.done = self._finish(s, prompt, None, "length")
                    continue
                params = msgspec.structs.replace(sp, n=1, max_new_tokens=remaining,
                                                 seed=None if sp.seed is None else sp.seed + s.index)
                nxt = self._choose(prompt, 1, min_version, exclude=failed_on, failure=failure)
                nxt.in_flight += 1  # counted now, so the samples that follow spread
                plan.append((nxt, params, s))
            for nxt, _, _ in plan:
                nxt.in_flight -= 1
            self.failovers += len(plan)
            attempts = [asyncio.ensure_future(self._attempt(nxt, prompt, params, [s], return_logprob, min_version))
                        for nxt, params, s in plan]
            try:
                results = await asyncio.gather(*attempts)
            except BaseException:  # one sample's own error is the request's: its other samples stop too
                for a in attempts:
                    a.cancel()
                await asyncio.gather(*attempts, return_exceptions=True)
                raise
            failure = None
            for (nxt, _, _), f in zip(plan, results, strict=True):
                if f is not None:
                    failure = f
                    if nxt not in failed_on:
                        failed_on.append(nxt)
        return [s.done for s in samples]  # type: ignore[misc]

    async def _attempt(self, server: ServerView, prompt: list[int], sp: SamplingParams, samples: list[_Sample],
                       return_logprob: bool, min_version: int) -> RollwireError | None:
        """Run ``samples`` on ``server`` (continuing from their tokens); the error that should move
        them elsewhere, or None when all are done. Any other error is raised: it is the request's."""
        server.in_flight += len(samples)
        server.routed += 1
        base = [len(s.ids) for s in samples]
        ids = prompt + samples[0].ids if len(samples) == 1 else prompt
        # a first run can start again from its prompt when too stale, as a non-streamed request does
        # (a continued one carries tokens in its prompt: it is aborted, as a streamed one is)
        stream: GenerationStream = server.client.stream(ids, sp, return_logprob=return_logprob,
                                                        min_version=min_version, timeout=None,
                                                        chunk_tokens=min(self.chunk_tokens, sp.max_new_tokens),
                                                        restartable=not any(base))
        self._running.add(stream)
        try:
            async for msg in stream:
                s = samples[msg.index] if len(samples) > 1 else samples[0]
                if isinstance(msg, GenerateChunk):
                    self._add_chunk(s, msg, base[samples.index(s)])
                    server.tokens += len(msg.token_ids)
                else:
                    s.done = self._finish(s, prompt, msg, msg.finish_reason, base[samples.index(s)])
            return None
        except RollwireError as e:
            if e.code not in TRY_ELSEWHERE or self._closing or (e.code in BROKEN and isinstance(e, RemoteError)):
                raise  # (a server's bad_frame refusal is about our request, not a broken server)
            if e.code in SERVER_GONE | BROKEN:
                self._evict(server, f"request failed: {e.code.value}")
            server.failures += sum(s.done is None for s in samples)
            self.tokens_carried += sum(len(s.ids) for s in samples if s.done is None)
            log.info("request_moves", endpoint=server.endpoint, code=e.code.value,
                        samples=[(s.index, len(s.ids)) for s in samples if s.done is None])
            return e
        except BaseException:
            with contextlib.suppress(Exception):
                await stream.aclose()  # cancelled (the caller's timeout): stop the work there
            raise
        finally:
            self._running.discard(stream)
            server.in_flight -= len(samples)

    @staticmethod
    def _add_chunk(s: _Sample, chunk: GenerateChunk, base: int) -> None:
        if chunk.restarted:  # the server started the sample again (too stale): its tokens here are void
            s.ids, s.logprobs, s.spans = s.ids[:base], s.logprobs[:base], _spans_before(s.spans, base)
        n = len(chunk.token_ids)
        s.spans = _extend_spans(s.spans, [VersionSpan(chunk.weight_version, 0, n)], len(s.ids))
        s.ids += chunk.token_ids
        if chunk.logprobs is not None:
            s.logprobs += chunk.logprobs

    @staticmethod
    def _finish(s: _Sample, prompt: list[int], done: GenerateDone | None, reason: Any, base: int = 0) -> GenerateDone:
        """The sample's one result: the tokens of every server it ran on (``base``: how many it had
        when this server took it; the server's GenerateDone is authoritative for the rest)."""
        if done is not None:
            s.ids = s.ids[:base] + list(done.output_ids)
            s.logprobs = s.logprobs[:base] + list(done.output_logprobs or [])
            s.spans = _extend_spans(_spans_before(s.spans, base), done.weight_version_spans, base)
        last = done or GenerateDone(output_ids=[], finish_reason="length", weight_version=0,
                                    usage=Usage(prompt_tokens=0, completion_tokens=0),
                                    timings=Timings(queued_s=0.0, first_token_s=0.0, total_s=0.0))
        return GenerateDone(index=s.index, output_ids=s.ids, output_logprobs=s.logprobs if last.output_logprobs
                            is not None or s.logprobs else None, finish_reason=reason,
                            weight_version=s.spans[-1].version if s.spans else last.weight_version,
                            weight_version_spans=s.spans,
                            usage=Usage(prompt_tokens=len(prompt), completion_tokens=len(s.ids),
                                        cached_tokens=last.usage.cached_tokens),
                            timings=last.timings)

    def stream(self, input_ids: Sequence[int], sampling_params: SamplingParams | None = None, *,
               return_logprob: bool = False, min_version: int = 0, timeout: float | None = None,
               chunk_tokens: int = 1) -> FleetStream:
        """A streamed request on one server; if it dies, the stream ends with its typed error.
        ``abort()`` on it asks that server to stop, as on ``GenerationStream``."""
        sp = sampling_params or SamplingParams()
        server = self._choose(input_ids, sp.n, min_version)
        inner = server.client.stream(input_ids, sp, return_logprob=return_logprob, min_version=min_version,
                                     timeout=timeout if timeout is not None else self.timeout,
                                     chunk_tokens=chunk_tokens)
        return FleetStream(server.endpoint, inner, self._stream(server, inner, sp.n))

    async def _stream(self, server: ServerView, stream: GenerationStream, n: int,
                      ) -> AsyncIterator[GenerateChunk | GenerateDone]:
        server.in_flight += n
        server.routed += 1
        self._running.add(stream)
        try:
            async for msg in stream:
                yield msg
        except RollwireError as e:
            if e.code in SERVER_GONE and not self._closing:
                self._evict(server, f"stream failed: {e.code.value}")
            raise
        finally:
            self._running.discard(stream)
            server.in_flight -= n

    def session(self, **kw: Any) -> FleetSession:
        """A session on one server (chosen when it opens); it stays there unless that server dies,
        then it moves to another by replaying its history from this client's record."""
        return FleetSession(self, kw)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {s.endpoint: {"alive": s.alive, "version": s.version, "in_flight": s.in_flight, "routed": s.routed,
                             "tokens": s.tokens, "failures": s.failures, "evictions": s.evictions, "why_out": s.why_out}
                for s in self.servers}




class FleetStream:
    """``RolloutFleet.stream``'s answer: iterate it for the chunks and GenerateDone(s) of one server
    (``endpoint``); ``abort()`` stops the request there (its Dones then come with "abort")."""

    def __init__(self, endpoint: str, inner: GenerationStream,
                 messages: AsyncIterator[GenerateChunk | GenerateDone]) -> None:
        self.endpoint = endpoint
        self._inner = inner
        self._messages = messages

    def __aiter__(self) -> FleetStream:
        return self

    async def __anext__(self) -> GenerateChunk | GenerateDone:
        return await self._messages.__anext__()

    async def abort(self) -> None:
        await self._inner.abort()

    async def aclose(self) -> None:
        """Stop reading: the request still running on its server is aborted there. A reader in
        another task stops too: the inner stream ends first, so the generator it is suspended in
        finishes by itself (closing a running generator is not allowed)."""
        await self._inner.aclose()
        aclose = getattr(self._messages, "aclose", None)
        if aclose is not None and not getattr(self._messages, "ag_running", False):  # running: its reader ends it
            await aclose()
