"""CurveZMQ authentication, the "Ironhouse" pattern: every peer has a key pair, every server an
allow-list of client public keys per role, and every client knows its server's public key.

Roles are ZAP domains. One authenticator per ZeroMQ context (ZAP is per context) runs on its own
thread, so a busy event loop never delays a handshake, and answers for every domain:

* ``rollout``: a rollout server's public sockets (rollout, sessions); allowed keys are the
  rollout clients' plus the trainers' (a trainer may ask for health and status).
* ``receivers``: a trainer's ROUTER and PUB; allowed keys are the rollout servers' (their
  WeightReceiverActors). A receiver, a CURVE client, checks the trainer's public key in the
  handshake, so a stranger who binds the trainer endpoint cannot pass as the trainer.

A peer that is not on the list never completes the handshake: it gets nothing, its frames never
reach the application. The ZAP user id of an accepted peer is its z85 public key; receivers of a
CURVE socket read it from each message (``client_of``) to tell who sent it.

Key files are ZeroMQ's certificate format (``zmq.auth.create_certificates``): ``NAME.key`` holds
the public key, ``NAME.key_secret`` both. The secret file is written mode 0600.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ROLLOUT_DOMAIN = "rollout"
RECEIVERS_DOMAIN = "receivers"


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 bytes
    secret: bytes | None = None  # z85; None for a peer's public key only

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """A ``.key_secret`` file (both keys) or a ``.key`` file (public only)."""
        try:
            public, secret = zmq.auth.load_certificate(os.fspath(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read a CURVE key from {path}: {e}") from None
        if public is None:
            raise ValueError(f"{path} holds no public key")
        return cls(public, secret)

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


def create_keys(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``name.key`` and ``name.key_secret`` (0600) in ``directory`` (made 0700 if new). An
    existing pair is never overwritten (servers and trainers may already trust it); ``name`` is a
    plain file name (letters, digits, ``._-``; no path)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-' (no path, not starting with '.')")
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    for existing in (d / f"{name}.key", d / f"{name}.key_secret"):
        if existing.exists():
            raise FileExistsError(f"{existing} exists: remove it first to make a new pair (whoever trusts the "
                                  "old public key must then be given the new one)")
    public_file, secret_file = zmq.auth.create_certificates(os.fspath(d), name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def load_public_keys(paths: Iterable[str | os.PathLike[str]]) -> frozenset[bytes]:
    """Public keys from ``.key`` files and from directories of them (their ``*.key`` files)."""
    keys: set[bytes] = set()
    for raw in paths:
        p = Path(raw)
        files = sorted(p.glob("*.key")) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise ValueError(f"{p} holds no *.key files")
        keys.update(KeyPair.load(f).public for f in files)
    return frozenset(keys)


class _AllowLists:
    """The authenticator's callback: an allow-list per domain, changeable while serving."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._allowed: dict[str, frozenset[bytes]] = {}

    def set(self, domain: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._allowed[domain] = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            return key in self._allowed.get(domain, frozenset())


_authenticators: dict[int, tuple[ThreadAuthenticator, _AllowLists]] = {}  # by libzmq context address
_auth_lock = threading.Lock()


def allow(ctx: zmq.Context, domain: str, keys: Iterable[bytes]) -> None:
    """Start ``ctx``'s authenticator if needed and set ``domain``'s allow-list. Call it before a
    CURVE server socket binds (STYLE.md: a handshake before it would not be checked)."""
    with _auth_lock:
        entry = _authenticators.get(ctx.underlying)
        if entry is None:
            lists = _AllowLists()
            auth = ThreadAuthenticator(zmq.Context.shadow(ctx.underlying))
            auth.start()
            auth.configure_curve_callback("*", credentials_provider=lists)  # type: ignore[no-untyped-call]
            entry = _authenticators[ctx.underlying] = (auth, lists)
        entry[1].set(domain, keys)
        entry[0].configure_curve_callback(domain, credentials_provider=entry[1])  # type: ignore[no-untyped-call]


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the authenticator of ``ctx`` (any Python object over the same libzmq context): a running
    one keeps ``ctx.destroy()`` waiting forever on its ZAP socket, so a CURVE server never exited."""
    with _auth_lock:
        entry = _authenticators.pop(ctx.underlying, None)
    if entry is not None:
        entry[0].stop()


@dataclass(frozen=True)
class CurveServer:
    """How a socket that binds authenticates its peers."""

    keys: KeyPair  # this side's pair (secret required)
    domain: str  # ZAP domain: which allow-list applies
    allowed: frozenset[bytes]  # client public keys (z85) let in

    def apply(self, sock: zmq.Socket) -> None:
        if self.keys.secret is None:
            raise ValueError("a CURVE server needs its secret key")
        allow(sock.context, self.domain, self.allowed)
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain.encode())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)


@dataclass(frozen=True)
class CurveClient:
    """How a socket that connects proves itself and checks the server it reaches."""

    keys: KeyPair  # this side's pair (secret required)
    server_key: bytes  # the server's public key (z85): a different server fails the handshake

    def apply(self, sock: zmq.Socket) -> None:
        if self.keys.secret is None:
            raise ValueError("a CURVE client needs its secret key")
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)


def client_of(frame: zmq.Frame) -> str | None:
    """The authenticated z85 public key of a received frame's sender (None without CURVE)."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user if isinstance(user, str) and user else None


def is_loopback_or_local(endpoint: str) -> bool:
    """True for inproc/ipc endpoints and tcp on a loopback host: no one off this host reaches them."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def require_secure_or_local(endpoints: Sequence[str], secure: bool, insecure_ok: bool) -> None:
    """Refuse to bind a non-loopback tcp address without keys unless ``--insecure`` says so."""
    exposed = [ep for ep in endpoints if not is_loopback_or_local(ep)]
    if exposed and not secure and not insecure_ok:
        raise SystemExit(f"refusing to bind {', '.join(exposed)} without CURVE keys: anyone who reaches it "
                         "could generate, or change weights. Pass --secret-key and --client-keys "
                         "(make them with `rollwire keys`), or --insecure to bind it anyway.")
