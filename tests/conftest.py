"""Shared fixtures: a real rollout server (hf engine, tiny model) on a fresh ipc or tcp endpoint."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import pytest

from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports.sockets import free_tcp_endpoint, ipc_endpoint

__all__ = ["free_tcp_endpoint"]


@pytest.fixture(params=["ipc", "tcp"])
def endpoint(request: pytest.FixtureRequest) -> str:
    return ipc_endpoint("test") if request.param == "ipc" else free_tcp_endpoint()


@pytest.fixture
async def server(endpoint: str) -> AsyncIterator[RolloutServer]:
    cfg = ServerConfig(engine="hf", model="tiny", rollout_endpoint=endpoint, max_new_tokens_limit=256)
    async with RolloutServer(cfg) as srv:
        yield srv


async def until(what: Callable[[], bool | Awaitable[bool]], why: str = "the server state",
                timeout: float = 60.0) -> None:
    """Poll ``what`` (state of an in-process server, or an awaitable ask of a server's state) every
    10 ms until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not await _holds(what()):
        assert time.monotonic() < deadline, f"timed out waiting for {why}"
        await asyncio.sleep(0.01)


async def _holds(result: bool | Awaitable[bool]) -> bool:
    return await result if inspect.isawaitable(result) else result


def kill_all(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every process still running, and reap each."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
