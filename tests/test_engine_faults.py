"""The engine against bad requests and its own failures, in real `rollwire serve` processes (hf engine).

* Sampling parameters that passed validation but overflowed inside the engine (seed 2**64 - 1 with
  n = 2 crashed the GenerationActor: torch.Generator cannot take seed + 1; a top_k of 2**63 failed
  every request batched with it) are
  refused at validation now, with bad_sampling_params, and their batch mates finish.
* A step that fails because of one request fails only that request (a fault injected for one
  request id through the engine's documented hook, ``ROLLWIRE_HF_FAULTS``: its parameters are
  fine); the requests batched with it continue to their full length, with the tokens they would
  have had alone.
* A dead engine worker (the hook shuts the worker down under load) gives every in-flight request
  engine_dead at once, a request waiting for a weight version included, and the server exits 1
  saying why.

Each test says what happened to every request it sent: exactly one terminal reply each.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest
import zmq
import zmq.asyncio

from rollwire.messages import (
    AbortRequest,
    Codec,
    ErrorCode,
    ErrorReply,
    GenerateDone,
    GenerateRequest,
    RolloutReply,
    RolloutRequest,
    SamplingParams,
    StatusReply,
    StatusRequest,
)

from .conftest import free_tcp_endpoint


def serve(endpoint: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`rollwire serve` in a child process (``env`` added to this one's: the fault hook)."""
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                             "--rollout-endpoint", endpoint, "--max-new-tokens-limit", "4000", *extra],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class RawClient:
    """A DEALER that names its own rids and records every reply per rid (so duplicates show)."""

    def __init__(self, endpoint: str) -> None:
        self.codec: Codec[Any] = Codec(RolloutReply)
        self.out: Codec[Any] = Codec(RolloutRequest)
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.replies: dict[int, list[Any]] = collections.defaultdict(list)
        self.terminal: collections.Counter[int] = collections.Counter()

    async def send(self, rid: int, msg: Any) -> None:
        await self.sock.send_multipart(self.out.encode(rid, msg))

    async def pump(self, timeout_s: float = 0.0) -> bool:
        """Read one reply if one comes within ``timeout_s``."""
        if not await self.sock.poll(int(timeout_s * 1000)):
            return False
        rid, msg, _ = self.codec.decode(await self.sock.recv_multipart())
        self.replies[rid].append(msg)
        if isinstance(msg, (GenerateDone, ErrorReply)):
            self.terminal[rid] += 1
        return True

    async def until(self, done: Any, what: str, within_s: float = 120.0) -> None:
        """Read replies until ``done()`` holds (a hang guard, not a timing assertion)."""
        deadline = time.monotonic() + within_s
        while not done():
            assert time.monotonic() < deadline, f"not reached within {within_s}s: {what}"
            await self.pump(0.05)

    async def status(self, rid: int) -> StatusReply:
        await self.send(rid, StatusRequest())
        await self.until(lambda: rid in self.replies, "status reply", 30)
        msg = self.replies.pop(rid)[0]
        assert isinstance(msg, StatusReply), msg
        return msg

    async def wait_ready(self, within_s: float = 120.0) -> None:
        deadline = time.monotonic() + within_s
        rid = 1 << 40
        while True:
            await self.send(rid, StatusRequest())
            if await self.pump(0.5) and rid in self.replies:
                self.replies.pop(rid)
                return
            assert time.monotonic() < deadline, "server did not start"

    def last(self, rid: int) -> Any:
        return self.replies[rid][-1]

    def close(self) -> None:
        self.sock.close()


def only_terminal(c: RawClient, rids: list[int]) -> None:
    assert {r: c.terminal[r] for r in rids} == dict.fromkeys(rids, 1), "each request: exactly one terminal reply"


GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(("params", "why"), [
    ({"temperature": 1.0, "seed": 2**64 - 1, "n": 2}, "seed"),  # seed + 1 crashed the GenerationActor (torch)
    ({"temperature": 1.0, "seed": -1}, "seed"),
    ({"temperature": 1.0, "top_k": 2**63}, "top_k"),  # failed its whole batch with `internal`
    ({"temperature": 1.0, "seed": 2**63 - 1, "n": 2}, "seed"),  # seed + 1 for the second sample overflows
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": 1e300}, "temperature"),
    ({"min_p": math.nan}, "min_p"),
    ({"stop_token_ids": [2**64 - 1]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(2000))}, "stop_token_ids"),
    ({"n": 10_000}, "n="),
], ids=["seed-2**64-n-2", "seed-negative", "top-k-2**63", "seed-plus-n", "temperature-inf", "temperature-huge",
        "min-p-nan", "stop-id-huge", "stop-ids-many", "n-huge"])
async def test_sampling_params_that_overflowed_in_the_engine_are_refused_and_batch_mates_finish(
        params: dict[str, Any], why: str) -> None:
    ep = free_tcp_endpoint()
    proc = serve(ep)
    c = RawClient(ep)
    try:
        await c.wait_ready()
        mates = list(range(1, 5))
        for rid in mates:
            await c.send(rid, GenerateRequest(input_ids=[rid, 2, 3], sampling_params=GREEDY))
        bad = SamplingParams(max_new_tokens=40, ignore_eos=True, **params)
        await c.send(99, GenerateRequest(input_ids=[7, 8, 9], sampling_params=bad))
        await c.until(lambda: all(c.terminal[r] for r in [*mates, 99]), "every reply")
        await c.pump(0.2)  # a duplicate reply would show up here (no assertion on time)
        only_terminal(c, [*mates, 99])
        err = c.last(99)
        assert isinstance(err, ErrorReply) and err.code == ErrorCode.BAD_SAMPLING_PARAMS, err
        assert why in err.message
        for rid in mates:
            done = c.last(rid)
            assert isinstance(done, GenerateDone) and done.finish_reason == "length", done
            assert len(done.output_ids) == 40
        st = await c.status(500)
        assert st.counters.get("restarts", 0) == 0 and st.in_flight == 0
    finally:
        c.close()
        stop(proc)


async def test_a_temperature_below_1e_minus_6_is_greedy() -> None:
    """A positive temperature too small to divide by (1e-320 made every logit inf, then NaN, and
    the sampler returned the last id) is greedy, as in SGLang."""
    ep = free_tcp_endpoint()
    proc = serve(ep)
    c = RawClient(ep)
    try:
        await c.wait_ready()
        for rid, t in ((1, 0.0), (2, 1e-320), (3, 1e-7)):
            sp = SamplingParams(max_new_tokens=12, temperature=t, ignore_eos=True)
            await c.send(rid, GenerateRequest(input_ids=[5, 6, 7], sampling_params=sp))
        await c.until(lambda: all(c.terminal[r] for r in (1, 2, 3)), "three replies")
        only_terminal(c, [1, 2, 3])
        assert c.last(1).output_ids == c.last(2).output_ids == c.last(3).output_ids
    finally:
        c.close()
        stop(proc)


async def test_a_step_failing_for_one_request_fails_only_that_request_and_its_batch_mates_go_on() -> None:
    """Fault injection: the step computing rid 4 raises once rid 4 has 10 tokens (its parameters
    are fine). rid 4 gets `internal`; the five requests batched with it finish all 40 tokens,
    equal to what each gives alone (greedy)."""
    ep = free_tcp_endpoint()
    proc = serve(ep, env={"ROLLWIRE_HF_FAULTS": "row::4:0@10"})
    c = RawClient(ep)
    try:
        await c.wait_ready()
        rids = list(range(1, 7))
        for rid in rids:
            await c.send(rid, GenerateRequest(input_ids=[10 * rid, 2, 3], sampling_params=GREEDY))
        await c.until(lambda: all(c.terminal[r] for r in rids), "every reply")
        await c.pump(0.2)
        only_terminal(c, rids)
        err = c.last(4)
        assert isinstance(err, ErrorReply) and err.code == ErrorCode.INTERNAL, err
        assert "injected step failure" in err.message and "batch mates go on" in err.message
        for rid in (1, 2, 3, 5, 6):
            done = c.last(rid)
            assert isinstance(done, GenerateDone) and done.finish_reason == "length", done
            assert len(done.output_ids) == 40
        # alone, one after the other: the same tokens (the retried mates were re-prefilled exactly)
        for rid in (1, 2, 3, 5, 6):
            await c.send(100 + rid, GenerateRequest(input_ids=[10 * rid, 2, 3], sampling_params=GREEDY))
            await c.until(lambda r=rid: c.terminal[100 + r] == 1, "alone")
            assert c.last(100 + rid).output_ids == c.last(rid).output_ids
        st = await c.status(500)
        assert st.counters["engine.requests_failed_alone"] == 1
        assert st.counters.get("restarts", 0) == 0 and st.counters["engine_dead"] == 0
    finally:
        c.close()
        stop(proc)


async def test_a_dead_engine_worker_fails_every_request_with_engine_dead_and_the_server_exits_1() -> None:
    """Fault injection: once the trigger file exists the engine's worker dies (its pool is shut
    down: no step can run). The 8 running requests and one waiting for an unreachable weight
    version each get engine_dead; `rollwire serve` exits 1 and names the engine's death."""
    ep = free_tcp_endpoint()
    trigger = os.path.join(tempfile.mkdtemp(prefix="rw-fault-"), "kill-worker")
    proc = serve(ep, env={"ROLLWIRE_HF_FAULTS": f"worker:{trigger}"})
    c = RawClient(ep)
    try:
        await c.wait_ready()
        long = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)
        running = list(range(1, 9))
        for rid in running:
            await c.send(rid, GenerateRequest(input_ids=[rid, 2, 3], sampling_params=long))
        await c.send(50, GenerateRequest(input_ids=[4, 5], sampling_params=long, min_version=7))
        deadline = time.monotonic() + 60
        while True:  # bounded poll on status: all 8 running in the engine, the 9th waiting
            st = await c.status(1000)
            if st.in_flight == 9 and st.counters.get("engine.running") == 8:
                break
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.05)
        open(trigger, "w").close()
        await c.until(lambda: all(c.terminal[r] for r in [*running, 50]), "every reply")
        only_terminal(c, [*running, 50])
        for rid in [*running, 50]:
            err = c.last(rid)
            assert isinstance(err, ErrorReply) and err.code == ErrorCode.ENGINE_DEAD, (rid, err)
        rc = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(timeout=60))
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert rc == 1, stderr
        assert "engine dead" in stderr, stderr
    finally:
        c.close()
        stop(proc)


async def test_an_abort_of_a_request_requeued_after_a_batch_mate_failed_ends_it_with_abort() -> None:
    """rid 2 fails at its 5th token; rid 1 (its batch mate, requeued) is aborted by its client
    afterwards and ends once, with finish_reason abort."""
    ep = free_tcp_endpoint()
    proc = serve(ep, env={"ROLLWIRE_HF_FAULTS": "row::2:0@5"})
    c = RawClient(ep)
    try:
        await c.wait_ready()
        long = SamplingParams(max_new_tokens=3000, temperature=0.0, ignore_eos=True)
        await c.send(1, GenerateRequest(input_ids=[1, 2, 3], sampling_params=long))
        await c.send(2, GenerateRequest(input_ids=[4, 5, 6], sampling_params=long))
        await c.until(lambda: c.terminal[2] == 1, "the culprit's error")
        assert c.last(2).code == ErrorCode.INTERNAL
        await c.send(3, AbortRequest(target_rid=1))
        await c.until(lambda: c.terminal[1] == 1, "the abort")
        await c.pump(0.2)
        only_terminal(c, [1, 2])
        done = c.last(1)
        assert isinstance(done, GenerateDone) and done.finish_reason == "abort" and len(done.output_ids) >= 5
    finally:
        c.close()
        stop(proc)
