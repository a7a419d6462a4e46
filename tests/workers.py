"""Rollout-worker processes for tests: raw DEALER + the codec, so every reply is counted."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import zmq
import zmq.asyncio

from rollwire.messages import Codec, GenerateDone, GenerateRequest, RolloutReply, SamplingParams


async def _count_replies(endpoint: str, n_requests: int, max_new_tokens: int, grace_s: float) -> dict[str, Any]:
    codec: Codec[Any] = Codec(RolloutReply)
    sock = zmq.asyncio.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    for rid in range(1, n_requests + 1):
        sp = SamplingParams(max_new_tokens=max_new_tokens - rid % 5, temperature=1.0, seed=rid, ignore_eos=True)
        await sock.send_multipart(codec.encode(rid, GenerateRequest(input_ids=[1 + rid % 7, 2, 3], sampling_params=sp)))
    terminal: collections.Counter[int] = collections.Counter()
    kinds: dict[int, str] = {}
    deadline = None
    while True:
        timeout_ms = 120_000 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        if not await sock.poll(timeout_ms):
            break
        rid, msg, _ = codec.decode(await sock.recv_multipart())
        terminal[rid] += 1
        kinds[rid] = msg.finish_reason if isinstance(msg, GenerateDone) else type(msg).__name__
        if deadline is None and len(terminal) == n_requests:
            deadline = time.monotonic() + grace_s  # keep listening: a duplicate would show up here
    sock.close()
    return {"terminal": dict(terminal), "kinds": kinds}


def count_replies(endpoint: str, n_requests: int, max_new_tokens: int, grace_s: float, out: Any) -> None:
    out.put(asyncio.run(_count_replies(endpoint, n_requests, max_new_tokens, grace_s)))


async def _keep_in_flight(endpoint: str, concurrency: int, max_new_tokens: int, seed: int, stop: Any,
                          grace_s: float) -> dict[str, Any]:
    """Keep ``concurrency`` greedy requests in flight until ``stop``; count every reply per rid."""
    import random

    rng = random.Random(seed)
    codec: Codec[Any] = Codec(RolloutReply)
    sock = zmq.asyncio.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    prompts: dict[int, list[int]] = {}
    done: dict[int, Any] = {}
    terminal: collections.Counter[int] = collections.Counter()
    next_rid = 1

    async def send_one() -> None:
        nonlocal next_rid
        prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(2, 6))]
        prompts[next_rid] = prompt
        await sock.send_multipart(codec.encode(next_rid, GenerateRequest(input_ids=prompt, sampling_params=sp)))
        next_rid += 1

    for _ in range(concurrency):
        await send_one()
    deadline = None
    while True:
        if deadline is None and stop.is_set():
            deadline = time.monotonic() + 60
        if deadline is not None and len(terminal) == len(prompts):
            deadline = min(deadline, time.monotonic() + grace_s)
        timeout_ms = 100 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        if not await sock.poll(timeout_ms):
            if deadline is not None and time.monotonic() >= deadline:
                break
            continue
        rid, msg, _ = codec.decode(await sock.recv_multipart())
        terminal[rid] += 1
        done[rid] = msg
        if not stop.is_set():
            await send_one()
    sock.close()
    return {"prompts": prompts, "done": done, "terminal": dict(terminal)}


def keep_in_flight(endpoint: str, concurrency: int, max_new_tokens: int, seed: int, stop: Any, out: Any) -> None:
    out.put(asyncio.run(_keep_in_flight(endpoint, concurrency, max_new_tokens, seed, stop, 1.0)))
