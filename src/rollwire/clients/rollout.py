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
from collections.abc import Sequence
from typing import Any

from rollwire.clients.session import Session
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
    RolloutReply,
    RollwireError,
    SamplingParams,
    SessionReply,
    StatusReply,
    StatusRequest,
)
from rollwire.transports.rpc import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_LIVENESS_S,
    ConnectionClosed,
    RequestTimeout,
    RpcClient,
    unwrap,
)
from rollwire.transports.security import CurveClient

GenerateOutput = GenerateDone  # the terminal reply is the output: output_ids, logprobs, spans...


RolloutError = RollwireError  # what a rollout call raises: one hierarchy, a stable ``code`` on each


class GenerationStream:
    """Async iterator over one streamed request: GenerateChunk deltas, then the GenerateDone(s).

    Chunks carry only new tokens; each GenerateDone carries the whole output of its sample.
    """

    def __init__(self, client: RolloutClient, request: GenerateRequest, timeout: float | None) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self.rid = client._rpc.next_rid()
        self._queue = client._rpc.open_stream(self.rid)
        self._remaining = request.sampling_params.n
        self._sent = False

    async def abort(self) -> None:
        """Ask the server to stop; the stream then ends with finish_reason "abort"."""
        await self._client._rpc.send(0, AbortRequest(target_rid=self.rid))

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerateChunk | GenerateDone:
        if not self._sent:
            self._sent = True
            try:
                await self._client._rpc.send(self.rid, self._request)
            except ConnectionClosed:
                self._client._rpc.close_stream(self.rid)
                raise
        if self._remaining == 0:
            self._client._rpc.close_stream(self.rid)
            raise StopAsyncIteration
        try:
            async with asyncio.timeout(self._timeout):
                item = await self._queue.get()
        except TimeoutError:
            await self.abort()
            self._client._rpc.close_stream(self.rid)
            raise RequestTimeout(f"no reply to request {self.rid} within {self._timeout}s; aborted it") from None
        try:
            msg = unwrap(item)
        except BaseException:
            self._client._rpc.close_stream(self.rid)
            raise
        if isinstance(msg, GenerateDone):
            self._remaining -= 1
        return msg  # type: ignore[no-any-return]


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

    async def __aenter__(self) -> RolloutClient:
        self._rpc.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._rpc.close()
        if self._session_rpc is not None:
            await self._session_rpc.close()

    def session(self, *, max_tokens: int = 8192, ttl_s: float = 600.0, keep_stale_prefix: bool = False,
                timeout: float | None = None) -> Session:
        """A multi-turn session: ``async with rc.session() as s: await s.generate(prompt, sp)``."""
        return Session(self, max_tokens=max_tokens, ttl_s=ttl_s, keep_stale_prefix=keep_stale_prefix,
                       timeout=timeout if timeout is not None else self.timeout)

    async def _sessions(self) -> RpcClient[Any]:
        """The DEALER to the server's SessionActor (its endpoint comes from the health reply)."""
        if self._session_rpc is None:
            endpoint = self.session_endpoint
            if endpoint is None:
                advertised = (await self.health()).session_endpoint
                if not advertised:
                    raise RolloutError(ErrorCode.UNKNOWN_KIND, f"{self.endpoint} serves no sessions")
                endpoint = _reachable(advertised, self.endpoint)
            if self._session_rpc is None:  # another task may have connected while we waited
                self._session_rpc = RpcClient(endpoint, SessionReply, **self._link)  # type: ignore[arg-type]
                self._session_rpc.start()
        return self._session_rpc

    def _request(self, input_ids: Sequence[int], sampling_params: SamplingParams | None, return_logprob: bool,
                 stream: bool, min_version: int, chunk_tokens: int = 1) -> GenerateRequest:
        return GenerateRequest(input_ids=list(input_ids), sampling_params=sampling_params or SamplingParams(),
                               return_logprob=return_logprob, stream=stream, min_version=min_version,
                               chunk_tokens=chunk_tokens)

    async def generate(self, input_ids: Sequence[int], sampling_params: SamplingParams | None = None, *,
                       return_logprob: bool = False, min_version: int = 0, timeout: float | None = None,
                       ) -> GenerateOutput | list[GenerateOutput]:
        """One output, or a list of ``n`` outputs (ordered by index) when sampling_params.n > 1."""
        req = self._request(input_ids, sampling_params, return_logprob, False, min_version)
        stream = GenerationStream(self, req, timeout if timeout is not None else self.timeout)
        outs: list[GenerateDone] = [m async for m in stream if isinstance(m, GenerateDone)]
        outs.sort(key=lambda o: o.index)
        return outs[0] if req.sampling_params.n == 1 else outs

    def stream(self, input_ids: Sequence[int], sampling_params: SamplingParams | None = None, *,
               return_logprob: bool = False, min_version: int = 0, timeout: float | None = None,
               chunk_tokens: int = 1) -> GenerationStream:
        """Chunks of new tokens as they come (``chunk_tokens``: at least this many per chunk), then
        the GenerateDone(s)."""
        req = self._request(input_ids, sampling_params, return_logprob, True, min_version, chunk_tokens)
        return GenerationStream(self, req, timeout if timeout is not None else self.timeout)

    async def _ask(self, msg: Any, what: str, timeout: float) -> Any:
        """One cheap request (health, status, params) under the caller's deadline."""
        try:
            reply = await self._rpc.call(msg, timeout=timeout)
        except TimeoutError:
            raise RequestTimeout(f"no {what} reply from {self.endpoint} within {timeout}s") from None
        return unwrap(reply)

    async def health(self, timeout: float = 5.0) -> HealthReply:
        return await self._ask(HealthRequest(), "health", timeout)  # type: ignore[no-any-return]

    async def status(self, timeout: float = 5.0) -> StatusReply:
        return await self._ask(StatusRequest(), "status", timeout)  # type: ignore[no-any-return]

    async def params(self, timeout: float = 30.0) -> ParamsReply:
        """The server's parameters: what a version may name, and what a complete one must."""
        return await self._ask(ParamsRequest(), "params", timeout)  # type: ignore[no-any-return]

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
