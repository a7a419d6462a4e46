"""rollwire: an RL rollout service on SGLang (or an embedded transformers engine)."""

from rollwire.clients.rollout import (
    GenerateOutput,
    GenerationStream,
    RequestTimeout,
    RolloutClient,
    RolloutError,
)
from rollwire.clients.session import Session, Trajectory, TurnRecord
from rollwire.fleet import RolloutFleet
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
    "RolloutFleet",
    "SamplingParams",
    "Session",
    "TrainerPublisher",
    "Trajectory",
    "TurnRecord",
    "VersionSpan",
]


def __getattr__(name: str) -> object:
    # the trainer side pulls in torch: imported on first use, not with every rollout client
    if name in ("TrainerPublisher", "PushReport", "PushError"):
        from rollwire.weightsync import publisher

        return getattr(publisher, name)
    raise AttributeError(f"module 'rollwire' has no attribute {name!r}")
