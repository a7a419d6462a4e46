"""What bench/weights.py measures its pushes against, in the same run: the state dicts and model it
pushes, the floors (two warm memcpys, raw pyzmq with the same buckets, a bare torch.distributed
broadcast) and the shm push's parts timed one by one (pack + checksum into the arena, the receiver's
checksum pass, the copy into the parameters), so a push's time can be split into what the bytes
cost and what remains (messages, pause and resume, scheduling).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

GiB = float(1 << 30)
HIDDEN, INTERMEDIATE, HEADS, VOCAB = 2048, 5632, 16, 512  # ~103 MB of bf16 per layer


def _config(n_layers: int, **kw: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=n_layers, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                       tie_word_embeddings=False, **kw)


def build_model(n_layers: int) -> Any:
    """A bf16 Qwen2 of ``n_layers`` layers, parameters allocated and touched (warm), no init."""
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    cfg = _config(n_layers, max_position_embeddings=4096, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.model.rotary_emb = Qwen2RotaryEmbedding(config=cfg)  # its buffer is computed, not a weight
    for p in model.parameters():
        p.data.zero_()
        p.requires_grad_(False)
    return model.eval()


def state_dict_for(n_layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in Qwen2ForCausalLM(_config(n_layers)).named_parameters()]
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes}


def nbytes_of(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def machine_load() -> dict[str, Any]:
    """How busy the machine is: load averages and the share of CPU time not idle since boot's last
    sample (``busy_pct`` over ``interval_s``, every process counted, this one included)."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = ticks()
        time.sleep(1.0)
        t1, i1 = ticks()
        busy = round(100 * (1 - (i1 - i0) / max(1, t1 - t0)), 1)
    except OSError:
        busy = None
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_pct": busy, "interval_s": 1.0,
            "time": time.strftime("%H:%M:%S")}


# -- floors -------------------------------------------------------------------------------------
def memcpy_floor(sd: dict[str, torch.Tensor]) -> Any:
    """Two warm memcpys: tensors -> one flat buffer -> parameter-like tensors (a function: one run)."""
    flat = torch.zeros(nbytes_of(sd), dtype=torch.uint8)
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


def packed_chunks(sd: dict[str, torch.Tensor], bucket: int) -> list[memoryview]:
    """The version's buckets, packed into warm memory: the raw pyzmq floor sends these."""
    from rollwire.weightsync.layout import byte_view, pack_bucket, plan_buckets

    out = []
    for plan in plan_buckets(list(sd.items()), bucket):
        buf = torch.empty(plan.nbytes, dtype=torch.uint8)
        pack_bucket(plan, buf)
        out.append(byte_view(buf))
    return out


# -- the shm push's parts, one at a time --------------------------------------------------------
def shm_parts(sd: dict[str, torch.Tensor], bucket: int, repeats: int) -> dict[str, float]:
    """Median seconds of each part of an shm push that moves or reads the bytes, in this process:
    ``pack_s`` (pack + checksum into an arena, as the trainer does), ``load_verified_s`` (arena
    views -> parameters, each piece hashed as it is copied: what the hf engine does), and, for
    comparison, ``verify_s`` (a separate checksum pass over the arena: ``--shm-verify before_load``
    and engines that do not copy themselves) and ``load_copy_s`` (the copy without hashing), with
    ``floor_s`` (two warm memcpys) in the same rounds."""
    from rollwire.weightsync import shm
    from rollwire.weightsync.layout import at_offsets, byte_view, plan_buckets, verify_buckets, view_at
    from rollwire.weightsync.memcopy import ByteCheck, copy_bytes, copy_pool, copy_threads, copy_verified

    plans = plan_buckets(list(sd.items()), bucket)
    arena = shm.ShmArena()
    params = {k: torch.zeros_like(v) for k, v in sd.items()}
    floor = memcpy_floor(sd)
    runs: dict[str, list[float]] = {"pack_s": [], "load_verified_s": [], "verify_s": [], "load_copy_s": [],
                                    "floor_s": []}
    with ThreadPoolExecutor(2) as workers:  # the publisher's two; packing and verify add copy_pool()
        for _ in range(repeats + 1):
            runs["floor_s"].append(floor())
            t0 = time.perf_counter()
            sums, offsets = asyncio.run(shm.prepare(arena, plans, workers))
            runs["pack_s"].append(time.perf_counter() - t0)
            metas = [p.meta(s) for p, s in zip(plans, sums, strict=True)]
            bufs = [byte_view(arena.tensor[o:o + m.nbytes]) for m, o in zip(metas, offsets, strict=True)]
            t0 = time.perf_counter()
            asyncio.run(verify_buckets(metas, bufs, copy_pool()))
            runs["verify_s"].append(time.perf_counter() - t0)
            pairs = [(params[nt.name], view_at(arena.tensor, nt.ref.frame, nt.ref.dtype, nt.ref.shape))
                     for nt in at_offsets(metas, offsets)]
            checks = [ByteCheck(m.index, arena.tensor[o:o + m.nbytes], m.checksum)
                      for m, o in zip(metas, offsets, strict=True)]
            t0 = time.perf_counter()
            bad = copy_verified(pairs, checks, copy_pool(), copy_threads())
            runs["load_verified_s"].append(time.perf_counter() - t0)
            assert not bad, bad
            t0 = time.perf_counter()
            copy_bytes(pairs, copy_pool(), copy_threads())
            runs["load_copy_s"].append(time.perf_counter() - t0)
            del bufs, pairs, checks
    arena.close()
    return {k: statistics.median(v[1:]) for k, v in runs.items()}


def stop_procs(stop: Any, procs: Sequence[Any], timeout: float = 60.0) -> None:
    """Ask the benchmark's child processes to end (``stop`` event), then kill any that does not."""
    stop.set()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()


async def wait_ready(ready: Any, procs: Sequence[Any], timeout: float = 300.0) -> None:
    """One "ready" per process, or RuntimeError as soon as one of them died."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    got = 0
    while got < len(procs):
        dead = [p for p in procs if p.exitcode is not None and p.exitcode != 0]
        if dead:
            raise RuntimeError(f"benchmark process {dead[0].name} exited with {dead[0].exitcode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(procs) - got} benchmark processes not ready after {timeout}s")
        try:
            await loop.run_in_executor(None, ready.get, True, 1.0)
            got += 1
        except Exception:  # queue.Empty: look at the processes again
            continue
