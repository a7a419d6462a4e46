"""Background tasks kept alive until they end.

asyncio holds only a weak reference to a running task: one nobody keeps can be garbage-collected
mid-flight. Every "run this to its end in the background" in rollwire goes through one
``BackgroundTasks``, which holds each task until it finishes and can drain or cancel them all. A
task that fails is logged as it ends (nobody awaits it: asyncio would otherwise report "Task
exception was never retrieved" at some later garbage collection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any

from rollwire.runtime.logging import get_logger

log = get_logger("rollwire.tasks")


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("background_task_failed", task=task.get_name(), error=repr(exc)[:300])

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the running tasks to end (their exceptions are theirs), at most ``timeout``."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def cancel(self) -> None:
        """Cancel every running task and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
