"""An Engine driven on its own event loop in a background thread, for tests.

``sglang.Engine`` keeps the loop it was built on, and pytest-asyncio gives each test a fresh loop;
so a test suite that shares one SGLang engine across tests (an engine start costs a minute) runs
it here and talks to it through this proxy, which forwards every call to the engine's loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import Any

import torch

from rollwire.engines.base import Engine, EngineDelta, EngineInfo, EngineRequest, MemoryTag, PauseMode


class ThreadedEngine:
    def __init__(self, factory: Callable[[], Engine]) -> None:
        self._factory = factory
        self.engine: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    async def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def start(self) -> None:
        async def build() -> None:
            self.engine = self._factory()
            await self.engine.start()
        await self._call(build())

    @property
    def weight_version(self) -> int:
        return int(self.engine.weight_version)

    def info(self) -> EngineInfo:
        info: EngineInfo = self.engine.info()
        return info

    def validate(self, req: EngineRequest) -> None:
        self.engine.validate(req)

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineDelta]:
        here = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for d in self.engine.generate(req):
                    here.call_soon_threadsafe(q.put_nowait, ("delta", d))
            except BaseException as e:
                here.call_soon_threadsafe(q.put_nowait, ("error", e))
                return
            here.call_soon_threadsafe(q.put_nowait, ("end", None))

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                kind, item = await q.get()
                if kind == "delta":
                    yield item
                elif kind == "error":
                    raise item
                else:
                    return
        finally:
            if not fut.done():
                fut.cancel()  # cancels pump() there: the engine's generator closes and aborts the request

    async def abort(self, rid: str) -> None:
        await self._call(self.engine.abort(rid))

    async def pause(self, mode: PauseMode) -> None:
        await self._call(self.engine.pause(mode))

    async def resume(self) -> None:
        await self._call(self.engine.resume())

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        await self._call(self.engine.update_weights(list(named_tensors), version))

    async def release_memory(self, tags: Sequence[MemoryTag]) -> None:
        await self._call(self.engine.release_memory(tags))

    async def resume_memory(self, tags: Sequence[MemoryTag]) -> None:
        await self._call(self.engine.resume_memory(tags))

    async def flush_cache(self) -> None:
        await self._call(self.engine.flush_cache())

    async def close_session(self, session_id: str) -> None:
        await self._call(self.engine.close_session(session_id))

    async def run(self, fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``fn(engine)`` on the engine's loop."""
        return await self._call(fn(self.engine))

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self._call(self.engine.shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
