"""Weight-push benchmarks, each against a floor measured in the same run.

* shm: push_weights() -> applied in the real RolloutServer (hf engine, a bf16 Qwen2-shaped model
  of the same tensors) vs two warm memcpys of the same bytes (tensors -> buffer -> parameters).
* inline over tcp: push -> applied by a receiver whose apply is a no-op (the wire and the checks),
  vs raw pyzmq streaming the same bytes in the same chunk sizes; also -> applied in the server.
* gloo: push -> applied by the no-op receiver vs a bare torch.distributed broadcast of the same
  tensors between two fresh processes; also -> applied in the server.

Every figure is the median of ``--repeats`` runs after one warm-up (the warm-up's time is kept in
the JSON as ``cold_s``). Floors are interleaved with the pushes: each timed push is preceded by one
run of its floor, and ``pct_of_floor`` is the median of the per-pair ratios (this 2-core machine is
shared, and its speed drifts by 2x within a minute: pairs taken seconds apart compare like with
like). Prints a table, writes bench/out/weights.json.

    python bench/weights.py            # 100 MB and 1 GB state dicts
    python bench/weights.py --quick    # 100 MB, 3 repeats
    python bench/weights.py --curve    # inline push with CURVE vs without (bench/out/weights_curve.json)

``--curve``: two no-op receivers, one a CURVE client of a trainer whose ROUTER and PUB are CURVE
servers (real key files), one plain; each repeat pushes the same version to both, in alternating
order, and ``curve_over_plain`` is the median of the per-pair time ratios. Only inline buckets
cross CURVE: shm, cuda_ipc and nccl/gloo payloads go through shared memory, CUDA IPC or a
torch.distributed group, and only their small control messages (announcement, outcome) are
encrypted.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

GiB = float(1 << 30)
HIDDEN, INTERMEDIATE, HEADS, VOCAB = 2048, 5632, 16, 512  # ~103 MB of bf16 per layer


def build_model(n_layers: int) -> Any:
    """A bf16 Qwen2 of ``n_layers`` layers, parameters allocated and touched (warm), no init."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_hidden_layers=n_layers, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.model.rotary_emb = Qwen2RotaryEmbedding(config=cfg)  # its buffer is computed, not a weight
    for p in model.parameters():
        p.data.zero_()
        p.requires_grad_(False)
    return model.eval()


def state_dict_for(n_layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_hidden_layers=n_layers, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in Qwen2ForCausalLM(cfg).named_parameters()]
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes}


# -- processes ---------------------------------------------------------------------------------
def server_proc(n_layers: int, trainer_endpoint: str, rollout_endpoint: str, ready: Any, stop: Any) -> None:
    from rollwire.engines.hf import HFEngine
    from rollwire.server import RolloutServer, ServerConfig

    model = build_model(n_layers)
    cfg = ServerConfig(rollout_endpoint=rollout_endpoint, trainer_endpoint=trainer_endpoint,
                       receiver_id="server", stall_timeout_s=120)

    async def main() -> None:
        async with RolloutServer(cfg, engine_factory=lambda: HFEngine(model, max_batch_size=4)):
            ready.put("server")
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)

    asyncio.run(main())


def sink_proc(trainer_endpoint: str, ready: Any, stop: Any, curve_files: tuple[str, str] | None = None) -> None:
    """``curve_files``: (this server's .key_secret, the trainer's .key): the receiver is a CURVE client."""
    from rollwire.actors.weight_receiver import WeightReceiverActor
    from rollwire.messages import GovernorRequest, LoadVersion, StepMessage, VersionApplied
    from rollwire.messages.weights import Ack
    from rollwire.runtime import Actor, ActorSystem, Port, address, handles
    from rollwire.weightsync.staged import STAGED

    class NoopApply(Actor):
        """Takes the staged tensor views (the receiver resolved them, as for the engine); loads nothing."""

        ports = {"weights": Port(GovernorRequest)}

        @handles(LoadVersion)
        async def on_apply(self, origin: Any, msg: LoadVersion, payload: Sequence[Any]) -> None:
            STAGED.get(msg.staged)
            await self.reply(origin, VersionApplied(version=msg.version, load_s=0.0, pause_s=0.0))

        @handles(StepMessage)
        async def on_step(self, origin: Any, msg: StepMessage, payload: Sequence[Any]) -> None:
            await self.reply(origin, Ack())

    kw: dict[str, Any] = {}
    if curve_files is not None:
        from rollwire.transports.security import CurveClient, KeyPair

        kw["curve"] = CurveClient(KeyPair.load(curve_files[0]), KeyPair.load(curve_files[1]).public)

    async def main() -> None:
        system = ActorSystem()
        await system.spawn(lambda: NoopApply("noop"))
        await system.spawn(lambda: WeightReceiverActor(trainer_endpoint, receiver_id="sink", stall_timeout_s=120,
                                                       apply_endpoint=address("noop", "weights"), **kw))
        ready.put("sink")
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await system.stop()

    asyncio.run(main())


def raw_zmq_proc(endpoint: str, ready: Any) -> None:
    """Receives rounds of chunks (zero-copy), answers b"done" after the last one of each round."""
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.put("raw")
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[1].bytes == b"end":
            sock.send_multipart([frames[0].bytes, b"done"])
        elif frames[1].bytes == b"quit":
            return


def bare_broadcast_proc(rank: int, port: int, n_layers: int, go: Any, out: Any) -> None:
    """torch.distributed as a user would write it: init_process_group + broadcast per tensor. Rank 0
    runs one round per item on ``go`` (None ends) and puts its seconds on ``out``."""
    import torch.distributed as dist

    torch.set_num_threads(2)
    sd = state_dict_for(n_layers)
    if rank:
        sd = {k: torch.empty_like(v) for k, v in sd.items()}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    flag = torch.zeros(1)
    while True:
        if rank == 0:
            flag.fill_(0 if go.get() is None else 1)
        dist.broadcast(flag, src=0)
        if not flag.item():
            break
        t0 = time.perf_counter()
        for t in sd.values():
            dist.broadcast(t, src=0)
        dist.barrier()
        if rank == 0:
            out.put(time.perf_counter() - t0)
    dist.destroy_process_group()


# -- floors in this process ---------------------------------------------------------------------
def memcpy_floor(sd: dict[str, torch.Tensor]) -> Any:
    """Two warm memcpys: tensors -> one flat buffer -> parameter-like tensors (a function: one run)."""
    total = sum(t.numel() * t.element_size() for t in sd.values())
    flat = torch.zeros(total, dtype=torch.uint8)
    params = {k: torch.zeros_like(v) for k, v in sd.items()}

    def once() -> float:
        t0 = time.perf_counter()
        off = 0
        for t in sd.values():
            n = t.numel() * t.element_size()
            flat[off:off + n].view(t.dtype).view(t.shape).copy_(t)
            off += n
        off = 0
        for k, t in sd.items():
            n = t.numel() * t.element_size()
            params[k].copy_(flat[off:off + n].view(t.dtype).view(t.shape))
            off += n
        return time.perf_counter() - t0

    return once


def raw_zmq_floor(endpoint: str, bufs: list[memoryview]) -> Any:
    """Stream ``bufs`` (zero-copy) over a DEALER and wait for the receiver's "done" (a function: one
    run; ``once(quit=True)`` stops the receiver)."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)

    def once(quit: bool = False) -> float:
        if quit:
            sock.send_multipart([b"quit"])
            sock.close(linger=1000)
            return 0.0
        t0 = time.perf_counter()
        for b in bufs:
            sock.send_multipart([b"chunk", b], copy=False)
        sock.send_multipart([b"end"])
        assert sock.recv() == b"done"
        return time.perf_counter() - t0

    return once


def stop_procs(stop: Any, procs: Sequence[Any], timeout: float = 60.0) -> None:
    """Ask the benchmark's child processes to end (``stop`` event), then kill any that does not."""
    stop.set()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()


async def checksum_passes(chunks: list[memoryview], repeats: int) -> float:
    """Median seconds of one cold checksum pass over the version (the receiver's verify)."""
    from concurrent.futures import ThreadPoolExecutor

    from rollwire.weightsync.checksum import checksum_parallel

    times = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            await asyncio.gather(*(checksum_parallel([c], pool) for c in chunks))
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# -- pushes -------------------------------------------------------------------------------------
async def push_series(tp: Any, sd: dict[str, torch.Tensor], transport: str, first_version: int, repeats: int,
                      rollout: Any = None, floor: Any = None) -> dict[str, Any]:
    """One warm-up push, then ``repeats`` timed ones (and the first token after each, if a server);
    ``floor`` (a function timing one floor run) runs before each push, its figures go in the row."""
    from rollwire.messages import SamplingParams

    times, ttft, floors = [], [], []
    for i in range(repeats + 1):
        if floor is not None:
            floors.append(await asyncio.get_running_loop().run_in_executor(None, floor))
        t0 = time.perf_counter()
        report = await tp.push_weights(first_version + i, sd, transport=transport)
        times.append(time.perf_counter() - t0)
        assert report.transport == transport
        if rollout is not None:
            out = await rollout.generate([1, 5, 9], SamplingParams(max_new_tokens=1, temperature=0.0))
            assert out.weight_version == first_version + i
            ttft.append(time.perf_counter() - t0)
    row: dict[str, Any] = {"cold_s": times[0], "median_s": statistics.median(times[1:]), "runs_s": times[1:]}
    if floors:
        row.update(floor_runs_s=floors[1:], pct_of_floor=100 * statistics.median(
            f / t for f, t in zip(floors[1:], times[1:], strict=True)))
    if ttft:
        row["push_to_first_token_s"] = statistics.median(ttft[1:])
    return row


async def bench_size(n_layers: int, repeats: int) -> list[dict[str, Any]]:
    from rollwire.clients.rollout import RolloutClient
    from rollwire.transports.sockets import free_tcp_endpoint
    from rollwire.weightsync.layout import byte_view, pack_bucket, plan_buckets
    from rollwire.weightsync.publisher import TrainerPublisher

    sd = state_dict_for(n_layers, seed=1)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    label = f"{nbytes / 1e6:.0f} MB bf16 ({len(sd)} tensors)"
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    srv_ep, sink_ep, raw_ep = (free_tcp_endpoint() for _ in range(3))
    rollout_ep = f"ipc:///tmp/rw-bench-{os.getpid()}"
    procs = [ctx.Process(target=server_proc, args=(n_layers, srv_ep, rollout_ep, ready, stop)),
             ctx.Process(target=sink_proc, args=(sink_ep, ready, stop)),
             ctx.Process(target=raw_zmq_proc, args=(raw_ep, ready))]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    for _ in procs:
        await loop.run_in_executor(None, ready.get, True, 300)
    rows = []
    try:
        async with TrainerPublisher(srv_ep, timeout_s=300) as to_server, \
                TrainerPublisher(sink_ep, timeout_s=300) as to_sink, RolloutClient(rollout_ep) as rc:
            def packed_chunks(bucket: int) -> list[memoryview]:
                """The version's buckets, packed into warm memory: the raw floor sends these."""
                out = []
                for plan in plan_buckets(list(sd.items()), bucket):
                    buf = torch.empty(plan.nbytes, dtype=torch.uint8)
                    pack_bucket(plan, buf)
                    out.append(byte_view(buf))
                return out

            def row(path: str, push: dict[str, Any], floor_name: str, **extra: Any) -> None:
                f = statistics.median(push["floor_runs_s"])
                rows.append({"size": label, "bytes": nbytes, "path": path, **push,
                             "gib_s": nbytes / GiB / push["median_s"], "floor": floor_name,
                             "floor_median_s": f, "floor_gib_s": nbytes / GiB / f, **extra})

            # shm: the floor, and what the protocol adds to it (the receiver's checksum pass; the
            # trainer hashes each piece as it copies it)
            v_srv = 1
            shm = await push_series(to_server, sd, "shm", v_srv, repeats, rc, floor=memcpy_floor(sd))
            v_srv += repeats + 1
            assert to_server._arena.created == 1, "the shm arena must be created once and reused"
            verify_s = await checksum_passes(packed_chunks(to_server.bucket_bytes), repeats)
            mem = statistics.median(shm["floor_runs_s"])
            row("shm -> server (hf engine)", shm, "2 warm memcpys (no checksum)",
                verify_s=verify_s, pct_of_floor_plus_verify=100 * (mem + verify_s) / shm["median_s"])
            # inline over tcp, at 512 MiB and 64 MiB buckets (the latter pipelined: verify while pulling)
            v_sink = 1
            for bucket in (512 << 20, 64 << 20):
                to_sink.bucket_bytes = to_server.bucket_bytes = bucket
                chunks = packed_chunks(bucket)
                raw = raw_zmq_floor(raw_ep, chunks)
                mib = f"{bucket >> 20} MiB buckets"
                inline = await push_series(to_sink, sd, "inline", v_sink, repeats, floor=raw)
                row(f"inline tcp -> receiver, {mib}", inline, f"raw pyzmq, {len(chunks)} x {mib}")
                v_sink += repeats + 1
                if bucket == 64 << 20:
                    row(f"inline tcp -> server, {mib}",
                        await push_series(to_server, sd, "inline", v_srv, repeats, rc, floor=raw),
                        f"raw pyzmq, {len(chunks)} x {mib}")
                    v_srv += repeats + 1
            raw(quit=True)
            # gloo broadcast, against a bare broadcast between two other processes
            go, out = ctx.Queue(), ctx.Queue()
            port = int(free_tcp_endpoint().rpartition(":")[2])
            pair = [ctx.Process(target=bare_broadcast_proc, args=(r, port, n_layers, go, out)) for r in (0, 1)]
            for p in pair:
                p.start()

            def bare() -> float:
                go.put(1)
                return float(out.get(True, 600))

            row("gloo -> receiver (no-op apply)", await push_series(to_sink, sd, "gloo", v_sink, repeats, floor=bare),
                "bare torch.distributed broadcast")
            row("gloo -> server (hf engine)", await push_series(to_server, sd, "gloo", v_srv, repeats, rc, floor=bare),
                "bare torch.distributed broadcast")
            go.put(None)
            for p in pair:
                p.join(60)
    finally:
        stop_procs(stop, procs)
    return rows


async def bench_curve(n_layers: int, repeats: int, buckets: Sequence[int]) -> list[dict[str, Any]]:
    """Inline push -> applied by a no-op receiver, CURVE on vs off, pairs interleaved (see the docstring)."""
    import tempfile

    from rollwire.transports.security import KeyPair, create_keys, load_public_keys
    from rollwire.transports.sockets import free_tcp_endpoint
    from rollwire.weightsync.publisher import TrainerPublisher

    sd = state_dict_for(n_layers, seed=1)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    label = f"{nbytes / 1e6:.0f} MB bf16 ({len(sd)} tensors)"
    keydir = tempfile.mkdtemp(prefix="rw-bench-keys-")
    trainer_pub, trainer_sec = create_keys(keydir, "trainer")
    server_pub, server_sec = create_keys(keydir, "server")
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    plain_ep, curve_ep = free_tcp_endpoint(), free_tcp_endpoint()
    procs = [ctx.Process(target=sink_proc, args=(plain_ep, ready, stop)),
             ctx.Process(target=sink_proc, args=(curve_ep, ready, stop, (str(server_sec), str(trainer_pub))))]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    for _ in procs:
        await loop.run_in_executor(None, ready.get, True, 300)
    rows = []
    try:
        async with TrainerPublisher(plain_ep, timeout_s=300) as plain, \
                TrainerPublisher(curve_ep, timeout_s=300, keys=KeyPair.load(trainer_sec),
                                 receiver_keys=load_public_keys([server_pub])) as curved:
            version = 0
            for bucket in buckets:
                plain.bucket_bytes = curved.bucket_bytes = bucket
                runs: dict[str, list[float]] = {"plain": [], "curve": []}
                for i in range(repeats + 1):  # the first pair warms up
                    version += 1
                    pair = [("plain", plain), ("curve", curved)]
                    for name, tp in pair if i % 2 == 0 else reversed(pair):
                        t0 = time.perf_counter()
                        report = await tp.push_weights(version, sd, transport="inline")
                        runs[name].append(time.perf_counter() - t0)
                        assert report.receivers == ["sink"]
                p_runs, c_runs = runs["plain"][1:], runs["curve"][1:]
                rows.append({"size": label, "bytes": nbytes, "bucket_mib": bucket >> 20,
                             "plain_median_s": statistics.median(p_runs), "curve_median_s": statistics.median(c_runs),
                             "plain_gib_s": nbytes / GiB / statistics.median(p_runs),
                             "curve_gib_s": nbytes / GiB / statistics.median(c_runs),
                             "curve_over_plain": statistics.median(c / p for c, p in zip(c_runs, p_runs, strict=True)),
                             "plain_runs_s": p_runs, "curve_runs_s": c_runs,
                             "cold_s": {"plain": runs["plain"][0], "curve": runs["curve"][0]}})
    finally:
        stop_procs(stop, procs)
    return rows


def print_curve_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'size':<28} {'bucket':>8} {'plain s':>8} {'plain GiB/s':>11} {'CURVE s':>8} {'CURVE GiB/s':>11} "
            f"{'CURVE/plain':>11}")
    print("inline push -> applied (no-op receiver), CURVE vs plain, median of per-pair ratios")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size']:<28} {r['bucket_mib']:>5} MiB {r['plain_median_s']:>8.3f} {r['plain_gib_s']:>11.2f} "
              f"{r['curve_median_s']:>8.3f} {r['curve_gib_s']:>11.2f} {r['curve_over_plain']:>10.2f}x")


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'size':<28} {'path':<40} {'median s':>9} {'GiB/s':>7} {'floor':<34} {'floor GiB/s':>11} {'% floor':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size']:<28} {r['path']:<40} {r['median_s']:>9.3f} {r['gib_s']:>7.2f} {r['floor']:<34} "
              f"{r['floor_gib_s']:>11.2f} {r['pct_of_floor']:>7.0f}%")
    for r in rows:
        if "pct_of_floor_plus_verify" in r:
            print(f"{r['size']}, {r['path']}: {r['pct_of_floor_plus_verify']:.0f}% of the floor plus the receiver's "
                  f"checksum pass ({r['verify_s'] * 1e3:.1f} ms)")
    for r in rows:
        if "push_to_first_token_s" in r:
            print(f"push -> first token on the new version, {r['size']}, {r['path']}: "
                  f"{r['push_to_first_token_s']:.3f} s")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 MB only, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--curve", action="store_true", help="only the inline push with CURVE vs without")
    ap.add_argument("--out", default=None, help="JSON file (default bench/out/weights.json, or weights_curve.json)")
    a = ap.parse_args(argv)
    out = a.out or str(Path(__file__).parent / "out" / ("weights_curve.json" if a.curve else "weights.json"))
    layers = [1] if a.quick else [1, 10]  # ~107 MB and ~1.03 GB
    repeats = a.repeats or (3 if a.quick else 5)
    rows: list[dict[str, Any]] = []
    for n in layers:
        rows += asyncio.run(bench_curve(n, repeats, (512 << 20, 64 << 20)) if a.curve else bench_size(n, repeats))
    (print_curve_table if a.curve else print_table)(rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
            "repeats": repeats, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
