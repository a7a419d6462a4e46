"""Multi-turn tool use through rollwire sessions: a calculator the model calls with a marker token.

The model writes an arithmetic expression and ends its turn with the marker ``#`` (a stop
token). The environment evaluates the expression and answers ``=<result>;`` as an environment
turn (loss_mask 0); the model then continues from the whole history, reusing the server's cached
KV. Several worker processes each run several sessions at once and print their trajectories:
model tokens in [brackets], environment tokens plain.

    python examples/multiturn_tool.py                    # starts its own server (tiny model, CPU)
    python examples/multiturn_tool.py --endpoint tcp://127.0.0.1:7500   # against `rollwire serve`

The tiny model has random weights, so its expressions are noise; the mechanics are real. The
action mask (digits, ``+``, ``*``, ``#``) keeps its output well formed enough to call the tool.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
from typing import Any

from rollwire import RolloutClient, SamplingParams
from rollwire.models import tiny_tokenizer

MARKER = "#"
ACTIONS = "123456789+*" + MARKER
MAX_TOOL_CALLS = 3


def calculator(expression: str) -> str:
    """Evaluate ``1+2*3``-style text (integers, + and *); anything else is an error string."""
    expression = expression.strip("+*")
    if not re.fullmatch(r"\d+([+*]\d+)*", expression or "x"):
        return "error"
    total = 0
    for term in expression.split("+"):
        product = 1
        for factor in term.split("*"):
            product *= int(factor[:6])  # keep numbers small: this is a toy
        total += product
    return str(total % 10**9)


async def episode(rc: RolloutClient, tok: Any, task: str, seed: int) -> str:
    marker = tok.convert_tokens_to_ids(MARKER)
    sp = SamplingParams(max_new_tokens=12, temperature=3.0, seed=seed, stop_token_ids=[marker],
                        allowed_token_ids=tok.convert_tokens_to_ids(list(ACTIONS)), ignore_eos=True)
    async with rc.session(max_tokens=512) as s:
        turn = await s.generate(tok.encode(f"calc {task}: "), sp)
        for _ in range(MAX_TOOL_CALLS):
            if turn.finish_reason != "stop":  # no tool call: the episode is over
                break
            expression = tok.decode(turn.output_ids[:-1])
            await s.append(tok.encode(f"={calculator(expression)};"))
            turn = await s.generate(sampling_params=sp)
        traj = s.trajectory()
    text = "".join(
        f"[{tok.decode(traj.token_ids[t.start:t.end])}]" if t.role == "model"
        else tok.decode(traj.token_ids[t.start:t.end]) for t in traj.turns)
    cached = [t.cached_tokens for t in traj.turns if t.role == "model"]
    versions = sorted({sp.version for sp in traj.weight_version_spans})
    return (f"{text!r}\n    tokens={len(traj.token_ids)} trained={sum(traj.loss_mask)} "
            f"cached_per_turn={cached} versions={versions}")


async def worker_main(endpoint: str, worker: int, sessions: int) -> list[str]:
    tok = tiny_tokenizer()
    async with RolloutClient(endpoint, timeout=120) as rc:
        await rc.wait_ready()
        return list(await asyncio.gather(*(episode(rc, tok, f"w{worker}s{i}", 100 * worker + i)
                                           for i in range(sessions))))


def worker(endpoint: str, index: int, sessions: int, out: Any) -> None:
    out.put((index, asyncio.run(worker_main(endpoint, index, sessions))))


def run_workers(endpoint: str, workers: int, sessions: int) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(endpoint, w, sessions, out)) for w in range(workers)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    for w in sorted(results):
        for line in results[w]:
            print(f"worker {w}: {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", default=None, help="a running server; default: start one here")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=4, help="concurrent sessions per worker")
    a = ap.parse_args()
    if a.endpoint:
        run_workers(a.endpoint, a.workers, a.sessions)
        return
    from rollwire.server import RolloutServer, ServerConfig
    from rollwire.transports.sockets import ipc_endpoint

    endpoint = ipc_endpoint("multiturn")

    async def serve_and_run() -> None:
        async with RolloutServer(ServerConfig(rollout_endpoint=endpoint)):
            await asyncio.get_running_loop().run_in_executor(None, run_workers, endpoint, a.workers, a.sessions)

    asyncio.run(serve_and_run())


if __name__ == "__main__":
    main()
