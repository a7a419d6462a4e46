"""A counting engine for fault injection only (crash on demand, slow steps). Never the proof of
a feature: features are tested on the real hf engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence

import torch

from rollwire.engines.base import EngineDelta, EngineError, EngineInfo, EngineRequest


class FaultyEngine:
    """Emits (last token + 1) % vocab every ``step_s``; raises RuntimeError when a prompt starts
    with ``crash_token`` (an unexpected bug, which must crash and restart the actor)."""

    def __init__(self, vocab: int = 100, step_s: float = 0.005, crash_token: int = 99) -> None:
        self.vocab, self.step_s, self.crash_token = vocab, step_s, crash_token
        self.version = 0
        self._aborted: set[str] = set()

    @property
    def weight_version(self) -> int:
        return self.version

    def info(self) -> EngineInfo:
        return EngineInfo("faulty", self.vocab, [], 1 << 20, self.version, "cpu", "float32")

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def validate(self, req: EngineRequest) -> None:
        if not req.input_ids:
            raise EngineError("empty_input", "input_ids is empty")

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineDelta]:
        if req.input_ids[0] == self.crash_token:
            raise RuntimeError("injected engine bug")
        tok = req.input_ids[-1]
        for i in range(req.params.max_new_tokens):
            await asyncio.sleep(self.step_s)
            if req.rid in self._aborted:
                self._aborted.discard(req.rid)
                yield EngineDelta(req.rid, [], None, self.version, "abort")
                return
            tok = (tok + 1) % self.vocab
            last = i == req.params.max_new_tokens - 1
            yield EngineDelta(req.rid, [tok], None, self.version, "length" if last else None)

    async def abort(self, rid: str) -> None:
        self._aborted.add(rid)

    async def pause(self, mode: str) -> None: ...

    async def resume(self) -> None: ...

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.version = version

    async def release_memory(self, tags: Sequence[str]) -> None: ...

    async def resume_memory(self, tags: Sequence[str]) -> None: ...

    async def flush_cache(self) -> None: ...

    async def close_session(self, session_id: str) -> None: ...
