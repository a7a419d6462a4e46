"""Issue 5 end to end on one GPU: `rollwire serve --engine sglang --mode colocated` (a child process),
a trainer process pushing weights from its own GPU memory with TrainerPublisher (cuda_ipc), a
rollout-worker process keeping requests in flight, and this process as the client. The governor
pauses, releases, wakes, loads and resumes around every push.

Checks (PASS/FAIL lines, JSON to $OUT/e2e_sglang.json):
1. the trainer's push of perturbed weights changes greedy outputs; pushing the originals back
   returns them exactly (cuda_ipc, chosen by ``auto``);
2. colocated cycles (``train_start`` -> weights, KV cache and graphs released; push -> weights
   woken, loaded, KV and graphs woken): GPU memory freed each time, no growth over the cycles;
   the first cycles run while the worker keeps requests in flight: each gets exactly one terminal
   reply, finishes, and its version spans are contiguous; greedy outputs after all cycles equal
   the baseline;
3. figures: the trainer's push_weights() -> applied for the whole model against a direct
   ``update_weights_from_tensor`` of the same CUDA tensors on an sglang.Engine in this process
   (same GPU, same run); release / resume time and GPU memory freed per tag (rollwire's adapter).

    python tests/gpu/e2e_sglang.py MODEL_DIR [--cycles 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import CHECK_ENGINE_ARGS, Report, device_info, gib_free, prompts, stop_process, wait_serving  # noqa: E402

PUSH_TRANSPORT = "auto"  # must resolve to cuda_ipc: the trainer's tensors are on the server's GPU


def trainer_proc(endpoint: str, model: str, commands: Any, results: Any) -> None:
    """The trainer: the model's tensors on the GPU; pushes and step messages as ``commands`` say."""
    import torch
    from safetensors.torch import load_file

    original = {k: v.cuda() for k, v in load_file(f"{model}/model.safetensors").items()}
    g = torch.Generator(device="cuda").manual_seed(3)
    perturbed = {k: v + 0.02 * torch.randn(v.shape, generator=g, device="cuda", dtype=torch.float32).to(v.dtype)
                 for k, v in original.items()}
    weights = {"original": original, "perturbed": perturbed}

    async def drive() -> None:
        from rollwire.weightsync.publisher import TrainerPublisher

        async with TrainerPublisher(endpoint, timeout_s=120) as tp:
            results.put(("started", sum(t.numel() * t.element_size() for t in original.values())))
            loop = asyncio.get_running_loop()
            while (cmd := await loop.run_in_executor(None, commands.get)) is not None:
                try:
                    if cmd[0] == "push":
                        _, version, kind = cmd
                        torch.cuda.synchronize()
                        rep = await tp.push_weights(version, weights[kind], transport=PUSH_TRANSPORT)
                        results.put(("pushed", rep.version, rep.transport, rep.receivers, rep.seconds, rep.bytes,
                                     rep.prepare_s, rep.wait_s))
                    else:
                        _, step, phase = cmd
                        t0 = time.perf_counter()
                        receivers = await tp.publish_step(step, phase)
                        results.put(("stepped", receivers, time.perf_counter() - t0))
                except Exception as e:  # reported to the driver, which fails the check
                    results.put(("error", f"{type(e).__name__}: {e}"))

    asyncio.run(drive())


async def main(a: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import load_file

    from rollwire import RolloutClient, SamplingParams
    from rollwire.engines.sglang import SGLangEngine
    from rollwire.transports.sockets import free_tcp_endpoint

    rep = Report("e2e_sglang")
    rollout_ep, trainer_ep = free_tcp_endpoint(), free_tcp_endpoint()
    args = {**CHECK_ENGINE_ARGS, "mem_fraction_static": "0.25"}
    cmd = [sys.executable, "-m", "rollwire.cli", "--log-level", "info", "serve", "--engine", "sglang", "--model",
           a.model, "--rollout-endpoint", rollout_ep, "--trainer-endpoint", trainer_ep, "--mode", "colocated",
           "--pause-policy", "retract", "--receiver-id", "gpu-server", "--tp", "1"]
    for k, v in args.items():
        cmd += ["--engine-arg", f"{k}={v}"]
    log = open(os.path.join(os.environ.get("OUT", "/tmp"), "e2e_serve.log"), "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    trainer = ctx.Process(target=trainer_proc, args=(trainer_ep, a.model, commands, results))
    trainer.start()
    loop = asyncio.get_running_loop()
    # the floor's engine (rollwire's adapter around sglang.Engine) starts here meanwhile
    eng = SGLangEngine(a.model, engine_args=args)
    await eng.start()

    async def result() -> Any:
        return await loop.run_in_executor(None, results.get, True, 300)

    started = await result()
    rep.check("trainer process started", started[0] == "started", detail=started)
    model_bytes = started[1]
    ps = prompts(4, eng.vocab_size, seed=11, lo=8, hi=24)
    greedy = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    version = 0

    async def push(kind: str) -> tuple[Any, float]:
        nonlocal version
        version += 1
        t0 = time.perf_counter()
        commands.put(("push", version, kind))
        r = await result()
        return r, time.perf_counter() - t0

    try:
        async with RolloutClient(rollout_ep, timeout=300) as rc:
            await wait_serving(rc, server)

            async def outputs() -> list[list[int]]:
                return [list((await rc.generate(p, greedy)).output_ids) for p in ps]  # type: ignore[union-attr]

            await outputs()
            baseline = await outputs()
            # 1. perturbed, then the originals
            r1, _ = await push("perturbed")
            rep.check("push of perturbed weights applied over cuda_ipc",
                      r1[:4] == ("pushed", 1, "cuda_ipc", ["gpu-server"]), reply=r1)
            changed = await outputs()
            rep.check("greedy outputs changed after the perturbed push",
                      sum(x != y for x, y in zip(changed, baseline, strict=True)) == len(ps))
            r2, _ = await push("original")
            back = await outputs()
            rep.check("greedy outputs return exactly after pushing the originals back",
                      r2[0] == "pushed" and back == baseline, same=sum(x == y for x, y in zip(back, baseline,
                                                                                             strict=True)))
            # 3a. push_weights() -> applied, server serving (pause, load, resume), nothing in flight
            timed, prepared, waited, first_timed = [], [], [], version + 1
            for _ in range(a.repeats):
                r, _ = await push("original")
                timed.append(r[4] if r[0] == "pushed" else float("nan"))
                prepared.append(r[6] if r[0] == "pushed" else float("nan"))
                waited.append(r[7] if r[0] == "pushed" else float("nan"))
            rep.figure("rollwire_push_s", {"runs_s": [round(x, 4) for x in timed],
                                           "median_s": round(statistics.median(timed), 4), "bytes": model_bytes,
                                           "trainer_prepare_median_s": round(statistics.median(prepared), 4),
                                           # the announcement to the last outcome, as the trainer saw it
                                           "trainer_wait_median_s": round(statistics.median(waited), 4)})
            log.flush()
            rep.figure("server_split_median_s", server_split(log.name, range(first_timed, version + 1)))
            # 2. colocated cycles, the first ones under load
            worker = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), "load"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            job = json.dumps({"endpoint": rollout_ep, "n": 32, "max_new_tokens": a.load_tokens,
                              "vocab": eng.vocab_size, "grace_s": 1.0, "stream": True})
            talk = loop.run_in_executor(None, worker.communicate, job)
            async with asyncio.timeout(120):
                while (await rc.status()).in_flight < 32:  # type: ignore[union-attr]
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # every request is generating
            cycles = []
            for c in range(a.cycles):
                f0 = gib_free()
                commands.put(("step", 100 + c, "train_start"))
                s = await result()
                f1 = gib_free()
                r, _ = await push("original")
                f2 = gib_free()
                cycles.append({"cycle": c, "step": s[0], "release_s": round(s[2], 4) if s[0] == "stepped" else None,
                               "push_s": round(r[4], 4) if r[0] == "pushed" else r, "freed_gib": round(f1 - f0, 3),
                               "free_after_gib": round(f2, 3), "under_load": worker.returncode is None})
                if c == a.load_cycles - 1:
                    stdout, stderr = await talk
            if a.cycles < a.load_cycles:
                stdout, stderr = await talk
            rep.figure("colocated_cycles", cycles)
            free_after = [c["free_after_gib"] for c in cycles]
            rep.check(f"colocated: {a.cycles} cycles, each frees GPU memory, no growth",
                      all(c["step"] == "stepped" and c["freed_gib"] > 1 for c in cycles)
                      and max(free_after) - min(free_after) < 0.25,
                      freed=[c["freed_gib"] for c in cycles], free_after=free_after)
            w: dict[str, Any] = (json.loads(stdout.strip().splitlines()[-1]) if worker.returncode == 0
                                 else {"error": stderr[-2000:]})
            terminal, kinds = w.get("terminal", {}), w.get("kinds", {})
            rep.figure("worker_fates", {rid: f"{kinds.get(rid)}, {n} terminal" for rid, n in sorted(terminal.items())})
            rep.check(f"{a.load_cycles} cycles under load: 32 requests, exactly one terminal reply each, all "
                      "finished (retracted and continued), spans contiguous, more than one version seen",
                      len(terminal) == 32 and all(n == 1 for n in terminal.values())
                      and all(k == "length" for k in kinds.values()) and w.get("spans_ok") is True
                      and len(w.get("versions_seen", [])) >= 2,
                      kinds=sorted(set(kinds.values())), versions_seen=w.get("versions_seen"), err=w.get("error", ""))
            after = await outputs()
            rep.check("greedy outputs after every cycle equal the baseline", after == baseline,
                      same=sum(x == y for x, y in zip(after, baseline, strict=True)))
        # 3b. floors on the engine in this process: direct update_weights_from_tensor, per-tag release
        await floors(eng, a, rep, [(k, v.cuda()) for k, v in load_file(f"{a.model}/model.safetensors").items()])
        push_med = rep.figures["rollwire_push_s"]["median_s"]
        direct_med = rep.figures["direct_update_weights_from_tensor_s"]["median_s"]
        rep.figure("push_over_direct_update", round(push_med / direct_med, 3))
        flat_med = rep.figures["direct_update_flattened_bucket_s"]["median_s"]
        rep.figure("push_over_direct_flattened_update", round(push_med / flat_med, 3))
    except Exception as e:
        rep.fail("e2e", e)
    finally:
        commands.put(None)
        trainer.join(30)
        stop_process(server)
        log.close()
        await eng.shutdown()
    rep.write({"device": device_info(), "model": a.model, "torch": torch.__version__})
    return 0 if all(c["ok"] for c in rep.checks) else 1


def server_split(path: str, versions: range) -> dict[str, float]:
    """Medians, over the timed pushes, of the serve log's timings: the receiver's (received to
    applied, staging, pause, load), the governor's, and the SGLang adapter's (staged views vs
    SGLang's own update)."""
    keys = {"version_applied": ("seconds", "stage_s", "resolve_s", "apply_s", "after_load_s", "pause_s", "load_s"),
            "version_loaded": ("governor_s",),
            "sglang_weights_loaded": ("staged_s", "sglang_s", "total_s")}
    seen: dict[str, list[float]] = {}
    with open(path, errors="replace") as f:
        lines = f.readlines()
    for line in lines:
        for event, fields in keys.items():
            if event not in line:
                continue
            m = re.search(r"version[=:\"' ]+(\d+)", line)
            if m is None or int(m.group(1)) not in versions:
                continue
            for f in fields:
                v = re.search(rf"\b{f}[=:\"' ]+([0-9.]+)", line)
                if v:
                    seen.setdefault(f"{event}.{f}", []).append(float(v.group(1)))
    return {k: round(statistics.median(v), 4) for k, v in seen.items()}


async def floors(eng: Any, a: argparse.Namespace, rep: Report, cuda: list) -> None:
    import torch
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput
    from sglang.srt.utils import MultiprocessingSerializer

    ts = []
    for _ in range(a.repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        req = UpdateWeightsFromTensorReqInput(serialized_named_tensors=[MultiprocessingSerializer.serialize(cuda)],
                                              flush_cache=True)
        await eng._eng.tokenizer_manager.update_weights_from_tensor(req, None)
        ts.append(time.perf_counter() - t0)
    rep.figure("direct_update_weights_from_tensor_s", {"runs_s": [round(x, 4) for x in ts[1:]],
                                                       "median_s": round(statistics.median(ts[1:]), 4)})
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    ts = []  # the same, the way verl and slime call it: one flattened bucket (torch.cat of the tensors)
    for _ in range(a.repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b = FlattenedTensorBucket(named_tensors=cuda)
        payload = {"flattened_tensor": b.get_flattened_tensor(), "metadata": b.get_metadata()}
        req = UpdateWeightsFromTensorReqInput(serialized_named_tensors=[MultiprocessingSerializer.serialize(payload)],
                                              flush_cache=True, load_format="flattened_bucket")
        await eng._eng.tokenizer_manager.update_weights_from_tensor(req, None)
        ts.append(time.perf_counter() - t0)
    rep.figure("direct_update_flattened_bucket_s", {"runs_s": [round(x, 4) for x in ts[1:]],
                                                    "median_s": round(statistics.median(ts[1:]), 4)})
    version = 1000
    per_tag = {}
    for tag in ("kv_cache", "cuda_graph", "weights"):
        rel, res, freed = [], [], []
        for _ in range(3):
            await eng.pause("retract")
            f0 = gib_free()
            t0 = time.perf_counter()
            await eng.release_memory([tag])
            rel.append(time.perf_counter() - t0)
            freed.append(gib_free() - f0)
            t0 = time.perf_counter()
            await eng.resume_memory([tag])
            if tag == "weights":
                version += 1
                await eng.update_weights(cuda, version=version)  # released weights are gone: re-send
            res.append(time.perf_counter() - t0)
            await eng.resume()
        per_tag[tag] = {"release_s": round(statistics.median(rel), 4), "resume_s": round(statistics.median(res), 4),
                        "freed_gib": round(statistics.median(freed), 3),
                        "resume_includes": "update_weights" if tag == "weights" else ""}
    rep.figure("release_resume_per_tag", per_tag)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--load-cycles", type=int, default=5)
    ap.add_argument("--load-tokens", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=7)
    import uvloop

    sys.exit(uvloop.run(main(ap.parse_args())))
