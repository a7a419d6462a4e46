"""Bad input gets a typed error back to its sender, and the server keeps serving everyone else."""

from __future__ import annotations

import msgspec
import pytest
import zmq
import zmq.asyncio

from rollwire import RolloutClient, RolloutError, SamplingParams
from rollwire.messages import (
    Codec,
    ErrorCode,
    ErrorReply,
    GenerateDone,
    GenerateRequest,
    Header,
    RolloutReply,
)
from rollwire.server import RolloutServer
from tests.conftest import until

replies: Codec = Codec(RolloutReply)
enc = msgspec.msgpack.Encoder()


async def _raw_exchange(endpoint: str, frames: list[bytes]) -> tuple[int, object]:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart(frames)
        assert await sock.poll(10_000), "no reply within 10 s"
        rid, msg, _ = replies.decode(await sock.recv_multipart())
        return rid, msg
    finally:
        sock.close()


async def _still_serving(endpoint: str) -> None:
    async with RolloutClient(endpoint, timeout=30) as rc:
        out = await rc.generate([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
        assert isinstance(out, GenerateDone) and len(out.output_ids) == 3


GOOD_BODY = enc.encode(GenerateRequest(input_ids=[1, 2], sampling_params=SamplingParams(max_new_tokens=2)))


@pytest.mark.parametrize(("frames", "code", "rid"), [
    ([b"\x92\x01\x07"], ErrorCode.BAD_FRAME, 0),  # header only
    ([b"\xc1garbage", GOOD_BODY], ErrorCode.BAD_FRAME, 0),  # header does not decode
    ([b"\x92\x01\x07", b"\xc1\xc1"], ErrorCode.BAD_FRAME, 7),  # body does not decode
    ([b"\x92\x01\x07", enc.encode(["teleport", 1])], ErrorCode.UNKNOWN_KIND, 7),
    ([b"\x92\x01\x07", enc.encode(["generate", "not a list"])], ErrorCode.BAD_FIELD, 7),
    ([b"\x92\x01\x07", enc.encode(["generate", [1, "x"]])], ErrorCode.BAD_FIELD, 7),
    ([b"\x92\x09\x07", GOOD_BODY], ErrorCode.UNSUPPORTED_PROTOCOL, 7),
], ids=["missing-body", "bad-header", "bad-body", "unknown-kind", "wrong-type", "wrong-item-type", "protocol-9"])
async def test_malformed_frames_get_a_typed_error_and_the_server_keeps_serving(
        server: RolloutServer, endpoint: str, frames: list[bytes], code: ErrorCode, rid: int) -> None:
    got_rid, msg = await _raw_exchange(endpoint, frames)
    assert isinstance(msg, ErrorReply), msg
    assert msg.code == code, msg
    assert got_rid == rid
    assert msg.message
    await _still_serving(endpoint)


@pytest.mark.parametrize(("input_ids", "sp", "code"), [
    ([], SamplingParams(max_new_tokens=4), ErrorCode.EMPTY_INPUT),
    ([1, 100_000], SamplingParams(max_new_tokens=4), ErrorCode.TOKEN_OUT_OF_RANGE),
    ([1, -3], SamplingParams(max_new_tokens=4), ErrorCode.TOKEN_OUT_OF_RANGE),
    ([1, 2], SamplingParams(max_new_tokens=0), ErrorCode.BAD_SAMPLING_PARAMS),
    ([1, 2], SamplingParams(max_new_tokens=-5), ErrorCode.BAD_SAMPLING_PARAMS),
    ([1, 2], SamplingParams(max_new_tokens=257), ErrorCode.BAD_SAMPLING_PARAMS),  # server limit is 256
    ([1, 2], SamplingParams(max_new_tokens=4, top_p=0.0), ErrorCode.BAD_SAMPLING_PARAMS),
    ([1, 2], SamplingParams(max_new_tokens=4, allowed_token_ids=[100_000]), ErrorCode.BAD_SAMPLING_PARAMS),
], ids=["empty", "id-above-vocab", "negative-id", "zero-tokens", "negative-tokens", "above-limit", "top-p-0",
        "allowed-out-of-vocab"])
async def test_invalid_requests_get_a_typed_error_naming_the_problem(
        server: RolloutServer, endpoint: str, input_ids: list[int], sp: SamplingParams, code: ErrorCode) -> None:
    async with RolloutClient(endpoint, timeout=30) as rc:
        with pytest.raises(RolloutError) as err:
            await rc.generate(input_ids, sp)
    assert err.value.code == code
    assert err.value.message
    await _still_serving(endpoint)


async def test_a_bad_request_does_not_disturb_requests_in_flight(server: RolloutServer, endpoint: str) -> None:
    async with RolloutClient(endpoint, timeout=60) as rc:
        long = rc.generate([5, 6], SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True))
        import asyncio

        task = asyncio.ensure_future(long)
        await until(lambda: server.generation.counters.get("requests") >= 1, "the long request in flight", 30)
        _, msg = await _raw_exchange(endpoint, [enc.encode(Header(1, 3)), b"\xc1"])
        assert isinstance(msg, ErrorReply) and msg.code == ErrorCode.BAD_FRAME
        out = await task
        assert out.finish_reason == "length" and len(out.output_ids) == 40  # type: ignore[union-attr]
