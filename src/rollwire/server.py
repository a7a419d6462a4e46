"""Compose the rollout server: an ActorSystem with the actors, on one uvloop event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rollwire.actors.generation import GENERATION, GenerationActor
from rollwire.actors.memory_governor import GOVERNOR, MemoryGovernor
from rollwire.actors.session import SESSIONS, SessionActor
from rollwire.engines.base import Engine
from rollwire.runtime import ActorSystem, address
from rollwire.runtime.logging import get_logger
from rollwire.transports.security import (
    ROLLOUT_DOMAIN,
    CurveClient,
    CurveServer,
    KeyPair,
    load_public_keys,
    require_secure_or_local,
)

log = get_logger("rollwire.server")


ShmVerify = Literal["while_loading", "before_load"]


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
    barrier_timeout_s: float = 60.0  # barrier pushes: resume on our own if the trainer never releases
    coalesce: bool = False  # keep only the newest version waiting behind a load
    max_staleness: int | None = None  # abort (retract policy: restart) requests started > K versions ago
    receiver_id: str = ""  # name this server registers under (default: host:pid)
    stall_timeout_s: float = 30.0  # a version not complete by then is discarded
    # shm buckets: verified as the hf engine (on a CPU) copies them, one pass over the bytes; a bad one
    # then leaves the engine holding requests until a whole version loads. "before_load": a separate
    # pass before pausing, so a bad bucket leaves the old version serving (as with every other engine)
    shm_verify: ShmVerify = "while_loading"
    # sessions (multi-turn); default endpoint: a free tcp port on the rollout host, or the rollout
    # ipc/inproc name + "-sessions". Clients learn it from the health reply.
    session_endpoint: str | None = None
    max_sessions: int = 4096
    max_session_tokens: int = 32768
    # trust and liveness (transports/security.py): CURVE when secret_key is set
    secret_key: str | None = None  # this server's .key_secret file
    client_keys: list[str] = field(default_factory=list)  # rollout clients' .key files or directories
    trainer_keys: list[str] = field(default_factory=list)  # trainers' .key files (the first is the one it pulls from)
    insecure: bool = False  # allow a non-loopback tcp bind without keys
    client_timeout_s: float = 15.0  # a client silent this long is gone: its requests and sessions are freed
    # fair sharing (per client: its CURVE key, else its connection)
    max_in_flight: int = 4096  # samples in flight in the whole server; beyond: overloaded
    max_client_in_flight: int = 2048  # samples in flight per client; beyond: client_limit
    max_client_waiting: int = 1024  # requests per client waiting for a min_version
    max_client_sessions: int | None = None  # None: half of max_sessions
    retry_after_s: float = 1.0  # what overloaded / client_limit tell the client

    def __post_init__(self) -> None:
        if self.shm_verify not in ("while_loading", "before_load"):
            raise ValueError(f"shm_verify must be while_loading or before_load, not {self.shm_verify!r}")

    def curve_server(self) -> CurveServer | None:
        """The CURVE guard of the public sockets: rollout clients' and trainers' keys are let in."""
        if self.secret_key is None:
            if self.client_keys or self.trainer_keys:
                raise SystemExit("--client-keys/--trainer-keys need --secret-key (this server's key pair)")
            return None
        keys = KeyPair.load(self.secret_key)
        if keys.secret is None:
            raise SystemExit(f"{self.secret_key} holds no secret key (give the .key_secret file)")
        allowed = load_public_keys([*self.client_keys, *self.trainer_keys])
        if not allowed:
            raise SystemExit("--secret-key without --client-keys or --trainer-keys would let no one in")
        return CurveServer(keys, ROLLOUT_DOMAIN, allowed)

    def curve_receiver(self) -> CurveClient | None:
        """How the WeightReceiverActor proves itself to the trainer and checks that it is the trainer."""
        if self.secret_key is None:
            return None
        if not self.trainer_keys:
            if self.trainer_endpoint:
                raise SystemExit("--secret-key with --trainer-endpoint needs --trainer-keys (the trainer's .key)")
            return None
        trainer = sorted(load_public_keys(self.trainer_keys[:1]))
        if len(trainer) != 1:
            raise SystemExit(f"the first --trainer-keys entry must be one key file, got {self.trainer_keys[0]}")
        return CurveClient(KeyPair.load(self.secret_key), trainer[0])


MAX_IPC_PATH = 107  # bytes of a unix socket path (sun_path, less its terminating zero)


def session_endpoint_for(rollout_endpoint: str) -> str:
    """The default session endpoint: any free tcp port on the rollout host (not port + 1, which
    a trainer endpoint often takes), or the ipc/inproc name + "-sessions"."""
    if rollout_endpoint.startswith("tcp://"):
        host, _, _ = rollout_endpoint.rpartition(":")
        return f"{host}:*"
    ep = f"{rollout_endpoint}-sessions"
    if rollout_endpoint.startswith("ipc://") and len(ep.removeprefix("ipc://").encode()) > MAX_IPC_PATH:
        # the suffix would take a path that fits over the limit: a short name beside it instead
        digest = hashlib.sha1(rollout_endpoint.encode()).hexdigest()[:10]
        ep = f"ipc://{os.path.dirname(rollout_endpoint.removeprefix('ipc://'))}/s-{digest}"
    return ep


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
        self.exit_reason: str | None = None  # why serve_forever stopped, when it was not asked to
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
        curve = cfg.curve_server()
        session_bind = cfg.session_endpoint or session_endpoint_for(cfg.rollout_endpoint)
        require_secure_or_local([cfg.rollout_endpoint, session_bind], curve is not None, cfg.insecure)
        sessions = await self.system.spawn(
            lambda: SessionActor(generation_rollout=address(GENERATION, "rollout"),
                                 generation_control=address(GENERATION, "control"),
                                 max_sessions=cfg.max_sessions, max_session_tokens=cfg.max_session_tokens,
                                 client_timeout_s=cfg.client_timeout_s, max_client_sessions=cfg.max_client_sessions,
                                 retry_after_s=cfg.retry_after_s),
            public={"sessions": [session_bind]}, curve=curve,
        )
        session_endpoint = sessions.bound_endpoint("sessions")
        await self.system.spawn(
            lambda: GenerationActor(self._engine_factory, max_new_tokens_limit=cfg.max_new_tokens_limit,
                                    model_name=cfg.model, max_staleness=cfg.max_staleness,
                                    session_endpoint=session_endpoint, client_timeout_s=cfg.client_timeout_s,
                                    max_in_flight=cfg.max_in_flight, max_client_in_flight=cfg.max_client_in_flight,
                                    max_client_waiting=cfg.max_client_waiting, retry_after_s=cfg.retry_after_s),
            public={"rollout": [cfg.rollout_endpoint]}, curve=curve,
        )
        await self.system.spawn(lambda: MemoryGovernor(
            generation=GENERATION, mode=cfg.mode, pause_policy=cfg.pause_policy,  # type: ignore[arg-type]
            drain_deadline_s=cfg.drain_deadline_s, barrier_timeout_s=cfg.barrier_timeout_s))
        if cfg.trainer_endpoint:
            from rollwire.actors.weight_receiver import WeightReceiverActor

            rid = cfg.receiver_id or f"{socket.gethostname()}:{os.getpid()}"
            trainer_endpoint = cfg.trainer_endpoint
            engine_device = cfg.device if cfg.engine == "hf" else "cuda"  # sglang's weights live on its GPUs
            receiver_curve = cfg.curve_receiver()
            extra: dict[str, Any] = {"curve": receiver_curve} if receiver_curve is not None else {}
            await self.system.spawn(lambda: WeightReceiverActor(
                trainer_endpoint, receiver_id=rid, apply_endpoint=address(GOVERNOR, "weights"),
                stall_timeout_s=cfg.stall_timeout_s, engine_device=engine_device, coalesce=cfg.coalesce,
                verify_on_load=cfg.shm_verify == "while_loading" and cfg.engine == "hf" and engine_device == "cpu",
                **extra))
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

    async def serve_forever(self) -> int:
        """Run until SIGINT/SIGTERM (exit status 0) or until supervision gives up (1, the reason in
        ``exit_reason`` and the log), then stop cleanly."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with self:
            assert self.system.failed is not None
            waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait()), self.system.failed]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if self.system.failed.done():
                self.exit_reason = str(self.system.failed.result())
                log.error("server_failed", reason=self.exit_reason)
            log.info("server_stopping")
        return 0 if self.exit_reason is None else 1


def run(coro: object) -> object:
    """Run a coroutine on uvloop when available."""
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
