"""GenerationActor: owns the Engine and the table of in-flight requests.

Receives GenerateRequest / AbortRequest / Health / Status on its ``rollout`` port (bound to its
inproc address and to the public rollout endpoint), runs each request as a task that streams the
engine's deltas back, and answers every request with exactly one terminal reply per sample
(GenerateDone, or ErrorReply). n > 1 runs n engine requests (seeds seed, seed+1, ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from rollwire.actors.generation_control import GenerationControl, session_key
from rollwire.engines.base import Engine, EngineDelta, EngineError, EngineRequest
from rollwire.messages import (
    PROTOCOL_VERSION,
    AbortRequest,
    ErrorCode,
    GenerateChunk,
    GenerateDone,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    RolloutRequest,
    StatusReply,
    StatusRequest,
    Timings,
    Usage,
    VersionSpan,
)
from rollwire.messages import GenerationControl as GenerationControlUnion
from rollwire.runtime import Actor, Origin, Port, RollwireError, handles
from rollwire.transports import sockets

GENERATION = "generation"


@dataclass
class InFlight:
    origin: Origin
    engine_rids: list[str]
    arrived: float
    start_version: int = 0  # live version when the request was admitted
    streamed: bool = False
    aborted: bool = False
    restarts: int = 0  # --max-staleness under the retract policy: times it was sent back to its prompt
    closed: bool = False  # answered by someone else (supervisor): send nothing more
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


@dataclass
class _Output:
    """What one sample has produced so far."""

    version: int  # of the last token (the live version before any)
    logprobs: list[float] | None
    ids: list[int] = field(default_factory=list)
    spans: list[list[int]] = field(default_factory=list)  # [version, start, end)
    finish: str = "abort"
    cached: int = 0
    first_token: float = 0.0


async def _no_deltas() -> AsyncIterator[EngineDelta]:
    return
    yield


def error_code(code: str) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL


def spans_add(spans: list[list[int]], version: int, n_tokens: int) -> None:
    """Extend the version spans [version, start, end) by ``n_tokens`` produced under ``version``."""
    if n_tokens == 0:
        return
    if spans and spans[-1][0] == version:
        spans[-1][2] += n_tokens
    else:
        start = spans[-1][2] if spans else 0
        spans.append([version, start, start + n_tokens])


class GenerationActor(GenerationControl, Actor):
    ports = {"rollout": Port(RolloutRequest), "control": Port(GenerationControlUnion, zero_copy=True,
                                                                       max_frame_bytes=sockets.BUCKET_MAX_FRAME)}

    def __init__(self, engine_factory: Callable[[], Engine], *, max_new_tokens_limit: int = 4096,
                 model_name: str = "", max_staleness: int | None = None, session_endpoint: str = "",
                 name: str = GENERATION, client_timeout_s: float = Actor.client_timeout_s) -> None:
        super().__init__(name)
        self.client_timeout_s = client_timeout_s
        self.session_endpoint = session_endpoint  # advertised in HealthReply
        self._engine_factory = engine_factory
        self.engine: Engine = engine_factory()
        self.max_new_tokens_limit = max_new_tokens_limit
        self.model_name = model_name
        self.max_staleness = max_staleness
        self.in_flight: dict[tuple[bytes, int], InFlight] = {}
        self._version_changed = asyncio.Event()
        self.state = "SERVING"  # as the governor last set it: SERVING, PAUSING, PAUSED, RELEASED, LOADING
        self.pause_policy: str = ""
        self._admission = asyncio.Event()  # cleared while paused: new requests wait here
        self._admission.set()
        self._running_samples = 0
        self._sample_finished = asyncio.Event()

    async def on_start(self) -> None:
        await self.engine.start()
        self.log.info("engine_started", **{k: v for k, v in vars(self.engine.info()).items() if k != "extra"})

    async def on_stop(self) -> None:
        """Abort everything in flight and let each request send its terminal reply."""
        tasks = [t for f in self.in_flight.values() for t in f.tasks]
        for f in list(self.in_flight.values()):
            f.aborted = True
            for erid in f.engine_rids:
                await self.engine.abort(erid)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await self.engine.shutdown()

    def take_held_requests(self) -> list[Origin]:
        held = list(self.in_flight.values())
        for f in held:
            f.closed = True  # the supervisor answers these; their own replies are suppressed
        self.in_flight.clear()
        return [f.origin for f in held]

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    async def _wait_for_change(self) -> None:
        """Until the version changes, admission reopens, or an abort arrives (it notifies too)."""
        waits = [asyncio.ensure_future(self._version_changed.wait())]
        if not self._admission.is_set():
            waits.append(asyncio.ensure_future(self._admission.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def notify_version_changed(self) -> None:
        self._version_changed.set()
        self._version_changed = asyncio.Event()

    # -- handlers -------------------------------------------------------------------------
    @handles(HealthRequest)
    def on_health(self, origin: Origin, msg: HealthRequest, payload: Sequence[Any]) -> None:
        self.reply_nowait(origin, HealthReply(weight_version=self.weight_version, governor_state=self.state,
                                              protocol=PROTOCOL_VERSION, session_endpoint=self.session_endpoint))

    @handles(StatusRequest)
    def on_status(self, origin: Origin, msg: StatusRequest, payload: Sequence[Any]) -> None:
        info = self.engine.info()
        counters = self.counters.snapshot()
        counters.update({f"engine.{k}": float(v) for k, v in info.extra.items() if isinstance(v, (int, float))})
        self.reply_nowait(origin, StatusReply(
            engine=info.name, model=self.model_name, weight_version=info.weight_version,
            governor_state=self.state, in_flight=len(self.in_flight),
            max_new_tokens_limit=self.max_new_tokens_limit, vocab_size=info.vocab_size, counters=counters))

    @handles(AbortRequest)
    def on_abort(self, origin: Origin, msg: AbortRequest, payload: Sequence[Any]) -> None:
        f = self.in_flight.get((origin.conn, msg.target_rid))
        self.counters.inc("abort_requests")
        if f is None or f.aborted:
            return  # already finished: its terminal reply is on the way or delivered
        f.aborted = True
        for erid in f.engine_rids:
            self.spawn(self.engine.abort(erid))
        self.notify_version_changed()  # wakes a request still waiting for min_version

    @handles(GenerateRequest)
    def on_generate(self, origin: Origin, msg: GenerateRequest, payload: Sequence[Any]) -> Any:
        key = (origin.conn, origin.rid)
        if key in self.in_flight:
            raise RollwireError(ErrorCode.DUPLICATE_REQUEST, f"request {origin.rid} is already in flight")
        sp = msg.sampling_params
        if sp.max_new_tokens > self.max_new_tokens_limit:
            limit = self.max_new_tokens_limit
            raise RollwireError(ErrorCode.BAD_SAMPLING_PARAMS,
                                f"max_new_tokens={sp.max_new_tokens} above this server's limit {limit}")
        if not 1 <= sp.n <= 64:
            raise RollwireError(ErrorCode.BAD_SAMPLING_PARAMS, f"n={sp.n} must be in [1, 64]")
        reqs = []
        for i in range(sp.n):
            params = sp if sp.n == 1 else msgspec.structs.replace(
                sp, n=1, seed=None if sp.seed is None else sp.seed + i)
            reqs.append(EngineRequest(f"{origin.conn.hex()}:{origin.rid}:{i}", list(msg.input_ids), params,
                                      msg.return_logprob, stream=msg.stream,
                                      session_id=session_key(origin.conn, msg.session_id) if sp.n == 1 else None,
                                      keep_stale_prefix=msg.keep_stale_prefix))
        try:
            self.engine.validate(reqs[0])  # type: ignore[attr-defined]
        except EngineError as e:
            raise RollwireError(error_code(e.code), e.message) from None
        flight = InFlight(origin, [r.rid for r in reqs], time.monotonic(), self.weight_version, streamed=msg.stream)
        self.in_flight[key] = flight
        self.counters.inc("requests")
        return self._run_request(flight, msg, reqs)

    async def _run_request(self, flight: InFlight, msg: GenerateRequest, reqs: list[EngineRequest]) -> None:
        flight.tasks = [asyncio.current_task()]  # type: ignore[list-item]
        try:
            while not flight.aborted and (self.weight_version < msg.min_version or not self._admission.is_set()):
                await self._wait_for_change()
            flight.start_version = self.weight_version
            await asyncio.gather(*(self._run_sample(flight, msg, i, r) for i, r in enumerate(reqs)))
        finally:
            self.in_flight.pop((flight.origin.conn, flight.origin.rid), None)

    async def _run_sample(self, flight: InFlight, msg: GenerateRequest, index: int, req: EngineRequest) -> None:
        origin = flight.origin
        started = time.monotonic()
        out = _Output(version=self.weight_version, logprobs=[] if msg.return_logprob else None)
        # aborted before it started (e.g. while waiting for min_version): no engine work at all
        deltas = _no_deltas() if flight.aborted else self.engine.generate(req)
        self._running_samples += 1
        try:
            while True:
                epoch = flight.restarts
                await self._collect(flight, msg, index, deltas, out)
                if not (flight.restarts > epoch and not flight.aborted):
                    break
                # too stale under the retract policy (even if it finished just before the abort
                # landed): its tokens are dropped and it starts again from its prompt on the live
                # version, so nothing it returns is older than the limit
                self.counters.inc("stale_restarts")
                out = _Output(version=self.weight_version, logprobs=[] if msg.return_logprob else None)
                req = dataclasses.replace(req, rid=f"{flight.engine_rids[index]}:r{flight.restarts}")
                flight.engine_rids[index] = req.rid  # where a later abort must go
                deltas = self.engine.generate(req)
        except EngineError as e:
            if not flight.closed:
                await self.reply_error(origin, error_code(e.code), e.message)
            return
        finally:
            self._running_samples -= 1
            self._sample_finished.set()
        if flight.closed:
            return
        now = time.monotonic()
        self.counters.inc("completion_tokens", len(out.ids))
        self.counters.inc(f"finish_{out.finish}")
        await self.reply(origin, GenerateDone(
            index=index, output_ids=out.ids, output_logprobs=out.logprobs,
            finish_reason=out.finish,  # type: ignore[arg-type]
            weight_version=out.version, weight_version_spans=[VersionSpan(*s) for s in out.spans],
            usage=Usage(prompt_tokens=len(req.input_ids), completion_tokens=len(out.ids), cached_tokens=out.cached),
            timings=Timings(queued_s=started - flight.arrived,
                            first_token_s=(out.first_token or now) - flight.arrived, total_s=now - flight.arrived)))

    async def _collect(self, flight: InFlight, msg: GenerateRequest, index: int, deltas: AsyncIterator[EngineDelta],
                       out: _Output) -> None:
        """Gather one engine run's deltas into ``out`` (streaming each as a chunk if asked)."""
        try:
            async for d in deltas:
                if d.token_ids:
                    if not out.first_token:
                        out.first_token = time.monotonic()
                    out.ids.extend(d.token_ids)
                    if out.logprobs is not None and d.logprobs is not None:
                        out.logprobs.extend(d.logprobs)
                    spans_add(out.spans, d.weight_version, len(d.token_ids))
                    out.version = d.weight_version
                    if msg.stream and not flight.closed:
                        await self.reply(flight.origin, GenerateChunk(index=index, token_ids=d.token_ids,
                                                                      logprobs=d.logprobs,
                                                                      weight_version=d.weight_version))
                out.cached = max(out.cached, d.cached_tokens)
                if d.finish_reason is not None:
                    out.finish = d.finish_reason
        finally:
            # closed now, not whenever the last reference goes (a kept exception's traceback can
            # hold it): an open SGLang generate_request holds off weight updates
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()
