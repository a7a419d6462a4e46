"""adapter_checks.py's last part: the checked SGLangEngine inside a RolloutServer, a rollout-worker
process (worker.py) pushing requests over tcp, and versions pushed through the MemoryGovernor
under each pause policy while the worker's requests run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from common import Report

HERE = os.path.dirname(os.path.abspath(__file__))


async def e2e(eng: Any, rep: Report, ps: list, refs: list, cuda: list, perturbed: Any) -> None:
    """The engine inside a RolloutServer; a worker process pushes requests over tcp; versions are
    pushed through the governor under each pause policy while the worker's requests run."""

    from rollwire.actors.memory_governor import GOVERNOR
    from rollwire.messages import ControlReply, LoadVersion, VersionApplied
    from rollwire.runtime import address
    from rollwire.server import RolloutServer, ServerConfig
    from rollwire.transports.rpc import RpcClient
    from rollwire.transports.sockets import free_tcp_endpoint
    from rollwire.weightsync.staged import STAGED, stage_tensors
    ep = free_tcp_endpoint()
    cfg = ServerConfig(engine="sglang", model="gpu", rollout_endpoint=ep, max_new_tokens_limit=4096)

    async def push(version: int, tensors: list) -> VersionApplied:
        key = stage_tensors(version, [(n, t.cpu()) for n, t in tensors])
        client: RpcClient = RpcClient(address(GOVERNOR, "weights"), ControlReply)
        try:
            reply = await client.call(LoadVersion(version=version, step=version, staged=key), timeout=120)
        finally:
            STAGED.discard(key)
            await client.close()
        assert isinstance(reply.msg, VersionApplied), reply.msg
        return reply.msg

    try:
        srv = await RolloutServer(cfg, engine_factory=lambda: eng).start()
    except Exception as e:
        rep.fail("rollout server start", e)
        return
    try:
        # greedy parity through the server, from another process
        worker = [sys.executable, os.path.join(HERE, "worker.py")]
        parity_in = json.dumps({"endpoint": ep, "prompts": ps, "max_new_tokens": len(refs[0])})
        out = await asyncio.get_running_loop().run_in_executor(None, lambda: subprocess.run(
            [*worker, "parity"], input=parity_in, capture_output=True, text=True, timeout=300))
        got = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-2000:]}
        same = sum(a == b for a, b in zip(got.get("outputs", []), refs, strict=False))
        rep.check("greedy through rollwire (worker process, tcp) == direct sglang.Engine", same == len(refs),
                  same=same, of=len(refs), err=got.get("error", ""))
        # pause policies under load: the worker keeps requests in flight and counts terminal replies
        base = srv.generation.weight_version
        runs = [("abort", True), ("retract", True), ("in_place", True), ("retract", False), ("in_place", False)]
        for i, (policy, streamed) in enumerate(runs):
            srv.governor.pause_policy = policy
            proc = subprocess.Popen([*worker, "load"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            job = json.dumps({"endpoint": ep, "n": 24, "max_new_tokens": 1000, "vocab": eng.info().vocab_size,
                              "grace_s": 1.0, "stream": streamed})
            talk = asyncio.get_running_loop().run_in_executor(None, proc.communicate, job)
            t_wait = time.monotonic()
            while len(srv.generation.in_flight) < 24 and time.monotonic() - t_wait < 60:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # every request is generating
            v = base + 2 * i + 1
            t = time.perf_counter()
            applied = await push(v, perturbed(1.2 + (i % 3) / 10))
            push_s = time.perf_counter() - t
            await asyncio.sleep(0.5)
            await push(v + 1, cuda)  # originals again
            stdout, stderr = await talk
            res = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": stderr[-2000:]}
            terminal = res.get("terminal", {})
            ok = len(terminal) == 24 and all(c == 1 for c in terminal.values())
            kinds = res.get("kinds", {})
            spans_ok = res.get("spans_ok", False)
            if policy == "abort":  # every request was generating 1000 tokens at the push: each one is aborted
                ok &= len(kinds) == 24 and all(k == "abort" for k in kinds.values())
            else:
                ok &= all(k == "length" for k in kinds.values()) and len(res.get("versions_seen", [])) >= 2
            what = "streamed" if streamed else "non-streamed"
            rep.check(f"governor push under load, policy {policy}, {what}: exactly one terminal reply each, "
                      "spans contiguous",
                      ok and spans_ok, kinds=sorted(set(kinds.values())), n=len(terminal),
                      versions_seen=res.get("versions_seen"), push_s=round(push_s, 3), load_s=round(applied.load_s, 3),
                      pause_s=round(applied.pause_s, 3), err=res.get("error", ""))
    finally:
        await srv.stop()
