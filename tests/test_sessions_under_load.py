"""100 concurrent sessions x 5 turns from 4 worker processes while the trainer pushes 5 versions.

Version v is the tiny model built with seed v (tests/versioned.py), so each model turn can be
recomputed span by span from its history: every turn must be complete, on versions that were
live, in non-decreasing order along each trajectory, and nothing may be lost or duplicated.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
from typing import Any

from rollwire.messages import GenerateDone, Timings, Usage, VersionSpan
from rollwire.server import RolloutServer, ServerConfig
from rollwire.weightsync.publisher import TrainerPublisher
from tests.session_workers import run_sessions
from tests.versioned import check_spans, version_state

from .conftest import free_tcp_endpoint, until

WORKERS, SESSIONS_PER_WORKER, TURNS, PUSHES = 4, 25, 5, 5


def turn_as_done(traj: dict[str, Any], turn: dict[str, Any]) -> tuple[list[int], GenerateDone]:
    """A model turn of a trajectory as (its prompt, the GenerateDone check_spans takes)."""
    out = traj["token_ids"][turn["start"]:turn["end"]]
    spans = [VersionSpan(s[0], s[1] - turn["start"], s[2] - turn["start"]) for s in turn["weight_version_spans"]]
    done = GenerateDone(index=0, output_ids=out, finish_reason=turn["finish_reason"],
                        weight_version=turn["weight_version"], weight_version_spans=spans,
                        usage=Usage(prompt_tokens=turn["start"], completion_tokens=len(out)),
                        timings=Timings(queued_s=0.0, first_token_s=0.0, total_s=0.0))
    return traj["token_ids"][:turn["start"]], done


async def test_100_sessions_x_5_turns_from_4_processes_across_5_pushes_lose_nothing() -> None:
    rollout_ep, trainer_ep = free_tcp_endpoint(), free_tcp_endpoint()
    states = {v: version_state(v) for v in range(1, PUSHES + 1)}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    started = [ctx.Event() for _ in range(WORKERS)]
    last_push = ctx.Event()  # every session's last turn waits for it
    loop = asyncio.get_running_loop()
    cfg = ServerConfig(rollout_endpoint=rollout_ep, trainer_endpoint=trainer_ep, pause_policy="retract")
    async with RolloutServer(cfg) as srv, TrainerPublisher(trainer_ep) as tp:
        procs = [ctx.Process(target=run_sessions,
                             args=(rollout_ep, w, SESSIONS_PER_WORKER, TURNS, started[w], last_push, results))
                 for w in range(WORKERS)]
        for p in procs:
            p.start()
        for ev in started:
            assert await loop.run_in_executor(None, ev.wait, 120)
        sessions_total = WORKERS * SESSIONS_PER_WORKER
        before_last_push = sessions_total * (TURNS - 1)  # the turns that may run before the last push
        counters = srv.sessions.counters
        await until(lambda: counters.get("sessions_opened") >= sessions_total and counters.get("turns") >= 1,
                    "every session open and a turn done on version 0", 120)
        for v in range(1, PUSHES + 1):
            report = await tp.push_weights(version=v, tensors=states[v], transport="inline")
            assert report.version == v and report.receivers
            turns_at_push = counters.get("turns")  # a turn ends on version v before the next push (if any is left)
            await until(lambda t=turns_at_push: counters.get("turns") > t or counters.get("turns") >= before_last_push,
                        f"a turn done after push {v}", 120)
        last_push.set()
        outs = dict([await loop.run_in_executor(None, results.get, True, 300) for _ in procs])
        for p in procs:
            await loop.run_in_executor(None, p.join, 30)
        snapshot = counters.snapshot()
    assert sorted(outs) == list(range(WORKERS))
    sessions = [s for w in outs.values() for s in w]
    assert len(sessions) == WORKERS * SESSIONS_PER_WORKER
    assert len({s["session"] for s in sessions}) == len(sessions)  # no session mixed up with another
    assert snapshot["turns"] == len(sessions) * TURNS
    assert snapshot["sessions_closed"] == len(sessions)
    seen_versions: set[int] = set()
    checked = reused = later_turns = 0
    for s in sessions:
        traj = s["trajectory"]
        model_turns = [t for t in traj["turns"] if t["role"] == "model"]
        assert len(model_turns) == TURNS
        assert all(t["finish_reason"] == "length" and t["end"] - t["start"] == 12 for t in model_turns)
        versions = [sp[0] for t in model_turns for sp in t["weight_version_spans"]]
        assert versions == sorted(versions) and set(versions) <= set(range(PUSHES + 1))
        seen_versions |= set(versions)
        assert sum(traj["loss_mask"]) == 12 * TURNS
        later_turns += TURNS - 1
        reused += sum(t["cached_tokens"] > 0 for t in model_turns[1:])
        for prev, t in itertools.pairwise(model_turns):  # no push in between: the KV was reused
            if prev["weight_version_spans"][-1][0] == t["weight_version_spans"][0][0]:
                assert t["cached_tokens"] > 0, (prev, t)
        assert len(traj["token_ids"]) == len(traj["loss_mask"]) == len(traj["logprobs"])
        for t in model_turns:  # retract policy: each span is its version's greedy continuation
            if len(t["weight_version_spans"]) > 1 or checked < 60:
                check_spans(*turn_as_done(traj, t))
                checked += 1
    print(f"versions seen {sorted(seen_versions)}, spans checked {checked}, "
          f"turns reusing the history's KV {reused}/{later_turns}")
    assert reused > 0
    assert seen_versions >= {0, PUSHES}  # turns ran before the first push and (last turns) after the last
