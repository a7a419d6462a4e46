"""The wire protocol. Nothing outside this package defines a wire type.

One tagged union per socket (below), one ``Codec``. See docs/protocol.md.
"""

from __future__ import annotations

from rollwire.messages.codec import Codec, ProtocolError
from rollwire.messages.control import HealthReply, HealthRequest, StatusReply, StatusRequest
from rollwire.messages.envelope import PROTOCOL_VERSION, Header, TensorRef
from rollwire.messages.errors import ErrorCode, ErrorReply
from rollwire.messages.generate import (
    AbortRequest,
    FinishReason,
    GenerateChunk,
    GenerateDone,
    GenerateRequest,
    SamplingParams,
    Timings,
    Usage,
    VersionSpan,
)

# The rollout socket: rollout workers (DEALER) -> server (ROUTER) and back.
RolloutRequest = GenerateRequest | AbortRequest | HealthRequest | StatusRequest
RolloutReply = GenerateChunk | GenerateDone | ErrorReply | HealthReply | StatusReply

__all__ = [
    "PROTOCOL_VERSION",
    "AbortRequest",
    "Codec",
    "ErrorCode",
    "ErrorReply",
    "FinishReason",
    "GenerateChunk",
    "GenerateDone",
    "GenerateRequest",
    "Header",
    "HealthReply",
    "HealthRequest",
    "ProtocolError",
    "RolloutReply",
    "RolloutRequest",
    "SamplingParams",
    "StatusReply",
    "StatusRequest",
    "TensorRef",
    "Timings",
    "Usage",
    "VersionSpan",
]
