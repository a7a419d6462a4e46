"""cuda_ipc push on one GPU: push_weights() -> applied, against device-to-device copy floors taken in
the same run.

Processes: this one is the trainer (a bf16 Qwen2-shaped state dict on the GPU); a RolloutServer with
the hf engine on the GPU (the same model shape, bf16); a receiver whose apply is a no-op (the
transport and its checks only). Rows, per size (~107 MB and ~1.03 GB):

* cuda_ipc -> server: the whole protocol (announce, open + verify, pause, copy into the live
  parameters, resume, GPU sync, outcome) vs the floor "load_state_dict copy": one copy_ per tensor
  from the same tensors into parameter-shaped tensors on the same GPU, synchronized (what an
  in-process load costs);
* cuda_ipc -> no-op receiver: the transport alone, same floor;
* the parts, timed here: one flat device-to-device copy of the same bytes (the bandwidth ceiling),
  the trainer's pack + GPU checksum, a GPU checksum pass alone (the one-pass Triton kernel, and
  torch's two reductions).

Every figure is the median of ``--repeats`` runs after one warm-up. Prints a table, writes JSON
(default bench/results/weights_cuda_ipc.json). ``--device cpu --transport shm`` runs the same
script on a CPU (a check of the script, not a figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rollwire.transports.sockets import free_tcp_endpoint, ipc_endpoint

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))  # bench/weights.py: the model shapes, the no-op receiver

import weights as wb  # noqa: E402

GiB = float(1 << 30)


def server_proc(n_layers: int, device: str, trainer_endpoint: str, rollout_endpoint: str, ready: Any,
                stop: Any) -> None:
    from rollwire.engines.hf import HFEngine
    from rollwire.server import RolloutServer, ServerConfig

    model = wb.build_model(n_layers).to(device)
    cfg = ServerConfig(rollout_endpoint=rollout_endpoint, trainer_endpoint=trainer_endpoint, device=device,
                       receiver_id="server", stall_timeout_s=120)

    async def main() -> None:
        async with RolloutServer(cfg, engine_factory=lambda: HFEngine(model, max_batch_size=4, device=device)):
            ready.put("server")
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)

    asyncio.run(main())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Any, device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def floors(sd: dict[str, torch.Tensor], device: str, repeats: int, bucket_bytes: int) -> dict[str, list[float]]:
    from rollwire.weightsync.cuda_ipc import CudaArena, arena_offsets, gpu_checksums, padded
    from rollwire.weightsync.layout import plan_buckets

    params = {k: torch.empty_like(v) for k, v in sd.items()}
    total = sum(t.numel() * t.element_size() for t in sd.values())
    src, dst = torch.ones(total, dtype=torch.uint8, device=device), torch.empty(total, dtype=torch.uint8, device=device)

    def load_state_dict_copy() -> None:
        with torch.no_grad():
            for k, t in sd.items():
                params[k].copy_(t)

    out = {"load_state_dict_copy": timed(load_state_dict_copy, device, repeats),
           "flat_d2d_copy": timed(lambda: dst.copy_(src), device, repeats)}
    if device.startswith("cuda"):
        plans = plan_buckets(list(sd.items()), bucket_bytes)
        offsets = arena_offsets([p.nbytes for p in plans])
        arena = CudaArena()
        arena.reserve(offsets[-1] + padded(plans[-1].nbytes), torch.device(device))
        out["trainer_pack_and_checksum"] = timed(lambda: arena.pack(plans, offsets), device, repeats)
        assert arena.tensor is not None
        sizes = [p.nbytes for p in plans]
        out["gpu_checksum_pass"] = timed(lambda: gpu_checksums(arena.tensor, offsets, sizes), device, repeats)
        from rollwire.weightsync import gpu_checksum

        kernel, gpu_checksum._KERNEL = gpu_checksum._KERNEL, None  # torch's two reductions, for comparison
        try:
            out["gpu_checksum_two_torch_passes"] = timed(lambda: gpu_checksums(arena.tensor, offsets, sizes),
                                                         device, repeats)
        finally:
            gpu_checksum._KERNEL = kernel
    return out


async def bench_size(n_layers: int, device: str, transport: str, repeats: int) -> list[dict[str, Any]]:
    from rollwire.clients.rollout import RolloutClient
    from rollwire.weightsync.publisher import TrainerPublisher

    sd = {k: v.to(device) for k, v in wb.state_dict_for(n_layers, seed=1).items()}
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    label = f"{nbytes / 1e6:.0f} MB bf16 ({len(sd)} tensors)"
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    srv_ep, sink_ep = (free_tcp_endpoint() for _ in range(2))
    rollout_ep = ipc_endpoint("bench-ipc")
    procs = [ctx.Process(target=server_proc, args=(n_layers, device, srv_ep, rollout_ep, ready, stop)),
             ctx.Process(target=wb.sink_proc, args=(sink_ep, ready, stop))]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    for _ in procs:
        await loop.run_in_executor(None, ready.get, True, 300)
    rows: list[dict[str, Any]] = []
    try:
        async with TrainerPublisher(srv_ep, timeout_s=300) as to_server, \
                TrainerPublisher(sink_ep, timeout_s=300) as to_sink, RolloutClient(rollout_ep) as rc:
            fl = floors(sd, device, repeats, to_server.bucket_bytes)
            base = statistics.median(fl["load_state_dict_copy"])

            def row(path: str, push: dict[str, Any]) -> None:
                rows.append({"size": label, "bytes": nbytes, "path": path, **push,
                             "gib_s": nbytes / GiB / push["median_s"], "floor": "load_state_dict copy (same GPU)",
                             "floor_median_s": base, "floor_gib_s": nbytes / GiB / base,
                             "pct_of_floor": 100 * base / push["median_s"]})

            server = await wb.push_series(to_server, sd, transport, 1, repeats, rc)
            row(f"{transport} -> server (hf engine, {device})", server)
            if transport == "cuda_ipc":
                assert to_server._senders["cuda_ipc"].arena.created == 1, "one CUDA arena, reused"
            row(f"{transport} -> receiver (no-op apply)", await wb.push_series(to_sink, sd, transport, 1, repeats))
            auto = await to_server.push_weights(repeats + 2, sd, transport="auto")
            for name, times in fl.items():
                m = statistics.median(times)
                rows.append({"size": label, "bytes": nbytes, "path": f"part: {name}", "median_s": m, "runs_s": times,
                             "gib_s": nbytes / GiB / m})
            rows.append({"size": label, "path": "auto picked", "transport": auto.transport})
    finally:
        wb.stop_procs(stop, procs)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'size':<28} {'path':<44} {'median ms':>10} {'GiB/s':>7} {'% of floor':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "median_s" not in r:
            print(f"{r['size']:<28} {r['path']:<44} {r['transport']:>10}")
            continue
        pct = f"{r['pct_of_floor']:.0f}%" if "pct_of_floor" in r else ""
        print(f"{r['size']:<28} {r['path']:<44} {1e3 * r['median_s']:>10.2f} {r['gib_s']:>7.1f} {pct:>10}")
        if "push_to_first_token_s" in r:
            ttft = 1e3 * r["push_to_first_token_s"]
            print(f"{'':<28} {'  push -> first token on the new version':<44} {ttft:>10.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--transport", default="cuda_ipc")
    ap.add_argument("--out", default=str(BENCH / "results" / "weights_cuda_ipc.json"))
    a = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for n in a.layers:
        rows += asyncio.run(bench_size(n, a.device, a.transport, a.repeats))
    print_table(rows)
    meta = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "python": sys.version.split()[0], "repeats": a.repeats, "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "python bench/gpu/cuda_ipc.py " + " ".join(sys.argv[1:])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
