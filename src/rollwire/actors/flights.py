"""What the GenerationActor keeps per request in flight, and per sample while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from rollwire.engines.base import EngineDelta
from rollwire.runtime import Origin


@dataclass
class InFlight:
    origin: Origin
    engine_rids: list[str]
    arrived: float
    start_version: int = 0  # live version when it started generating (admitted, until then)
    streamed: bool = False
    restartable: bool = False  # streamed, yet its client takes chunks back (GenerateRequest.restartable)
    aborted: bool = False
    stopping: bool = False  # aborted because the server stops: a cut sample ends with shutting_down
    restarts: int = 0  # --max-staleness under the retract policy: times it was sent back to its prompt
    started: bool = False  # past its wait for min_version and admission: only then can it be stale
    closed: bool = False  # answered by someone else (supervisor): send nothing more
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    client: str | None = None  # whose limits it counts against (None: exempt)
    samples: int = 1
    waiting: bool = False  # counted among its client's requests waiting for min_version


@dataclass
class SampleOutput:
    """What one sample has produced so far."""

    version: int  # of the last token (the live version before any)
    logprobs: list[float] | None
    ids: list[int] = field(default_factory=list)
    spans: list[list[int]] = field(default_factory=list)  # [version, start, end)
    finish: str = "abort"
    cached: int = 0
    first_token: float = 0.0


async def no_deltas() -> AsyncIterator[EngineDelta]:
    return
    yield


def spans_add(spans: list[list[int]], version: int, n_tokens: int) -> None:
    """Extend the version spans [version, start, end) by ``n_tokens`` produced under ``version``."""
    if n_tokens == 0:
        return
    if spans and spans[-1][0] == version:
        spans[-1][2] += n_tokens
    else:
        start = spans[-1][2] if spans else 0
        spans.append([version, start, start + n_tokens])
