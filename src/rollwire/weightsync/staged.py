"""Staged versions: a verified version's tensors, resolved once, waiting in this process for the load.

The WeightReceiverActor stages a version (its transport's ``Stager``), resolves every tensor here
into a view (on payload frames, on the attached shm arena, on the opened CUDA arena) and puts the
list in ``STAGED`` under a fresh key. Only the key travels: ``LoadVersion`` to the MemoryGovernor,
``SwapWeights`` to the GenerationActor, which loads ``STAGED.get(key).tensors``. The receiver
discards the entry once the governor answers, whatever the answer; the views keep their frames alive
until then. (Tensors cannot travel in a message without a copy; the actors of one server share this
process, so the table is the zero-copy hand-over, and the messages still carry the control flow.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rollwire.messages import ErrorCode, RollwireError
from rollwire.messages.codec import Buffer
from rollwire.messages.weights import NamedTensor
from rollwire.weightsync import cuda_ipc, shm
from rollwire.weightsync.inline import decode_tensor
from rollwire.weightsync.layout import Where, view_at
from rollwire.weightsync.memcopy import ByteCheck

NamedTensors = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class StagedVersion:
    version: int
    tensors: NamedTensors
    nbytes: int
    # buckets the receiver did not verify: the engine verifies them as it copies them (``ByteCheck``)
    checks: Sequence[ByteCheck] = ()


class StagedTable:
    """Staged versions by key (this process only)."""

    def __init__(self) -> None:
        self._entries: dict[str, StagedVersion] = {}
        self._keys = itertools.count(1)

    def put(self, staged: StagedVersion) -> str:
        key = f"v{staged.version}#{next(self._keys)}"
        self._entries[key] = staged
        return key

    def get(self, key: str) -> StagedVersion:
        try:
            return self._entries[key]
        except KeyError:
            raise RollwireError(ErrorCode.WEIGHTS_FAILED, f"no staged version {key!r} in this process") from None

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


STAGED = StagedTable()


_last_views: tuple[tuple[str, str], list[NamedTensor], NamedTensors] | None = None


def resolve(tensors: Sequence[NamedTensor], payload: Sequence[Buffer], where: Where) -> NamedTensors:
    """The (name, tensor) views of a staged version: on its payload frames (inline, gloo), on the
    attached shm arena ``where["shm_name"]`` or on the opened CUDA arena ``where["cuda_arena"]``
    (then ``TensorRef.frame`` is a byte offset). Valid while the sender keeps the bytes unchanged,
    i.e. until the receiver reports the outcome. A trainer pushes the same layout into the same
    arena version after version: the last arena's views are kept and handed out again when both
    repeat (a view costs microseconds, a model has hundreds of tensors)."""
    global _last_views
    if where.get("cuda_arena"):
        arena = ("cuda", where["cuda_arena"])
        base = cuda_ipc.opened(arena[1])
    elif where.get("shm_name"):
        arena = ("shm", where["shm_name"])
        base = shm.attach(arena[1]).tensor
    else:
        return [(nt.name, decode_tensor(nt.ref, payload)) for nt in tensors]
    if _last_views is not None and _last_views[0] == arena and _last_views[1] == tensors:
        return list(_last_views[2])
    views = [(nt.name, view_at(base, nt.ref.frame, nt.ref.dtype, nt.ref.shape)) for nt in tensors]
    _last_views = (arena, list(tensors), views)
    return list(views)


def forget_views() -> None:
    """Drop the kept views, and the arena mapping they keep alive (a stopping receiver)."""
    global _last_views
    _last_views = None


def stage_tensors(version: int, tensors: NamedTensors) -> str:
    """Put already-resolved tensors in the table (tests, and loaders that hold tensors in this process)."""
    return STAGED.put(StagedVersion(version, tensors, sum(t.numel() * t.element_size() for _, t in tensors)))
