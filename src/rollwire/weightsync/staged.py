"""The tensors of a staged version, for whoever loads it in this process.

A step on the way to one load path: the GenerationActor still turns an ApplyVersion into tensors
here (views on payload frames, on an attached shm arena, or on an opened CUDA arena).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rollwire.messages.codec import Buffer
from rollwire.messages.weights import ApplyVersion
from rollwire.weightsync import cuda_ipc, shm
from rollwire.weightsync.inline import decode_tensor
from rollwire.weightsync.layout import view_at


def tensors_from_apply(msg: ApplyVersion, payload: Sequence[Buffer]) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of an ApplyVersion: views on its payload frames (inline, gloo), on
    the attached shm arena ``msg.shm_name`` or on the opened CUDA arena ``msg.cuda_arena`` (CUDA
    tensors; ``TensorRef.frame`` is then a byte offset). The views are valid while the sender keeps
    the bytes unchanged, i.e. until it gets the reply."""
    if msg.cuda_arena:
        base = cuda_ipc.opened(msg.cuda_arena)
        return [(nt.name, view_at(base, nt.ref.frame, nt.ref.dtype, nt.ref.shape)) for nt in msg.tensors]
    if msg.shm_name:
        base = shm.attach(msg.shm_name).tensor
        return [(nt.name, view_at(base, nt.ref.frame, nt.ref.dtype, nt.ref.shape)) for nt in msg.tensors]
    return [(nt.name, decode_tensor(nt.ref, payload)) for nt in msg.tensors]
