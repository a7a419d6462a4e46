"""The OpenAI face's cost: chat completions through ``rollwire gateway`` vs the same prompts as
token ids through ``RolloutClient.generate`` on the same server, in the same run (the floor).

One ``rollwire serve`` (hf engine, tiny model) and one ``rollwire gateway`` in front of it, each its
own process; this process is the client of both. Arms, interleaved in every repeat (their order
rotates from repeat to repeat):

- ``floor``: ``RolloutClient.generate(prompt_ids, ...)`` with the ids the gateway's chat template
  gives the same messages, ``return_logprob=True`` (the gateway always asks for logprobs);
- ``gateway``: ``AsyncOpenAI().chat.completions.create(messages=...)``, not streamed;
- ``gateway_stream``: the same, ``stream=True`` (server-sent events, one chunk per token).

Every request is greedy with ``ignore_eos``, so every arm makes the same number of tokens. Request
``i`` asks for ``token_counts(...)[i]`` new tokens (bench/workload.py): with ``--lengths mixed`` (the
default) between half and one and a half times ``--max-tokens`` (a fixed spread by request index,
mean ``--max-tokens``), as rollouts differ in length; with ``--lengths fixed`` all ``--max-tokens``,
which puts the closed loop in lock-step (workload.py says why that measures the engine's prefill
scheduling as much as the face). ``--requests-per-client`` requests per concurrent client (closed
loop: each of the N clients sends its next request when its last one ends). Per arm and concurrency: tokens/s
(completion tokens / wall time) and p50 request latency; the figures are medians over
``--repeats``, the ratios medians of each repeat's ratio. Machine load: the load average, and the
share of the machine's CPU time that went to processes other than this bench's three during the
measurements (from /proc), since other jobs share the cores.

    python bench/gateway.py [--quick] [--concurrency 1 8 64] [--repeats 3] [--lengths mixed|fixed]
                            [--out bench/out/gateway.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
from workload import LENGTHS, token_counts  # bench/workload.py (this script's folder is on the path)

from rollwire import RolloutClient, SamplingParams
from rollwire.gateway.chat import ChatFormat, canonical, load_tokenizer
from rollwire.gateway.schemas import Message
from rollwire.transports.sockets import free_tcp_endpoint

ARMS = ("floor", "gateway", "gateway_stream")


def messages(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"Question {i}: what is {i} plus {3 * i + 1}? Answer briefly."}]


# -- machine load ----------------------------------------------------------------------------
def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def _proc_jiffies(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (every thread of the process)
        except (OSError, IndexError, ValueError):
            pass
    return total


class Load:
    """CPU use over a span, in cores: the machine's, each of our processes' (named), and the rest
    (other jobs on the machine)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.busy0, self.total0 = _machine_jiffies()
        self.ours0 = {name: _proc_jiffies([pid]) for name, pid in pids.items()}

    def done(self) -> dict[str, float]:
        busy, total = _machine_jiffies()
        ours = {name: _proc_jiffies([pid]) - self.ours0[name] for name, pid in self.pids.items()}
        span = max(1, total - self.total0)
        cpus = os.cpu_count() or 1
        out = {"machine_busy_cores": round(cpus * (busy - self.busy0) / span, 2)}
        out.update({f"{name}_cores": round(cpus * j / span, 2) for name, j in ours.items()})
        out["others_cores"] = round(cpus * max(0, (busy - self.busy0) - sum(ours.values())) / span, 2)
        return out


# -- the arms --------------------------------------------------------------------------------
async def run_arm(call: Callable[[int], Awaitable[int]], concurrency: int, per_client: int,
                  ) -> dict[str, float]:
    """``concurrency`` clients, ``per_client`` requests each (closed loop): tokens/s and p50 latency."""
    lat: list[float] = []
    tokens = 0

    async def client(c: int) -> None:
        nonlocal tokens
        for k in range(per_client):
            t = time.perf_counter()
            n = await call(c * per_client + k)  # awaited first: `tokens += await ...` would lose updates
            lat.append(time.perf_counter() - t)
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"tokens_s": tokens / wall, "p50_ms": 1e3 * statistics.median(lat), "tokens": tokens, "wall_s": wall}


async def main(a: argparse.Namespace) -> dict[str, Any]:
    chat = ChatFormat(load_tokenizer(a.model))
    n_prompts = 64
    prompts = [chat.encode(chat.render([canonical(Message.model_validate(m)) for m in messages(i)], None,
                                       generation_prompt=True)) for i in range(n_prompts)]
    endpoint = free_tcp_endpoint()
    port = int(free_tcp_endpoint(span=1).rpartition(":")[2])
    cli = [sys.executable, "-m", "rollwire.cli", "--log-level", "error"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    serve = subprocess.Popen([*cli, "serve", "--engine", "hf", "--model", a.model, "--rollout-endpoint", endpoint],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gateway = subprocess.Popen([*cli, "gateway", "--host", "127.0.0.1", "--port", str(port), "--model", a.model,
                                "--rollout-endpoint", endpoint], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    counts = token_counts(a.max_tokens, a.lengths)
    sps = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in counts]
    body: dict[str, Any] = {"model": a.model, "temperature": 0}
    extra = {"ignore_eos": True}
    try:
        deadline = time.monotonic() + 180
        while True:  # the gateway answers /health once it has reached the server
            assert gateway.poll() is None and serve.poll() is None, "a process exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the gateway did not come up"
            await asyncio.sleep(0.2)
        async with RolloutClient(endpoint) as rc, openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600) as oc:
            await rc.wait_ready(timeout=60)

            async def floor(i: int) -> int:
                out = await rc.generate(prompts[i % n_prompts], sps[i % len(sps)], return_logprob=True)
                assert not isinstance(out, list)
                return len(out.output_ids)

            async def gw(i: int) -> int:
                r = await oc.chat.completions.create(messages=messages(i % n_prompts), extra_body=extra,
                                                     max_tokens=counts[i % len(counts)], **body)
                assert r.usage is not None
                return r.usage.completion_tokens

            async def gw_stream(i: int) -> int:
                r = await oc.chat.completions.create(messages=messages(i % n_prompts), extra_body=extra,
                                                     max_tokens=counts[i % len(counts)], stream=True,
                                                     stream_options={"include_usage": True}, **body)
                usage = 0
                async for ch in r:
                    if ch.usage is not None:
                        usage = ch.usage.completion_tokens
                return usage

            calls = {"floor": floor, "gateway": gw, "gateway_stream": gw_stream}
            # warm-up, and a check that both paths run the same prompt to the same tokens
            direct = await rc.generate(prompts[0], sps[0])
            assert not isinstance(direct, list)
            via = await oc.chat.completions.create(messages=messages(0), extra_body={**extra, "return_token_ids": True},
                                                   max_tokens=counts[0], **body)
            same = list(direct.output_ids) == (via.choices[0].model_extra or {}).get("token_ids")
            for arm in ARMS:
                await run_arm(calls[arm], 4, 2)
            pids = {"bench_client": os.getpid(), "server": serve.pid, "gateway": gateway.pid}
            rows = []
            load_before = os.getloadavg()
            for conc in a.concurrency:
                per_client = max(a.requests_per_client, -(-a.min_requests // conc))
                reps: list[dict[str, Any]] = []
                for rep in range(a.repeats):
                    order = ARMS[rep % len(ARMS):] + ARMS[:rep % len(ARMS)]
                    got: dict[str, Any] = {}
                    for arm in order:
                        load = Load(pids)
                        got[arm] = await run_arm(calls[arm], conc, per_client)
                        got[arm]["load"] = load.done()
                    reps.append(got)
                    print(f"  c={conc} repeat {rep + 1}: " + ", ".join(
                        f"{arm} {got[arm]['tokens_s']:.0f} tok/s p50 {got[arm]['p50_ms']:.1f} ms "
                        f"(others {got[arm]['load']['others_cores']} cores)" for arm in ARMS), flush=True)
                row: dict[str, Any] = {"concurrency": conc, "requests": conc * per_client}
                for arm in ARMS:
                    row[arm] = {"tokens_s": round(statistics.median(r[arm]["tokens_s"] for r in reps), 1),
                                "p50_ms": round(statistics.median(r[arm]["p50_ms"] for r in reps), 2),
                                **{k: round(statistics.median(r[arm]["load"][k] for r in reps), 2)
                                   for k in reps[0][arm]["load"]}}
                for arm in ("gateway", "gateway_stream"):
                    row[arm]["ratio_tokens_s"] = round(statistics.median(
                        r[arm]["tokens_s"] / r["floor"]["tokens_s"] for r in reps), 3)
                    row[arm]["added_p50_ms"] = round(statistics.median(
                        r[arm]["p50_ms"] - r["floor"]["p50_ms"] for r in reps), 2)
                row["repeats"] = reps
                rows.append(row)
            return {"rows": rows, "same_tokens_gateway_vs_floor": same, "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()}
    finally:
        for p in (gateway, serve):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def table(res: dict[str, Any]) -> str:
    lines = ["conc  floor tok/s  p50 ms | gateway tok/s  ratio  p50 ms  +p50 | stream tok/s  ratio  p50 ms  +p50"]
    for r in res["rows"]:
        f, g, s = r["floor"], r["gateway"], r["gateway_stream"]
        lines.append(f"{r['concurrency']:>4}  {f['tokens_s']:>11}  {f['p50_ms']:>6} | {g['tokens_s']:>13}  "
                     f"{g['ratio_tokens_s']:>5}  {g['p50_ms']:>6}  {g['added_p50_ms']:>4} | {s['tokens_s']:>12}  "
                     f"{s['ratio_tokens_s']:>5}  {s['p50_ms']:>6}  {s['added_p50_ms']:>4}")
    lb, la = res["loadavg_before"], res["loadavg_after"]
    lines.append("cores used (median) by  bench client / gateway / server / other jobs:")
    for r in res["rows"]:
        lines.append(f"  c={r['concurrency']:<3} " + "; ".join(
            f"{arm} {r[arm]['bench_client_cores']}/{r[arm]['gateway_cores']}/{r[arm]['server_cores']}/"
            f"{r[arm]['others_cores']}" for arm in ARMS))
    lines.append(f"load average {lb[0]:.2f} before, {la[0]:.2f} after, on {res['machine']['cpus']} CPUs; "
                 f"greedy tokens gateway == floor: {res['same_tokens_gateway_vs_floor']}; "
                 f"lengths {res['machine']['args']['lengths']}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repeat, concurrency 1 and 8")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--lengths", choices=LENGTHS, default="mixed",
                    help="new tokens per request: spread around --max-tokens (mixed) or all --max-tokens (fixed)")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--min-requests", type=int, default=32, help="at least this many requests per measurement")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", default="bench/out/gateway.json")
    a = ap.parse_args()
    if a.quick:
        a.repeats, a.concurrency = 1, [1, 8]
    res = asyncio.run(main(a))
    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                      "openai": openai.__version__, "args": vars(a)}
    print(table(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
