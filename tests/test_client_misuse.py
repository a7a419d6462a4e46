"""The Python client used the wrong way (from an adversarial helper's list), against a real server:
each misuse ends in a typed error at the call, and nothing runs on the server for nobody."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from rollwire import RolloutClient, SamplingParams
from rollwire.messages import ErrorCode, GenerateChunk, RollwireError
from rollwire.server import RolloutServer

from .conftest import until


async def test_n_0_gets_the_servers_refusal_not_an_empty_answer(server: RolloutServer, endpoint: str) -> None:
    """(before: ``generate`` returned [] and a stream ended at once; the refusal was dropped)"""
    async with RolloutClient(endpoint) as rc:
        with pytest.raises(RollwireError) as e:
            await rc.generate([1, 2, 3], SamplingParams(n=0))
        assert e.value.code == ErrorCode.BAD_SAMPLING_PARAMS
        stream = rc.stream([1, 2, 3], SamplingParams(n=0))
        with pytest.raises(RollwireError) as e:
            async for _ in stream:
                pass
        assert e.value.code == ErrorCode.BAD_SAMPLING_PARAMS
        assert rc._rpc.dropped_replies == 0


async def test_a_stream_let_go_unread_is_aborted_on_the_server(server: RolloutServer, endpoint: str) -> None:
    """A loop left with ``return`` after the first chunk, the stream object then dropped: before,
    the request ran on to its max_new_tokens for nobody while its chunks piled up in the client's
    queue until ``close``. Now it ends ``abort`` on the server and its queue is gone."""
    async with RolloutClient(endpoint) as rc:
        aborts = (await rc.status()).counters.get("finish_abort", 0)

        async def first_chunk() -> object:
            async for msg in rc.stream([1, 2, 3], SamplingParams(max_new_tokens=256, ignore_eos=True)):
                return msg
            return None

        assert isinstance(await first_chunk(), GenerateChunk)
        await until(lambda: not rc._rpc.open_streams(), "the dropped stream's queue unregistered")

        async def idle() -> bool:
            return (await rc.status()).in_flight == 0

        await until(idle, "the abandoned request ended on the server")
        assert (await rc.status()).counters.get("finish_abort", 0) == aborts + 1
        never_read = rc.stream([1, 2, 3], SamplingParams(max_new_tokens=4))
        assert rc._rpc.open_streams() == [never_read.rid]
        del never_read  # never sent: nothing to abort, its queue goes
        await until(lambda: not rc._rpc.open_streams(), "the unread stream's queue unregistered")


async def test_a_client_used_from_a_second_event_loop_says_so(server: RolloutServer, endpoint: str) -> None:
    """Before: the second thread's call never returned (its reply went to a future of another loop)."""
    async with RolloutClient(endpoint) as rc:
        assert len((await rc.generate([1, 2, 3], SamplingParams(max_new_tokens=2))).output_ids) == 2

        def in_another_thread() -> object:
            return asyncio.run(rc.generate([1, 2, 3], SamplingParams(max_new_tokens=2)))

        with pytest.raises(RuntimeError, match="another event loop"):
            await asyncio.wait_for(asyncio.to_thread(in_another_thread), 60)
        assert len((await rc.generate([1, 2, 3], SamplingParams(max_new_tokens=2))).output_ids) == 2


async def test_ids_a_session_cannot_encode_leave_it_usable(server: RolloutServer, endpoint: str) -> None:
    """(before: a numpy array given to ``append`` raised TypeError before anything was sent, and
    marked the session desynced for good)"""
    async with RolloutClient(endpoint) as rc, rc.session() as s:
        with pytest.raises(TypeError):
            await s.append(np.array([3, 4]))  # type: ignore[arg-type]
        assert not s.desynced
        assert await s.append([3, 4]) == 2
        done = await s.generate([], SamplingParams(max_new_tokens=2))
        assert len(done.output_ids) == 2 and s.trajectory().token_ids[:2] == [3, 4]
