"""The nccl transport's rules that hold without GPUs (its data path needs two; see issue 8 and
tests/gpu/nccl_two_gpu.py): it is never picked by ``auto``, an explicit choice needs every
receiver to offer it, an announcement needs its buckets' arena offsets, and a receiver without
CUDA and NCCL does not offer it."""

from __future__ import annotations

import pytest
import torch

from rollwire.actors.weight_receiver import WeightReceiverActor
from rollwire.messages.weights import NcclPayload
from rollwire.weightsync.layout import LayoutError, check_layout, plan_buckets
from rollwire.weightsync.push import Registered, choose_transport
from tests.weights.test_layout import ready_for

WITH_NCCL = ["shm", "inline", "gloo", "nccl"]


def receiver(rid: str, transports: tuple[str, ...] = ("shm", "inline", "gloo", "nccl")) -> Registered:
    return Registered(rid, b"peer", "h", list(transports), 0, [])


def test_auto_never_picks_a_broadcast_and_an_explicit_nccl_needs_every_receiver_to_offer_it() -> None:
    both = [receiver("a"), receiver("b")]
    assert choose_transport("auto", WITH_NCCL, "h", both) == "shm"
    assert choose_transport("nccl", WITH_NCCL, "h", both) == "nccl"
    with pytest.raises(ValueError, match="cannot reach receivers \\['c'\\]"):
        choose_transport("nccl", WITH_NCCL, "h", [*both, receiver("c", ("shm", "inline", "gloo"))])
    with pytest.raises(ValueError, match="not available here"):
        choose_transport("nccl", ["shm", "inline", "gloo"], "h", both)


def test_an_nccl_announcement_without_one_offset_per_bucket_is_refused() -> None:
    plans = plan_buckets([("w", torch.zeros(300)), ("b", torch.zeros(10))], bucket_bytes=1024)
    check_layout(ready_for(plans, payload=NcclPayload(group="tcp://h:1", ranks=["a"],
                                                      offsets=[4096 * i for i in range(len(plans))])))
    with pytest.raises(LayoutError, match="nccl: 0 offsets"):
        check_layout(ready_for(plans, payload=NcclPayload(group="tcp://h:1", ranks=["a"], offsets=[])))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a receiver without CUDA offers")
def test_a_receiver_without_cuda_does_not_offer_nccl_or_cuda_ipc() -> None:
    actor = WeightReceiverActor("tcp://127.0.0.1:1", receiver_id="r", apply_endpoint="inproc://x")
    assert "nccl" not in actor.transports and "cuda_ipc" not in actor.transports
    assert {"inline", "gloo"} <= set(actor.transports)
