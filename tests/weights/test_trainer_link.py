"""TrainerLink alone, on a real ROUTER with a raw DEALER peer: a handler that raises (at once, or in
the coroutine it returns) answers its message with ``internal`` and the request id, is counted and
logged once, and the link goes on serving the next message."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import structlog

from rollwire.messages import ErrorCode
from rollwire.messages.errors import ErrorReply
from rollwire.messages.weights import Ack, PullBucket, Register, TrainerReply
from rollwire.transports import sockets
from rollwire.weightsync.trainer_link import TrainerLink
from tests.conftest import free_tcp_endpoint
from tests.weights.hostile import call, dealer


async def test_a_failing_handler_costs_only_its_message_and_is_logged_once() -> None:
    counters: Counter[str] = Counter()

    def register(peer: bytes, key: str, rid: int, msg: Register) -> None:
        raise ValueError("broken at once")

    async def pull(peer: bytes, key: str, rid: int, msg: PullBucket) -> None:
        if msg.index == 7:
            raise KeyError("broken later")
        await link.reply(peer, rid, Ack())

    endpoint = free_tcp_endpoint()
    router = sockets.router([endpoint])
    link = TrainerLink(router, {Register: register, PullBucket: pull}, counters, curve=False)

    async def receive() -> None:
        for _ in range(3):  # the three messages below, no more: the loop is bounded
            link.on_frames(await router.recv_multipart(copy=False))

    receiving = asyncio.create_task(receive())
    peer = dealer(endpoint)
    try:
        with structlog.testing.capture_logs() as logs:
            reg = Register(receiver_id="r1", host_id="h", transports=["inline"], live_version=0, checksums=[])
            at_once = await call(peer, reg, TrainerReply, rid=11)
            later = await call(peer, PullBucket(version=1, index=7), TrainerReply, rid=12)
            fine = await call(peer, PullBucket(version=1, index=0), TrainerReply, rid=13)
            await asyncio.wait_for(receiving, 20)
        assert isinstance(at_once, ErrorReply) and at_once.code == ErrorCode.INTERNAL
        assert "ValueError" in at_once.message and "broken at once" in at_once.message
        assert isinstance(later, ErrorReply) and later.code == ErrorCode.INTERNAL and "KeyError" in later.message
        assert isinstance(fine, Ack)  # the link still serves
        assert counters["handler_errors"] == 2
        events: list[Any] = [e["event"] for e in logs]
        assert events.count("trainer_message_failed") == 2, events
        assert "background_task_failed" not in events  # one failure, one log line
    finally:
        receiving.cancel()
        peer.close(linger=0)
        await link.close()
