"""The routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, and the
trajectory routes (GET/DELETE /v1/sessions/{id}[/trajectory]).

Every request is validated before anything is sent (schemas.py); every failure leaves as an
OpenAI-shaped error (errors.py), FastAPI's own 404/405/422 included. A plain request goes to the
server as one token request (streamed when the caller streams or sent stop strings, so it can be
cut at the first one); a request tagged with a session runs as that rollwire session's next turn
(sessions.py). A stream's first reply is awaited before the HTTP response starts, so a refusal
(overloaded, bad parameters) still has its 4xx status.

With several ``--rollout-endpoint`` the gateway runs over a ``RolloutFleet``: plain requests are
routed across the servers (a non-streamed one continues on another server if its own dies; a
streamed one ends with ``server_unavailable``), and each session is a ``FleetSession``, which stays
on its server and moves to another by replaying its history when that server dies, so the
trajectory goes on unbroken. One endpoint: a plain ``RolloutClient``, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from rollwire.clients.rollout import RolloutClient
from rollwire.clients.session import SessionDesynced
from rollwire.gateway.chat import tools_json
from rollwire.gateway.choices import Choice
from rollwire.gateway.core import (
    OFF_LOOP_BYTES,
    SESSION_HEADER,
    Gateway,
    StopBeforeReady,
    close_quietly,
    log,
    session_endpoint,
)
from rollwire.gateway.errors import APIError, bad_request, from_rollwire
from rollwire.gateway.events import (
    ClosingStreamingResponse,
    first_event,
    history_length,
    merge,
    plain_events,
    replay,
    session_turn,
)
from rollwire.gateway.metrics import CountingMiddleware
from rollwire.gateway.render import (
    chat_response,
    chat_stream,
    completion_choice,
    error_event,
    legacy_logprobs,
    rollwire_info,
    session_headers,
    sse,
    trajectory_body,
    usage_body,
)
from rollwire.gateway.schemas import ChatCompletionRequest, CompletionRequest, decode_json, parse
from rollwire.gateway.session_lookup import (
    drop_if_unused,
    dropped_desynced,
    on_a_restarted_server,
    open_chat_session,
    reopen_on_restarted_server,
    session_id_of,
    unsupported_session,
)
from rollwire.messages import RollwireError, StatusReply


# -- the app ------------------------------------------------------------------------------
def build_app(gw: Gateway) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await gw.start()
            log.info("gateway_ready", endpoints=gw.cfg.endpoints, model=gw.name)
        except StopBeforeReady as e:  # a signal while waiting: uvicorn exits right after startup
            log.warning("gateway_stopped_before_ready", reason=str(e))
        except RollwireError as e:  # no server answered in time (or not a rollwire one): one line, exit 3
            gw.start_error = f"{e.code.value}: {e.message}"
            log.error("gateway_no_server", endpoints=gw.cfg.endpoints, error=gw.start_error)
            gw.request_exit()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="rollwire gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: APIError) -> JSONResponse:
        headers = {"retry-after": f"{max(1, round(e.retry_after_s))}"} if e.retry_after_s else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RollwireError)
    async def _rollwire_error(request: Request, e: RollwireError) -> JSONResponse:
        return error_response(from_rollwire(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                       type=kind, code=str(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(bad_request(f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(ClientDisconnect)
    async def _gone_during_upload(request: Request, e: ClientDisconnect) -> Response:
        gw.metrics.inc("client_disconnects_total")  # hung up before its body was in: nothing ran
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("gateway_internal_error", path=request.url.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}", type="internal_error",
                                       code="internal"))

    app.add_middleware(CountingMiddleware, gw=gw)

    async def body_of(request: Request) -> tuple[Any, int]:
        limit = gw.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        buf = bytearray()
        async for piece in request.stream():
            buf += piece
            if len(buf) > limit:
                raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        return await gw.text_work(len(buf) > OFF_LOOP_BYTES, decode_json, buf), len(buf)

    # -- chat -------------------------------------------------------------------------------
    async def unless_gone(request: Request, work: Any) -> Response:
        """``work`` (the rest of a request, its body read), cancelled if the caller hangs up first:
        its generation is then aborted on the servers, as a cut stream's is (a non-streamed request
        ran on to its max_tokens for nobody). A streamed response is returned at once: its body
        watches for the hang-up itself."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(hung_up(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # this handler itself is cancelled: the work goes with it
            task.cancel()
            raise
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its cancellation runs to its end (aborts sent); raises nothing
            if not task.cancelled():
                task.exception()  # retrieved: it ended with its own error as it was cancelled
            gw.metrics.inc("client_disconnects_total")
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        return task.result()  # type: ignore[no-any-return]

    async def hung_up(request: Request) -> None:
        """Returns once the caller has hung up (its body was read: what comes next is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        owner = gw.owner(request)
        body, size = await body_of(request)
        return await unless_gone(request, chat_turn(request, owner, body, size))

    async def chat_turn(request: Request, owner: str, body: Any, size: int) -> Response:
        big = size > OFF_LOOP_BYTES
        req: ChatCompletionRequest = await gw.text_work(big, parse, ChatCompletionRequest, body)
        gw.check_model(req.model)
        sid = session_id_of(request, req.session_id)
        tools = tools_json(req.tools) if req.tool_choice != "none" else None
        messages = await gw.text_work(big, gw.chat.conversation, req.messages, tools, gw.max_model_len)
        stops = req.stops()
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if sid is None:
            prompt = await gw.text_work(big, gw.chat.prompt_ids, messages, tools)
            max_tokens = req.token_limit() or gw.default_max_tokens(len(prompt))
            sp = gw.sampling(req, max_tokens, stops, chat=True, n=req.n)
            choices = [Choice(gw.chat, i, stops=stops, tools=bool(tools), chat_mode=True) for i in range(req.n)]
            events = plain_events(gw, prompt, sp, choices, streamed=req.stream or any(
                len(gw.chat.encode(s)) > 1 for s in stops))
            cs = None
            prompt_tokens = len(prompt)
        else:
            if req.n != 1:
                raise bad_request("n must be 1 in a session (a session is one trajectory)", "n")
            cs = await open_chat_session(gw, owner, sid, tools)
            if cs.lock.locked():
                raise APIError(409, f"session {sid} has a turn running", type="conflict_error",
                               code="session_busy")
            await cs.lock.acquire()  # released when the turn's events end (_session_turn)
            try:
                if on_a_restarted_server(cs):
                    await reopen_on_restarted_server(gw, cs)
                prompt, prompt_text = await gw.text_work(big, cs.new_tokens, gw.chat, messages, tools)
                max_tokens = req.token_limit() or gw.default_max_tokens((history_length(cs) or 0) + len(prompt),
                                                                        session=True)
                sp = gw.sampling(req, max_tokens, stops, chat=True, n=1)
            except BaseException:
                cs.lock.release()
                drop_if_unused(gw, cs)
                raise
            choices = [Choice(gw.chat, 0, stops=stops, tools=bool(tools), chat_mode=True)]
            try:
                first, events = await first_event(session_turn(gw, cs, messages, prompt, prompt_text, sp, choices[0],
                                                           streamed=req.stream))
            except APIError as e:
                if e.code in ("unknown_session", "session_expired", "session_closed"):
                    gw.sessions.sessions.pop(cs.key, None)  # gone on the server: the id starts afresh next time
                else:
                    drop_if_unused(gw, cs)
                raise
            except SessionDesynced as e:  # a reply never came: the record is unknown, the session unusable
                raise dropped_desynced(gw, cs, e) from None
            prompt_tokens = len(prompt)  # the whole history, once the turn's GenerateDone says it
            events = replay(first, events)
        if not req.stream:
            return await chat_response(gw, req, choices, events, rid, created, prompt_tokens, sid, prompt)
        first, events = await first_event(events)
        body = chat_stream(gw, req, choices, replay(first, events), rid, created, prompt_tokens, sid, prompt)
        return ClosingStreamingResponse(body, media_type="text/event-stream", headers=session_headers(sid))

    # -- completions -------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        gw.owner(request)
        body, size = await body_of(request)
        return await unless_gone(request, completion(body, size, bool(request.headers.get(SESSION_HEADER))))

    async def completion(body: Any, size: int, session_header: bool) -> Response:
        big = size > OFF_LOOP_BYTES
        req: CompletionRequest = await gw.text_work(big, parse, CompletionRequest, body)
        gw.check_model(req.model)
        if req.session_id is not None or session_header:
            raise unsupported_session()
        stops = req.stops()
        texts = [p for p in req.prompts() if isinstance(p, str)]
        gw.chat.check_fits(max((len(p) for p in texts), default=0), gw.max_model_len, "prompt")
        prompts = await gw.text_work(big, lambda: [gw.chat.encode(p) if isinstance(p, str) else p
                                                   for p in req.prompts()])
        if any(not p for p in prompts):
            raise bad_request("a prompt is empty", "prompt")
        if gw.vocab_size and any(t < 0 or t >= gw.vocab_size for p in prompts for t in p):
            raise bad_request(f"prompt token ids must lie in [0, {gw.vocab_size})", "prompt")
        sp = gw.sampling(req, req.max_tokens, stops, chat=False, n=req.n)
        streamed = req.stream or any(len(gw.chat.encode(s)) > 1 for s in stops)
        groups = [[Choice(gw.chat, k * req.n + i, stops=stops, tools=False, chat_mode=False) for i in range(req.n)]
                  for k in range(len(prompts))]
        merged = merge([plain_events(gw, p, sp, g, streamed) for p, g in zip(prompts, groups, strict=True)],
                        [g[0].index for g in groups])
        choices = [c for g in groups for c in g]
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        first, events = await first_event(merged)
        events = replay(first, events)
        prompt_tokens = sum(len(p) for p in prompts)
        if not req.stream:
            async for _ in events:
                pass
            gw.metrics.inc("completion_tokens_total", sum(len(c.ids) for c in choices))
            gw.metrics.inc("prompt_tokens_total", prompt_tokens)
            body = {"id": rid, "object": "text_completion", "created": created, "model": gw.name,
                    "choices": [completion_choice(c, req, prompts[c.index // req.n]) for c in choices],
                    "usage": usage_body(choices, prompt_tokens), "rollwire": rollwire_info(choices, None)}
            return JSONResponse(body)

        async def stream() -> AsyncGenerator[bytes, None]:
            try:
                async with contextlib.aclosing(events):
                    async for index, deltas, taken, start in events:
                        c = choices[index]
                        text = "".join(d.get("text", "") for d in deltas)
                        lp = legacy_logprobs(c, taken, start) if req.logprobs is not None and taken else None
                        if text or lp:
                            yield sse({"id": rid, "object": "text_completion", "created": created,
                                        "model": gw.name, "choices": [{"index": index, "text": text, "logprobs": lp,
                                                                       "finish_reason": None}]})
                for c in choices:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": gw.name,
                                "choices": [{"index": c.index, "text": "", "logprobs": None,
                                             "finish_reason": c.finish_reason}]})
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": gw.name,
                                "choices": [], "usage": usage_body(choices, prompt_tokens)})
                gw.metrics.inc("completion_tokens_total", sum(len(c.ids) for c in choices))
                gw.metrics.inc("prompt_tokens_total", prompt_tokens)
            except (RollwireError, APIError) as e:
                yield error_event(e)
            yield b"data: [DONE]\n\n"

        return ClosingStreamingResponse(stream(), media_type="text/event-stream")

    # -- the rest ----------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        gw.owner(request)
        return JSONResponse({"object": "list", "data": [{"id": gw.name, "object": "model", "created": 0,
                                                         "owned_by": "rollwire", "max_model_len": None}]})

    @app.get("/health")
    async def health() -> JSONResponse:
        """Every server's health; with a fleet, also whether the fleet counts it live (admitted).
        200 while some server can take requests ("ok": all can, "degraded": some), else 503."""
        fleet = gw.fleet.stats() if gw.fleet is not None else {}

        async def one(ep: str, rc: RolloutClient) -> dict[str, Any]:
            try:
                h = await rc.health(timeout=2.0)
                row: dict[str, Any] = {"endpoint": ep, "weight_version": h.weight_version,
                                       "state": h.governor_state}
            except RollwireError as e:
                row = {"endpoint": ep, "error": e.code.value}
            if ep in fleet:
                row["alive"] = fleet[ep]["alive"]
                if not fleet[ep]["alive"]:
                    row["why_out"] = fleet[ep]["why_out"]
            return row

        servers = await asyncio.gather(*(one(ep, rc) for ep, rc in gw.server_clients().items()))
        up = [("error" not in r) and r.get("alive", True) for r in servers]
        status = "ok" if all(up) else "degraded" if any(up) else "unavailable"
        body: dict[str, Any] = {"status": status, "servers": servers}
        if gw.fleet is not None:
            body["sessions"] = {ep: sum(1 for cs in gw.sessions.sessions.values()
                                        if session_endpoint(gw, cs.session) == ep) for ep in gw.cfg.endpoints}
        return JSONResponse(body, status_code=200 if any(up) else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        async def one(rc: RolloutClient) -> StatusReply | None:
            try:
                return await rc.status(timeout=2.0)
            except RollwireError:
                return None

        clients = gw.server_clients()
        replies = await asyncio.gather(*(one(rc) for rc in clients.values()))
        statuses = dict(zip(clients, replies, strict=True))
        gw.metrics.set("sessions_open", len(gw.sessions.sessions))
        fleet = None
        if gw.fleet is not None:
            fleet = {"servers": gw.fleet.stats(), "failovers": gw.fleet.failovers,
                     "tokens_carried": gw.fleet.tokens_carried, "current_version": gw.fleet.current_version}
        return PlainTextResponse(gw.metrics.render(statuses, fleet), media_type="text/plain; version=0.0.4")

    @app.get("/v1/sessions/{sid}/trajectory")
    async def trajectory(sid: str, request: Request) -> JSONResponse:
        cs = gw.sessions.get(gw.owner(request), sid)
        if cs.lock.locked():
            raise APIError(409, f"session {sid} has a turn running", type="conflict_error", code="session_busy")
        return JSONResponse(trajectory_body(gw, cs))

    @app.delete("/v1/sessions/{sid}")
    async def close_session(sid: str, request: Request) -> JSONResponse:
        """Close the session; the answer is its final trajectory."""
        cs = gw.sessions.get(gw.owner(request), sid)
        if cs.lock.locked():
            raise APIError(409, f"session {sid} has a turn running", type="conflict_error", code="session_busy")
        body = trajectory_body(gw, cs)
        del gw.sessions.sessions[cs.key]
        await close_quietly(cs.session)  # expired on the server already, or its server gone: nothing to free
        return JSONResponse(body)

    return app
