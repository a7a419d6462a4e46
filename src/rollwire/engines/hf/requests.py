"""Per-request state of the hf engine and how its tokens become ``EngineDelta``s.

``deliver`` hands a step's tokens to the request's queue. A non-streamed request (``stream=False``)
gets them held back and delivered with the finish (or when the weight version changes, so one
delta never mixes versions): one wake-up of the consumer per request instead of per token. A
streamed one whose consumer forwards chunks (``chunk_tokens`` > 1, as the fleet client asks for
its progress reports) gets them held back until a chunk is full: one wake-up per chunk.
``next_delta`` merges deltas that queued up behind a slow consumer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rollwire.engines.base import EngineDelta, EngineRequest
from rollwire.engines.hf import prefix as hf_prefix
from rollwire.engines.hf.sampling import RowSampler
from rollwire.messages.generate import FinishReason


@dataclass(eq=False)
class Seq:
    req: EngineRequest
    sampler: RowSampler
    stop_ids: frozenset[int]
    limit: int  # finish with "length" once prompt + output reaches this
    queue: asyncio.Queue[EngineDelta | BaseException] = field(default_factory=asyncio.Queue)
    output: list[int] = field(default_factory=list)
    done: bool = False
    abort_requested: bool = False
    # tokens held back until the finish, a version change, or (streamed) a full chunk
    held_toks: list[int] = field(default_factory=list)
    held_lps: list[float] | None = None
    held_version: int = -1
    # sessions: the cached prefix used at admission, how many prompt tokens it covered, and the
    # version that computed this request's KV (hf_prefix.STALE once a load happened under it)
    prefix: tuple[hf_prefix.Entry, int] | None = None
    cached: int = 0
    kv_version: int = 0


def deliver(s: Seq, toks: list[int], lps: list[float | None] | None, version: int, reason: FinishReason | None) -> None:
    """Queue (or hold back) a step's tokens of ``s``; with ``reason`` the request is done."""
    logprobs = [x for x in lps if x is not None] if lps is not None else None
    if s.held_toks and s.held_version != version:  # spans must not mix versions
        s.queue.put_nowait(EngineDelta(rid=s.req.rid, token_ids=s.held_toks, logprobs=s.held_lps,
                                       weight_version=s.held_version, cached_tokens=s.cached))
        s.held_toks, s.held_lps = [], None
    if reason is None and (not s.req.stream or len(s.held_toks) + len(toks) < s.req.chunk_tokens):
        if not s.held_toks:
            s.held_version, s.held_lps = version, [] if logprobs is not None else None
        s.held_toks += toks
        if s.held_lps is not None and logprobs is not None:
            s.held_lps += logprobs
        return
    if s.held_toks:
        toks = s.held_toks + toks
        logprobs = s.held_lps + logprobs if s.held_lps is not None and logprobs is not None else logprobs
        s.held_toks, s.held_lps = [], None
    s.queue.put_nowait(EngineDelta(rid=s.req.rid, token_ids=toks, logprobs=logprobs,
                                   weight_version=version, finish_reason=reason, cached_tokens=s.cached))
    if reason is not None:
        s.done = True


def next_delta(first: EngineDelta, queue: asyncio.Queue[EngineDelta | BaseException]) -> EngineDelta:
    """Merge deltas already queued behind ``first`` (same version) so a slow reader catches up."""
    while not queue.empty() and first.finish_reason is None:
        nxt = queue._queue[0]  # type: ignore[attr-defined]
        if isinstance(nxt, BaseException) or nxt.weight_version != first.weight_version:
            break
        queue.get_nowait()
        lps = first.logprobs + nxt.logprobs if first.logprobs is not None and nxt.logprobs is not None else None
        first = EngineDelta(rid=first.rid, token_ids=first.token_ids + nxt.token_ids, logprobs=lps,
                            weight_version=first.weight_version, finish_reason=nxt.finish_reason,
                            cached_tokens=first.cached_tokens)
    return first


def eos_of(model: Any) -> list[int]:
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
    return []


class FairQueue:
    """The hf engine's waiting requests: round-robin across clients (``EngineRequest.client``), so
    a client with a thousand requests queued takes turns with a newcomer for every batch slot that
    frees; within a client, first come first served. Requests put back (``appendleft``: retracted,
    or requeued after a batch mate's failed step) go before all others, in the order given."""

    def __init__(self) -> None:
        self._front: deque[Seq] = deque()
        self._clients: dict[str, deque[Seq]] = {}  # insertion order is the rotation: first is next

    def __len__(self) -> int:
        return len(self._front) + sum(len(q) for q in self._clients.values())

    def __bool__(self) -> bool:
        return bool(self._front or self._clients)

    def __iter__(self) -> Iterator[Seq]:
        yield from self._front
        for q in self._clients.values():
            yield from q

    def __contains__(self, s: object) -> bool:
        return isinstance(s, Seq) and (s in self._front or s in self._clients.get(s.req.client, ()))

    def append(self, s: Seq) -> None:
        self._clients.setdefault(s.req.client, deque()).append(s)

    def appendleft(self, s: Seq) -> None:
        self._front.appendleft(s)

    def clients(self) -> list[str]:
        """Clients with requests queued (not counting the put-back ones), next in turn first."""
        return list(self._clients)

    def put_back(self, s: Seq) -> None:
        """``s`` gave up its batch slot: first of its client's queue, its client's turn unchanged."""
        self._clients.setdefault(s.req.client, deque()).appendleft(s)

    def next_turn(self, client: str) -> None:
        """``client`` (queued) takes the next turn."""
        q = self._clients.pop(client)
        self._clients = {client: q, **self._clients}

    def peek(self) -> Seq:
        if self._front:
            return self._front[0]
        return self._clients[next(iter(self._clients))][0]

    def popleft(self) -> Seq:
        if self._front:
            return self._front.popleft()
        client = next(iter(self._clients))
        q = self._clients.pop(client)
        s = q.popleft()
        if q:
            self._clients[client] = q  # to the back of the rotation
        return s

    def remove(self, s: Seq) -> None:
        if s in self._front:
            self._front.remove(s)
            return
        q = self._clients[s.req.client]
        q.remove(s)
        if not q:
            del self._clients[s.req.client]

    def clear(self) -> None:
        self._front.clear()
        self._clients.clear()
