"""Issues 16 and 17 on one GPU: SGLang servers behind a RolloutFleet, and behind the OpenAI gateway.

The checkpoint: a random-weight Qwen2 of Qwen2-0.5B's shape with the tiny model's character-level
tokenizer and chat template (vocab 512), written locally, so that `rollwire gateway` and SGLang's
own OpenAI server render the same chat into the same tokens.

Parts (each writes its JSON as soon as it ends, so a later failure keeps the earlier figures):

- ``gateway`` (issue 17): server A (`rollwire serve --engine sglang`, 0.2 of the GPU's memory) with
  `rollwire gateway` in front of it, and SGLang's own OpenAI server (`python -m
  sglang.launch_server`, the same checkpoint, engine arguments and share of memory). Arms,
  interleaved in each repeat: ``floor`` (RolloutClient.generate on A with the chat template's ids,
  logprobs on), ``gateway`` and ``gateway_stream`` (the `openai` client through the gateway),
  ``sglang_http`` and ``sglang_http_stream`` (the same client, the same requests, SGLang's server).
  Greedy with ``ignore_eos``, new tokens per request as in bench/gateway.py (``--lengths``); tokens/s
  and p50 latency at each concurrency.
- ``fleet`` (issue 16): two more servers, B1 and B2, with 0.1 of the GPU's memory each (half of A's),
  behind one RolloutFleet, against A alone through a RolloutClient and through a RolloutFleet of one;
  a closed loop of ``--fleet-concurrency`` requests, arms alternated in each repeat.

Each server's share is set from the memory free when it starts (SGLang sizes its pool as a fraction
of the free memory it finds), and they start one after another.

    python3 bench/gpu/serving_sglang.py [--parts gateway fleet] [--repeats 3]

SGLang's HTTP server needs more than the kit's trimmed wheels: ``jsonschema`` and ``soundfile`` (with
their dependencies) are imported at its start. Add them to ``.whl`` before the device call:
``pip download jsonschema requests soundfile cffi pycparser --python-version 3.12 --only-binary=:all:
--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl`` (then remove the numpy
wheel it pulls in: the image's numpy must stay). ``xgrammar`` is not there either, hence
``--grammar-backend none`` (no structured output is asked for).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # the repository root (bench/, tests/) and bench/ (workload)
from bench.gateway import messages, run_arm  # noqa: E402
from bench.workload import LENGTHS, token_counts  # noqa: E402
from tests.gpu.common import (  # noqa: E402
    KIT_ENGINE_ARGS,
    QWEN05B,
    device_info,
    out_dir,
    stop_process,
    wait_serving,
    write_qwen2,
)

CLI = [sys.executable, "-m", "rollwire.cli", "--log-level", "warning"]
ENGINE = {**KIT_ENGINE_ARGS, "cuda_graph_max_bs_decode": "160"}


def write_chat_model(path: str) -> str:
    from rollwire.models import TINY_VOCAB, tiny_tokenizer

    write_qwen2(path, {**QWEN05B, "vocab_size": TINY_VOCAB}, head_std=0.25)
    tiny_tokenizer().save_pretrained(path)
    return path


def gpu_mib() -> tuple[int, int]:
    """(free, total) MiB of GPU 0, without a CUDA context in this process."""
    out = subprocess.check_output(["nvidia-smi", "--query-gpu=memory.free,memory.total",
                                   "--format=csv,noheader,nounits", "-i", "0"], text=True)
    free, total = (int(x) for x in out.strip().split(","))
    return free, total


def fraction_for(share: float) -> str:
    """The mem_fraction_static that gives a server ``share`` of the whole GPU, from what is free now."""
    free, total = gpu_mib()
    return f"{min(0.95, share * total / free):.4f}"


def free_port(below: int = 55000) -> int:
    """A free port under ``below`` (SGLang's server derives a gRPC port 10000 above its HTTP port)."""
    from rollwire.transports.sockets import free_tcp_endpoint

    for _ in range(200):
        port = int(free_tcp_endpoint(span=1).rpartition(":")[2])
        if port < below:
            return port
    raise RuntimeError(f"no free port under {below}")


def log_file(name: str) -> Any:
    return open(out_dir() / f"serving_{name}.log", "w")


def start_rollwire(model: str, name: str, share: float) -> tuple[subprocess.Popen[bytes], str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = [*CLI, "serve", "--engine", "sglang", "--model", model, "--rollout-endpoint", endpoint,
           "--max-new-tokens-limit", "4096"]
    for k, v in {**ENGINE, "mem_fraction_static": fraction_for(share)}.items():
        cmd += ["--engine-arg", f"{k}={v}"]
    return subprocess.Popen(cmd, stdout=log_file(name), stderr=subprocess.STDOUT), endpoint


async def wait_rollwire(endpoint: str, proc: subprocess.Popen[bytes], timeout: float = 400) -> float:
    """Seconds until `rollwire serve` at ``endpoint`` answers status (tests/gpu/common.wait_serving)."""
    from rollwire import RolloutClient

    t0 = time.monotonic()
    async with RolloutClient(endpoint) as rc:
        await wait_serving(rc, proc, timeout)
    return time.monotonic() - t0


async def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 400) -> float:
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{url} did not answer in {timeout} s")
        await asyncio.sleep(1.0)


def median_rows(reps: list[dict[str, Any]], arms: list[str], base: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for arm in arms:
        row[arm] = {key: round(statistics.median(r[arm][key] for r in reps), 2)
                    for key in ("tokens_s", "p50_ms") if key in reps[0][arm]}
        if arm != base:
            row[arm]["ratio_to_" + base] = round(statistics.median(
                r[arm]["tokens_s"] / r[base]["tokens_s"] for r in reps), 3)
    row["repeats"] = reps
    return row


async def gateway_part(a: argparse.Namespace, model: str, a_endpoint: str, procs: list[Any]) -> dict[str, Any]:
    import openai

    from rollwire import RolloutClient, SamplingParams
    from rollwire.gateway.chat import ChatFormat, canonical, load_tokenizer
    from rollwire.gateway.schemas import Message

    gw_port, sg_port = free_port(), free_port()
    gateway = subprocess.Popen([*CLI, "gateway", "--host", "127.0.0.1", "--port", str(gw_port), "--model", model,
                                "--rollout-endpoint", a_endpoint], stdout=log_file("gateway"), stderr=subprocess.STDOUT)
    procs.append(gateway)
    sg_cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--host", "127.0.0.1",
              "--port", str(sg_port), "--attention-backend", ENGINE["attention_backend"],
              "--sampling-backend", ENGINE["sampling_backend"], "--cuda-graph-max-bs-decode",
              ENGINE["cuda_graph_max_bs_decode"], "--random-seed", "0", "--log-level", "warning",
              "--grammar-backend", "none",
              "--mem-fraction-static", fraction_for(0.2)]
    sglang_http = subprocess.Popen(sg_cmd, stdout=log_file("sglang_http"), stderr=subprocess.STDOUT)
    procs.append(sglang_http)
    start = {"gateway_s": round(await wait_http(f"http://127.0.0.1:{gw_port}/health", gateway), 1),
             "sglang_http_s": round(await wait_http(f"http://127.0.0.1:{sg_port}/v1/models", sglang_http), 1)}
    print(f"gateway part: started {start}", flush=True)

    chat = ChatFormat(load_tokenizer(model))
    prompts = [chat.encode(chat.render([canonical(Message.model_validate(m)) for m in messages(i)], None,
                                       generation_prompt=True)) for i in range(64)]
    counts = token_counts(a.max_tokens, a.lengths)
    sps = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in counts]
    body: dict[str, Any] = {"model": model, "temperature": 0, "extra_body": {"ignore_eos": True}}
    arms = ["floor", "gateway", "gateway_stream", "sglang_http", "sglang_http_stream"]
    async with RolloutClient(a_endpoint) as rc, \
            openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="x", max_retries=0,
                               timeout=600) as gw, \
            openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{sg_port}/v1", api_key="x", max_retries=0,
                               timeout=600) as sg:
        async def floor(i: int) -> int:
            out = await rc.generate(prompts[i % 64], sps[i % len(sps)], return_logprob=True)
            assert not isinstance(out, list)
            return len(out.output_ids)

        def chat_call(client: openai.AsyncOpenAI):  # type: ignore[no-untyped-def]
            async def call(i: int) -> int:
                r = await client.chat.completions.create(messages=messages(i % 64), max_tokens=counts[i % len(counts)],
                                                         **body)
                assert r.usage is not None
                return r.usage.completion_tokens
            return call

        def stream_call(client: openai.AsyncOpenAI):  # type: ignore[no-untyped-def]
            async def call(i: int) -> int:
                r = await client.chat.completions.create(messages=messages(i % 64), max_tokens=counts[i % len(counts)],
                                                         stream=True, stream_options={"include_usage": True}, **body)
                n = 0
                async for ch in r:
                    if ch.usage is not None:
                        n = ch.usage.completion_tokens
                return n
            return call

        calls = {"floor": floor, "gateway": chat_call(gw), "gateway_stream": stream_call(gw),
                 "sglang_http": chat_call(sg), "sglang_http_stream": stream_call(sg)}
        # the same chat to the same tokens on both faces (greedy, random weights: compared as text)
        g0 = await gw.chat.completions.create(messages=messages(0), max_tokens=counts[0], **body)
        s0 = await sg.chat.completions.create(messages=messages(0), max_tokens=counts[0], **body)
        same_text = g0.choices[0].message.content == s0.choices[0].message.content
        for arm in arms:
            await run_arm(calls[arm], 8, 2)  # warm-up (CUDA graphs, JIT)
        rows = []
        for conc in a.concurrency:
            per_client = max(2, -(-a.min_requests // conc))
            reps = []
            for rep in range(a.repeats):
                order = arms[rep % len(arms):] + arms[:rep % len(arms)]
                got = {arm: await run_arm(calls[arm], conc, per_client) for arm in order}
                reps.append(got)
                print(f"  c={conc} repeat {rep + 1}: " + ", ".join(
                    f"{arm} {got[arm]['tokens_s']:.0f} tok/s p50 {got[arm]['p50_ms']:.1f} ms" for arm in arms),
                      flush=True)
            row = {"concurrency": conc, "requests": conc * per_client, **median_rows(reps, arms, "floor")}
            for arm in ("gateway", "gateway_stream"):
                twin = arm.replace("gateway", "sglang_http")
                row[arm]["ratio_to_" + twin] = round(statistics.median(
                    r[arm]["tokens_s"] / r[twin]["tokens_s"] for r in reps), 3)
            rows.append(row)
    return {"start": start, "same_text_gateway_vs_sglang_http": same_text, "rows": rows}


async def fleet_part(a: argparse.Namespace, model: str, a_endpoint: str, procs: list[Any]) -> dict[str, Any]:
    from rollwire import RolloutClient, RolloutFleet, SamplingParams

    eps, start = [], {}
    for name in ("b1", "b2"):
        p, ep = start_rollwire(model, name, 0.1)
        procs.append(p)
        start[name] = round(await wait_rollwire(ep, p), 1)
        eps.append(ep)
    print(f"fleet part: started {start}", flush=True)
    sp = SamplingParams(max_new_tokens=a.fleet_tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(7)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.randrange(16, 64))] for _ in range(256)]

    async def closed_loop(gen: Any, concurrency: int) -> dict[str, float]:
        tokens, end = 0, time.monotonic() + a.seconds

        async def loop(i: int) -> None:
            nonlocal tokens
            k = 0
            while time.monotonic() < end:
                out = await gen(prompts[(i * 31 + k) % len(prompts)], sp)
                tokens += len(out.output_ids)
                k += 1

        t0 = time.monotonic()
        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        return {"tokens_s": tokens / (time.monotonic() - t0)}

    arms = ["one", "one_fleet", "two_fleet"]
    rows = []
    async with RolloutClient(a_endpoint) as rc, RolloutFleet([a_endpoint]) as f1, RolloutFleet(eps) as f2:
        await f1.wait_ready(servers=1, timeout=60)
        await f2.wait_ready(servers=2, timeout=60)
        gens = {"one": rc.generate, "one_fleet": f1.generate, "two_fleet": f2.generate}
        for arm in arms:
            await closed_loop(gens[arm], 16)  # warm-up
        for conc in a.fleet_concurrency:
            reps = []
            for rep in range(a.repeats):
                order = arms[rep % len(arms):] + arms[:rep % len(arms)]
                before = {e: s["tokens"] for e, s in f2.stats().items()}
                got = {arm: await closed_loop(gens[arm], conc) for arm in order}
                # tokens each of B1, B2 made in the two_fleet arm: how evenly the fleet split the load
                got["two_fleet_tokens_per_server"] = {e: s["tokens"] - before[e] for e, s in f2.stats().items()}
                reps.append(got)
                print(f"  c={conc} repeat {rep + 1}: " + ", ".join(
                    f"{arm} {got[arm]['tokens_s']:.0f} tok/s" for arm in arms), flush=True)
            rows.append({"concurrency": conc, **median_rows(reps, arms, "one")})
        stats = f2.stats()
        # the adapter's fair admission on A: SGLang's limit as read at start, requests held for a slot
        counters = (await rc.status()).counters
        admission = {k: counters.get(f"engine.{k}") for k in ("max_running_requests", "held_for_a_slot")}
        print(f"fleet part: server A admission {admission}", flush=True)
    return {"start": start, "rows": rows, "two_fleet_stats": stats, "a_admission": admission}


def table(result: dict[str, Any]) -> str:
    lines = []
    gw = result.get("gateway", {})
    if "rows" in gw:
        lines.append("conc | floor tok/s | gateway tok/s (x floor, x sglang_http) | sglang_http tok/s (x floor) | "
                     "gateway_stream (x floor, x sglang stream) | sglang_http_stream (x floor) | p50 ms floor/gw/sgl")
        for r in gw["rows"]:
            f, g, s, gs, ss = (r[k] for k in ("floor", "gateway", "sglang_http", "gateway_stream",
                                              "sglang_http_stream"))
            lines.append(f"{r['concurrency']:>4} | {f['tokens_s']:>11} | {g['tokens_s']:>8} ({g['ratio_to_floor']}, "
                         f"{g['ratio_to_sglang_http']}) | {s['tokens_s']:>8} ({s['ratio_to_floor']}) | "
                         f"{gs['tokens_s']:>8} ({gs['ratio_to_floor']}, {gs['ratio_to_sglang_http_stream']}) | "
                         f"{ss['tokens_s']:>8} ({ss['ratio_to_floor']}) | {f['p50_ms']}/{g['p50_ms']}/{s['p50_ms']}")
    fl = result.get("fleet", {})
    if "rows" in fl:
        lines.append("conc | one server (0.2 of memory) tok/s | same via RolloutFleet (x) | two servers (0.1 each) "
                     "via RolloutFleet (x)")
        for r in fl["rows"]:
            lines.append(f"{r['concurrency']:>4} | {r['one']['tokens_s']:>10} | {r['one_fleet']['tokens_s']:>10} "
                         f"({r['one_fleet']['ratio_to_one']}) | {r['two_fleet']['tokens_s']:>10} "
                         f"({r['two_fleet']['ratio_to_one']})")
    for part in ("gateway", "fleet"):
        if "error" in result.get(part, {}):
            lines.append(f"{part}: {result[part]['error']}")
    return "\n".join(lines)


async def main(a: argparse.Namespace) -> int:
    model = write_chat_model(a.model)
    procs: list[Any] = []
    result: dict[str, Any] = {"device": device_info() if a.device_info else {}, "args": vars(a)}
    path = out_dir() / "serving_sglang.json"
    failed = 0
    try:
        p, a_endpoint = start_rollwire(model, "a", 0.2)
        procs.append(p)
        result["server_a_start_s"] = round(await wait_rollwire(a_endpoint, p), 1)
        print(f"server A up in {result['server_a_start_s']} s", flush=True)
        for part, fn in (("gateway", gateway_part), ("fleet", fleet_part)):
            if part not in a.parts:
                continue
            try:
                result[part] = await fn(a, model, a_endpoint, procs)
            except Exception as e:  # keep the other part's figures
                import traceback

                traceback.print_exc()
                result[part] = {"error": f"{type(e).__name__}: {e}"}
                failed += 1
            path.write_text(json.dumps(result, indent=1, default=str))
    finally:
        for proc in reversed(procs):
            stop_process(proc, timeout=30)
    print(table(result))
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["gateway", "fleet"], choices=["gateway", "fleet"])
    ap.add_argument("--model", default="/tmp/rw-chat-qwen05b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--lengths", choices=LENGTHS, default="mixed", help="bench/workload.py")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--fleet-concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--fleet-tokens", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--device-info", action="store_true", help="import torch/sglang here to name the GPU")
    sys.exit(asyncio.run(main(ap.parse_args())))
