"""The GenerationActor closes each engine stream it reads as soon as it stops reading it.

An SGLang generate_request left open (suspended, not closed) holds off every weight update, so a
stream must not wait for garbage collection: a stored exception's traceback keeps the reading
frame, and with it the stream, alive."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rollwire.actors.flights import InFlight, SampleOutput
from rollwire.actors.generation import GenerationActor
from rollwire.engines.base import EngineDelta
from rollwire.messages import GenerateRequest
from rollwire.runtime import Origin
from tests.fakes import FaultyEngine


def recording_stream(closed: list[str]) -> AsyncIterator[EngineDelta]:
    async def stream() -> AsyncIterator[EngineDelta]:
        try:
            for i in range(1000):
                yield EngineDelta("r0", [i], None, 0, None)
        finally:
            closed.append("r0")

    return stream()


async def test_a_stream_read_until_the_reply_fails_is_closed_before_the_error_leaves_the_actor() -> None:
    actor = GenerationActor(FaultyEngine)

    async def reply_fails(*_: object, **__: object) -> None:
        raise ConnectionError("the worker's socket is gone")

    actor.reply = reply_fails  # type: ignore[method-assign]
    flight = InFlight(origin=Origin("rollout", "rollout", b"worker", 1), engine_rids=["r0"], arrived=0.0)
    closed: list[str] = []
    out = SampleOutput(version=0, logprobs=None)
    with pytest.raises(ConnectionError) as err:
        await actor._collect(flight, GenerateRequest(input_ids=[1], stream=True), 0, recording_stream(closed), out)
    assert err.value.__traceback__ is not None  # kept alive, with the frames that read the stream
    assert closed == ["r0"] and out.ids == [0]  # one token read, then the stream closed, not left suspended


async def test_a_stream_read_to_its_end_is_closed_once() -> None:
    actor = GenerationActor(FaultyEngine)
    closed: list[str] = []

    async def finite() -> AsyncIterator[EngineDelta]:
        try:
            yield EngineDelta("r0", [7], None, 3, "length")
        finally:
            closed.append("r0")

    out = SampleOutput(version=0, logprobs=None)
    flight = InFlight(origin=Origin("rollout", "rollout", b"worker", 1), engine_rids=["r0"], arrived=0.0)
    await actor._collect(flight, GenerateRequest(input_ids=[1]), 0, finite(), out)
    assert closed == ["r0"] and (out.ids, out.finish, out.spans) == ([7], "length", [[3, 0, 1]])
