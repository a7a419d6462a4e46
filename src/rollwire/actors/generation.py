"""GenerationActor: owns the Engine and the table of in-flight requests.

Receives GenerateRequest / AbortRequest / Health / Status on its ``rollout`` port (bound to its
inproc address and to the public rollout endpoint), runs each request as a task that streams the
engine's deltas back, and answers every request with exactly one terminal reply per sample
(GenerateDone, or ErrorReply). n > 1 runs n engine requests (seeds seed, seed+1, ...).

Fair sharing. Capacity is counted in samples (a request with n samples counts n): at most
``max_in_flight`` in the actor, ``max_client_in_flight`` per client (``Origin.client``: the CURVE
key, else the connection), of which at most ``max_client_waiting`` may be requests still waiting
for their ``min_version``. Beyond these a request is refused before anything is recorded
(``overloaded`` / ``client_limit``, with ``retry_after_s``), so the same rid may be sent again.
Defaults: 4096 samples, 2048 per client (half: one client never leaves a newcomer without room),
1024 waiting requests per client. A co-located actor's request (a session turn forwarded by the
SessionActor) counts for the client named in ``GenerateRequest.client`` (a public peer's value is
ignored), or, naming none, for no one (the SessionActor bounds its turns itself). The engine gets
the client with each request and shares batch slots round-robin among clients (hf). A client gone silent
(``on_client_gone``) has its requests aborted, waiting ones included.

Engine death. An engine that dies (``DeathWatch``) fails every request it holds with
``engine_dead``; requests waiting here get the same, new ones are refused with it, and once each
has its reply the actor raises ``EngineDied``: the server exits non-zero with the reason (the
engine is not rebuilt in this process: SGLang's GPU state and the live weights went with it; an
outer supervisor restarts the server, whose receiver then takes the trainer's next version).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec

from rollwire.actors.flights import InFlight, SampleOutput, no_deltas, spans_add
from rollwire.actors.generation_control import GenerationControl, session_key
from rollwire.actors.memory_governor import GOVERNOR
from rollwire.engines.base import Engine, EngineDelta, EngineError, EngineRequest
from rollwire.engines.validation import MAX_N
from rollwire.messages import (
    PROTOCOL_VERSION,
    AbortRequest,
    ControlReply,
    ErrorCode,
    ErrorReply,
    GenerateChunk,
    GenerateDone,
    GenerateRequest,
    GovernorQuery,
    GovernorStatus,
    HealthReply,
    HealthRequest,
    ParamsReply,
    ParamsRequest,
    RolloutRequest,
    StatusReply,
    StatusRequest,
    Timings,
    Usage,
    VersionSpan,
)
from rollwire.messages import GenerationControl as GenerationControlUnion
from rollwire.runtime import Actor, Origin, Port, RollwireError, address, handles
from rollwire.transports import sockets

GENERATION = "generation"
GOVERNOR_QUERY_TIMEOUT_S = 2.0


class EngineDied(Exception):
    """The engine died: the GenerationActor stops for good (``fatal``: supervision need not retry)."""

    fatal = True


# engine factory -> (why, the dead engine): an actor restarted after its engine died does not build
# another engine from the same factory, it stops again at once (see GenerationActor.on_start)
_DEAD_ENGINES: weakref.WeakKeyDictionary[Callable[[], Engine], tuple[str, Engine]] = weakref.WeakKeyDictionary()


class GenerationActor(GenerationControl, Actor):
    ports = {"rollout": Port(RolloutRequest), "control": Port(GenerationControlUnion, zero_copy=True,
                                                                       max_frame_bytes=sockets.BUCKET_MAX_FRAME)}
    # requests are bounded by max_in_flight (refused before anything is recorded), not by the
    # mailbox: the governor's control messages must get through however many requests run
    max_pending = 1 << 16

    def __init__(self, engine_factory: Callable[[], Engine], *, max_new_tokens_limit: int = 4096,
                 model_name: str = "", max_staleness: int | None = None, session_endpoint: str = "",
                 name: str = GENERATION, client_timeout_s: float = Actor.client_timeout_s,
                 max_in_flight: int = 4096, max_client_in_flight: int = 2048, max_client_waiting: int = 1024,
                 retry_after_s: float = 1.0, governor: str = GOVERNOR) -> None:
        super().__init__(name)
        self.governor_endpoint = address(governor, "weights")  # asked for its state by health and status
        self.client_timeout_s = client_timeout_s
        self.session_endpoint = session_endpoint  # advertised in HealthReply
        self._engine_factory = engine_factory
        dead = _DEAD_ENGINES.get(engine_factory)
        self._dead: str | None = dead[0] if dead is not None else None  # why the engine died
        self.engine: Engine = dead[1] if dead is not None else engine_factory()
        self.max_new_tokens_limit = max_new_tokens_limit
        self.model_name = model_name
        self.max_staleness = max_staleness
        self.max_in_flight = max_in_flight  # samples in flight (and waiting) in this actor
        self.max_client_in_flight = max_client_in_flight  # samples in flight per client
        self.max_client_waiting = max_client_waiting  # requests per client waiting for their min_version
        self.retry_after_s = retry_after_s  # told to refused senders (overloaded, client_limit)
        self.in_flight: dict[tuple[bytes, int], InFlight] = {}
        self._samples = 0
        self._client_samples: collections.Counter[str] = collections.Counter()
        self._client_waiting: collections.Counter[str] = collections.Counter()
        self._version_changed = asyncio.Event()
        self.pause_policy: str = ""
        self._admission = asyncio.Event()  # cleared while paused: new requests wait here
        self._admission.set()
        self._running_samples = 0
        self._sample_finished = asyncio.Event()

    async def on_start(self) -> None:
        if self._dead is not None:  # restarted after the engine died: stop again, for good
            self.spawn(self._stop_for_good())
            return
        await self.engine.start()
        watch = getattr(self.engine, "set_death_callback", None)
        if watch is not None:
            watch(self._engine_died)
        self.log.info("engine_started", **{k: v for k, v in vars(self.engine.info()).items() if k != "extra"})

    async def on_stop(self) -> None:
        """Abort everything in flight and let each request send its terminal reply: a sample the
        stop cut short ends its request with ``shutting_down`` (not a Done with "abort", which
        would read as the caller's own abort: a fleet client continues such work elsewhere)."""
        tasks = [t for f in self.in_flight.values() for t in f.tasks]
        for f in list(self.in_flight.values()):
            f.stopping = not f.aborted  # one its caller aborted already still ends with its Done ("abort")
            f.aborted = True
            for erid in f.engine_rids:
                await self.engine.abort(erid)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await self.engine.shutdown()  # a dead engine shut down again (by a restarted actor) does nothing

    def on_client_gone(self, sock: str, peer: bytes, client: str) -> None:
        """A rollout client went silent: abort its requests (engine aborts; the ones still waiting
        for min_version or admission end now). Each still gets its terminal reply, which the gone
        peer may never read."""
        conn = Origin("rollout", sock, peer, 0, client).conn
        gone = [f for f in self.in_flight.values() if f.origin.conn == conn]
        for f in gone:
            self._abort_flight(f)
        self.counters.inc("client_gone_aborts", len(gone))

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
    async def _governor_state(self) -> str:
        """The MemoryGovernor's state (it owns the one state machine); UNKNOWN if it does not answer."""
        try:
            reply = await self.peer(self.governor_endpoint, ControlReply).call(GovernorQuery(),
                                                                               timeout=GOVERNOR_QUERY_TIMEOUT_S)
        except (TimeoutError, RollwireError):
            return "UNKNOWN"
        state = reply.msg.state if isinstance(reply.msg, GovernorStatus) else "UNKNOWN"
        if state == "SERVING" and not self.engine.info().weights_complete:
            return "INCOMPLETE"  # a load failed part-way: requests wait for a whole version
        return state

    @handles(HealthRequest)
    async def on_health(self, origin: Origin, msg: HealthRequest, payload: Sequence[Any]) -> None:
        state = await self._governor_state()
        await self.reply(origin, HealthReply(weight_version=self.weight_version, governor_state=state,
                                             protocol=PROTOCOL_VERSION, session_endpoint=self.session_endpoint))

    @handles(ParamsRequest)
    def on_params(self, origin: Origin, msg: ParamsRequest, payload: Sequence[Any]) -> None:
        self.reply_nowait(origin, ParamsReply(weight_version=self.weight_version, params=self.engine.parameters()))

    @handles(StatusRequest)
    async def on_status(self, origin: Origin, msg: StatusRequest, payload: Sequence[Any]) -> None:
        state = await self._governor_state()
        info = self.engine.info()
        counters = self.counters.snapshot()
        counters.update({f"engine.{k}": float(v) for k, v in info.extra.items() if isinstance(v, (int, float))})
        counters.update(samples_in_flight=float(self._samples), clients_in_flight=float(len(self._client_samples)),
                        clients_waiting=float(len(self._client_waiting)), engine_dead=float(self._dead is not None))
        await self.reply(origin, StatusReply(
            engine=info.name, model=self.model_name, weight_version=info.weight_version,
            governor_state=state, in_flight=len(self.in_flight),
            max_new_tokens_limit=self.max_new_tokens_limit, vocab_size=info.vocab_size, counters=counters,
            max_model_len=info.max_model_len))

    @handles(AbortRequest)
    def on_abort(self, origin: Origin, msg: AbortRequest, payload: Sequence[Any]) -> None:
        f = self.in_flight.get((origin.conn, msg.target_rid))
        self.counters.inc("abort_requests")
        if f is None or f.aborted:
            return  # already finished: its terminal reply is on the way or delivered
        self._abort_flight(f)

    def _abort_flight(self, f: InFlight) -> None:
        if f.aborted:
            return
        f.aborted = True
        for erid in f.engine_rids:
            self.spawn(self.engine.abort(erid))
        self.notify_version_changed()  # wakes a request still waiting for min_version

    @handles(GenerateRequest)
    def on_generate(self, origin: Origin, msg: GenerateRequest, payload: Sequence[Any]) -> None:
        key = (origin.conn, origin.rid)
        if self._dead is not None:
            raise RollwireError(ErrorCode.ENGINE_DEAD, f"the engine died: {self._dead}")
        if key in self.in_flight:
            raise RollwireError(ErrorCode.DUPLICATE_REQUEST, f"request {origin.rid} is already in flight")
        sp = msg.sampling_params
        if sp.max_new_tokens > self.max_new_tokens_limit:
            limit = self.max_new_tokens_limit
            raise RollwireError(ErrorCode.BAD_SAMPLING_PARAMS,
                                f"max_new_tokens={sp.max_new_tokens} above this server's limit {limit}")
        if not 1 <= sp.n <= MAX_N:
            raise RollwireError(ErrorCode.BAD_SAMPLING_PARAMS, f"n={sp.n} must be in [1, {MAX_N}]")
        if not 1 <= msg.chunk_tokens <= max(1, sp.max_new_tokens):  # a bad max_new_tokens: its own error
            raise RollwireError(ErrorCode.BAD_FIELD, f"chunk_tokens={msg.chunk_tokens} must be in [1, max_new_tokens]")
        # a co-located actor's request counts for the client it names (none: exempt)
        client = (msg.client or None) if origin.internal else origin.client
        waits = msg.min_version > self.weight_version
        if self._refused(origin, client, sp.n, waits):
            return

        def sample(i: int) -> EngineRequest:
            params = sp if sp.n == 1 else msgspec.structs.replace(
                sp, n=1, seed=None if sp.seed is None else sp.seed + i)
            return EngineRequest(f"{origin.conn.hex()}:{origin.rid}:{i}", list(msg.input_ids), params,
                                 msg.return_logprob, stream=msg.stream, chunk_tokens=msg.chunk_tokens,
                                 session_id=session_key(origin.conn, msg.session_id) if sp.n == 1 else None,
                                 keep_stale_prefix=msg.keep_stale_prefix, client=client or origin.client)

        # the first and the last sample (the highest seed) cover every sample's parameters; both are
        # checked before the others copy the prompt (a refused prompt is not copied n times), and an
        # EngineError is this request's reply
        reqs = [sample(0)]
        self.engine.validate(reqs[0])
        if sp.n > 1:
            last = sample(sp.n - 1)
            self.engine.validate(last)
            reqs += [sample(i) for i in range(1, sp.n - 1)] + [last]
        flight = InFlight(origin, [r.rid for r in reqs], time.monotonic(), self.weight_version, streamed=msg.stream,
                          restartable=msg.stream and msg.restartable,
                          client=client, samples=sp.n, waiting=waits and client is not None)
        self.in_flight[key] = flight
        self._samples += sp.n
        if client is not None:
            self._client_samples[client] += sp.n
            if flight.waiting:
                self._client_waiting[client] += 1
        self.counters.inc("requests")
        # a task of its own (not the handler's awaitable): nothing between here and the task can
        # drop the request with its table entry left behind
        flight.tasks = [self.spawn(self._run_request(flight, msg, reqs))]

    def _refused(self, origin: Origin, client: str | None, samples: int, waits: bool) -> bool:
        """Refuse (with retry_after_s) a request beyond the actor's or its client's capacity."""
        code, why = None, ""
        if self._samples + samples > self.max_in_flight:
            code, why = ErrorCode.OVERLOADED, f"{self._samples} samples in flight (limit {self.max_in_flight})"
        elif client is not None and self._client_samples[client] + samples > self.max_client_in_flight:
            code, why = ErrorCode.CLIENT_LIMIT, (f"this client has {self._client_samples[client]} samples in "
                                                 f"flight (limit {self.max_client_in_flight})")
        elif client is not None and waits and self._client_waiting[client] >= self.max_client_waiting:
            code, why = ErrorCode.CLIENT_LIMIT, (f"this client has {self._client_waiting[client]} requests waiting "
                                                 f"for a weight version (limit {self.max_client_waiting})")
        if code is None:
            return False
        self.counters.inc(f"refused_{code.value}")
        self.reply_nowait(origin, ErrorReply(code=code, message=why, origin=self.name,
                                             retry_after_s=self.retry_after_s))
        return True

    def _release(self, flight: InFlight) -> None:
        """Its capacity is free again (the request ended, or stopped waiting for its version)."""
        if flight.waiting:
            flight.waiting = False
            assert flight.client is not None
            self._client_waiting[flight.client] -= 1
            if not self._client_waiting[flight.client]:
                del self._client_waiting[flight.client]

    async def _run_request(self, flight: InFlight, msg: GenerateRequest, reqs: list[EngineRequest]) -> None:
        try:
            while not flight.aborted and (self.weight_version < msg.min_version or not self._admission.is_set()):
                await self._wait_for_change()
            self._release(flight)
            if self._dead is not None:  # never reached the engine
                if not flight.closed:
                    await self.reply_error(flight.origin, ErrorCode.ENGINE_DEAD, f"the engine died: {self._dead}")
                return
            flight.start_version, flight.started = self.weight_version, True
            await asyncio.gather(*(self._run_sample(flight, msg, i, r) for i, r in enumerate(reqs)))
        except Exception as e:  # a bug: this request's one reply is the error, then the actor crashes
            if not flight.closed:
                flight.closed = True
                self.send_error_soon(flight.origin, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
            raise
        finally:
            self._release(flight)
            if self.in_flight.get((flight.origin.conn, flight.origin.rid)) is flight:
                del self.in_flight[(flight.origin.conn, flight.origin.rid)]
            self._samples -= flight.samples
            if flight.client is not None:
                self._client_samples[flight.client] -= flight.samples
                if not self._client_samples[flight.client]:
                    del self._client_samples[flight.client]

    # -- engine death ---------------------------------------------------------------------
    def _engine_died(self, reason: str) -> None:
        """The engine's death callback: it has failed what it held with engine_dead; requests
        waiting here get the same; once every request has its reply the actor stops for good."""
        if self._dead is not None:
            return
        self._dead = reason
        _DEAD_ENGINES[self._engine_factory] = (reason, self.engine)
        self.counters.inc("engine_deaths")
        self.log.error("engine_dead", reason=reason, in_flight=len(self.in_flight))
        for f in self.in_flight.values():
            f.aborted = True  # a waiting one wakes and answers engine_dead
        self.notify_version_changed()
        self.spawn(self._stop_for_good([t for f in self.in_flight.values() for t in f.tasks]))

    async def _stop_for_good(self, tasks: Sequence[asyncio.Task[Any]] = ()) -> None:
        if tasks:
            await asyncio.wait(tasks, timeout=30.0)  # each request sends its engine_dead first
        while self._crash is None:  # the actor's run loop has started (a restarted actor: at once)
            await asyncio.sleep(0.01)
        raise EngineDied(f"engine dead: {self._dead}")

    async def _run_sample(self, flight: InFlight, msg: GenerateRequest, index: int, req: EngineRequest) -> None:
        origin = flight.origin
        started = time.monotonic()
        out = SampleOutput(version=self.weight_version, logprobs=[] if msg.return_logprob else None)
        if self._dead is not None:
            if not flight.closed:
                await self.reply_error(origin, ErrorCode.ENGINE_DEAD, f"the engine died: {self._dead}")
            return
        # aborted before it started (e.g. while waiting for min_version): no engine work at all
        deltas = no_deltas() if flight.aborted else self.engine.generate(req)
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
                out = SampleOutput(version=self.weight_version, logprobs=[] if msg.return_logprob else None)
                req = dataclasses.replace(req, rid=f"{flight.engine_rids[index]}:r{flight.restarts}")
                flight.engine_rids[index] = req.rid  # where a later abort must go
                if msg.stream and not flight.closed:  # its client drops what it was sent of this sample
                    await self.reply(origin, GenerateChunk(index=index, token_ids=[], weight_version=out.version,
                                                           restarted=True))
                # an abort that came while the chunk was sent: the new run must not start
                deltas = no_deltas() if flight.aborted else self.engine.generate(req)
        except EngineError as e:
            if not flight.closed:
                await self.reply_error(origin, e.code, e.message)
            return
        finally:
            self._running_samples -= 1
            self._sample_finished.set()
        if flight.closed:
            return
        if flight.stopping and out.finish == "abort":
            flight.closed = True  # the request's one terminal reply (its other samples send nothing more)
            self.counters.inc("cut_by_stop")
            await self.reply_error(origin, ErrorCode.SHUTTING_DOWN, f"the server is stopping: sample {index} was cut "
                                                                    f"after {len(out.ids)} tokens")
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

    async def _send_chunk(self, flight: InFlight, index: int, out: SampleOutput, sent: int) -> int:
        if not flight.closed:
            lps = out.logprobs[sent:] if out.logprobs is not None else None
            await self.reply(flight.origin, GenerateChunk(index=index, token_ids=out.ids[sent:], logprobs=lps,
                                                          weight_version=out.version))
        return len(out.ids)

    async def _collect(self, flight: InFlight, msg: GenerateRequest, index: int, deltas: AsyncIterator[EngineDelta],
                       out: SampleOutput) -> None:
        """Gather one engine run's deltas into ``out`` (streamed as chunks of at least
        ``msg.chunk_tokens`` tokens of one version, if asked)."""
        sent = len(out.ids)  # tokens of ``out`` already streamed
        try:
            async for d in deltas:
                if d.token_ids:
                    if msg.stream and sent < len(out.ids) and d.weight_version != out.version:
                        sent = await self._send_chunk(flight, index, out, sent)  # a chunk has one version
                    if not out.first_token:
                        out.first_token = time.monotonic()
                    out.ids.extend(d.token_ids)
                    if out.logprobs is not None and d.logprobs is not None:
                        out.logprobs.extend(d.logprobs)
                    spans_add(out.spans, d.weight_version, len(d.token_ids))
                    out.version = d.weight_version
                    if msg.stream and (len(out.ids) - sent >= msg.chunk_tokens or d.finish_reason is not None):
                        sent = await self._send_chunk(flight, index, out, sent)
                out.cached = max(out.cached, d.cached_tokens)
                if d.finish_reason is not None:
                    out.finish = d.finish_reason
                    if msg.stream and sent < len(out.ids):  # ended by a delta without tokens (an abort)
                        sent = await self._send_chunk(flight, index, out, sent)
        finally:
            # closed now, not whenever the last reference goes (a kept exception's traceback can
            # hold it): an open SGLang generate_request holds off weight updates
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()
