"""Tensors cross a real ZeroMQ socket as payload frames: one frame per tensor beside the
header and body, bit-exact, and decoded as views on the received frames (no copy).

The socket pair is rollwire's own DEALER -> ROUTER (as on an actor's zero-copy control port),
over inproc and ipc, on pyzmq's asyncio sockets, received with ``copy=False``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

from rollwire.messages import Codec, NamedTensor, TensorRef
from rollwire.transports import sockets
from rollwire.weightsync.inline import decode_tensor, encode_tensors


class Tensors(msgspec.Struct, frozen=True, tag="tensors", array_like=True):
    """Tensors as payload frames, as a trainer's BucketData carries its bucket."""

    tensors: list[NamedTensor]


codec: Codec[Any] = Codec(Tensors)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(5, 3, generator=g)
    f32[0, 0], f32[0, 1], f32[0, 2] = float("nan"), float("-inf"), -0.0  # bits, not just values
    return {
        "bf16": torch.randn(4, 7, generator=g).to(torch.bfloat16),
        "f32_transposed": f32.t(),  # non-contiguous: strides (1, 3)
        "empty": torch.empty(0, 3, dtype=torch.float32),
        "scalar": torch.tensor(2.5, dtype=torch.float64),  # 0-dim
        "i64": torch.tensor([[-(1 << 62), -1, 0], [1, 7, (1 << 62)]], dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _address(buf: Any) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


class Pair:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.router = sockets.router([endpoint], ctx=ctx)
        self.dealer = sockets.dealer(endpoint, ctx=ctx)

    async def send(self, rid: int, tensors: list[torch.Tensor]) -> None:
        refs, bufs = encode_tensors(tensors)
        msg = Tensors(tensors=[NamedTensor(f"t{i}", r) for i, r in enumerate(refs)])
        assert await sockets.send(self.dealer, codec.encode(rid, msg, bufs), copy=False)

    async def recv(self) -> list[zmq.Frame]:
        frames = await self.router.recv_multipart(copy=False)
        return frames[1:]  # drop the peer identity the ROUTER prepends


@pytest.fixture(params=["inproc", "ipc"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    ctx = zmq.asyncio.Context()
    name = f"tensor-frames-{id(ctx)}"
    endpoint = sockets.inproc_endpoint(name) if request.param == "inproc" else sockets.ipc_endpoint("tf")
    p = Pair(ctx, endpoint)
    try:
        yield p
    finally:
        p.dealer.close(linger=0)
        p.router.close(linger=0)
        ctx.term()


async def test_each_tensor_travels_as_one_frame_beside_header_and_body(pair: Pair) -> None:
    tensors = list(_tensors().values())
    await pair.send(11, tensors)
    frames = await pair.recv()
    assert len(frames) == 2 + len(tensors)
    rid, msg, payload = codec.decode([f.buffer for f in frames])
    assert rid == 11 and isinstance(msg, Tensors)
    assert [t.ref.frame for t in msg.tensors] == list(range(len(tensors)))
    assert len(payload) == len(tensors)


@pytest.mark.parametrize("kind", list(_tensors()))
async def test_a_tensor_arrives_bit_equal_with_its_dtype_and_shape(pair: Pair, kind: str) -> None:
    sent = _tensors()[kind]
    await pair.send(1, [sent])
    frames = await pair.recv()
    assert len(frames) == 3
    _, msg, payload = codec.decode([f.buffer for f in frames])
    got = decode_tensor(msg.tensors[0].ref, payload)
    assert got.dtype == sent.dtype
    assert got.shape == sent.shape
    assert got.is_contiguous()
    assert _bits(got) == _bits(sent)
    assert len(payload[0]) == sent.numel() * sent.element_size()


async def test_a_decoded_tensor_is_a_view_on_the_received_frame(pair: Pair) -> None:
    sent = torch.arange(1024, dtype=torch.float32)
    await pair.send(1, [sent])
    frames = await pair.recv()
    _, msg, payload = codec.decode([f.buffer for f in frames])
    got = decode_tensor(msg.tensors[0].ref, payload)
    assert got.data_ptr() == _address(payload[0])


async def test_a_decoded_tensor_keeps_its_frame_alive_after_the_frames_are_dropped(pair: Pair) -> None:
    sent = torch.arange(4096, dtype=torch.int64)
    await pair.send(1, [sent])
    frames = await pair.recv()
    _, msg, payload = codec.decode([f.buffer for f in frames])
    got = decode_tensor(msg.tensors[0].ref, payload)
    del frames, payload, msg
    gc.collect()
    _ = torch.zeros(1 << 16, dtype=torch.int64) + 1  # reuse freed memory if the frame were gone
    assert torch.equal(got, sent)


async def test_many_tensors_after_a_payload_offset_are_found_by_their_frame_index(pair: Pair) -> None:
    tensors = [torch.full((i + 1,), float(i)) for i in range(5)]
    refs, bufs = encode_tensors(tensors, first_frame=2)
    blobs = [memoryview(b"first"), memoryview(b"second")]
    msg = Tensors(tensors=[NamedTensor(f"t{i}", r) for i, r in enumerate(refs)])
    assert await sockets.send(pair.dealer, codec.encode(4, msg, [*blobs, *bufs]), copy=False)
    frames = await pair.recv()
    assert len(frames) == 2 + 2 + 5
    _, got_msg, payload = codec.decode([f.buffer for f in frames])
    for named, sent in zip(got_msg.tensors, tensors, strict=True):
        assert torch.equal(decode_tensor(named.ref, payload), sent)
    assert bytes(payload[0]) == b"first"


def test_a_non_contiguous_tensor_is_sent_in_logical_order() -> None:
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3).t()
    refs, bufs = encode_tensors([t])
    assert refs == [TensorRef(0, "int32", [3, 2])]
    assert np.frombuffer(bufs[0], dtype=np.int32).tolist() == [0, 3, 1, 4, 2, 5]


def test_a_contiguous_tensor_is_sent_without_a_copy() -> None:
    t = torch.arange(16, dtype=torch.float32)
    _, bufs = encode_tensors([t])
    assert _address(bufs[0]) == t.data_ptr()


# -- decode refuses what does not fit ----------------------------------------------------------
PAYLOAD = [memoryview(bytes(24))]  # 24 bytes: 6 float32 or 3 int64


@pytest.mark.parametrize("ref", [
    TensorRef(0, "float32", [5]),  # 20 bytes needed
    TensorRef(0, "float32", [7]),  # 28 bytes needed
    TensorRef(0, "int64", [2, 2]),
    TensorRef(0, "float32", []),  # a scalar needs 4 bytes
    TensorRef(0, "float32", [0]),  # an empty tensor needs 0 bytes
], ids=["short", "long", "int64-2x2", "scalar", "empty"])
def test_decode_refuses_a_frame_of_the_wrong_byte_size(ref: TensorRef) -> None:
    with pytest.raises(ValueError, match="bytes"):
        decode_tensor(ref, PAYLOAD)


@pytest.mark.parametrize("dtype", ["complex64", "float8_e4m3fn", "torch.float32", "", "object"])
def test_decode_refuses_a_dtype_it_does_not_support(dtype: str) -> None:
    with pytest.raises(ValueError, match="dtype"):
        decode_tensor(TensorRef(0, dtype, [6]), PAYLOAD)


@pytest.mark.parametrize("frame", [1, 2, -1, 1 << 40])
def test_decode_refuses_a_frame_index_out_of_range(frame: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        decode_tensor(TensorRef(frame, "float32", [6]), PAYLOAD)


def test_decode_refuses_a_negative_dimension() -> None:
    with pytest.raises(ValueError, match="negative"):
        decode_tensor(TensorRef(0, "float32", [-2, -3]), PAYLOAD)


def test_decode_accepts_exactly_the_right_size() -> None:
    assert decode_tensor(TensorRef(0, "int64", [3]), PAYLOAD).tolist() == [0, 0, 0]
    assert decode_tensor(TensorRef(0, "float32", [2, 3]), PAYLOAD).shape == (2, 3)
