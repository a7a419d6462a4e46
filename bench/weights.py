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
like). Prints a table with the machine's load, writes bench/results/weights_cpu_<UTC time>.json.
The floors and the shm push's parts timed one by one live in bench/weights_floor.py.

    python bench/weights.py            # 100 MB and 1 GB state dicts
    python bench/weights.py --quick    # 100 MB, 3 repeats
    python bench/weights.py --curve    # inline push with CURVE vs without (weights_curve_cpu_<time>.json)
    python bench/weights.py --sizes 1 --paths shm inline --repeats 7   # only these

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
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from weights_floor import (  # bench/ is not a package: its directory is on sys.path
    GiB,
    bare_broadcast_proc,
    build_model,
    machine_load,
    memcpy_floor,
    nbytes_of,
    packed_chunks,
    raw_zmq_floor,
    raw_zmq_proc,
    shm_parts,
    state_dict_for,
    stop_procs,
    wait_ready,
)

PATHS = ("shm", "inline", "gloo")


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

    class NoopApply(Actor):
        """Answers "applied" and loads nothing: the receiver has verified the version and resolved its
        tensor views (as for the engine) before it sends LoadVersion."""

        ports = {"weights": Port(GovernorRequest)}

        @handles(LoadVersion)
        async def on_apply(self, origin: Any, msg: LoadVersion, payload: Sequence[Any]) -> None:
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


async def bench_size(n_layers: int, repeats: int, paths: Sequence[str] = PATHS) -> list[dict[str, Any]]:
    from rollwire.clients.rollout import RolloutClient
    from rollwire.transports.sockets import free_tcp_endpoint
    from rollwire.weightsync.publisher import TrainerPublisher

    sd = state_dict_for(n_layers, seed=1)
    nbytes = nbytes_of(sd)
    label = f"{nbytes / 1e6:.0f} MB bf16 ({len(sd)} tensors)"
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    srv_ep, sink_ep, raw_ep = (free_tcp_endpoint() for _ in range(3))
    rollout_ep = f"ipc://{tempfile.mkdtemp(prefix='rw-bench-')}/rollout"  # a 0700 directory, as ipc needs
    procs = [ctx.Process(target=server_proc, args=(n_layers, srv_ep, rollout_ep, ready, stop), name="server"),
             ctx.Process(target=sink_proc, args=(sink_ep, ready, stop), name="sink"),
             ctx.Process(target=raw_zmq_proc, args=(raw_ep, ready), name="raw_zmq")]
    for p in procs:
        p.start()
    rows = []
    try:
        await wait_ready(ready, procs)
        async with TrainerPublisher(srv_ep, timeout_s=300) as to_server, \
                TrainerPublisher(sink_ep, timeout_s=300) as to_sink, RolloutClient(rollout_ep) as rc:
            def row(path: str, push: dict[str, Any], floor_name: str, **extra: Any) -> None:
                f = statistics.median(push["floor_runs_s"])
                rows.append({"size": label, "bytes": nbytes, "path": path, **push,
                             "gib_s": nbytes / GiB / push["median_s"], "floor": floor_name,
                             "floor_median_s": f, "floor_gib_s": nbytes / GiB / f, **extra})

            v_srv = v_sink = 1
            if "shm" in paths:  # the floor, then the push's parts one by one: what remains is protocol
                shm = await push_series(to_server, sd, "shm", v_srv, repeats, rc, floor=memcpy_floor(sd))
                v_srv += repeats + 1
                arena = to_server._senders["shm"].arena
                assert arena.created == 1, "the shm arena must be created once and reused"
                parts = await asyncio.get_running_loop().run_in_executor(None, shm_parts, sd, to_server.bucket_bytes,
                                                                         repeats)
                moved = parts["pack_s"] + parts["load_verified_s"]
                row("shm -> server (hf engine)", shm, "2 warm memcpys (no checksum)", parts=parts,
                    remains_s=shm["median_s"] - moved)
            if "inline" in paths:  # 512 MiB and 64 MiB buckets (the latter pipelined: verify while pulling)
                for bucket in (512 << 20, 64 << 20):
                    to_sink.bucket_bytes = to_server.bucket_bytes = bucket
                    chunks = packed_chunks(sd, bucket)
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
                    del chunks
                raw(quit=True)
            if "gloo" in paths:  # against a bare broadcast between two other processes
                go, out = ctx.Queue(), ctx.Queue()
                port = int(free_tcp_endpoint().rpartition(":")[2])
                pair = [ctx.Process(target=bare_broadcast_proc, args=(r, port, n_layers, go, out)) for r in (0, 1)]
                for p in pair:
                    p.start()

                def bare() -> float:
                    go.put(1)
                    return float(out.get(True, 600))

                row("gloo -> receiver (no-op apply)",
                    await push_series(to_sink, sd, "gloo", v_sink, repeats, floor=bare),
                    "bare torch.distributed broadcast")
                row("gloo -> server (hf engine)", await push_series(to_server, sd, "gloo", v_srv, repeats, rc,
                                                                   floor=bare), "bare torch.distributed broadcast")
                go.put(None)
                for p in pair:
                    p.join(60)
    finally:
        stop_procs(stop, procs)
    return rows


async def bench_curve(n_layers: int, repeats: int, buckets: Sequence[int]) -> list[dict[str, Any]]:
    """Inline push -> applied by a no-op receiver, CURVE on vs off, pairs interleaved (see the docstring)."""
    from rollwire.transports.security import KeyPair, create_keys, load_public_keys
    from rollwire.transports.sockets import free_tcp_endpoint
    from rollwire.weightsync.publisher import TrainerPublisher

    sd = state_dict_for(n_layers, seed=1)
    nbytes = nbytes_of(sd)
    label = f"{nbytes / 1e6:.0f} MB bf16 ({len(sd)} tensors)"
    keydir = tempfile.mkdtemp(prefix="rw-bench-keys-")
    trainer_pub, trainer_sec = create_keys(keydir, "trainer")
    server_pub, server_sec = create_keys(keydir, "server")
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    plain_ep, curve_ep = free_tcp_endpoint(), free_tcp_endpoint()
    procs = [ctx.Process(target=sink_proc, args=(plain_ep, ready, stop), name="sink"),
             ctx.Process(target=sink_proc, args=(curve_ep, ready, stop, (str(server_sec), str(trainer_pub))),
                         name="curve_sink")]
    for p in procs:
        p.start()
    rows = []
    try:
        await wait_ready(ready, procs)
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
        if "parts" in r:
            ms = {k: v * 1e3 for k, v in r["parts"].items()}
            print(f"{r['size']}, {r['path']}: push {r['median_s'] * 1e3:.1f} ms, where pack + checksum "
                  f"{ms['pack_s']:.1f} and the copy into the parameters, verifying as it copies, "
                  f"{ms['load_verified_s']:.1f} take {(ms['pack_s'] + ms['load_verified_s']):.1f} one after the other "
                  f"(each timed alone, floor {ms['floor_s']:.1f} beside them); the push overlaps them (the receiver "
                  f"copies each piece once written) and adds messages, pause and resume: push minus both "
                  f"{r['remains_s'] * 1e3:+.1f}. For comparison: the copy alone {ms['load_copy_s']:.1f}, "
                  f"a separate checksum pass (--shm-verify before_load) {ms['verify_s']:.1f}")
    for r in rows:
        if "push_to_first_token_s" in r:
            print(f"push -> first token on the new version, {r['size']}, {r['path']}: "
                  f"{r['push_to_first_token_s']:.3f} s")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 MB only, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--sizes", nargs="+", type=int, default=None, metavar="LAYERS",
                    help="model layers per size (1: ~107 MB, 10: ~1.03 GB; default 1 10)")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--curve", action="store_true", help="only the inline push with CURVE vs without")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/weights_cpu_<UTC time>.json, "
                                                "or weights_curve_cpu_<UTC time>.json)")
    a = ap.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    out = a.out or str(Path(__file__).parent / "results" / f"weights{'_curve' if a.curve else ''}_cpu_{stamp}.json")
    layers = a.sizes or ([1] if a.quick else [1, 10])
    repeats = a.repeats or (3 if a.quick else 5)
    load = [machine_load()]
    rows: list[dict[str, Any]] = []
    for n in layers:
        rows += asyncio.run(bench_curve(n, repeats, (512 << 20, 64 << 20)) if a.curve
                            else bench_size(n, repeats, a.paths))
        load.append(machine_load())
    (print_curve_table if a.curve else print_table)(rows)
    print("machine load (before, then after each size): " + "; ".join(
        f"{x['time']} loadavg {x['loadavg'][0]:.2f} busy {x['busy_pct']}%" for x in load))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    import xxhash

    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
            "xxhash": xxhash.VERSION,  # < 4.0 hashes holding the GIL: the threads' checksums run one at a time
            "repeats": repeats, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": sys.argv[1:] if argv is None else list(argv), "machine_load": load}
    Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
