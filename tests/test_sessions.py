"""Sessions end to end on a real server (hf engine, tiny model): trajectories, prefix reuse,
weight versions across turns, TTL and close freeing the engine's cached KV."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rollwire import RolloutClient, RolloutError, SamplingParams
from rollwire.clients.session import SessionDesynced
from rollwire.messages import ErrorCode
from rollwire.models import tiny
from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports.sockets import ipc_endpoint
from tests.versioned import check_spans, send_version, version_state

from .conftest import until

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)


async def engine_counters(rc: RolloutClient) -> dict[str, float]:
    return {k.removeprefix("engine."): v for k, v in (await rc.status()).counters.items() if "prefix" in k}


async def test_turn_two_reuses_the_prefix_and_equals_a_full_recompute(server: RolloutServer) -> None:
    ep = server.cfg.rollout_endpoint
    async with RolloutClient(ep, timeout=60) as rc, rc.session(max_tokens=1024) as s:
        t1 = await s.generate(list(range(10, 60)), GREEDY)
        await s.append([3, 4, 5])
        t2 = await s.generate(sampling_params=GREEDY)
        traj = s.trajectory()
        assert t1.usage.cached_tokens == 0
        assert t2.usage.cached_tokens == 50 + 10 - 1  # turn 1's prompt + output but its last token
        history = traj.token_ids[:-10]
        recomputed = await rc.generate(history, GREEDY)  # no session: a full prefill
        assert recomputed.usage.cached_tokens == 0
        assert t2.output_ids == recomputed.output_ids
        assert traj.token_ids == list(range(10, 60)) + t1.output_ids + [3, 4, 5] + t2.output_ids


async def test_a_streamed_turn_yields_its_tokens_then_the_done_and_records_what_generate_would(
        server: RolloutServer) -> None:
    """Two sessions, the same turns: one by ``generate``, one by ``stream`` (one chunk per token, then
    the GenerateDone). The chunks carry exactly the done's tokens and logprobs, the second turn
    reuses the cached prefix as the first session's does, and both trajectories are identical. A
    stream left before its end leaves the session unusable, with a clear error."""
    ep = server.cfg.rollout_endpoint
    async with RolloutClient(ep, timeout=60) as rc, rc.session() as a, rc.session() as b:
        plain = [await a.generate(list(range(10, 40)), GREEDY), await a.generate([3, 4], GREEDY)]
        streamed = []
        for prompt in (list(range(10, 40)), [3, 4]):
            items = [m async for m in b.stream(prompt, GREEDY)]
            chunks, done = items[:-1], items[-1]
            assert [len(c.token_ids) for c in chunks] == [1] * len(done.output_ids)
            assert [t for c in chunks for t in c.token_ids] == list(done.output_ids)
            assert [x for c in chunks for x in (c.logprobs or [])] == list(done.output_logprobs or [])
            streamed.append(done)
        assert [d.output_ids for d in streamed] == [d.output_ids for d in plain]
        assert streamed[1].usage.cached_tokens == plain[1].usage.cached_tokens > 0
        assert b.trajectory() == a.trajectory()
        stream = b.stream([5], GREEDY)
        async for _ in stream:  # the first chunk, then away
            break
        await stream.aclose()  # type: ignore[attr-defined]
        with pytest.raises(SessionDesynced, match="no longer known"):
            await b.generate([6], GREEDY)


async def test_the_default_session_endpoint_leaves_the_neighbouring_port_to_a_trainer() -> None:
    """The issue's layout: rollout on port P, trainer on P + 1; sessions bind a free port."""
    from rollwire.weightsync.publisher import TrainerPublisher

    from .conftest import free_tcp_endpoint

    rollout = free_tcp_endpoint(span=3)  # the trainer's PUB takes P + 2
    host, _, port = rollout.rpartition(":")
    trainer = f"{host}:{int(port) + 1}"
    async with TrainerPublisher(trainer), RolloutServer(ServerConfig(rollout_endpoint=rollout,
                                                                     trainer_endpoint=trainer)), \
            RolloutClient(rollout, timeout=60) as rc:
        advertised = (await rc.health()).session_endpoint
        assert advertised.startswith(f"{host}:") and advertised not in (rollout, trainer)
        async with rc.session() as s:
            assert (await s.generate([5, 6], GREEDY)).finish_reason == "length"


async def test_five_turn_trajectory_aligns_loss_mask_and_logprobs_with_the_tokens() -> None:
    """Sampled turns (T=1) between environment turns of lengths 1, 7, 2, 13: every model token's
    logprob equals the model's own log-softmax at that position of the whole trajectory."""
    ep = ipc_endpoint("traj")
    env_turns = [[40], [41, 42, 43, 44, 45, 46, 47], [48, 49], list(range(50, 63))]
    async with RolloutServer(ServerConfig(rollout_endpoint=ep)) as srv, RolloutClient(ep, timeout=60) as rc, \
            rc.session(max_tokens=2048) as s:
        for turn in range(5):
            sp = SamplingParams(max_new_tokens=5 + 3 * turn, temperature=1.0, seed=turn, ignore_eos=True)
            await s.generate([1, 20, 21] if turn == 0 else [], sp)
            if turn < 4:
                await s.append(env_turns[turn])
        traj = s.trajectory()
        assert srv.sessions.sessions[s.id].history == traj.token_ids  # the client's record is the server's
    roles = [t.role for t in traj.turns]
    assert roles == ["prompt", "model", "env", "model", "env", "model", "env", "model", "env", "model"]
    assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.logprobs)
    for t in traj.turns:
        assert traj.loss_mask[t.start:t.end] == [int(t.role == "model")] * (t.end - t.start)
        if t.role != "model":
            assert traj.token_ids[t.start:t.end] in ([1, 20, 21], *env_turns)
    assert sum(traj.loss_mask) == sum(5 + 3 * i for i in range(5))
    assert [t.cached_tokens > 0 for t in traj.turns if t.role == "model"] == [False] + [True] * 4
    with torch.no_grad():
        logits = tiny(0)[0](torch.tensor([traj.token_ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    model_positions = [i for i, m in enumerate(traj.loss_mask) if m]
    for i in model_positions:
        assert abs(traj.logprobs[i] - float(logp[i - 1, traj.token_ids[i]])) < 1e-3, i
    assert all(traj.logprobs[i] == 0.0 for i, m in enumerate(traj.loss_mask) if not m)
    spans = traj.weight_version_spans
    assert [(sp.start, sp.end) for sp in spans] == [(t.start, t.end) for t in traj.turns if t.role == "model"]


@pytest.mark.parametrize("policy", ["retract", "in_place"])
async def test_a_turn_in_flight_during_a_weight_push_continues_and_the_next_turn_runs_on_the_new_version(
        policy: str) -> None:
    """The running turn keeps its tokens and continues under version 1 (two spans, each the
    greedy continuation of its own version). Retract re-prefilled its KV under version 1, so the
    next turn reuses it; in_place kept version 0's KV under it, so the next turn recomputes."""
    ep = ipc_endpoint("sess-push")
    long_turn = SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)
    async with RolloutServer(ServerConfig(rollout_endpoint=ep, pause_policy=policy)) as srv, \
            RolloutClient(ep, timeout=120) as rc, rc.session(max_tokens=2048) as s:
        await s.generate([5, 6, 7], GREEDY)
        history = s.trajectory().token_ids
        turn = asyncio.ensure_future(s.generate([8], long_turn))
        await until(lambda: srv.generation._running_samples == 1, "the turn generating")
        assert (await send_version(1, version_state(1))).__class__.__name__ == "VersionApplied"
        done = await turn
        assert [sp.version for sp in done.weight_version_spans] == [0, 1], done.weight_version_spans
        if policy == "retract":  # in_place: version 1's tokens attend to version 0's KV, by design
            check_spans([*history, 8], done)
        t3 = await s.generate([9], GREEDY)
        reused = len(history) + 1 + len(done.output_ids) - 1
        assert t3.usage.cached_tokens == (reused if policy == "retract" else 0)
        assert [sp.version for sp in t3.weight_version_spans] == [1]
        check_spans(s.trajectory().token_ids[:-10], t3)
        versions = [t.weight_version for t in s.trajectory().turns if t.role == "model"]
        assert versions == [0, 1, 1]


async def test_close_and_ttl_expiry_free_the_engine_kv_they_held() -> None:
    ep = ipc_endpoint("sess-ttl")
    cfg = ServerConfig(rollout_endpoint=ep)
    async with RolloutServer(cfg) as srv, RolloutClient(ep, timeout=60) as rc:
        srv.sessions.sweep_interval_s = 0.1
        closing, expiring = rc.session(), rc.session(ttl_s=3600)  # shortened below, when its expiry is due
        await closing.open()
        await expiring.open()
        for s in (closing, expiring):
            await s.generate(list(range(10, 100)), GREEDY)
        await until(lambda: _prefix_sessions(rc, 2), "both sessions hold cached KV", 10)
        held = (await engine_counters(rc))["prefix_cache_bytes"]
        assert held > 0
        closed = await closing.close()
        assert closed.turns == 1 and closed.length == 100
        await until(lambda: _prefix_sessions(rc, 1), "the closed session's KV freed", 10)
        assert (await engine_counters(rc))["prefix_cache_bytes"] == held / 2
        srv.sessions.sessions[expiring.id].ttl_s = 0.5  # (a slow machine must not expire it earlier)
        await until(lambda: _prefix_sessions(rc, 0), "expiry: idle 0.5 s, swept every 0.1 s", 10)
        assert (await engine_counters(rc))["prefix_cache_bytes"] == 0
        for s, code in ((closing, ErrorCode.SESSION_CLOSED), (expiring, ErrorCode.SESSION_EXPIRED)):
            try:
                await s.generate([1], GREEDY)
                raise AssertionError("a gone session generated")
            except RolloutError as e:
                assert e.code == code
        assert srv.sessions.counters.snapshot()["sessions_expired"] == 1


async def _prefix_sessions(rc: RolloutClient, n: int) -> bool:
    return (await engine_counters(rc))["prefix_sessions"] == n


async def test_an_ipc_rollout_path_near_the_length_limit_gets_a_session_endpoint_that_fits() -> None:
    """A rollout path of 100 bytes fits a unix socket (107 at most), "-sessions" after it would
    not: the default session endpoint is then a short name beside it, and sessions work."""
    from rollwire.transports.sockets import private_ipc_dir

    base = f"{private_ipc_dir()}/"
    ep = "ipc://" + base + "r" * (100 - len(base))
    async with RolloutServer(ServerConfig(rollout_endpoint=ep)) as srv, RolloutClient(ep, timeout=60) as rc:
        assert len(srv.sessions.bound_endpoint("sessions").removeprefix("ipc://")) <= 107
        async with rc.session() as s:
            done = await s.generate([1, 2], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
            assert done.finish_reason == "length"
