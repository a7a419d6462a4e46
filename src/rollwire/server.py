"""Compose the rollout server: an ActorSystem with the actors, on one uvloop event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollwire.actors.generation import GENERATION, GenerationActor
from rollwire.actors.memory_governor import GOVERNOR, MemoryGovernor
from rollwire.actors.session import SESSIONS, SessionActor
from rollwire.engines.base import Engine
from rollwire.runtime import ActorSystem, address
from rollwire.runtime.logging import get_logger

log = get_logger("rollwire.server")


@dataclass
class ServerConfig:
    engine: str = "hf"  # hf | sglang
    model: str = "tiny"  # "tiny", "tiny:SEED" or a local checkpoint directory
    rollout_endpoint: str = "tcp://127.0.0.1:7500"
    device: str = "cpu"
    dtype: str | None = None
    max_new_tokens_limit: int = 4096
    max_batch_size: int = 64
    engine_args: dict[str, str] = field(default_factory=dict)
    # weight sync and the memory governor
    trainer_endpoint: str | None = None  # the TrainerPublisher's endpoint; None: no weight sync
    mode: str = "disaggregated"  # colocated | disaggregated
    pause_policy: str = "retract"  # abort | retract | drain | in_place
    drain_deadline_s: float = 30.0
    coalesce: bool = False  # keep only the newest version waiting behind a load
    max_staleness: int | None = None  # abort (retract policy: restart) requests started > K versions ago
    receiver_id: str = ""  # name this server registers under (default: host:pid)
    stall_timeout_s: float = 30.0  # a version not complete by then is discarded
    # sessions (multi-turn); default endpoint: a free tcp port on the rollout host, or the rollout
    # ipc/inproc name + "-sessions". Clients learn it from the health reply.
    session_endpoint: str | None = None
    max_sessions: int = 4096
    max_session_tokens: int = 32768


def session_endpoint_for(rollout_endpoint: str) -> str:
    """The default session endpoint: any free tcp port on the rollout host (not port + 1, which
    a trainer endpoint often takes), or the ipc/inproc name + "-sessions"."""
    if rollout_endpoint.startswith("tcp://"):
        host, _, _ = rollout_endpoint.rpartition(":")
        return f"{host}:*"
    return f"{rollout_endpoint}-sessions"


def make_engine_factory(cfg: ServerConfig) -> Callable[[], Engine]:
    if cfg.engine == "hf":
        from rollwire.engines.hf import HFEngine

        return lambda: HFEngine.from_spec(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                          max_batch_size=cfg.max_batch_size)
    if cfg.engine == "sglang":
        try:
            from rollwire.engines.sglang import SGLangEngine  # type: ignore[import-not-found]
        except ImportError as e:
            raise SystemExit(f"--engine sglang needs SGLang: pip install 'rollwire[sglang]' ({e})") from None
        return lambda: SGLangEngine(cfg.model, engine_args=cfg.engine_args)  # type: ignore[no-any-return]
    raise SystemExit(f"unknown engine {cfg.engine!r}: choose hf or sglang")


class RolloutServer:
    """All actors of one rollout server. ``async with RolloutServer(cfg) as srv: ...``"""

    def __init__(self, cfg: ServerConfig, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.cfg = cfg
        self.system = ActorSystem()
        self._engine_factory = engine_factory or make_engine_factory(cfg)

    @property
    def generation(self) -> GenerationActor:
        return self.system.actor(GENERATION)  # type: ignore[return-value]

    @property
    def sessions(self) -> SessionActor:
        return self.system.actor(SESSIONS)  # type: ignore[return-value]

    @property
    def governor(self) -> MemoryGovernor:
        return self.system.actor(GOVERNOR)  # type: ignore[return-value]

    async def start(self) -> RolloutServer:
        cfg = self.cfg
        sessions = await self.system.spawn(
            lambda: SessionActor(generation_rollout=address(GENERATION, "rollout"),
                                 generation_control=address(GENERATION, "control"),
                                 max_sessions=cfg.max_sessions, max_session_tokens=cfg.max_session_tokens),
            extra_binds={"sessions": [cfg.session_endpoint or session_endpoint_for(cfg.rollout_endpoint)]},
        )
        session_endpoint = sessions.bound_endpoint("sessions")
        await self.system.spawn(
            lambda: GenerationActor(self._engine_factory, max_new_tokens_limit=cfg.max_new_tokens_limit,
                                    model_name=cfg.model, max_staleness=cfg.max_staleness,
                                    session_endpoint=session_endpoint),
            extra_binds={"rollout": [cfg.rollout_endpoint]},
        )
        await self.system.spawn(lambda: MemoryGovernor(
            generation=GENERATION, mode=cfg.mode, pause_policy=cfg.pause_policy,  # type: ignore[arg-type]
            coalesce=cfg.coalesce, drain_deadline_s=cfg.drain_deadline_s))
        if cfg.trainer_endpoint:
            from rollwire.actors.weight_receiver import WeightReceiverActor

            rid = cfg.receiver_id or f"{socket.gethostname()}:{os.getpid()}"
            trainer_endpoint = cfg.trainer_endpoint
            engine_device = cfg.device if cfg.engine == "hf" else "cuda"  # sglang's weights live on its GPUs
            await self.system.spawn(lambda: WeightReceiverActor(
                trainer_endpoint, receiver_id=rid, apply_endpoint=address(GOVERNOR, "weights"),
                stall_timeout_s=cfg.stall_timeout_s, engine_device=engine_device, coalesce=cfg.coalesce))
        log.info("server_ready", rollout_endpoint=cfg.rollout_endpoint, session_endpoint=session_endpoint,
                 engine=cfg.engine, model=cfg.model)
        return self

    async def stop(self) -> None:
        await self.system.stop()
        log.info("server_stopped")

    async def __aenter__(self) -> RolloutServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM (or supervision gives up), then stop cleanly."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with self:
            assert self.system.failed is not None
            waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait()), self.system.failed]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            log.info("server_stopping")


def run(coro: object) -> object:
    """Run a coroutine on uvloop when available."""
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
