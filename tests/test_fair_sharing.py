"""Fair sharing in the GenerationActor and the hf engine, against real `rollwire serve` processes.

* A flood refused with client_limit / overloaded leaves nothing behind (the flood of the issue left
  15,779 of 20,000 counted in flight forever), each refusal says when to retry, and the refused
  rids succeed when sent again (not duplicate_request).
* Per-client caps: samples in flight and requests waiting for a weight version; another client is
  served meanwhile.
* A client gone silent has its requests aborted, those waiting for a version included.
* One client holding every batch slot does not starve a newcomer: admission is round-robin
  across clients.

Each test says what happened to every request it sent: exactly one terminal reply each.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

from rollwire import RolloutClient
from rollwire.messages import (
    AbortRequest,
    ErrorCode,
    ErrorReply,
    GenerateDone,
    GenerateRequest,
    SamplingParams,
)

from .conftest import free_tcp_endpoint
from .test_engine_faults import RawClient, only_terminal, serve, stop

SHORT = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)


async def _resend_until_served(c: RawClient, rids: list[int], wave: int) -> None:
    """Send ``rids`` again (same rids), ``wave`` at a time, each wave answered before the next."""
    for i in range(0, len(rids), wave):
        part = rids[i:i + wave]
        for rid in part:
            c.terminal[rid] = 0
            await c.send(rid, GenerateRequest(input_ids=[1 + rid % 50, 2], sampling_params=SHORT))
        await c.until(lambda p=part: all(c.terminal[r] for r in p), "a wave of retries")
        for rid in part:
            assert isinstance(c.last(rid), GenerateDone), c.last(rid)


async def test_a_flood_of_6000_refused_beyond_the_client_cap_leaves_nothing_in_flight_and_refused_rids_retry() -> None:
    """Defaults (2048 samples in flight per client, half the server's 4096): 6000 requests at once from one client."""
    ep = free_tcp_endpoint()
    proc = serve(ep)
    c = RawClient(ep)
    try:
        await c.wait_ready()
        rids = list(range(1, 6001))
        for rid in rids:
            await c.send(rid, GenerateRequest(input_ids=[1 + rid % 50, 2], sampling_params=SHORT))
        await c.until(lambda: all(c.terminal[r] for r in rids), "a reply to every request", 300)
        await c.pump(0.2)
        only_terminal(c, rids)
        refused = [r for r in rids if isinstance(c.last(r), ErrorReply)]
        served = [r for r in rids if isinstance(c.last(r), GenerateDone)]
        assert len(refused) + len(served) == 6000 and refused and served
        for r in refused:
            err = c.last(r)
            assert err.code == ErrorCode.CLIENT_LIMIT and err.retry_after_s > 0, err
        st = await c.status(10**6)
        assert st.in_flight == 0 and st.counters["samples_in_flight"] == 0 and st.counters["clients_in_flight"] == 0
        await _resend_until_served(c, refused, 500)  # same rids: served, never duplicate_request
        st = await c.status(10**6 + 1)
        assert st.in_flight == 0 and st.counters.get("restarts", 0) == 0
    finally:
        c.close()
        stop(proc)


async def test_overloaded_says_when_to_retry_and_the_same_rids_are_served_after() -> None:
    ep = free_tcp_endpoint()
    proc = serve(ep, "--max-in-flight", "32", "--max-client-in-flight", "1000000", "--retry-after", "0.25")
    c = RawClient(ep)
    try:
        await c.wait_ready()
        rids = list(range(1, 201))
        for rid in rids:
            await c.send(rid, GenerateRequest(input_ids=[1 + rid % 50, 2], sampling_params=SHORT))
        await c.until(lambda: all(c.terminal[r] for r in rids), "a reply to every request")
        only_terminal(c, rids)
        refused = [r for r in rids if isinstance(c.last(r), ErrorReply)]
        assert refused
        for r in refused:
            assert c.last(r).code == ErrorCode.OVERLOADED and c.last(r).retry_after_s == 0.25, c.last(r)
        assert (await c.status(10**6)).in_flight == 0
        await _resend_until_served(c, refused, 32)
    finally:
        c.close()
        stop(proc)


async def test_per_client_caps_on_samples_in_flight_and_version_waiters_leave_others_served() -> None:
    ep = free_tcp_endpoint()
    proc = serve(ep, "--max-client-in-flight", "6", "--max-client-waiting", "2")
    a, b, w = RawClient(ep), RawClient(ep), RawClient(ep)
    try:
        await a.wait_ready()
        for rid in range(1, 9):  # 8 long requests: 6 fit the cap
            await a.send(rid, GenerateRequest(input_ids=[rid, 2, 3], sampling_params=LONG))
        await a.until(lambda: a.terminal[7] and a.terminal[8], "two refusals")
        for rid in (7, 8):
            err = a.last(rid)
            assert err.code == ErrorCode.CLIENT_LIMIT and "in flight" in err.message and err.retry_after_s > 0, err
        for rid in (1, 2, 3):  # 3 waiting for a version that never comes: 2 fit the cap
            await w.send(rid, GenerateRequest(input_ids=[4, 5], sampling_params=LONG, min_version=99))
        await w.until(lambda: w.terminal[3] == 1, "one refusal")
        assert w.last(3).code == ErrorCode.CLIENT_LIMIT and "waiting" in w.last(3).message, w.last(3)
        # another client is served meanwhile
        await b.send(1, GenerateRequest(input_ids=[9, 9],
                                        sampling_params=SamplingParams(max_new_tokens=5, ignore_eos=True)))
        await b.until(lambda: b.terminal[1] == 1, "b served")
        assert isinstance(b.last(1), GenerateDone) and b.last(1).finish_reason == "length"
        st = await b.status(100)
        assert st.in_flight == 8 and st.counters["clients_waiting"] == 1
        # the held ones end on abort
        for rid in range(1, 7):
            await a.send(100 + rid, AbortRequest(target_rid=rid))
        for rid in (1, 2):
            await w.send(100 + rid, AbortRequest(target_rid=rid))
        await a.until(lambda: all(a.terminal[r] for r in range(1, 7)), "a's aborts")
        await w.until(lambda: w.terminal[1] and w.terminal[2], "w's aborts")
        await a.pump(0.2)
        only_terminal(a, list(range(1, 9)))
        only_terminal(w, [1, 2, 3])
        only_terminal(b, [1])
        for c, rid in [*((a, r) for r in range(1, 7)), (w, 1), (w, 2)]:
            assert isinstance(c.last(rid), GenerateDone) and c.last(rid).finish_reason == "abort", c.last(rid)
        st = await b.status(101)
        assert st.in_flight == 0 and st.counters["clients_waiting"] == 0
    finally:
        for c in (a, b, w):
            c.close()
        stop(proc)


CLIENT = """
import asyncio, sys
from rollwire import RolloutClient, SamplingParams
LONG = SamplingParams(max_new_tokens=4000, temperature=0.0, ignore_eos=True)
async def main():
    async with RolloutClient(sys.argv[1]) as rc:
        await rc.wait_ready(timeout=120)
        calls = [asyncio.ensure_future(rc.generate([1 + i, 2, 3], LONG)) for i in range(4)]
        calls += [asyncio.ensure_future(rc.generate([7, 8], LONG, min_version=99)) for _ in range(2)]
        await asyncio.sleep(0)
        sent = rc._rpc._last_tx
        # until a Heartbeat went out after the requests (one goes after heartbeat_s of silence):
        # from then on the server judges this connection by its silence
        while rc._rpc._last_tx < sent + 0.9 * rc._rpc.heartbeat_s:
            await asyncio.sleep(0.05)
        print("sent", flush=True)
        await asyncio.gather(*calls)
asyncio.run(main())
"""


async def test_a_client_gone_silent_has_its_running_and_waiting_requests_aborted() -> None:
    ep = free_tcp_endpoint()
    proc = serve(ep, "--client-timeout", "4")  # the client beats every 1 s
    client = subprocess.Popen([sys.executable, "-c", CLIENT, ep], stdout=subprocess.PIPE)
    try:
        async with RolloutClient(ep) as rc:
            await rc.wait_ready(timeout=120)
            loop = asyncio.get_running_loop()
            assert client.stdout is not None
            assert (await loop.run_in_executor(None, client.stdout.readline)).strip() == b"sent"
            deadline = time.monotonic() + 60
            while True:  # bounded poll: all six arrived, four running in the engine
                st = await rc.status()
                if st.in_flight == 6 and st.counters["engine.running"] == 4:
                    break
                assert time.monotonic() < deadline, st
                await asyncio.sleep(0.05)
            client.send_signal(signal.SIGKILL)
            client.wait()
            deadline = time.monotonic() + 60
            while (st := await rc.status()).in_flight:  # freed once the server calls the client gone
                assert time.monotonic() < deadline, st
                await asyncio.sleep(0.1)
            assert st.counters["client_gone_aborts"] == 6
            assert st.counters["engine.running"] == 0 and st.counters["clients_waiting"] == 0
            assert st.counters["finish_abort"] == 6  # each ended with abort (its reply undeliverable)
    finally:
        stop(client)
        stop(proc)


async def test_one_client_holding_every_batch_slot_does_not_starve_a_newcomer() -> None:
    """--max-batch-size 4: client A has 4 requests running and 20 queued; client B's one request
    is admitted at the next free slot (round-robin), not behind A's 20."""
    ep = free_tcp_endpoint()
    proc = serve(ep, "--max-batch-size", "4")
    sp = SamplingParams(max_new_tokens=300, temperature=0.0, ignore_eos=True)
    order: list[str] = []
    try:
        async with RolloutClient(ep) as ra, RolloutClient(ep) as rb:
            await ra.wait_ready(timeout=120)
            a_calls = []
            for i in range(24):
                t = asyncio.ensure_future(ra.generate([1 + i, 2, 3], sp))
                t.add_done_callback(lambda _t, i=i: order.append(f"a{i}"))
                a_calls.append(t)
            deadline = time.monotonic() + 60
            while True:  # bounded poll: A fills the batch and queues the rest
                st = await ra.status()
                if st.counters.get("engine.running") == 4 and st.counters.get("engine.waiting") == 20:
                    break
                assert time.monotonic() < deadline, st
                await asyncio.sleep(0.005)
            b_call = asyncio.ensure_future(rb.generate([9, 9, 9], sp))
            b_call.add_done_callback(lambda _t: order.append("b"))
            results = await asyncio.gather(*a_calls, b_call)
        assert all(isinstance(r, GenerateDone) and r.finish_reason == "length" for r in results)
        assert len(order) == 25
        ahead = order.index("b")
        print(f"A's requests finished before B's: {ahead} of 24")
        assert ahead <= 8, order  # FIFO would put it behind all 24
    finally:
        stop(proc)


async def test_a_newcomer_gets_a_batch_slot_while_another_client_holds_all_of_them_with_long_requests() -> None:
    """--max-batch-size 4: client A runs 4 requests of 4000 tokens and queues 4 more. Round-robin
    alone would make client B wait for one of them to finish; instead A's newest row gives up
    its slot (B is below its share of 2), so B's 20 tokens come back before any of A's requests
    ends. Then A's are aborted: each ends once."""
    ep = free_tcp_endpoint()
    proc = serve(ep, "--max-batch-size", "4")
    a, b = RawClient(ep), RawClient(ep)
    try:
        await a.wait_ready()
        for rid in range(1, 9):
            await a.send(rid, GenerateRequest(input_ids=[rid, 2, 3], sampling_params=LONG))
        deadline = time.monotonic() + 60
        while True:  # bounded poll: A fills the batch and queues the rest
            st = await b.status(1000)
            if st.counters.get("engine.running") == 4 and st.counters.get("engine.waiting") == 4:
                break
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.01)
        sp = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
        await b.send(1, GenerateRequest(input_ids=[9, 9, 9], sampling_params=sp))
        await b.until(lambda: b.terminal[1] == 1, "B's reply")
        await a.pump(0)
        assert isinstance(b.last(1), GenerateDone) and len(b.last(1).output_ids) == 20
        assert not any(a.terminal.values()), "B finished before any of A's requests"
        st = await b.status(1001)
        assert st.counters["engine.rows_preempted"] >= 1
        for rid in range(1, 9):
            await a.send(100 + rid, AbortRequest(target_rid=rid))
        await a.until(lambda: all(a.terminal[r] for r in range(1, 9)), "A's aborts")
        await a.pump(0.2)
        only_terminal(a, list(range(1, 9)))
        for rid in range(1, 9):
            assert isinstance(a.last(rid), GenerateDone) and a.last(rid).finish_reason == "abort", a.last(rid)
    finally:
        a.close()
        b.close()
        stop(proc)
