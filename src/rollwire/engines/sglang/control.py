"""SGLangEngine's control half: pause / resume in SGLang's modes, memory release by tag, cache
flush, and the scheduler round trips they need (the attributes below are SGLangEngine's).

Pause and continue live on SGLang's TokenizerManager (``pause_generation`` with mode abort,
retract or in_place; ``continue_generation``). New requests are held by the adapter while paused,
so with nothing of ours inside SGLang the scheduler is not paused at all. Released weights are
gone until re-sent (``resume_memory(["weights"])`` then ``update_weights``); a flush needs an idle
scheduler, so running requests are evicted first and re-submitted when the engine runs again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rollwire.engines.base import ALL_MEMORY_TAGS, EngineError, MemoryTag, PauseMode
from rollwire.engines.sglang import compat
from rollwire.engines.sglang.payloads import FlatStaging
from rollwire.engines.sglang.requests import Live
from rollwire.engines.sglang.weights import EVICT_TIMEOUT_S
from rollwire.engines.validation import check_tags
from rollwire.messages.errors import ErrorCode

log = logging.getLogger("rollwire.engines.sglang")


class ControlMixin:
    _tm: Any
    _io: Any
    _lock: asyncio.Lock | None
    _live: dict[str, Live]
    _paused: bool
    _released: set[MemoryTag]
    _weights_sent: bool
    _sched_paused: str
    _flat_staging: FlatStaging

    if TYPE_CHECKING:  # SGLangEngine's
        def _pulse(self) -> None: ...

    async def pause(self, mode: PauseMode) -> None:
        if mode not in ("abort", "retract", "in_place"):
            raise EngineError(ErrorCode.BAD_PAUSE_MODE, f"unknown pause mode {mode!r}")
        assert self._lock is not None, "engine not started"
        async with self._lock:
            self._paused = True
            self._pulse()
            # a segment submitted in this very tick is not inside SGLang's scheduler yet (its
            # TokenizerManager registers it, then waits on its pause condition before sending): let
            # it get there, or it would sit behind the pause where no abort or eviction reaches it
            await asyncio.sleep(0)
            if mode == "abort":
                for s in self._live.values():
                    s.abort_requested = True
                self._pulse()
                inside = [s for s in self._live.values() if s.submitted and not s.done]
                await self._pause_scheduler("retract")
                for s in inside:
                    self._tm.abort_request(s.srid)
                await self._wait_states_finished(inside, EVICT_TIMEOUT_S)
            elif not self._released and any(s.submitted and not s.done for s in self._live.values()):
                # with nothing inside SGLang the scheduler needs no pause (new requests are held here);
                # released: it is paused already, with nothing inside
                await self._pause_scheduler(mode)

    async def resume(self) -> None:
        """Run again. KV cache / CUDA graphs released while paused come back first; released weights
        do not (they must be re-sent): requests stay held until resume_memory + update_weights."""
        assert self._lock is not None, "engine not started"
        async with self._lock:
            self._paused = False
            if self._released and "weights" not in self._released:  # only KV / graphs released: take them back
                back = [t for t in ALL_MEMORY_TAGS if t in self._released]
                await self._tm.resume_memory_occupation(self._io.ResumeMemoryOccupationReqInput(tags=back), None)
                self._released.clear()
            if not self._weights_sent:  # requests stay held (``_runnable``), in SGLang too
                log.warning("resumed without a complete version loaded: requests are held until one loads")
            elif not self._released:
                await self._continue_scheduler()
            self._pulse()

    async def release_memory(self, tags: Sequence[MemoryTag]) -> None:
        """Frees GPU memory by tag (SGLang's torch_memory_saver). Needs a paused engine; requests
        inside SGLang are evicted first and re-submitted once the engine runs again. Released
        weights are lost: resume_memory(["weights"]), then update_weights with every tensor."""
        check_tags(tags)
        if not self._paused:
            raise EngineError(ErrorCode.NOT_PAUSED, "release_memory needs a paused engine")
        new = [t for t in ALL_MEMORY_TAGS if t in tags and t not in self._released]
        if not new:
            return
        assert self._lock is not None
        async with self._lock:
            await self._evict()
            await self._tm.release_memory_occupation(self._io.ReleaseMemoryOccupationReqInput(tags=list(new)), None)
            self._released.update(new)
            self._flat_staging.close()
            _return_cached_memory()
            if "weights" in new:
                self._weights_sent = False

    async def resume_memory(self, tags: Sequence[MemoryTag]) -> None:
        check_tags(tags)
        back = [t for t in ALL_MEMORY_TAGS if t in tags and t in self._released]
        if not back:
            return
        assert self._lock is not None
        async with self._lock:
            await self._tm.resume_memory_occupation(self._io.ResumeMemoryOccupationReqInput(tags=list(back)), None)
            self._released.difference_update(back)
            if not self._released and not self._paused and self._weights_sent:  # resume() came first: run now
                await self._continue_scheduler()
            self._pulse()

    async def flush_cache(self) -> None:
        """Drops SGLang's prefix cache. Refused (busy) while requests run unpaused; while paused,
        requests inside SGLang are evicted first (they re-prefill on resume)."""
        if not self._paused and any(not s.done for s in self._live.values()):
            raise EngineError(ErrorCode.BUSY, "flush_cache while requests are running; pause first")
        assert self._lock is not None
        async with self._lock:
            if "kv_cache" in self._released:
                return  # released KV was flushed by SGLang then
            if self._paused:
                await self._evict()
            out = await self._tm.flush_cache()
            if not getattr(out, "success", True):
                raise EngineError(ErrorCode.BUSY, f"sglang refused to flush: {getattr(out, 'message', '')}")

    # -- scheduler round trips ------------------------------------------------------------------

    async def _sync(self) -> None:
        """Round trip to the scheduler: it has handled everything sent before, and the outputs of
        steps before that have been handled here (they travel on another socket: give it a moment)."""
        await self._tm.get_internal_state()
        await asyncio.sleep(0.002)

    async def _settle(self, lives: list[Live], quiet_s: float = 0.003, limit_s: float = 0.2) -> None:
        """Wait until the outputs of ``lives`` stop arriving (after a pause, the last step's tokens
        may still be on their way through SGLang's output socket)."""
        deadline = time.monotonic() + limit_s
        seen = [s.produced() for s in lives]
        while time.monotonic() < deadline:
            await asyncio.sleep(quiet_s)
            now = [s.produced() for s in lives]
            if now == seen:
                return
            seen = now

    async def _pause_scheduler(self, mode: str) -> None:
        await self._tm.pause_generation(self._io.PauseGenerationReqInput(mode=mode))
        await self._sync()
        self._sched_paused = mode

    async def _continue_scheduler(self) -> None:
        if self._sched_paused:
            await self._tm.continue_generation(self._io.ContinueGenerationReqInput())
            self._sched_paused = ""

    async def _evict(self) -> None:
        """Take every request out of SGLang (to be re-submitted later) so its scheduler is idle."""
        inside = [s for s in self._live.values() if s.submitted and not s.done]
        if self._sched_paused != "retract" or inside:
            await self._pause_scheduler("retract")  # running requests go back to the waiting queue
        if not inside:
            return
        for s in inside:
            s.evicting = True
            self._tm.abort_request(s.srid)
        await self._wait_states_finished(inside, EVICT_TIMEOUT_S)

    async def _wait_states_finished(self, lives: list[Live], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(s.state is not None and not compat.state_finished(s.state) for s in lives):
            if time.monotonic() > deadline:
                raise EngineError(ErrorCode.INTERNAL, "sglang did not end the aborted requests in time")
            await asyncio.sleep(0.001)


def _return_cached_memory() -> None:
    """This process's share of the GPU: the buffers weight loads copied into (freed once SGLang's
    scheduler let go of them, then kept by torch's caching allocator) go back to the driver, so
    that a colocated trainer gets them too."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()

