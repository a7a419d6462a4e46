"""TrainerLink: the trainer's ROUTER, where receivers register, pull buckets and report outcomes.

It decodes each message, hands it to the trainer's handler for its type (``@handles``) and sends
replies. Nothing a peer sends stops it: an undecodable or unexpected message is a typed error to
its sender or a counted drop (``counters``), and a handler that raises answers its message with
``internal`` and costs only that message.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from rollwire.messages.codec import Codec, ProtocolError
from rollwire.messages.errors import ErrorCode, ErrorReply
from rollwire.messages.weights import Ack, TrainerRequest
from rollwire.runtime.logging import get_logger
from rollwire.runtime.tasks import BackgroundTasks
from rollwire.transports import sockets
from rollwire.transports.security import client_of

log = get_logger("rollwire.trainer")

# a handler gets (peer routing id, peer's CURVE key or "", request id, message); a coroutine it
# returns runs as a task of the link
Handler = Callable[[bytes, str, int, Any], Any]


class TrainerLink:
    def __init__(self, router: Any, handlers: dict[type, Handler], counters: Counter[str], *, curve: bool) -> None:
        self.router = router
        self.counters = counters
        self._handlers = handlers
        self._curve = curve
        self.codec: Codec[Any] = Codec(TrainerRequest)
        self._running = BackgroundTasks()  # handlers running (pulls waiting for credits, replies)

    async def close(self) -> None:
        await self._running.cancel()
        self.router.close(linger=sockets.DEFAULT_LINGER_MS)

    async def reply(self, peer: bytes, rid: int, msg: Any, payload: Sequence[Any] = ()) -> bool:
        """Send ``msg`` (and ``payload``, zero-copy: unchanged until sent) to ``peer``; False if
        it could not be delivered (counted)."""
        try:
            return await sockets.send(self.router, [peer, *self.codec.encode(rid, msg, payload)], copy=not payload)
        except zmq.ZMQError as e:
            self.counters["replies_undeliverable"] += 1
            log.warning("reply_failed", error=str(e))
            return False

    async def refuse(self, peer: bytes, rid: int, code: ErrorCode, why: str, retry_after_s: float = 0.0) -> None:
        await self.reply(peer, rid, ErrorReply(code=code, message=why, origin="trainer", retry_after_s=retry_after_s))

    def connected(self, peer: bytes) -> bool:
        """Whether ``peer``'s connection still takes sends (ROUTER_MANDATORY: a send to one that is
        gone fails at once)."""
        try:
            pending = sockets.send_nowait(self.router, [peer, *self.codec.encode(0, Ack())])
        except zmq.ZMQError:
            return False
        if pending is not None:
            pending.cancel()
        return True

    def on_frames(self, frames: list[Any]) -> None:
        """The ROUTER's receive loop hands each message here."""
        if len(frames) < 2:
            self.counters["bad_messages"] += 1
            return
        peer = frames[0].bytes
        key = (client_of(frames[-1]) or "") if self._curve else ""
        try:
            rid, msg, _ = self.codec.decode([f.buffer for f in frames[1:]])
        except ProtocolError as e:
            self.counters["bad_messages"] += 1
            self._running.spawn(self.refuse(peer, e.rid, e.code, e.message))
            return
        except Exception as e:  # a decoder that raised something else (deep nesting: RecursionError)
            self.counters["bad_messages"] += 1
            self._running.spawn(self.refuse(peer, 0, ErrorCode.BAD_FRAME, f"undecodable: {type(e).__name__}"))
            return
        handler = self._handlers.get(type(msg))
        if handler is None:  # a reply type the codec knows, sent to us as a request
            self.counters["bad_messages"] += 1
            why = f"the trainer does not take {type(msg).__name__}"
            self._running.spawn(self.refuse(peer, rid, ErrorCode.UNKNOWN_KIND, why))
            return
        try:
            result = handler(peer, key, rid, msg)
        except Exception as e:
            self._failed(peer, rid, msg, e)
            return
        if result is not None:
            self._running.spawn(self._answering(peer, rid, msg, result))

    async def _answering(self, peer: bytes, rid: int, msg: Any, handling: Any) -> None:
        """Run a handler's coroutine; its failure is answered here (logged once, not again as a
        failed background task)."""
        try:
            await handling
        except Exception as e:
            self._failed(peer, rid, msg, e)

    def _failed(self, peer: bytes, rid: int, msg: Any, e: BaseException) -> None:
        self.counters["handler_errors"] += 1
        log.error("trainer_message_failed", kind=type(msg).__name__, error=repr(e)[:300], exc_info=e)
        self._running.spawn(self.refuse(peer, rid, ErrorCode.INTERNAL, f"{type(e).__name__}: {str(e)[:200]}"))
