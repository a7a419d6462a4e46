"""A rollout-worker process for the GPU checks. Reads its job as JSON on stdin, prints one JSON line.

    worker.py parity   {"endpoint", "prompts", "max_new_tokens"}  -> {"outputs": [[ids]...]}
    worker.py load     {"endpoint", "n", "max_new_tokens", "vocab", "grace_s", "stream" (default true)}
                       -> {"terminal": {rid: count}, "kinds": {rid: finish}, "spans_ok", "versions_seen"}

``load`` speaks the wire directly (a DEALER and the codec) so that every reply is counted: a
request answered twice, or never, shows up in ``terminal``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import sys
import time
from typing import Any


async def parity(job: dict[str, Any]) -> dict[str, Any]:
    from rollwire import RolloutClient, SamplingParams

    sp = SamplingParams(max_new_tokens=job["max_new_tokens"], temperature=0.0, ignore_eos=True)
    outs = []
    async with RolloutClient(job["endpoint"], timeout=120) as rc:
        for p in job["prompts"]:
            o = await rc.generate(p, sp)
            outs.append(list(o.output_ids))  # type: ignore[union-attr]
    return {"outputs": outs}


async def load(job: dict[str, Any]) -> dict[str, Any]:
    import zmq
    import zmq.asyncio

    from rollwire.messages import Codec, GenerateDone, GenerateRequest, RolloutReply, SamplingParams

    codec: Any = Codec(RolloutReply)
    sock = zmq.asyncio.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(job["endpoint"])
    rng = random.Random(7)
    n = job["n"]
    for rid in range(1, n + 1):
        sp = SamplingParams(max_new_tokens=job["max_new_tokens"], temperature=0.0, ignore_eos=True)
        prompt = [rng.randrange(10, job["vocab"]) for _ in range(rng.randrange(3, 20))]
        await sock.send_multipart(codec.encode(rid, GenerateRequest(input_ids=prompt, sampling_params=sp,
                                                                    stream=job.get("stream", True))))
    terminal: collections.Counter[int] = collections.Counter()
    kinds: dict[int, str] = {}
    spans_ok = True
    versions: set[int] = set()
    streamed: dict[int, int] = collections.Counter()
    deadline = None
    while True:
        timeout_ms = 300_000 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        if not await sock.poll(timeout_ms):
            break
        rid, msg, _ = codec.decode(await sock.recv_multipart())
        if not isinstance(msg, GenerateDone) and type(msg).__name__ == "GenerateChunk":
            streamed[rid] += len(msg.token_ids)
            continue
        terminal[rid] += 1
        if isinstance(msg, GenerateDone):
            kinds[rid] = msg.finish_reason
            spans = msg.weight_version_spans
            end = 0
            for s in spans:
                spans_ok &= s.start == end and s.end > s.start
                end = s.end
                versions.add(s.version)
            spans_ok &= end == len(msg.output_ids)
            spans_ok &= streamed[rid] == (len(msg.output_ids) if job.get("stream", True) else 0)
        else:
            kinds[rid] = type(msg).__name__
        if deadline is None and len(terminal) == n:
            deadline = time.monotonic() + job.get("grace_s", 1.0)  # a duplicate would arrive in the grace time
    sock.close()
    return {"terminal": dict(terminal), "kinds": kinds, "spans_ok": spans_ok, "versions_seen": sorted(versions)}


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    fn = {"parity": parity, "load": load}[sys.argv[1]]
    print(json.dumps(asyncio.run(fn(job))), flush=True)
