"""rollwire: an RL rollout service on SGLang (or an embedded transformers engine)."""

from rollwire.clients.rollout import (
    GenerateOutput,
    GenerationStream,
    RequestTimeout,
    RolloutClient,
    RolloutError,
)
from rollwire.messages import ErrorCode, GenerateChunk, GenerateDone, SamplingParams, VersionSpan

__version__ = "0.1.0"

__all__ = [
    "ErrorCode",
    "GenerateChunk",
    "GenerateDone",
    "GenerateOutput",
    "GenerationStream",
    "RequestTimeout",
    "RolloutClient",
    "RolloutError",
    "SamplingParams",
    "VersionSpan",
]
