"""Step calls waiting for the receivers' ``StepDone``.

Several calls may wait on the same (receiver, step, phase) at once (a user's step and a barrier
release, two tasks of one trainer): each gets its own future, and an acknowledgement answers them
all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from rollwire.messages.weights import StepDone
from rollwire.weightsync.push import ReceiverFailed

Key = tuple[str, int, str]  # receiver id, step, phase


class StepWaits:
    def __init__(self) -> None:
        self._waiting: dict[Key, list[asyncio.Future[StepDone]]] = {}

    def expect(self, receiver_ids: Iterable[str], step: int, phase: str) -> dict[str, asyncio.Future[StepDone]]:
        loop = asyncio.get_running_loop()
        futs: dict[str, asyncio.Future[StepDone]] = {rid: loop.create_future() for rid in receiver_ids}
        for rid, fut in futs.items():
            self._waiting.setdefault((rid, step, phase), []).append(fut)
        return futs

    def forget(self, futs: dict[str, asyncio.Future[StepDone]], step: int, phase: str) -> None:
        for rid, fut in futs.items():
            if fut.done():
                if not fut.cancelled():
                    fut.exception()  # read: a failure nobody collected (the call was cancelled)
            else:
                fut.cancel()
            waiting = self._waiting.get((rid, step, phase), [])
            if fut in waiting:
                waiting.remove(fut)
            if not waiting:
                self._waiting.pop((rid, step, phase), None)

    def acknowledged(self, msg: StepDone) -> None:
        for fut in self._waiting.get((msg.receiver_id, msg.step, msg.phase), []):
            if not fut.done():
                fut.set_result(msg)

    def fail(self, why: str, receiver_id: str | None = None) -> None:
        """Fail what waits on ``receiver_id`` (None: on every receiver)."""
        for (rid, _, _), futs in self._waiting.items():
            if receiver_id is None or rid == receiver_id:
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(ReceiverFailed(why))
