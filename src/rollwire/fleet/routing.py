"""Which server takes a request: the fleet client's view of each server and its routing policies.

``least_loaded`` (default): among the live servers (at ``min_version`` when any is), the one with
fewer samples in flight *counted by this client* of two picked at random (power of two choices: a
burst spreads instead of piling onto the server that looked idlest a moment ago).
``prefix``: the server a hash of the prompt's first ``prefix_tokens`` tokens names, so requests
sharing a prefix meet its cached KV, but only while that server's load stays within the bounded-load
gate (``load_factor`` x the fleet's mean + 1); otherwise ``least_loaded``.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from rollwire.clients.rollout import RolloutClient
from rollwire.messages import ErrorCode

Policy = Literal["least_loaded", "prefix"]
# a call failed with one of these: its server is gone (the fleet evicts it; the work moves)
SERVER_GONE = frozenset({ErrorCode.SERVER_UNAVAILABLE, ErrorCode.SHUTTING_DOWN, ErrorCode.ENGINE_DEAD})


@dataclass
class ServerView:
    """One server as this client knows it."""

    endpoint: str
    client: RolloutClient
    alive: bool = False  # admitted: answered health and serves the fleet's current version
    version: int = 0  # its live weight version, from health replies and outputs
    in_flight: int = 0  # samples this client has running there
    routed: int = 0  # requests sent there
    tokens: int = 0  # tokens received from it
    failures: int = 0  # requests that died with it and went elsewhere
    evictions: int = 0
    last_ok: float = field(default_factory=time.monotonic)
    behind_since: float | None = None  # since when it serves a version below the fleet's current one
    bad_replies: int = 0  # its client's count of replies no request could have, at the last health check
    why_out: str = "not checked yet"


def prefix_key(input_ids: Sequence[int], prefix_tokens: int) -> int:
    head = ",".join(map(str, input_ids[:prefix_tokens])).encode()
    return int.from_bytes(hashlib.blake2b(head, digest_size=8).digest(), "little")


class Router:
    def __init__(self, servers: Sequence[ServerView], policy: Policy = "least_loaded", *, prefix_tokens: int = 32,
                 load_factor: float = 1.25, rng: random.Random | None = None) -> None:
        if policy not in ("least_loaded", "prefix"):
            raise ValueError(f"unknown routing policy {policy!r}")
        self.servers = list(servers)
        self.policy = policy
        self.prefix_tokens = prefix_tokens
        self.load_factor = load_factor
        self._rng = rng or random.Random()

    def live(self, exclude: Sequence[ServerView] = ()) -> list[ServerView]:
        return [s for s in self.servers if s.alive and s not in exclude]

    def choose(self, input_ids: Sequence[int], samples: int = 1, min_version: int = 0,
               exclude: Sequence[ServerView] = ()) -> ServerView | None:
        """The server for a request (None: no live server). ``exclude``: ones it already died on."""
        live = self.live(exclude)
        if not live:
            return None
        current = [s for s in live if s.version >= min_version] if min_version else live
        pool = current or live  # none at min_version yet: it waits on one of them, as on one server
        if self.policy == "prefix":
            owner = self.servers[prefix_key(input_ids, self.prefix_tokens) % len(self.servers)]
            mean = sum(s.in_flight for s in pool) / len(pool)
            if owner in pool and owner.in_flight + samples <= self.load_factor * mean + samples + 1:
                return owner
        if len(pool) == 1:
            return pool[0]
        a, b = self._rng.sample(pool, 2)
        return a if a.in_flight <= b.in_flight else b
