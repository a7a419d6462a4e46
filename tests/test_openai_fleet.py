"""The OpenAI face over a fleet: one ``rollwire gateway`` process in front of two ``rollwire serve``
processes (a ``RolloutFleet`` inside the gateway), driven by the real ``openai`` client. Both servers
run the scripted tiny model (gateway_stack.py) pushed as version 1, so every answer is known.

Plain chat completions (streamed and not) spread over both servers; a tool-using episode tagged
with ``X-Session-ID`` runs two turns, then the server its session lives on is SIGKILLed: the next
turn still answers (the session moved to the other server by replaying its exact history), the
trajectory goes on unbroken (model tokens, loss_mask, logprobs over the whole sequence), and plain
requests keep working on the server left."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from rollwire.gateway.client import fetch_trajectory
from rollwire.transports.sockets import free_tcp_endpoint
from rollwire.weightsync.publisher import TrainerPublisher
from tests.gateway_stack import PLAIN_ANSWER, PLAIN_TASK, TASK, TOOLS, _stop, model_logprobs, scripted_state, user

SERVERS = 2


@dataclass
class FleetStack:
    endpoints: list[str]
    servers: list[subprocess.Popen[bytes]]
    gateway: subprocess.Popen[bytes]
    base_url: str

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.root + path, timeout=30) as r:
                body = r.read().decode()
                return r.status, json.loads(body) if path != "/metrics" else body
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def until(what: Any, why: str, timeout: float = 60.0) -> Any:
    """Poll ``what()`` until it is truthy (bounded); its value."""
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {why}"
        time.sleep(0.05)
    return got


async def _push(trainer: str) -> None:
    async with TrainerPublisher(trainer, min_receivers=SERVERS, timeout_s=120) as tp:
        await tp.push_weights(version=1, tensors=scripted_state(), transport="inline")


@pytest.fixture(scope="module")
def fleet() -> Iterator[FleetStack]:
    eps, trainer = [free_tcp_endpoint() for _ in range(SERVERS)], free_tcp_endpoint()
    port = int(free_tcp_endpoint(span=1).rpartition(":")[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = tempfile.TemporaryFile()  # noqa: SIM115 (every process's output, shown if the stack fails; closed below)
    cli = [sys.executable, "-m", "rollwire.cli", "--log-level", "warning"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, ep in enumerate(eps):
            procs.append(subprocess.Popen([*cli, "serve", "--rollout-endpoint", ep, "--trainer-endpoint", trainer,
                                           "--receiver-id", f"server-{i}"], env=env, stdout=logs,
                                          stderr=subprocess.STDOUT))
        gateway = subprocess.Popen([*cli, "gateway", "--host", "127.0.0.1", "--port", str(port),
                                    *[a for ep in eps for a in ("--rollout-endpoint", ep)]],
                                   env=env, stdout=logs, stderr=subprocess.STDOUT)
        procs.append(gateway)
        asyncio.run(_push(trainer))
        s = FleetStack(eps, procs[:SERVERS], gateway, f"http://127.0.0.1:{port}/v1")

        def both_live_at_v1() -> bool:
            assert gateway.poll() is None, f"the gateway exited with {gateway.returncode}"
            try:
                status, body = s.get("/health")
            except OSError:  # not listening yet
                return False
            return status == 200 and body["status"] == "ok" and \
                [(r.get("alive"), r.get("weight_version")) for r in body["servers"]] == [(True, 1)] * SERVERS

        until(both_live_at_v1, "the gateway to admit both servers at version 1", timeout=180)
        yield s
        assert gateway.poll() is None, "the gateway died"
    except BaseException:
        logs.seek(0)
        sys.stderr.write(logs.read()[-8000:].decode(errors="replace"))
        raise
    finally:
        for p in reversed(procs):
            _stop(p)
        logs.close()


@pytest.fixture(scope="module")
def client(fleet: FleetStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleet.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _plain_burst(fleet: FleetStack, n: int) -> list[str]:
    """``n`` concurrent plain chats, half streamed: each one's text."""
    async def one(c: openai.AsyncOpenAI, stream: bool) -> str:
        r: Any = await c.chat.completions.create(model="tiny", messages=user(PLAIN_TASK), temperature=0,
                                                 stream=stream)
        if stream:
            return "".join([ch.choices[0].delta.content or "" async for ch in r if ch.choices])
        return r.choices[0].message.content  # type: ignore[no-any-return]

    async def burst() -> list[str]:
        async with openai.AsyncOpenAI(base_url=fleet.base_url, api_key="unused", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i % 2 == 1) for i in range(n)))

    return asyncio.run(burst())


def _metric(text: str, name: str, endpoint: str | None = None) -> float:
    key = name + (f'{{endpoint="{endpoint}"}}' if endpoint is not None else "")
    rows = [line for line in text.splitlines() if line.rsplit(" ", 1)[0] == key]
    assert len(rows) == 1, (key, rows)
    return float(rows[0].rsplit(" ", 1)[1])


def test_plain_chats_spread_over_both_servers_and_metrics_are_per_endpoint(fleet: FleetStack) -> None:
    assert _plain_burst(fleet, 8) == [PLAIN_ANSWER] * 8
    status, text = fleet.get("/metrics")
    assert status == 200
    for ep in fleet.endpoints:  # each server's own counters, and the fleet client's view of it
        assert _metric(text, "rollwire_server_up", ep) == 1
        assert _metric(text, "rollwire_live_weight_version", ep) == 1
        assert _metric(text, "rollwire_fleet_server_alive", ep) == 1
        assert _metric(text, "rollwire_fleet_server_routed", ep) >= 1, ep  # 8 at once: both took some
        assert _metric(text, "rollwire_server_requests", ep) >= 1, ep
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def _turn(client: openai.OpenAI, sid: str, messages: list[dict[str, Any]]) -> Any:
    return client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0,
                                          extra_headers={"X-Session-ID": sid},
                                          extra_body={"return_token_ids": True})


def _run_tool(call: Any) -> str:
    args = json.loads(call.function.arguments)
    return str(args["a"] + args["b"] if call.function.name == "add" else args["a"] * args["b"])


def test_a_session_survives_the_death_of_its_server_with_its_trajectory_unbroken(
        fleet: FleetStack, client: openai.OpenAI) -> None:
    sid = "fleet-episode"
    messages: list[dict[str, Any]] = user(TASK)
    generated: list[list[int]] = []
    calls: list[str] = []

    def turn() -> Any:
        r = _turn(client, sid, messages)
        generated.append(r.choices[0].model_extra["token_ids"])
        msg = r.choices[0].message
        messages.append(msg.model_dump(exclude_none=True))
        for c in msg.tool_calls or []:
            calls.append(f"{c.function.name}{tuple(json.loads(c.function.arguments).values())}")
            messages.append({"role": "tool", "tool_call_id": c.id, "content": _run_tool(c)})
        return r

    turn()
    turn()
    before = fetch_trajectory(fleet.base_url, sid)
    assert before.server in fleet.endpoints and before.moves == 0
    victim = fleet.endpoints.index(before.server)
    status, health = fleet.get("/health")
    assert health["sessions"][before.server] == 1

    fleet.servers[victim].send_signal(signal.SIGKILL)  # the session's server dies between turns
    fleet.servers[victim].wait(timeout=30)
    t0 = time.monotonic()
    r3 = turn()  # at once, as an agent would: the session moves and the turn runs on the other server
    moved_s = time.monotonic() - t0
    r4 = turn()
    print(f"turn after the kill answered in {moved_s:.2f}s; calls {calls}; "
          f"final {r4.choices[0].message.content!r}")
    assert r3.choices[0].finish_reason == "tool_calls"
    assert calls == ["add(2, 3)", "add(5, 4)", "mul(9, 2)"]  # the scripted episode, unchanged by the move
    assert r4.choices[0].message.content == "It is 18." and r4.choices[0].finish_reason == "stop"

    traj = fetch_trajectory(fleet.base_url, sid)
    assert traj.server == fleet.endpoints[1 - victim] and traj.moves == 1
    assert traj.token_ids[:len(before.token_ids)] == before.token_ids  # the history before the kill, kept
    model_turns = [t for t in traj.turns if t.role == "model"]
    assert [t.role for t in traj.turns] == ["env", "model"] * 4
    assert [traj.token_ids[t.start:t.end] for t in model_turns] == generated
    assert traj.loss_mask == [int(t.role == "model") for t in traj.turns for _ in range(t.start, t.end)]
    assert all(a.end == b.start for a, b in zip(traj.turns, traj.turns[1:], strict=False))
    assert traj.turns[0].start == 0 and traj.turns[-1].end == len(traj.token_ids)
    # every model token's logprob is the model's own over the whole trajectory: the replayed history
    # is the exact token sequence the first server held
    logp = model_logprobs(scripted_state(), traj.token_ids)
    for i, m in enumerate(traj.loss_mask):
        want = float(logp[i - 1, traj.token_ids[i]]) if m else 0.0
        assert abs(traj.logprobs[i] - want) < 1e-3, (i, traj.logprobs[i], want)
    assert [(s.version, s.start, s.end) for s in traj.weight_version_spans] == \
        [(1, t.start, t.end) for t in model_turns]

    # plain requests keep working (streamed ones too) on the server left; the gateway says so
    assert _plain_burst(fleet, 6) == [PLAIN_ANSWER] * 6
    status, health = fleet.get("/health")
    assert status == 200 and health["status"] == "degraded"
    rows = {r["endpoint"]: r for r in health["servers"]}
    assert rows[fleet.endpoints[victim]]["alive"] is False and rows[fleet.endpoints[1 - victim]]["alive"] is True
    _, text = fleet.get("/metrics")
    assert _metric(text, "rollwire_server_up", fleet.endpoints[victim]) == 0
    assert _metric(text, "rollwire_fleet_server_alive", fleet.endpoints[victim]) == 0
    assert _metric(text, "rollwire_gateway_session_moves_total") == 1
    final = fetch_trajectory(fleet.base_url, sid, close=True)
    assert final.token_ids == traj.token_ids
