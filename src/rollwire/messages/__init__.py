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
from rollwire.messages.samples import Sample, SampleGroup
from rollwire.messages.weights import (
    Ack,
    ApplyVersion,
    NamedTensor,
    Pause,
    ReleaseMemory,
    Resume,
    ResumeMemory,
    StepMessage,
    VersionApplied,
)

# The rollout socket: rollout workers (DEALER) -> server (ROUTER) and back.
RolloutRequest = GenerateRequest | AbortRequest | HealthRequest | StatusRequest
RolloutReply = GenerateChunk | GenerateDone | ErrorReply | HealthReply | StatusReply
# GenerationActor's control port (inproc, from the MemoryGovernor).
GenerationControl = Pause | Resume | ApplyVersion | ReleaseMemory | ResumeMemory
# MemoryGovernor's weights port (inproc, from the WeightReceiverActor).
GovernorRequest = ApplyVersion | StepMessage
# Replies on both internal ports.
ControlReply = Ack | VersionApplied | ErrorReply
# The experience socket (demo): rollout workers -> trainer.
ExperienceRequest = SampleGroup

__all__ = [
    "PROTOCOL_VERSION",
    "AbortRequest",
    "Ack",
    "ApplyVersion",
    "Codec",
    "ControlReply",
    "ErrorCode",
    "ErrorReply",
    "ExperienceRequest",
    "FinishReason",
    "GenerateChunk",
    "GenerateDone",
    "GenerateRequest",
    "GenerationControl",
    "GovernorRequest",
    "Header",
    "HealthReply",
    "HealthRequest",
    "NamedTensor",
    "Pause",
    "ProtocolError",
    "ReleaseMemory",
    "Resume",
    "ResumeMemory",
    "RolloutReply",
    "RolloutRequest",
    "Sample",
    "SampleGroup",
    "SamplingParams",
    "StatusReply",
    "StatusRequest",
    "StepMessage",
    "TensorRef",
    "Timings",
    "Usage",
    "VersionApplied",
    "VersionSpan",
]
