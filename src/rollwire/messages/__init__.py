"""The wire protocol. Nothing outside this package defines a wire type.

One tagged union per socket (below), one ``Codec``. See docs/protocol.md.
"""

from __future__ import annotations

from rollwire.messages.codec import Codec, ProtocolError
from rollwire.messages.control import (
    HealthReply,
    HealthRequest,
    Heartbeat,
    ParamSpec,
    ParamsReply,
    ParamsRequest,
    StatusReply,
    StatusRequest,
)
from rollwire.messages.envelope import PROTOCOL_VERSION, Header, TensorRef
from rollwire.messages.errors import ErrorCode, ErrorReply, RemoteError, RollwireError
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
from rollwire.messages.session import (
    Appended,
    AppendTokens,
    CloseSession,
    ForgetSession,
    OpenSession,
    SessionClosed,
    SessionGenerate,
    SessionOpened,
)
from rollwire.messages.weights import (
    Ack,
    GovernorQuery,
    GovernorStatus,
    LoadVersion,
    NamedTensor,
    ReleaseForTraining,
    ResumeGeneration,
    StepMessage,
    SwapWeights,
    VersionApplied,
)

# The rollout socket: rollout workers (DEALER) -> server (ROUTER) and back.
RolloutRequest = GenerateRequest | AbortRequest | HealthRequest | StatusRequest | ParamsRequest | Heartbeat
RolloutReply = GenerateChunk | GenerateDone | ErrorReply | HealthReply | StatusReply | ParamsReply | Heartbeat
# The session socket: rollout workers (DEALER) -> SessionActor (ROUTER) and back.
SessionRequest = OpenSession | AppendTokens | SessionGenerate | CloseSession | AbortRequest | Heartbeat
SessionReply = SessionOpened | Appended | SessionClosed | GenerateChunk | GenerateDone | ErrorReply | Heartbeat
# GenerationActor's control port (inproc, from the MemoryGovernor and the SessionActor).
GenerationControl = SwapWeights | ReleaseForTraining | ResumeGeneration | ForgetSession
# MemoryGovernor's weights port (inproc, from the WeightReceiverActor; GovernorQuery from the GenerationActor).
GovernorRequest = LoadVersion | StepMessage | GovernorQuery
# Replies on both internal ports.
ControlReply = Ack | VersionApplied | GovernorStatus | ErrorReply
# The experience socket (demo): rollout workers -> trainer.
ExperienceRequest = SampleGroup

__all__ = [
    "PROTOCOL_VERSION",
    "AbortRequest",
    "Ack",
    "AppendTokens",
    "Appended",
    "CloseSession",
    "Codec",
    "ControlReply",
    "ErrorCode",
    "ErrorReply",
    "ExperienceRequest",
    "FinishReason",
    "ForgetSession",
    "GenerateChunk",
    "GenerateDone",
    "GenerateRequest",
    "GenerationControl",
    "GovernorQuery",
    "GovernorRequest",
    "GovernorStatus",
    "Header",
    "HealthReply",
    "HealthRequest",
    "Heartbeat",
    "LoadVersion",
    "NamedTensor",
    "OpenSession",
    "ParamSpec",
    "ParamsReply",
    "ParamsRequest",
    "ProtocolError",
    "ReleaseForTraining",
    "RemoteError",
    "ResumeGeneration",
    "RolloutReply",
    "RolloutRequest",
    "RollwireError",
    "Sample",
    "SampleGroup",
    "SamplingParams",
    "SessionClosed",
    "SessionGenerate",
    "SessionOpened",
    "SessionReply",
    "SessionRequest",
    "StatusReply",
    "StatusRequest",
    "StepMessage",
    "SwapWeights",
    "TensorRef",
    "Timings",
    "Usage",
    "VersionApplied",
    "VersionSpan",
]
