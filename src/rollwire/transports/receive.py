"""The one receive loop: every socket's single receiving task (actor ports, RPC clients, the
trainer's ROUTER, subscribers) waits for a message, then handles it and every message already
queued behind it with non-blocking receives (no Future each), yielding every ``RECV_BATCH``
messages so a long queue never starves the loop's other tasks.

``on_frames`` runs synchronously and must not raise for a peer's bytes: decoding and dispatch
errors are the caller's to count or answer (a raise here ends the loop, as a dead socket does)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from rollwire.transports import sockets

RECV_BATCH = 256  # messages handled per wake-up before the task yields


async def receive_loop(sock: zmq.asyncio.Socket, on_frames: Callable[[list[Any]], None], *,
                       copy: bool = True, batch: int = RECV_BATCH) -> None:
    """Feed every multipart message of ``sock`` to ``on_frames`` until cancelled. A cancel
    requested from inside ``on_frames`` (an actor that crashed on this message) stops the loop
    before it reads another: what is still queued stays in the socket for a successor."""
    ready = sockets.shadow(sock)
    this = asyncio.current_task()
    while True:
        frames: list[Any] = await sock.recv_multipart(copy=copy)
        handled = 0
        while True:
            on_frames(frames)
            if this is not None and this.cancelling():
                raise asyncio.CancelledError
            handled += 1
            if handled % batch == 0:
                await asyncio.sleep(0)
            try:
                frames = ready.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                break
