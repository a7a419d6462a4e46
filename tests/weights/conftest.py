"""Fixtures: a WeightReceiverActor applying into an ApplySink, on fresh tcp endpoints."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from rollwire.actors.weight_receiver import WeightReceiverActor
from rollwire.runtime import ActorSystem, address
from tests.conftest import free_tcp_endpoint
from tests.weights.harness import ApplySink


@dataclass
class Rig:
    endpoint: str  # where the trainer binds its ROUTER
    pub_endpoint: str
    system: ActorSystem
    sink_name: str
    receiver_name: str

    @property
    def sink(self) -> ApplySink:
        return self.system.actor(self.sink_name)  # type: ignore[return-value]

    @property
    def receiver(self) -> WeightReceiverActor:
        return self.system.actor(self.receiver_name)  # type: ignore[return-value]


async def make_rig(system: ActorSystem, *, stall_timeout_s: float = 1.0, receiver_id: str = "r1",
                   known: dict | None = None, endpoint: str | None = None, delay_s: float = 0.0,
                   coalesce: bool = False, curve: Any = None) -> Rig:
    """A receiver and its sink; names are unique per call (ZeroMQ frees an inproc name
    asynchronously after close, so the next test must not bind the same one)."""
    endpoint = endpoint or free_tcp_endpoint()
    suffix = uuid.uuid4().hex[:8]
    sink_name, receiver_name = f"sink-{suffix}", f"receiver-{suffix}"
    await system.spawn(lambda: ApplySink(known, name=sink_name, delay_s=delay_s))
    await system.spawn(lambda: WeightReceiverActor(endpoint, receiver_id=receiver_id,
                                                   apply_endpoint=address(sink_name, "weights"),
                                                   stall_timeout_s=stall_timeout_s, coalesce=coalesce,
                                                   name=receiver_name, **({"curve": curve} if curve else {})))
    return Rig(endpoint, free_tcp_endpoint(), system, sink_name, receiver_name)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    system = ActorSystem()
    try:
        yield await make_rig(system)
    finally:
        await system.stop()
