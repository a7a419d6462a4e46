"""RolloutClient: what a rollout worker uses to get tokens, logprobs and weight versions.

Many concurrent requests are multiplexed over one DEALER socket; each has its own request id.
Errors come back typed: ``RolloutError`` carries the server's ``ErrorCode``. The client beats
every ``heartbeat_s`` and fails every pending call with ``SERVER_UNAVAILABLE`` when it hears nothing
from the server for ``liveness_s`` (default 3 s; a healthy long generation keeps answering beats),
then reconnects by itself. ``curve`` (a ``CurveClient``: this client's key pair and the server's
public key) authenticates both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, TypeVar

from rollwire.clients.session import Session, _send_quietly
from rollwire.messages import (
    AbortRequest,
    ErrorCode,
    GenerateChunk,
    GenerateDone,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    ParamsReply,
    ParamsRequest,
    ProtocolError,
    RolloutReply,
    RollwireError,
    SamplingParams,
    SessionReply,
    StatusReply,
    StatusRequest,
)
from rollwire.runtime.tasks import BackgroundTasks
from rollwire.transports.rpc import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_LIVENESS_S,
    ConnectionClosed,
    RequestTimeout,
    RpcClient,
    unwrap,
)
from rollwire.transports.security import CurveClient

T = TypeVar("T")
GenerateOutput = GenerateDone  # the terminal reply is the output: output_ids, logprobs, spans...


CLOSE_ABORT_S = 1.0  # close(): at most this long sending aborts for what still runs
RolloutError = RollwireError  # what a rollout call raises: one hierarchy, a stable ``code`` on each


class GenerationStream:
    """Async iterator over one streamed request: GenerateChunk deltas, then the GenerateDone(s).

    Chunks carry only new tokens; each GenerateDone carries the whole output of its sample.
    ``timeout`` bounds the whole request, from its send to its last GenerateDone (then it is
    aborted on the server). A reply that cannot belong to this request (another kind of message, a
    sample index outside ``[0, n)``, a second GenerateDone for one sample, a ``restarted`` chunk
    for a request that is not ``restartable``) is counted in
    ``RpcClient.bad_replies`` and dropped: each sample ends exactly once. Left early (``aclose``,
    a cancelled ``generate``), the request is aborted on the server.
    """

    def __init__(self, client: RolloutClient, request: GenerateRequest, timeout: float | None) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self._deadline: float | None = None
        self.rid = client._rpc.next_rid()
        self._queue = client._rpc.open_stream(self.rid)
        self._n = request.sampling_params.n
        self._done: set[int] = set()
        self._sent = False
        self._ended = False
        self._abort_first = False  # abort() came before the request was sent

    async def abort(self) -> None:
        """Ask the server to stop; the stream then ends with finish_reason "abort" (before the
        first read: the request goes out with its abort right behind it)."""
        if not self._sent:
            self._abort_first = True
            return
        if not self._ended:  # (an ended stream is not among close()'s open streams anyway)
            self._client._aborted.add(self.rid)  # close() need not abort it again
        await self._client._rpc.send(0, AbortRequest(target_rid=self.rid))

    def _end(self) -> None:
        self._ended = True
        self._client._rpc.close_stream(self.rid)
        self._client._aborted.discard(self.rid)

    async def aclose(self) -> None:
        """Stop reading: a request still running is aborted on the server (best effort). A reader
        waiting in another task stops too (its iteration ends)."""
        if self._ended:
            return
        self._end()
        self._queue.put_nowait(StopAsyncIteration())  # wakes a waiting reader; nothing else comes now
        if self._sent and len(self._done) < self._n:
            with contextlib.suppress(RollwireError):
                await self.abort()

    def __aiter__(self) -> GenerationStream:
        return self

    def __del__(self) -> None:
        # let go unread (a loop left with break, its reader cancelled, the object dropped): the
        # request would run on to its end for nobody, its chunks piling up in the queue
        if not self._ended:  # (never iterated: nothing to abort, its queue to unregister)
            _abandon(self._client, self.rid, sent=self._sent)

    async def __anext__(self) -> GenerateChunk | GenerateDone:
        if self._ended:  # read to its end, or closed (before its first read: never sent)
            raise StopAsyncIteration
        if not self._sent:
            self._sent = True
            if self._timeout is not None:
                self._deadline = asyncio.get_running_loop().time() + self._timeout
            try:
                await self._client._rpc.send(self.rid, self._request)
                if self._abort_first:
                    await self.abort()
            except ConnectionClosed:
                self._end()
                raise
        while True:
            if self._n and len(self._done) == self._n:  # (n=0: the server's refusal is what comes)
                self._end()
                raise StopAsyncIteration
            try:
                async with asyncio.timeout_at(self._deadline):
                    item = await self._queue.get()
            except TimeoutError:
                self._end()
                with contextlib.suppress(RollwireError):
                    await self.abort()
                raise RequestTimeout(f"request {self.rid} not complete within {self._timeout}s; aborted it") from None
            if self._ended:  # closed by another task while this one waited
                raise StopAsyncIteration
            try:
                msg = unwrap(item)
            except BaseException:
                self._end()
                raise
            if isinstance(msg, (GenerateChunk, GenerateDone)) and 0 <= msg.index < self._n \
                    and msg.index not in self._done \
                    and not (isinstance(msg, GenerateChunk) and msg.restarted and not self._request.restartable):
                if isinstance(msg, GenerateDone):
                    self._done.add(msg.index)
                return msg
            self._client._rpc.bad_replies += 1  # not a reply this request can have: dropped


def _abandon(client: RolloutClient, rid: int, sent: bool) -> None:
    """Abort request ``rid`` of a stream nobody holds any more, ``sent`` or not (from a finalizer:
    on the client's loop, whatever thread collected the stream)."""
    loop = client._rpc.loop
    if loop is None or loop.is_closed():
        return

    def on_loop() -> None:
        client._rpc.close_stream(rid)
        if sent and not client._closed:
            client._aborted.add(rid)
            client._background.spawn(_send_quietly(client._rpc, AbortRequest(target_rid=rid)))

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to stop
        loop.call_soon_threadsafe(on_loop)


class RolloutClient:
    def __init__(self, endpoint: str, *, timeout: float | None = None, session_endpoint: str | None = None,
                 curve: CurveClient | None = None, heartbeat_s: float | None = DEFAULT_HEARTBEAT_S,
                 liveness_s: float = DEFAULT_LIVENESS_S) -> None:
        self.endpoint = endpoint
        self.timeout = timeout  # default per-request timeout (None: wait as long as it takes)
        self.session_endpoint = session_endpoint  # None: asked from the server (HealthReply) on first use
        self._link = {"curve": curve, "heartbeat_s": heartbeat_s, "liveness_s": liveness_s}
        self._rpc: RpcClient[Any] = RpcClient(endpoint, RolloutReply, **self._link)  # type: ignore[arg-type]
        self._session_rpc: RpcClient[Any] | None = None
        self._aborted: set[int] = set()  # rids of requests whose abort was sent (``close`` skips them)
        self._closed = False  # no new link (a session one) is made after ``close``
        # old session links being closed; sessions a server opened after their opener stopped waiting
        self._background = BackgroundTasks()

    async def __aenter__(self) -> RolloutClient:
        self._rpc.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Requests and session turns still running are aborted on the server first (best effort,
        within ``CLOSE_ABORT_S``): otherwise they would run on until the server takes this client
        for gone. Their callers get ``shutting_down``."""
        self._closed = True
        rpcs = [self._rpc] + ([self._session_rpc] if self._session_rpc is not None else [])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_ABORT_S):
                await self._abort_orphans()
                for rpc in rpcs:
                    for rid in rpc.open_streams():
                        if rpc is self._rpc and rid in self._aborted:
                            continue
                        with contextlib.suppress(RollwireError):  # that link is broken: the others still go
                            await rpc.send(0, AbortRequest(target_rid=rid))
        for rpc in rpcs:
            await rpc.close()
        await self._background.drain()

    def session(self, *, max_tokens: int = 8192, ttl_s: float = 600.0, keep_stale_prefix: bool = False,
                timeout: float | None = None) -> Session:
        """A multi-turn session: ``async with rc.session() as s: await s.generate(prompt, sp)``."""
        return Session(self, max_tokens=max_tokens, ttl_s=ttl_s, keep_stale_prefix=keep_stale_prefix,
                       timeout=timeout if timeout is not None else self.timeout)

    async def _sessions(self, refresh: bool = False) -> RpcClient[Any]:
        """The DEALER to the server's SessionActor (its endpoint comes from the health reply).
        ``refresh``: ask health again first (the server may have restarted on another session port)."""
        if self._closed:
            raise ConnectionClosed(f"client to {self.endpoint} is closed")
        if refresh and self.session_endpoint is None:
            await self.health()  # swaps the session link if the advertised endpoint changed
        if self._session_rpc is None:
            endpoint = self.session_endpoint
            if endpoint is None:
                advertised = (await self.health()).session_endpoint
                if not advertised:
                    raise RolloutError(ErrorCode.UNKNOWN_KIND, f"{self.endpoint} serves no sessions")
                endpoint = _reachable(advertised, self.endpoint)
            if self._closed:  # closed while we asked for the endpoint
                raise ConnectionClosed(f"client to {self.endpoint} is closed")
            if self._session_rpc is None:  # another task may have connected while we waited
                self._session_rpc = RpcClient(endpoint, SessionReply, **self._link)  # type: ignore[arg-type]
                self._session_rpc.start()
        return self._session_rpc

    def _advertised(self, session_endpoint: str) -> None:
        """A health reply named the session endpoint: a server restarted at our rollout endpoint
        binds a fresh session port, so a link to the old one is retired (its sessions are gone
        with the old process) and the next session call connects to the new one."""
        old = self._session_rpc
        if old is None or self.session_endpoint is not None or not session_endpoint:
            return
        if _reachable(session_endpoint, self.endpoint) != old.endpoint:
            self._session_rpc = None
            self._background.spawn(old.close())

    def _request(self, input_ids: Sequence[int], sampling_params: SamplingParams | None, return_logprob: bool,
                 stream: bool, min_version: int, chunk_tokens: int = 1, restartable: bool = False) -> GenerateRequest:
        return GenerateRequest(input_ids=list(input_ids), sampling_params=sampling_params or SamplingParams(),
                               return_logprob=return_logprob, stream=stream, min_version=min_version,
                               chunk_tokens=chunk_tokens, restartable=restartable)

    async def generate(self, input_ids: Sequence[int], sampling_params: SamplingParams | None = None, *,
                       return_logprob: bool = False, min_version: int = 0, timeout: float | None = None,
                       ) -> GenerateOutput | list[GenerateOutput]:
        """One output, or a list of ``n`` outputs (ordered by index) when sampling_params.n > 1."""
        req = self._request(input_ids, sampling_params, return_logprob, False, min_version)
        stream = GenerationStream(self, req, timeout if timeout is not None else self.timeout)
        try:
            outs: list[GenerateDone] = [m async for m in stream if isinstance(m, GenerateDone)]
        finally:
            await asyncio.shield(stream.aclose())  # cancelled: the samples still running are aborted
        outs.sort(key=lambda o: o.index)
        return outs[0] if req.sampling_params.n == 1 else outs

    def stream(self, input_ids: Sequence[int], sampling_params: SamplingParams | None = None, *,
               return_logprob: bool = False, min_version: int = 0, timeout: float | None = None,
               chunk_tokens: int = 1, restartable: bool = False) -> GenerationStream:
        """Chunks of new tokens as they come (``chunk_tokens``: at least this many per chunk), then
        the GenerateDone(s). ``restartable``: a sample too stale (``--max-staleness``, retract
        policy) starts again from its prompt instead of being aborted; a chunk with ``restarted``
        then says that every earlier chunk of that sample is void."""
        req = self._request(input_ids, sampling_params, return_logprob, True, min_version, chunk_tokens, restartable)
        return GenerationStream(self, req, timeout if timeout is not None else self.timeout)

    async def _ask(self, msg: Any, want: type[T], timeout: float) -> T:
        """One cheap request (health, status, params) under the caller's deadline; a reply of
        another kind is a typed ``bad_frame`` error, never handed on as if it were the answer."""
        what = type(msg).__struct_config__.tag
        try:
            reply = await self._rpc.call(msg, timeout=timeout)
        except TimeoutError:
            raise RequestTimeout(f"no {what} reply from {self.endpoint} within {timeout}s") from None
        out = unwrap(reply)
        if not isinstance(out, want):
            self._rpc.bad_replies += 1
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{self.endpoint} answered {what} with "
                                                     f"{type(out).__struct_config__.tag!r}")
        return out

    async def health(self, timeout: float = 5.0) -> HealthReply:
        reply = await self._ask(HealthRequest(), HealthReply, timeout)
        self._advertised(reply.session_endpoint)
        await self._abort_orphans()  # the server answers again: what it may still run for us stops
        return reply

    async def _abort_orphans(self) -> None:
        """Abort, best effort, the requests and session turns given up as server_unavailable (run
        on elsewhere by a fleet, or failed to their callers): the server that stalled may be
        running them still."""
        for rpc in (self._rpc, self._session_rpc):
            while rpc is not None and rpc.given_up:
                rid = rpc.given_up.pop()
                with contextlib.suppress(RollwireError):
                    await rpc.send(0, AbortRequest(target_rid=rid))

    async def status(self, timeout: float = 5.0) -> StatusReply:
        return await self._ask(StatusRequest(), StatusReply, timeout)

    async def params(self, timeout: float = 30.0) -> ParamsReply:
        """The server's parameters: what a version may name, and what a complete one must."""
        return await self._ask(ParamsRequest(), ParamsReply, timeout)

    async def wait_ready(self, timeout: float = 60.0) -> HealthReply:
        """Poll health until the server answers (the READY handshake for a new connection)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return await self.health(timeout=min(1.0, max(0.05, deadline - asyncio.get_running_loop().time())))
            except RolloutError as e:
                if e.code not in (ErrorCode.TIMEOUT, ErrorCode.SERVER_UNAVAILABLE) or \
                        asyncio.get_running_loop().time() >= deadline:
                    raise


def _reachable(advertised: str, via: str) -> str:
    """A tcp endpoint bound on a wildcard host is reached at the host we already talk to."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if advertised.startswith(wildcard) and via.startswith("tcp://"):
            host = via.removeprefix("tcp://").rpartition(":")[0]
            return f"tcp://{host}:{advertised.removeprefix(wildcard)}"
    return advertised
