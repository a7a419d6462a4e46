"""Launch N ``rollwire serve`` servers as Ray actors in one placement group (``pip install "rollwire[ray]"``).

    with RayLauncher(4, engine="sglang", model="/ckpt", tp=1, trainer_endpoint="tcp://10.0.0.1:7501",
                     serve_args=["--secret-key", "keys/server.key_secret", "--client-keys", "keys/worker.key"],
                     curve=worker_curve) as launcher:
        endpoints = launcher.start()              # ["tcp://10.0.0.2:41234", ...], every server answering health
        async with RolloutFleet(endpoints) as fleet: ...

Each server is one actor (``ServeActor``) pinned to its own bundle of the placement group (``PACK`` by
default, as slime and OpenRLHF do); a bundle asks ``num_cpus`` CPUs and ``num_gpus`` GPUs (default:
``tp`` for SGLang or a CUDA device, 0 for the hf engine on CPU). The actor runs ``rollwire serve`` as a
child process and supervises it, so the server's exit status keeps its meaning and a crash of the
engine cannot take Ray's worker with it.

Restarts. When the child exits without being asked to (a crash, ``kill -9``), the actor logs its exit
status and exits the worker process, and Ray restarts the actor (``max_restarts``). When the worker
process dies, the child dies with it (Linux: ``PR_SET_PDEATHSIG``), so nothing is left serving on a
port nobody owns. A restarted actor serves **at the same endpoint**: it picks its port on its first
start and remembers it in a node-local file keyed by its actor id, so a fleet client built from
``start()``'s list re-admits it by its own health checks, with nothing to poll. Only if Ray places
the restarted actor on another node (its node died), or the port was taken meanwhile, does the
endpoint change; ``servers()`` and ``current_endpoints()`` report the endpoints as they are now.
A server that fails on its first start, before it was ever ready, is not restarted: ``start()``
raises with its exit status and tears everything down.

Endpoints are ``tcp://<host>:<port>`` with ``host`` the actor's node IP (default) or the ``host``
given (``127.0.0.1`` for a one-node cluster). A non-loopback host needs CURVE keys in
``serve_args`` (and ``curve``, the client keys the launcher's health checks use), or
``insecure=True`` on a network you trust, as ``rollwire serve`` itself requires.

Servers given ``trainer_endpoint`` register with that trainer's ``TrainerPublisher`` themselves
(a restarted one too), so the trainer needs no list; ``start()``'s list is for the rollout clients.
Without Ray, start the servers any other way (SLURM, by hand) and give the clients the endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollwire.transports.security import CurveClient, is_loopback_or_local
from rollwire.transports.sockets import free_tcp_endpoint

STATE_DIR = Path(tempfile.gettempdir()) / "rollwire-ray"  # node-local: one small JSON file per actor

# Runs first in the child: die with the actor's worker process (PR_SET_PDEATHSIG = 1, kept across
# exec), or at once if it is already gone, then become `python -m rollwire.cli ...` (argv[2:]).
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.executable, [sys.executable, "-m", "rollwire.cli", *sys.argv[2:]])
"""


@dataclass(frozen=True)
class ServerInfo:
    """One server as its actor reports it now."""

    index: int
    endpoint: str | None  # rollout endpoint; None once the actor is dead for good (max_restarts spent)
    session_endpoint: str | None
    node_ip: str | None
    pid: int | None  # the `rollwire serve` process
    actor_pid: int | None  # the Ray worker process that supervises it
    incarnation: int  # 0 on the first start, +1 on each restart by Ray
    last_exit: int | None  # exit status of the previous incarnation's server (-9: SIGKILL); None if unknown
    alive: bool


def _port_free(host: str, port: int) -> bool:
    """Whether a listener can bind ``host:port`` now (SO_REUSEADDR, as libzmq binds: the dead server's
    connections in TIME_WAIT do not block it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _tcp_port(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


async def _health_until(proc: subprocess.Popen[bytes], index: int, endpoint: str, curve: CurveClient | None,
                        deadline: float) -> None:
    """Poll a server's health until it answers; raise if its process exits or ``deadline`` passes.
    (A module function: an ``async def`` method would make Ray run ``ServeActor`` as an async actor.)"""
    from rollwire.clients.rollout import RolloutClient
    from rollwire.messages import ErrorCode, RollwireError

    async with RolloutClient(endpoint, curve=curve) as rc:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server {index} ({endpoint}) exited with status {proc.returncode} before it "
                                   "was ready (its log is its Ray actor's stderr)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"server {index} ({endpoint}) not ready in time")
            try:
                await rc.health(timeout=min(1.0, left))
                return
            except RollwireError as e:
                if e.code not in (ErrorCode.TIMEOUT, ErrorCode.SERVER_UNAVAILABLE):
                    raise


class ServeActor:
    """A Ray actor that runs one ``rollwire serve`` child and exits when the child dies uninvited.
    (Made a Ray actor class by ``RayLauncher``; importing this module does not import Ray.)"""

    def __init__(self, index: int, serve_argv: Sequence[str], host: str | None, curve: CurveClient | None,
                 env: dict[str, str]) -> None:
        import ray

        self.index = index
        self.curve = curve
        self.stopping = False
        self.ever_ready = False
        self.node_ip = ray.util.get_node_ip_address()
        bind_host = host or self.node_ip
        actor_id = ray.get_runtime_context().get_actor_id()
        self.state_file = STATE_DIR / f"{actor_id}.json"
        state = self._load_state()
        incarnation = state.get("incarnation", -1) + 1
        endpoint = state.get("endpoint")
        if not (endpoint and endpoint.startswith(f"tcp://{bind_host}:") and _port_free(bind_host, _tcp_port(endpoint))
                and _port_free(bind_host, _tcp_port(endpoint) + 1)):
            endpoint = free_tcp_endpoint(bind_host, span=2)  # P for rollouts, P + 1 for sessions
        self.endpoint: str = endpoint
        argv = [*serve_argv, "--rollout-endpoint", self.endpoint]
        self.session_endpoint: str | None = None  # as serve_argv says, if it names one
        if not _has_flag(serve_argv, "--session-endpoint"):
            self.session_endpoint = f"tcp://{bind_host}:{_tcp_port(endpoint) + 1}"
            argv += ["--session-endpoint", self.session_endpoint]
        self.incarnation = incarnation
        self.last_exit: int | None = state.get("last_exit") if incarnation else None
        self._save_state(incarnation=incarnation, endpoint=self.endpoint, last_exit=None)
        self.proc = subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv],
                                     env={**os.environ, **env})
        self.watcher = threading.Thread(target=self._watch, name="rollwire-serve-watcher", daemon=True)
        self.watcher.start()

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {}

    def _save_state(self, **state: Any) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def _watch(self) -> None:
        """The child exited: if nobody asked it to, end this worker process so that Ray restarts the actor.
        A first start that fails before it was ever ready is not restarted (a bad model path or argument
        would fail every time): ``wait_ready`` raises with its exit status and ``start`` tears down."""
        status = self.proc.wait()
        if self.stopping or (self.incarnation == 0 and not self.ever_ready):
            return
        self._save_state(incarnation=self.incarnation, endpoint=self.endpoint, last_exit=status)
        print(f"rollwire ray: server {self.index} ({self.endpoint}, pid {self.proc.pid}) exited with status "
              f"{status}; ending its actor so that Ray restarts it", file=sys.stderr, flush=True)
        os._exit(1)

    def info(self) -> ServerInfo:
        return ServerInfo(index=self.index, endpoint=self.endpoint, session_endpoint=self.session_endpoint,
                          node_ip=self.node_ip, pid=self.proc.pid, actor_pid=os.getpid(),
                          incarnation=self.incarnation, last_exit=self.last_exit, alive=self.proc.poll() is None)

    def wait_ready(self, timeout: float) -> ServerInfo:
        """Poll the server's health until it answers (or its process exits, or ``timeout`` passes)."""
        asyncio.run(_health_until(self.proc, self.index, self.endpoint, self.curve, time.monotonic() + timeout))
        self.ever_ready = True
        return self.info()

    def stop(self, timeout: float) -> int | None:
        """SIGTERM the server (it gives in-flight requests their terminal reply), SIGKILL it after
        ``timeout``; return its exit status."""
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(OSError):
            self.state_file.unlink()
        return self.proc.returncode


def _default_num_gpus(engine: str, device: str, tp: int | None) -> float:
    return float(tp or 1) if engine == "sglang" or device.startswith("cuda") else 0.0


class RayLauncher:
    """N rollout servers as Ray actors in one placement group; see the module doc.

    ``serve_args`` are any further ``rollwire serve`` arguments, the same for every server (not
    ``--rollout-endpoint``: the launcher picks each). ``actor_options`` are passed to
    ``ActorClass.options`` (e.g. ``runtime_env``). Call ``start()`` in a process where ``ray.init``
    has run (it runs ``ray.init()`` with no arguments otherwise, joining a cluster if one is set up).
    """

    def __init__(self, num_servers: int, *, engine: str = "hf", model: str = "tiny", device: str = "cpu",
                 tp: int | None = None, trainer_endpoint: str | None = None, mode: str = "disaggregated",
                 serve_args: Sequence[str] = (), num_cpus: float = 1.0, num_gpus: float | None = None,
                 host: str | None = None, insecure: bool = False, curve: CurveClient | None = None,
                 max_restarts: int = 3, strategy: str = "PACK", env: dict[str, str] | None = None,
                 log_level: str | None = None, actor_options: dict[str, Any] | None = None) -> None:
        if num_servers < 1:
            raise ValueError(f"num_servers must be at least 1, got {num_servers}")
        if _has_flag(serve_args, "--rollout-endpoint"):
            raise ValueError("the launcher picks each server's --rollout-endpoint; leave it out of serve_args")
        secure = _has_flag(serve_args, "--secret-key")
        if not secure and not insecure and (host is None or not is_loopback_or_local(f"tcp://{host}:0")):
            raise ValueError(f"servers would bind {host or 'the node IP'} without CURVE keys: pass --secret-key and "
                             "--client-keys in serve_args (and curve=, for the launcher's health checks), "
                             "insecure=True on a network you trust, or host='127.0.0.1' on a one-node cluster")
        if secure and curve is None:
            raise ValueError("with --secret-key in serve_args, pass curve= (client keys the server admits): "
                             "the launcher's health checks connect to each server")
        argv = ["--log-level", log_level] if log_level else []  # rollwire's own options come before `serve`
        argv += ["serve", "--engine", engine, "--model", model, "--device", device, "--mode", mode]
        if tp is not None:
            argv += ["--tp", str(tp)]
        if trainer_endpoint is not None:
            argv += ["--trainer-endpoint", trainer_endpoint]
        if insecure:
            argv.append("--insecure")
        self.num_servers = num_servers
        self.serve_argv = [*argv, *serve_args]
        self.host = host
        self.curve = curve
        self.bundle = {"CPU": float(num_cpus)}
        gpus = _default_num_gpus(engine, device, tp) if num_gpus is None else float(num_gpus)
        if gpus:
            self.bundle["GPU"] = gpus
        self.max_restarts = max_restarts
        self.strategy = strategy
        self.env = dict(env or {})
        self.actor_options = dict(actor_options or {})
        self.endpoints: list[str] = []  # as started; a restarted server keeps its endpoint (module doc)
        self._pg: Any = None
        self._actors: list[Any] = []

    def start(self, timeout: float = 300.0) -> list[str]:
        """Reserve the placement group, start every server, wait until each answers health; return the
        rollout endpoints in server order. On any failure, what was started is torn down."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self._actors:
            raise RuntimeError("already started")
        if not ray.is_initialized():
            ray.init()
        deadline = time.monotonic() + timeout
        try:
            self._pg = placement_group([dict(self.bundle) for _ in range(self.num_servers)], strategy=self.strategy)
            try:
                ray.get(self._pg.ready(), timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"placement group of {self.num_servers} x {self.bundle} not placed in {timeout}s "
                                   f"(cluster: {ray.cluster_resources()})") from None
            actor_cls = ray.remote(ServeActor)
            for i in range(self.num_servers):
                strategy = PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=i)
                options = {"num_cpus": self.bundle["CPU"], "num_gpus": self.bundle.get("GPU", 0),
                           "max_restarts": self.max_restarts, "max_task_retries": 0,
                           "scheduling_strategy": strategy, **self.actor_options}
                self._actors.append(actor_cls.options(**options).remote(  # type: ignore[attr-defined]
                    i, self.serve_argv, self.host, self.curve, self.env))
            infos = self._ready(deadline)
        except BaseException:
            self.shutdown()
            raise
        self.endpoints = [str(info.endpoint) for info in infos]
        return list(self.endpoints)

    def _ready(self, deadline: float) -> list[ServerInfo]:
        import ray

        left = max(0.1, deadline - time.monotonic())
        return ray.get([a.wait_ready.remote(left) for a in self._actors], timeout=left + 10)  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 300.0) -> list[ServerInfo]:
        """Wait until every server answers health (e.g. after a restart); a call to an actor that is
        restarting waits for it. Raises if a server is dead for good or ``timeout`` passes."""
        return self._ready(time.monotonic() + timeout)

    def servers(self, timeout: float = 10.0) -> list[ServerInfo]:
        """Each server as it is now. A server whose actor is restarting is waited for (up to
        ``timeout``); one dead for good (``max_restarts`` spent) comes back with ``alive=False``."""
        import ray

        out = []
        for i, actor in enumerate(self._actors):
            try:
                out.append(ray.get(actor.info.remote(), timeout=timeout))
            except ray.exceptions.RayActorError:
                out.append(ServerInfo(index=i, endpoint=None, session_endpoint=None, node_ip=None, pid=None,
                                      actor_pid=None, incarnation=-1, last_exit=None, alive=False))
        return out

    def current_endpoints(self, timeout: float = 10.0) -> list[str]:
        """The live servers' endpoints now (differ from ``endpoints`` only after a move to another node)."""
        return [str(s.endpoint) for s in self.servers(timeout) if s.alive]

    def shutdown(self, timeout: float = 30.0) -> list[int | None]:
        """Stop every server (SIGTERM, then SIGKILL after ``timeout``), kill the actors without restart,
        and remove the placement group; return each server's exit status (0: stopped cleanly; None:
        its actor was dead or did not answer). Safe to call twice, and after a failed ``start``."""
        import ray

        stops = [a.stop.remote(timeout) for a in self._actors]
        statuses: list[int | None] = [None] * len(stops)
        done, _ = ray.wait(stops, num_returns=len(stops), timeout=timeout + 15)
        for i, ref in enumerate(stops):
            if ref in done:
                with contextlib.suppress(ray.exceptions.RayError):
                    statuses[i] = ray.get(ref)
        for actor in self._actors:
            ray.kill(actor, no_restart=True)  # the worker's death takes a child that did not stop (pdeathsig)
        self._actors = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
        return statuses

    def __enter__(self) -> RayLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
