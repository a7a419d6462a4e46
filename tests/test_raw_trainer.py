"""A trainer written from docs/protocol.md section 11 alone, in raw pyzmq and msgpack: it may not
import rollwire's trainer, weight-sync or codec code (msgspec is used as a plain msgpack
library: lists in, lists out). It takes the registration of a real
`rollwire serve` process, makes its SUB join with beacons, announces a full version of the tiny
model inline, serves the pulled buckets with their checksums (computed as the document says),
and the server reports the version applied; later generations report it and are the greedy
continuations of the pushed weights."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from typing import Any

import msgspec
import numpy as np
import xxhash
import zmq
import zmq.asyncio

from rollwire import RolloutClient, SamplingParams

from .conftest import free_tcp_endpoint
from .versioned import greedy, version_state

PIECE = 1 << 20
VERSION, SEED = 1, 5  # the pushed weights: the tiny model built with seed 5 (the server serves seed 0)
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


def bucket_checksum(data: bytes) -> int:
    """Section 11: xxh3-64 of each 1 MiB piece; xxh3-64 of the digests (8 bytes LE each); top bit cleared."""
    digests = b"".join(xxhash.xxh3_64_intdigest(data[i:i + PIECE]).to_bytes(8, "little")
                       for i in range(0, len(data), PIECE))
    return xxhash.xxh3_64_intdigest(digests) & ((1 << 63) - 1)


def pack_one_bucket() -> tuple[bytes, list[list[Any]]]:
    """Every tensor back to back (8-byte aligned), as [name, dtype, shape, offset] TensorMeta arrays."""
    out, metas, offset = bytearray(), [], 0
    for name, t in version_state(SEED).items():
        raw = t.detach().contiguous().numpy().astype(np.float32).tobytes()
        out += raw + b"\0" * (-len(raw) % 8)
        metas.append([name, "float32", list(t.shape), offset])
        offset = len(out)
    return bytes(out), metas


def frames(rid: int, body: list[Any], *payload: bytes) -> list[bytes]:
    # frame 0: the header [protocol 1, rid]; frame 1: the body; then payload frames
    return [msgspec.msgpack.encode([1, rid]), msgspec.msgpack.encode(body), *payload]


def weights_ready(trainer_id: str, nbytes: int, metas: list[list[Any]]) -> list[Any]:
    bucket = [0, nbytes, -1, metas]  # BucketMeta [index, nbytes, checksum (-1: in band), tensors]
    return ["weights_ready", trainer_id, VERSION, 0, 1, nbytes, [bucket], ["inline"]]


async def test_a_raw_pyzmq_trainer_written_from_the_document_pushes_a_full_version() -> None:
    ctx = zmq.asyncio.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for s in (router, pub):
        s.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    pub.bind("tcp://127.0.0.1:0")
    trainer_ep = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub_ep = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    rollout_ep = free_tcp_endpoint()
    server = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                               "--rollout-endpoint", rollout_ep, "--trainer-endpoint", trainer_ep],
                              stdout=subprocess.DEVNULL)
    trainer_id = uuid.uuid4().hex
    data, metas = pack_one_bucket()
    seen: list[str] = []  # every message the server sent us, by tag, in order
    outcome: list[Any] = []
    try:
        deadline = time.monotonic() + 120  # every wait below is bounded by this

        async def recv() -> tuple[bytes, int, list[Any], list[bytes]]:
            assert await router.poll(max(1, int(1000 * (deadline - time.monotonic())))), f"silence after {seen}"
            peer, header, body, *payload = await router.recv_multipart()
            rid = msgspec.msgpack.decode(header)[1]
            msg = msgspec.msgpack.decode(body)
            seen.append(msg[0])
            return peer, rid, msg, payload

        # 1. registration: ["register", receiver_id, host_id, transports, live_version, cuda_devices, checksums]
        peer, rid, msg, _ = await recv()
        while msg[0] != "register":
            peer, rid, msg, _ = await recv()
        assert "inline" in msg[3] and "xxh3-64/1MiB" in msg[6], msg
        receiver_id = msg[1]
        await router.send_multipart([peer, *frames(rid, ["welcome", trainer_id, pub_ep, "xxh3-64/1MiB"])])

        # 2. beacons on the PUB until the receiver acknowledges one (its SUB has joined)
        seq, joined = 0, False
        while not joined:
            seq += 1
            await pub.send_multipart(frames(0, ["beacon", trainer_id, seq]))
            if await router.poll(50):
                _, _, msg, _ = await recv()
                joined = msg[0] == "beacon_seen" and msg[1] == receiver_id and msg[2] == trainer_id
            assert time.monotonic() < deadline, seen

        # 3. announce the version; serve each pull with the bytes and their checksum; wait for the outcome
        await pub.send_multipart(frames(0, weights_ready(trainer_id, len(data), metas)))
        while not outcome:
            peer, rid, msg, _ = await recv()
            if msg[0] == "pull":  # ["pull", version, index]
                assert msg[1:] == [VERSION, 0], msg
                await router.send_multipart([peer, *frames(rid, ["bucket", VERSION, 0, bucket_checksum(data)], data)])
            elif msg[0] == "outcome":  # [receiver_id, version, ok, error_code, message, seconds, trainer_id]
                outcome = msg
        assert outcome[1:4] == [receiver_id, VERSION, True], outcome

        # 4. the server now generates with the pushed weights, and says so
        async with RolloutClient(rollout_ep) as rc:
            prompt = [3, 17, 42]
            done = await rc.generate(prompt, GREEDY)
            assert done.weight_version == VERSION and done.output_ids == greedy(SEED, prompt, 8)  # type: ignore[union-attr]
        print(f"server sent, in order: {seen[:3]} ... {seen[-2:]} ({len(seen)} messages); outcome {outcome[:4]}")
    finally:
        server.terminate()
        assert server.wait(60) == 0
        router.close()
        pub.close()
        ctx.term()


async def test_any_client_learns_the_servers_parameters_and_a_version_built_from_them_applies() -> None:
    """`params` on the rollout socket: every name, dtype and shape of the served model, and which a
    complete version needs (tied aliases are not required)."""
    from rollwire.models import tiny

    ep = free_tcp_endpoint()
    server = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                               "--rollout-endpoint", ep], stdout=subprocess.DEVNULL)
    try:
        async with RolloutClient(ep) as rc:
            await rc.wait_ready(timeout=120)
            reply = await rc.params()
        model = tiny(0)[0]
        named = dict(model.named_parameters(remove_duplicate=False))
        assert [p.name for p in reply.params] == list(named)
        for p in reply.params:
            assert (p.dtype, p.shape) == (str(named[p.name].dtype).removeprefix("torch."), list(named[p.name].shape))
        required = {p.name for p in reply.params if p.required}
        assert required == {n for n, _ in model.named_parameters()}  # one name per distinct tensor
        assert reply.weight_version == 0
        print(f"{len(reply.params)} parameters, {len(required)} required")
    finally:
        server.terminate()
        assert server.wait(60) == 0
