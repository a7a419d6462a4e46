"""Tensors as payload frames: the body carries ``TensorRef``s, the bytes travel beside it.

Encoding hands ZeroMQ a memoryview of the tensor's own storage (no copy; the tensor must stay
alive and unchanged until the send completes, which ``sockets.send(copy=False)`` awaits).
Decoding builds a tensor *view* on the received frame: it keeps that frame's buffer alive and
is read-only in spirit (torch cannot mark it so); ``.clone()`` it to own a writable copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from rollwire.messages.codec import Buffer
from rollwire.messages.envelope import TensorRef

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {name!r}; supported: {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """Raw bytes of a CPU tensor, zero-copy when it is already contiguous."""
    if t.device.type != "cpu":
        raise ValueError(f"tensor on {t.device} cannot be sent as frames; move it to CPU first")
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode_tensors(tensors: Sequence[torch.Tensor], first_frame: int = 0) -> tuple[list[TensorRef], list[memoryview]]:
    refs, bufs = [], []
    for i, t in enumerate(tensors):
        refs.append(TensorRef(first_frame + i, dtype_name(t.dtype), list(t.shape)))
        bufs.append(tensor_buffer(t))
    return refs, bufs


def decode_tensor(ref: TensorRef, payload: Sequence[Buffer]) -> torch.Tensor:
    """A view on the payload frame; raises ValueError on a bad index, dtype or size."""
    if not 0 <= ref.frame < len(payload):
        raise ValueError(f"tensor frame {ref.frame} out of range ({len(payload)} payload frames)")
    dtype = dtype_from_name(ref.dtype)
    buf = payload[ref.frame]
    numel = 1
    for d in ref.shape:
        if d < 0:
            raise ValueError(f"negative dimension in shape {ref.shape}")
        numel *= d
    expected = numel * dtype.itemsize
    if len(buf) != expected:
        raise ValueError(f"frame {ref.frame} has {len(buf)} bytes, shape {ref.shape} {ref.dtype} needs {expected}")
    if expected == 0:
        return torch.empty(ref.shape, dtype=dtype)
    with warnings.catch_warnings():  # frombuffer warns on read-only buffers; the view is not written
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(dtype).view(ref.shape)
