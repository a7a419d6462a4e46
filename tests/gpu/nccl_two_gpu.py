"""Issue 8 on a two-GPU machine: weights pushed by NCCL broadcast into rollwire's SGLang engine.

    python tests/gpu/nccl_two_gpu.py [MODEL_DIR]     # writes $OUT/nccl_two_gpu.json; needs 2 GPUs

GPU 0: SGLangEngine (rollwire's adapter) in this process. GPU 1: a trainer process that hosts the
weight group with rollwire's own ``weightsync.broadcast.BroadcastGroup`` (rank 0, NCCL,
``NCCL_CUMEM_ENABLE=0``) and broadcasts every tensor in checkpoint order. The engine joins with
``join_weight_group`` and receives with ``update_weights_from_distributed``. SGLang's side builds
its group through ``init_custom_process_group``, which keys the rendezvous store under
``PrefixStore(group_name)``: the trainer wraps its store the same way (the one change
BroadcastGroup needs to talk to SGLang directly; see the report of this script's author).

Checks (each prints PASS/FAIL and the run goes on):
  1. greedy outputs change after an nccl push of perturbed weights, return exactly after the originals;
  2. 5 nccl pushes (pause retract / in_place alternating) with streamed and non-streamed requests in
     flight: one terminal delta each, versions in order, every version seen;
  3. a trainer killed mid-broadcast: the push fails within its timeout, the old version serves,
     the group is torn down, and a new trainer's push succeeds;
then a benchmark: bare torch.distributed broadcast (two plain processes, before the engine
starts), direct ``TokenizerManager.update_weights_from_distributed``, the adapter's call, and the
adapter's call inside pause/resume; medians of 5, GB/s over the checkpoint's bytes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
               "NCCL_CUMEM_ENABLE": "0"}.items():
    os.environ[_k] = _v  # multicast off on shared hosts; CUMEM as SGLang sets it for its processes
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import KIT_ENGINE_ARGS, QWEN05B, Report, device_info, prompts, write_qwen2  # noqa: E402

GROUP = "rollwire-nccl"
REPEATS = 5


# -- the trainer (GPU 1, its own process) --------------------------------------------------------------


def trainer(conn: Any, model: str, gpu: int) -> None:
    """Commands: ("host",) -> init_method; ("connect",); ("push", scale, die_after) -> seconds;
    ("bare_connect", init_method, rank); ("bare", n) -> seconds per full pass; ("stop",)."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from rollwire.weightsync.broadcast import BroadcastGroup

    torch.cuda.set_device(gpu)
    named = [(k, v.to(f"cuda:{gpu}").contiguous()) for k, v in load_file(f"{model}/model.safetensors").items()]
    group: Any = None
    conn.send(("ready", [(k, str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in named],
               sum(v.numel() * v.element_size() for _, v in named)))
    while True:
        msg = conn.recv()
        if msg[0] == "host":
            group = BroadcastGroup.host("127.0.0.1", world_size=2, backend="nccl", timeout_s=120.0)
            group._store = dist.PrefixStore(GROUP, group._store)  # SGLang's init_custom_process_group keying
            conn.send(group.init_method)
        elif msg[0] == "bare_host":  # a plain group with another plain process (no SGLang)
            group = BroadcastGroup.host("127.0.0.1", world_size=2, backend="nccl", timeout_s=120.0)
            conn.send(group.init_method)
        elif msg[0] == "connect":
            t = time.perf_counter()
            group.connect()
            conn.send(time.perf_counter() - t)
        elif msg[0] == "push":
            _, scale, die_after = msg
            tensors = [v if scale == 1.0 else (v.float() * scale + 0.01).to(v.dtype) for _, v in named]
            torch.cuda.synchronize()
            t = time.perf_counter()
            for i, v in enumerate(tensors):
                if die_after is not None and i == die_after:
                    torch.cuda.synchronize()
                    os._exit(17)  # killed mid-broadcast
                group.broadcast(v)
            torch.cuda.synchronize()
            conn.send(time.perf_counter() - t)
        elif msg[0] == "bare_recv":  # rank 1 of the bare benchmark
            _, init_method, n = msg
            g = BroadcastGroup.join(init_method, 1, 2, backend="nccl", timeout_s=120.0)
            g.connect()
            bufs = [torch.empty_like(v) for _, v in named]
            for _ in range(n):
                for b in bufs:
                    g.broadcast(b)
            torch.cuda.synchronize()
            g.close()
            conn.send("done")
        elif msg[0] == "bare_send":
            _, n = msg
            group.connect()
            times = []
            for _ in range(n):
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _, v in named:
                    group.broadcast(v)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            group.close()
            group = None
            conn.send(times)
        elif msg[0] == "close":
            if group is not None:
                group.close()
                group = None
            conn.send("closed")
        else:
            conn.send("bye")
            return


class Trainer:
    def __init__(self, model: str, gpu: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=trainer, args=(child, model, gpu), daemon=True)
        self.proc.start()
        _, self.specs, self.nbytes = self.recv(300)

    def recv(self, timeout: float = 180.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("trainer did not answer")
        return self.conn.recv()

    async def ask(self, *msg: Any, timeout: float = 180.0) -> Any:
        self.conn.send(msg)
        return await asyncio.get_running_loop().run_in_executor(None, self.recv, timeout)


# -- checks ------------------------------------------------------------------------------------------------


async def generate(eng: Any, rid: str, prompt: list[int], n: int = 32, stream: bool = True) -> dict[str, Any]:
    from rollwire.engines.base import EngineRequest
    from rollwire.messages.generate import SamplingParams

    out: dict[str, Any] = {"tokens": [], "versions": [], "finals": 0, "finish": None}
    req = EngineRequest(rid, prompt, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True), stream=stream)
    async for d in eng.generate(req):
        out["tokens"] += d.token_ids
        out["versions"] += [d.weight_version] * len(d.token_ids)
        if d.finish_reason is not None:
            out["finals"] += 1
            out["finish"] = d.finish_reason
    return out


async def greedy(eng: Any, ps: list[list[int]], tag: str) -> list[list[int]]:
    outs = await asyncio.gather(*(generate(eng, f"{tag}{i}", p) for i, p in enumerate(ps)))
    return [o["tokens"] for o in outs]


async def push(eng: Any, tr: Trainer, version: int, scale: float, *, die_after: int | None = None,
               timeout_s: float = 60.0) -> tuple[float, Any]:
    """Engine receive and trainer broadcast together; returns (engine seconds, trainer answer)."""
    tr.conn.send(("push", scale, die_after))
    t = time.perf_counter()
    await eng.update_weights_from_distributed(tr.specs, version, group_name=GROUP, timeout_s=timeout_s)
    dt = time.perf_counter() - t
    answer = await asyncio.get_running_loop().run_in_executor(None, tr.recv, 60.0)
    return dt, answer


async def join(eng: Any, tr: Trainer) -> float:
    init_method = await tr.ask("host")
    host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
    t = time.perf_counter()
    tr.conn.send(("connect",))
    await eng.join_weight_group(host, int(port), rank_offset=1, world_size=2, group_name=GROUP)
    await asyncio.get_running_loop().run_in_executor(None, tr.recv, 120.0)
    return time.perf_counter() - t


async def main(model: str) -> int:
    import torch

    from rollwire.engines.base import EngineError
    from rollwire.engines.sglang import SGLangEngine

    rep = Report("nccl_two_gpu")
    if torch.cuda.device_count() < 2:
        rep.check("two GPUs", False, found=torch.cuda.device_count())
        rep.write({"device": device_info()})
        return 1
    write_qwen2(model, QWEN05B, seed=0)
    tr = Trainer(model, gpu=1)
    gb = tr.nbytes / 1e9
    rep.figure("weights_gb", round(gb, 3))

    # bare torch.distributed broadcast between the two GPUs (trainer -> a plain helper on GPU 0)
    try:
        helper = Trainer(model, gpu=0)
        init_method = await tr.ask("bare_host")
        helper.conn.send(("bare_recv", init_method, REPEATS + 1))
        times = (await tr.ask("bare_send", REPEATS + 1, timeout=300))[1:]
        await asyncio.get_running_loop().run_in_executor(None, helper.recv, 60.0)
        await helper.ask("stop")
        med = statistics.median(times)
        rep.figure("bare_broadcast", {"runs_s": [round(x, 4) for x in times], "median_s": round(med, 4),
                                      "gb_s": round(gb / med, 1)})
    except Exception as e:
        rep.fail("bare broadcast benchmark", e)

    eng = SGLangEngine(model, engine_args={**KIT_ENGINE_ARGS, "mem_fraction_static": "0.5", "base_gpu_id": "0"})
    await eng.start()
    ps = prompts(8, QWEN05B["vocab_size"], seed=11)
    await greedy(eng, ps, "warm")
    base = await greedy(eng, ps, "base")
    version = 0
    try:
        rep.figure("join_s", round(await join(eng, tr), 3))
        # 1. perturbed, then the originals
        await eng.pause("retract")
        version += 1
        dt, tb = await push(eng, tr, version, 1.5)
        await eng.resume()
        changed = await greedy(eng, ps, "p")
        await eng.pause("retract")
        version += 1
        await push(eng, tr, version, 1.0)
        await eng.resume()
        back = await greedy(eng, ps, "o")
        rep.check("nccl push of perturbed weights changes greedy outputs; the originals restore them exactly",
                  changed != base and back == base, changed=sum(c != b for c, b in zip(changed, base, strict=True)),
                  restored=sum(c == b for c, b in zip(back, base, strict=True)), of=len(ps),
                  first_push_s=round(dt, 3), trainer_s=round(tb, 3))

        # 2. five pushes with requests in flight
        tasks = [asyncio.ensure_future(generate(eng, f"f{i}", p, n=600, stream=i % 2 == 0))
                 for i, p in enumerate(ps * 2)]
        await asyncio.sleep(0.3)
        v_first = version + 1
        for k in range(5):
            await eng.pause("retract" if k % 2 == 0 else "in_place")
            version += 1
            await push(eng, tr, version, 1.5 if k % 2 == 0 else 1.0)
            await eng.resume()
            await asyncio.sleep(0.15)
        outs = await asyncio.gather(*tasks)
        ok = all(o["finals"] == 1 and o["finish"] == "length" and len(o["tokens"]) == 600 for o in outs)
        ok &= all(o["versions"] == sorted(o["versions"]) for o in outs)
        seen = sorted({v for o in outs for v in o["versions"]})
        rep.check("5 nccl pushes with 16 requests in flight: one terminal each, versions in order",
                  ok and seen[-1] == version and len(seen) >= 3, versions_seen=seen, from_version=v_first - 1)

        # 3. the trainer dies mid-broadcast
        serving = version
        await eng.pause("retract")
        t = time.perf_counter()
        try:
            await push(eng, tr, version + 1, 1.5, die_after=len(tr.specs) // 2, timeout_s=30.0)
            failed, msg = False, "push succeeded"
        except (EngineError, TimeoutError) as e:
            failed, msg = True, str(e)
        fail_s = time.perf_counter() - t
        await asyncio.wait_for(eng.resume(), 60)
        after = await asyncio.wait_for(greedy(eng, ps, "k"), 120)
        rep.check("trainer killed mid-broadcast: the push fails in time, the old version serves, group torn down",
                  failed and fail_s < 45 and eng.info().weight_version == serving and after == base
                  and GROUP not in eng.info().extra["weight_groups"], fail_s=round(fail_s, 2), message=msg[:300],
                  version=eng.info().weight_version, outputs_equal_originals=after == base)
        tr = Trainer(model, gpu=1)
        await join(eng, tr)
        await eng.pause("retract")
        version += 1
        await push(eng, tr, version, 1.0)
        await eng.resume()
        rep.check("a new trainer's push works after that", await greedy(eng, ps, "n") == base, version=version)

        # benchmark: adapter (with and without pause/resume) vs direct TokenizerManager call
        bench: dict[str, list[float]] = {"direct_update_weights_from_distributed": [], "adapter": [],
                                         "adapter_with_pause_resume": [], "trainer_broadcast": []}
        io = eng._io
        for _ in range(REPEATS):
            await eng.pause("retract")
            obj = io.UpdateWeightsFromDistributedReqInput(
                names=[n for n, _, _ in tr.specs], dtypes=[d for _, d, _ in tr.specs],
                shapes=[s for _, _, s in tr.specs], group_name=GROUP, flush_cache=True, abort_all_requests=False)
            tr.conn.send(("push", 1.0, None))
            t = time.perf_counter()
            ok, message = await eng._tm.update_weights_from_distributed(obj, None)
            if not ok:
                raise RuntimeError(f"direct update_weights_from_distributed: {message}")
            bench["direct_update_weights_from_distributed"].append(time.perf_counter() - t)
            bench["trainer_broadcast"].append(await asyncio.get_running_loop().run_in_executor(None, tr.recv, 60.0))
            version += 1
            dt, _ = await push(eng, tr, version, 1.0)
            bench["adapter"].append(dt)
            await eng.resume()
            t = time.perf_counter()
            await eng.pause("retract")
            version += 1
            await push(eng, tr, version, 1.0)
            await eng.resume()
            bench["adapter_with_pause_resume"].append(time.perf_counter() - t)
        figs = {k: {"runs_s": [round(x, 4) for x in v], "median_s": round(statistics.median(v), 4),
                    "gb_s": round(gb / statistics.median(v), 1)} for k, v in bench.items()}
        d = figs["direct_update_weights_from_distributed"]["median_s"]
        figs["adapter_over_direct"] = round(figs["adapter"]["median_s"] / d, 3)
        figs["adapter_with_pause_resume_over_direct"] = round(figs["adapter_with_pause_resume"]["median_s"] / d, 3)
        rep.figure("push_benchmark", figs)
        rep.check("outputs still the originals after the benchmark", await greedy(eng, ps, "z") == base)
    except Exception as e:
        rep.fail("nccl run", e)
    finally:
        rep.write({"device": device_info(), "model": model, "engine_info": vars(eng.info())})
        try:
            await asyncio.wait_for(eng.shutdown(), 60)
        except Exception as e:  # an engine stuck in NCCL: the run's result is already written
            print(f"shutdown: {e!r}", flush=True)
    return 0


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rw-qwen05b")))
