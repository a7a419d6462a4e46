"""Shared fixtures: a real rollout server (hf engine, tiny model) on a fresh ipc or tcp endpoint."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from rollwire.server import RolloutServer, ServerConfig
from rollwire.transports.sockets import ipc_endpoint


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(params=["ipc", "tcp"])
def endpoint(request: pytest.FixtureRequest) -> str:
    return ipc_endpoint("test") if request.param == "ipc" else free_tcp_endpoint()


@pytest.fixture
async def server(endpoint: str) -> AsyncIterator[RolloutServer]:
    cfg = ServerConfig(engine="hf", model="tiny", rollout_endpoint=endpoint, max_new_tokens_limit=256)
    async with RolloutServer(cfg) as srv:
        yield srv
