"""A cancel that arrives in the same loop turn as a call's failure is never lost.

Python 3.11's ``asyncio.wait_for`` returns the awaited future's result when the task is cancelled
after that future completed but before the task ran again, so the cancellation disappears. A
retry loop around such a call (the WeightReceiverActor's registration) then never stops: the
server's receiver hung on stop whenever a trainer closed the link as the server shut down."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from rollwire.messages.weights import Register, TrainerReply
from rollwire.transports.rpc import ConnectionClosed, RpcClient
from rollwire.transports.sockets import ipc_endpoint
from tests.conftest import until


async def test_a_retry_loop_cancelled_as_its_call_fails_ends_cancelled() -> None:
    endpoint = ipc_endpoint("cancel")
    silent = zmq.asyncio.Context.instance().socket(zmq.ROUTER)  # receives, never answers
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind(endpoint)
    client: RpcClient[TrainerReply] = RpcClient(endpoint, TrainerReply)
    attempts = 0

    async def register_until_answered() -> None:
        nonlocal attempts
        while attempts < 1000:
            attempts += 1
            try:
                await client.call(Register(receiver_id="r", host_id="h", transports=["inline"], live_version=0),
                                  timeout=30)
                return
            except (ConnectionClosed, TimeoutError):
                await asyncio.sleep(0.01)  # as a registration loop does: pause, try again

    task = asyncio.ensure_future(register_until_answered())
    try:
        await until(lambda: bool(client._waiters), "the call waiting for its reply", 30)
        await client.close()  # fails the pending call: the task is now ready to run with ConnectionClosed
        task.cancel()  # ... and is cancelled before it runs
        await asyncio.wait([task], timeout=10)
        assert task.cancelled(), f"the cancel was lost: still retrying after {attempts} attempts"
        assert attempts == 1
    finally:
        task.cancel()
        silent.close()
