"""The gateway's state: its configuration, its clients (one ``RolloutClient``, or a ``RolloutFleet``
over several servers), the chat format, the session table and the metrics; and how an OpenAI
request's sampling fields become rollwire ``SamplingParams``."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from rollwire.clients.rollout import RolloutClient
from rollwire.clients.session import Session
from rollwire.fleet.client import RolloutFleet
from rollwire.fleet.session import FleetSession
from rollwire.gateway.chat import ChatFormat
from rollwire.gateway.errors import APIError, bad_request
from rollwire.gateway.metrics import GatewayMetrics
from rollwire.gateway.schemas import _Sampling
from rollwire.gateway.sessions import ChatSession, SessionTable
from rollwire.messages import RollwireError, SamplingParams
from rollwire.runtime.logging import get_logger
from rollwire.runtime.tasks import BackgroundTasks

log = get_logger("rollwire.gateway")

SESSION_HEADER = "x-session-id"
# a body this large is parsed, rendered and tokenized on a worker thread: ~1 ms per KiB with the tiny
# model's tokenizer, so at most ~16 ms of the event loop for a body under it (it was 256 KiB: 0.26 s each,
# and 32 such requests at once held /health for 5 s)
OFF_LOOP_BYTES = 16 << 10
T = TypeVar("T")


class StopBeforeReady(Exception):
    """The process was asked to stop while the gateway still waited for its servers."""


@dataclass
class GatewayConfig:
    endpoints: list[str]  # rollout endpoints: one (a RolloutClient) or several (a RolloutFleet)
    model: str = "tiny"  # tokenizer and chat template: tiny[:SEED] or a local checkpoint directory
    served_model_name: str = ""  # the name clients pass as ``model`` (default: ``model``)
    api_keys: list[str] = field(default_factory=list)  # empty: no auth, one owner for every session
    max_body_bytes: int = 8 << 20
    default_max_tokens: int = 1024  # a chat turn without max_tokens (capped by the server's limit)
    session_max_tokens: int = 16384  # each rollwire session's token budget (history + a turn)
    session_ttl_s: float = 600.0
    max_sessions: int = 4096
    request_timeout_s: float | None = 600.0
    start_timeout_s: float = 120.0  # how long it waits for a rollout server at start
    fleet_health_interval_s: float = 1.0  # several endpoints: how often each server's health is asked


class Gateway:
    """What the routes share: the tokenizer, the server client, the session table, the counters."""

    def __init__(self, cfg: GatewayConfig, chat: ChatFormat, client: RolloutClient | RolloutFleet | None = None,
                 ) -> None:
        if not cfg.endpoints:
            raise SystemExit("the gateway needs at least one rollout endpoint")
        if len(set(cfg.endpoints)) != len(cfg.endpoints):
            raise SystemExit(f"a rollout endpoint is named twice: {cfg.endpoints}")
        self.cfg = cfg
        self.chat = chat
        self.name = cfg.served_model_name or cfg.model
        if client is None:
            client = RolloutClient(cfg.endpoints[0], timeout=cfg.request_timeout_s) if len(cfg.endpoints) == 1 \
                else RolloutFleet(cfg.endpoints, timeout=cfg.request_timeout_s,
                                  health_interval_s=cfg.fleet_health_interval_s)
        self.client: RolloutClient | RolloutFleet = client
        self.sessions = SessionTable(cfg.max_sessions, cfg.session_ttl_s)
        self.metrics = GatewayMetrics()
        self.in_flight = 0
        self.max_new_tokens_limit = 4096
        self.vocab_size = 0
        self.max_model_len = 0  # the server's context (0: not reported)
        self._sweeper: asyncio.Task[None] | None = None
        # a large request's text work (JSON, pydantic, template, tokenizer) runs here, not on the
        # event loop: seconds of tokenizing there would starve every other request and the
        # heartbeats that keep the servers counted alive
        self._text_pool = ThreadPoolExecutor(2, thread_name_prefix="rw-gw-text")
        self._background = BackgroundTasks()
        self.should_stop: Callable[[], bool] = lambda: False  # set by whoever runs the HTTP server
        self.request_exit: Callable[[], None] = lambda: None  # the same: stop serving (a failed start)
        self.start_error: str | None = None

    @property
    def fleet(self) -> RolloutFleet | None:
        return self.client if isinstance(self.client, RolloutFleet) else None

    def server_clients(self) -> dict[str, RolloutClient]:
        """Each server's own client (health, status), by endpoint."""
        if isinstance(self.client, RolloutFleet):
            return {s.endpoint: s.client for s in self.client.servers}
        return {self.cfg.endpoints[0]: self.client}

    async def start(self) -> None:
        """Until a server answers (a fleet: one is admitted; the rest join as they come), at most
        ``start_timeout_s``, checking each second whether the process was asked to stop meanwhile
        (``should_stop``: uvicorn's flag; a signal does not interrupt its startup otherwise)."""
        await self.client.__aenter__()
        log.info("gateway_waiting_for_servers", endpoints=self.cfg.endpoints)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.start_timeout_s
        while True:
            try:
                if isinstance(self.client, RolloutFleet):
                    first = (await self.client.wait_ready(servers=1, timeout=1.0))[0]
                    st = await self.server_clients()[first].status()
                else:
                    await self.client.wait_ready(timeout=1.0)
                    st = await self.client.status()
                break
            except (TimeoutError, RollwireError):
                if self.should_stop():
                    raise StopBeforeReady("asked to stop before a rollout server answered") from None
                if loop.time() >= deadline:
                    raise
        self.max_new_tokens_limit, self.vocab_size = st.max_new_tokens_limit, st.vocab_size
        self.max_model_len = st.max_model_len
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*(close_quietly(s.session) for s in list(self.sessions.sessions.values())))
        await self._background.drain()
        await self.client.close()
        self._text_pool.shutdown(wait=False, cancel_futures=True)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.cfg.session_ttl_s / 4))
            for s in self.sessions.expired():  # the server expires it on its own anyway
                await close_quietly(s.session)
            self.metrics.set("sessions_open", len(self.sessions.sessions))

    # -- helpers --------------------------------------------------------------------------
    async def text_work(self, big: bool, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: on a worker thread for a large request, else here (a thread hop costs
        more than a small request's whole text work)."""
        if not big:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._text_pool, fn, *args)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` to its end in the background (cleanup a closing request must not wait for)."""
        self._background.spawn(coro)

    def drop_session(self, cs: ChatSession) -> None:
        """Forget a chat session and free its rollwire session on the server (in the background)."""
        if self.sessions.sessions.get(cs.key) is cs:  # once: whoever drops it first closes it
            del self.sessions.sessions[cs.key]
            self.metrics.inc("sessions_dropped_total")
            self.spawn(close_quietly(cs.session))

    def default_max_tokens(self, used: int, *, session: bool = False) -> int:
        """A chat turn without max_tokens: the configured default, within the server's limit and
        the room left after ``used`` tokens (the context; a session's token budget too), as
        OpenAI-style servers fill the context."""
        limit = min(self.cfg.default_max_tokens, self.max_new_tokens_limit)
        caps = [c for c in (self.max_model_len, self.cfg.session_max_tokens if session else 0) if c]
        room = min(caps) - used if caps else 0
        return min(limit, room) if caps and room >= 1 else limit

    def owner(self, request: Request) -> str:
        if not self.cfg.api_keys:
            return ""
        auth = request.headers.get("authorization", "")
        key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        # bytes: a header's non-ASCII characters would make compare_digest raise (a 500, not a 401)
        if not any(secrets.compare_digest(key.encode(), k.encode()) for k in self.cfg.api_keys):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
        return key

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"The model '{model}' does not exist (this gateway serves '{self.name}')",
                           param="model", code="model_not_found")

    def sampling(self, req: _Sampling, max_tokens: int, stops: list[str], *, chat: bool, n: int) -> SamplingParams:
        if max_tokens > self.max_new_tokens_limit:
            raise bad_request(f"max_tokens={max_tokens} exceeds the server's limit {self.max_new_tokens_limit}",
                              "max_tokens")
        stop_ids = list(req.stop_token_ids or [])
        if chat and not req.ignore_eos:
            stop_ids += self.chat.end_ids
        for s in stops:  # a stop string that is one token stops in the engine, at once
            ids = self.chat.encode(s)
            if len(ids) == 1:
                stop_ids.append(ids[0])
        if self.vocab_size and any(i >= self.vocab_size for i in stop_ids):
            raise bad_request(f"stop_token_ids must lie in [0, {self.vocab_size})", "stop_token_ids")
        return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, min_p=req.min_p, seed=req.seed, n=n,
                              stop_token_ids=sorted(set(stop_ids)), ignore_eos=req.ignore_eos)


async def close_quietly(session: Session | FleetSession) -> None:
    """Free a session on its server, if that server is still there to free it."""
    if isinstance(session, FleetSession) and not session.server_alive:
        return  # its server is gone (or evicted): nothing to free, and no liveness wait for it
    with contextlib.suppress(Exception):
        await session.close()


def session_endpoint(gw: Gateway, session: Session | FleetSession) -> str:
    return session.endpoint if isinstance(session, FleetSession) else gw.cfg.endpoints[0]



