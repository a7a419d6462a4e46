"""Session turn latency: a 2k-token history with prefix reuse vs a full re-prefill.

Each repeat opens a session, runs turn 1 on a ``--history``-token prompt, appends an 8-token
environment turn and times turn 2 (``--tokens`` new tokens, greedy):
  session  - turn 2 through rollwire's SessionActor (the engine reuses the history's KV)
  full     - the same full history as a plain request through rollwire (full prefill)
and, as the floor, the hf engine called directly in this process on the same turns
(``direct_cached`` with the engine's prefix cache, ``direct_full`` without), in a phase of its
own before the server starts. The server runs in a child process (``rollwire serve``), the
client here, over tcp. Medians of ``--repeats``.

    python bench/sessions.py [--model tiny|small] [--history 2048] [--repeats 7]

``small`` is a random-weight Qwen2 (hidden 512, 8 layers) saved to a temporary checkpoint
directory and loaded by the real checkpoint path; ``tiny`` is the 2-layer test model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rollwire import RolloutClient, SamplingParams
from rollwire.engines.base import EngineRequest
from rollwire.engines.hf import HFEngine
from rollwire.transports.sockets import free_tcp_endpoint

ENV_TURN = [7, 8, 9, 10, 11, 12, 13, 14]


def _model_spec(name: str, tmp: str) -> str:
    if name == "tiny":
        return "tiny"
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=1408, max_position_embeddings=8192,
                      tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp)
    return tmp


async def _direct(engine: HFEngine, history: list[int], tokens: int, session: str | None) -> tuple[float, list[int]]:
    sp = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    out: list[int] = []
    t0 = time.perf_counter()
    async for d in engine.generate(EngineRequest(f"d{random.random()}", history, sp, stream=False,
                                                 session_id=session)):
        out += d.token_ids
    return time.perf_counter() - t0, out


def _prompts(a: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(0)
    return [[1] + [rng.randrange(3, 512) for _ in range(a.history - 1)] for _ in range(a.repeats + 1)]


async def _floor(a: argparse.Namespace, spec: str, runs: dict[str, list[float]]) -> None:
    """The hf engine called directly on the same turns, prefix cache on and off (no server running)."""
    engine = HFEngine.from_spec(spec)
    await engine.start()
    try:
        for r, prompt in enumerate(_prompts(a)):  # prompt 0 warms up and is dropped
            _, out1 = await _direct(engine, prompt, a.tokens, session=f"s{r}")
            history = prompt + out1 + ENV_TURN
            cached_s, _ = await _direct(engine, history, a.tokens, session=f"s{r}")
            full_s, _ = await _direct(engine, history, a.tokens, session=None)
            await engine.close_session(f"s{r}")
            if r:
                runs["direct_cached"].append(cached_s)
                runs["direct_full"].append(full_s)
    finally:
        await engine.shutdown()


async def _rollwire(a: argparse.Namespace, spec: str, runs: dict[str, list[float]]) -> list[int]:
    """The same turns through a `rollwire serve` child process: session turn vs plain full request."""
    ep = free_tcp_endpoint()
    server = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                               "--rollout-endpoint", ep, "--model", spec, "--max-new-tokens-limit", "4096"])
    sp = SamplingParams(max_new_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    cached: list[int] = []
    try:
        async with RolloutClient(ep, timeout=600) as rc:
            await rc.wait_ready(timeout=300)
            for r, prompt in enumerate(_prompts(a)):
                async with rc.session(max_tokens=a.history + 2 * a.tokens + 64) as s:
                    t1 = await s.generate(prompt, sp)
                    await s.append(ENV_TURN)
                    t0 = time.perf_counter()
                    t2 = await s.generate(sampling_params=sp)
                    session_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                await rc.generate(prompt + t1.output_ids + ENV_TURN, sp)
                full_s = time.perf_counter() - t0
                if r:
                    cached.append(t2.usage.cached_tokens)
                    runs["session"].append(session_s)
                    runs["full"].append(full_s)
    finally:
        server.terminate()
        server.wait(30)
    return cached


async def main(a: argparse.Namespace, spec: str) -> dict[str, object]:
    runs: dict[str, list[float]] = {"session": [], "full": [], "direct_cached": [], "direct_full": []}
    # one phase after the other: two torch processes computing at once on 2 cores slow each other
    await _floor(a, spec, runs)
    cached = await _rollwire(a, spec, runs)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": a.model, "history": a.history + a.tokens + len(ENV_TURN), "new_tokens": a.tokens,
            "repeats": a.repeats, "cpu_count": os.cpu_count(), "cached_tokens": cached, "median_s": med,
            "runs_s": runs, "speedup_rollwire": med["full"] / med["session"],
            "speedup_direct": med["direct_full"] / med["direct_cached"],
            "session_over_direct_cached": med["session"] / med["direct_cached"]}


def _print(res: dict[str, object]) -> None:
    med: dict[str, float] = res["median_s"]  # type: ignore[assignment]
    print(f"\nturn 2 of a session, history {res['history']} tokens, {res['new_tokens']} new tokens, "
          f"model {res['model']}; medians of {res['repeats']} (ms)")
    print(f"{'path':<26}{'reuse':>10}{'full prefill':>14}{'speedup':>9}")
    print(f"{'rollwire (client process)':<26}{med['session'] * 1e3:>10.1f}{med['full'] * 1e3:>14.1f}"
          f"{res['speedup_rollwire']:>9.2f}")
    print(f"{'hf engine direct (floor)':<26}{med['direct_cached'] * 1e3:>10.1f}{med['direct_full'] * 1e3:>14.1f}"
          f"{res['speedup_direct']:>9.2f}")
    print(f"rollwire session turn / direct cached turn: {res['session_over_direct_cached']:.2f}x; "
          f"cached tokens per turn: {res['cached_tokens']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", choices=["tiny", "small"])
    ap.add_argument("--history", type=int, default=2048, help="prompt tokens of turn 1")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per turn")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="bench/out/sessions.json")
    args = ap.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        result = uvloop.run(main(args, _model_spec(args.model, tmp)))
    _print(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
