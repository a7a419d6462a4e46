"""The Engine protocol: what GenerationActor needs from a backend (hf, sglang).

An engine is driven from one asyncio event loop (the GenerationActor's). It never imports an
actor or zmq. Outputs are streamed as ``EngineDelta``s; the last one of a request carries a
``finish_reason``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from rollwire.messages.control import ParamSpec
from rollwire.messages.errors import ErrorCode, RollwireError
from rollwire.messages.generate import FinishReason, SamplingParams
from rollwire.messages.weights import ALL_MEMORY_TAGS as ALL_MEMORY_TAGS  # re-exported for the engines
from rollwire.messages.weights import MemoryTag as MemoryTag
from rollwire.weightsync.memcopy import ByteCheck

PauseMode = Literal["abort", "retract", "in_place"]  # the engine's own; "drain" is the GenerationActor's


ENGINE_DEAD = ErrorCode.ENGINE_DEAD  # EngineError code: the engine died under the request (see DeathWatch)


class EngineError(RollwireError):
    """A request the engine refuses (bad input) or fails; the engine keeps serving, except with
    code ``engine_dead``: then it has died and every request it held got the same error."""


@dataclass
class EngineRequest:
    rid: str  # unique among the engine's live requests
    input_ids: list[int]
    params: SamplingParams  # n is handled above the engine: an engine request is one sample
    return_logprob: bool = False
    stream: bool = True  # False: the engine may hold tokens back and deliver them with the finish
    # stream: the consumer forwards tokens in chunks of at least this many (GenerateRequest.chunk_tokens),
    # so the engine may hold them back until a chunk is full (or the version changes, or the finish)
    chunk_tokens: int = 1
    # sessions: the engine may keep this request's KV under ``session_id`` when it finishes and
    # reuse it for the session's next request whose input_ids extend it (see close_session)
    session_id: str | None = None
    keep_stale_prefix: bool = False  # reuse a prefix computed by an older weight version
    client: str = ""  # who asked (the actor's per-client key): engines share batch slots fairly among clients


@dataclass
class EngineDelta:
    rid: str
    token_ids: list[int]  # new tokens since the previous delta
    logprobs: list[float] | None  # aligned with token_ids when return_logprob
    weight_version: int  # version that produced these tokens
    finish_reason: FinishReason | None = None  # set on the last delta only
    cached_tokens: int = 0  # tokens served from a reused prefix so far (over re-prefills too); the actor keeps the max


@dataclass
class EngineInfo:
    name: str
    vocab_size: int
    eos_token_ids: list[int]
    max_model_len: int
    weight_version: int
    device: str
    dtype: str
    extra: dict[str, object] = field(default_factory=dict)
    # False once a load failed after part of it was copied (or after a weights release) until a
    # whole version loads: the engine holds its requests meanwhile
    weights_complete: bool = True


@runtime_checkable
class DeathWatch(Protocol):
    """Optional part of an engine (hf and sglang have it): it can die (a worker thread failing
    outside any one request, SGLang's scheduler process killed). On death it fails every request
    it holds with ``EngineError(ENGINE_DEAD)`` at once, refuses new ones the same way, and calls
    the callback once with the reason, even when nothing was in flight."""

    def set_death_callback(self, callback: Callable[[str], None]) -> None: ...


@runtime_checkable
class VerifyingLoader(Protocol):
    """Optional part of an engine that copies weight bytes itself (the hf engine): it verifies the
    bytes of not-yet-verified buckets in the same pass as it copies them, instead of a separate
    checksum pass before the load. Without it, the GenerationActor verifies them first."""

    async def update_weights_verified(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                                      checks: Sequence[ByteCheck]) -> None:
        """``update_weights`` whose tensors lie in the buckets ``checks`` (not verified yet). A bucket
        that fails its check raises ``EngineError(bad_checksum)`` and the version is not live; if
        bytes were already copied, the engine holds no complete version (it generates nothing,
        requests wait) until a whole version loads."""


@runtime_checkable
class Engine(Protocol):
    def info(self) -> EngineInfo: ...

    @property
    def weight_version(self) -> int:
        """The live version, as ``info().weight_version``, without building the info (asked per request)."""

    async def start(self) -> None:
        """Start background work; called on the event loop that will drive the engine."""

    async def shutdown(self) -> None:
        """Abort everything still running (each gets a final "abort" delta) and stop."""

    def parameters(self) -> list[ParamSpec]:
        """The tensors a version may name: name, dtype, shape, and whether a complete version
        needs it (docs/protocol.md section 11.6); empty when the engine cannot tell."""

    def validate(self, req: EngineRequest) -> None:
        """Raise EngineError if ``req`` cannot run (empty, ids out of range, bad params, too long)."""

    def generate(self, req: EngineRequest) -> AsyncIterator[EngineDelta]:
        """Stream deltas of one request; the last carries finish_reason."""

    async def abort(self, rid: str) -> None:
        """Finish ``rid`` at its next step with finish_reason "abort" (no-op if unknown)."""

    async def pause(self, mode: PauseMode) -> None:
        """Stop generating. abort: running requests finish with "abort". retract: their KV is
        dropped and they are re-prefilled (prompt + output so far) on resume. in_place: they
        keep their KV and continue on resume."""

    async def resume(self) -> None: ...

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy tensors into the live parameters in place; then the live version is ``version``.
        Only called while paused. Raises EngineError on an unknown name, shape or dtype."""

    async def release_memory(self, tags: Sequence[MemoryTag]) -> None: ...

    async def resume_memory(self, tags: Sequence[MemoryTag]) -> None: ...

    async def flush_cache(self) -> None: ...

    async def close_session(self, session_id: str) -> None:
        """Free whatever the engine keeps for ``session_id`` (its cached prefix); no-op if unknown."""
