"""A multi-turn tool-using agent written only against the ``openai`` client, trained from exact
trajectories.

Each worker process runs agent episodes the way agent scaffolds do: a chat completion with
``tools``, the calls run locally, their results sent back as ``tool`` messages, the whole message
list resent every turn. The only rollwire-specific thing an agent does is tag its requests with an
``X-Session-ID`` header. The trainer side then fetches each episode's trajectory from the gateway
(``rollwire.gateway.fetch_trajectory``): token ids, loss_mask (1 exactly on the model's tokens),
logprobs and weight versions, exactly as generated, never re-tokenized.

    python examples/openai_agent.py                     # starts rollwire serve + rollwire gateway (tiny model, CPU)
    python examples/openai_agent.py --base-url http://127.0.0.1:8000/v1 --model tiny   # against a running gateway

The tiny model has random weights, so it seldom writes a tool call; when it answers without one,
the agent asks again (a user turn) until its turn budget is spent. A real checkpoint calls the tools.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "mul", "description": "a * b", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]


def run_tool(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments)
        a, b = int(args["a"]), int(args["b"])
    except (ValueError, KeyError, TypeError) as e:
        return f"error: {e}"
    return str(a + b if name == "add" else a * b) if name in ("add", "mul") else f"error: no tool {name}"


def episode(client: Any, model: str, session_id: str, task: str, turns: int, seed: int) -> dict[str, Any]:
    """One agent episode, plain openai client code."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Use the tools."},
                                      {"role": "user", "content": task}]
    calls = 0
    for turn in range(turns):
        r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=1.0,
                                           seed=seed + turn, max_tokens=24,
                                           extra_headers={"X-Session-ID": session_id})
        msg = r.choices[0].message
        messages.append(msg.model_dump(exclude_none=True))
        if msg.tool_calls:
            calls += len(msg.tool_calls)
            messages += [{"role": "tool", "tool_call_id": c.id, "content": run_tool(c.function.name,
                                                                                  c.function.arguments)}
                         for c in msg.tool_calls]
        elif turn + 1 < turns:
            messages.append({"role": "user", "content": "Use a tool, then answer."})
    return {"session_id": session_id, "turns": turns, "tool_calls": calls}


def worker(base_url: str, model: str, index: int, episodes: int, turns: int, out: Any) -> None:
    import openai

    with openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"), max_retries=0) as c:
        out.put([episode(c, model, f"w{index}-e{e}", f"What is ({index}+{e})*3?", turns, 100 * index + e)
                 for e in range(episodes)])


def run_agents(base_url: str, model: str, workers: int, episodes: int, turns: int) -> int:
    from rollwire.gateway import fetch_trajectory

    out: Any = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=worker, args=(base_url, model, i, episodes, turns, out))
             for i in range(workers)]
    for p in procs:
        p.start()
    done = [ep for _ in procs for ep in out.get(timeout=600)]
    for p in procs:
        p.join(timeout=60)
    if any(p.exitcode != 0 for p in procs):
        print("a worker failed", file=sys.stderr)
        return 1
    for ep in sorted(done, key=lambda e: e["session_id"]):  # the trainer's side: exact trajectories
        traj = fetch_trajectory(base_url, ep["session_id"], close=True)
        model_turns = [t for t in traj.turns if t.role == "model"]
        versions = sorted({s.version for s in traj.weight_version_spans})
        print(f"{ep['session_id']}: tokens={len(traj.token_ids)} trained={sum(traj.loss_mask)} "
              f"model_turns={len(model_turns)} tool_calls={ep['tool_calls']} versions={versions} "
              f"messages={len(traj.messages)}")
    return 0


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2.0):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up in {timeout}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=None, help="a running gateway's /v1 URL (default: start one)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--episodes", type=int, default=2, help="episodes per worker")
    p.add_argument("--turns", type=int, default=4, help="model turns per episode")
    a = p.parse_args()
    if a.base_url is not None:
        return run_agents(a.base_url, a.model, a.workers, a.episodes, a.turns)
    from rollwire.transports.sockets import free_tcp_endpoint

    rollout = free_tcp_endpoint()
    port = int(free_tcp_endpoint(span=1).rpartition(":")[2])
    cli = [sys.executable, "-m", "rollwire.cli", "--log-level", "warning"]
    procs = [subprocess.Popen([*cli, "serve", "--model", a.model, "--rollout-endpoint", rollout]),
             subprocess.Popen([*cli, "gateway", "--model", a.model, "--port", str(port),
                               "--rollout-endpoint", rollout])]
    try:
        _wait(f"http://127.0.0.1:{port}/health", procs[1])
        return run_agents(f"http://127.0.0.1:{port}/v1", a.model, a.workers, a.episodes, a.turns)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
