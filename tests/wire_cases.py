"""The socket unions and their codecs, shared by the wire-format tests."""

from __future__ import annotations

from typing import Any

import msgspec

from rollwire.messages import (
    Codec,
    ControlReply,
    ExperienceRequest,
    GenerateRequest,
    GenerationControl,
    GovernorRequest,
    RolloutReply,
    RolloutRequest,
    SamplingParams,
    SessionReply,
    SessionRequest,
)
from rollwire.messages.weights import Payload, TrainerAnnouncement, TrainerReply, TrainerRequest

UNIONS: dict[str, Any] = {
    "RolloutRequest": RolloutRequest,
    "RolloutReply": RolloutReply,
    "GenerationControl": GenerationControl,
    "GovernorRequest": GovernorRequest,
    "ControlReply": ControlReply,
    "ExperienceRequest": ExperienceRequest,
    "SessionRequest": SessionRequest,
    "SessionReply": SessionReply,
    "TrainerRequest": TrainerRequest,
    "TrainerReply": TrainerReply,
    "TrainerAnnouncement": TrainerAnnouncement,
    "Payload": Payload,  # WeightsReady.payload: a tagged union nested in an announcement
}
CODECS: dict[str, Codec[Any]] = {name: Codec(union) for name, union in UNIONS.items()}
HEADER = b"\x92\x01\x05"  # [protocol 1, rid 5]
enc = msgspec.msgpack.Encoder()

# a request and its bytes, field by field (docs/protocol.md, section 3)
GOLDEN_REQUEST = GenerateRequest(input_ids=[1, 5, 9], return_logprob=True,
                                 sampling_params=SamplingParams(max_new_tokens=32, temperature=0.0, seed=7))
GOLDEN_BODY = bytes.fromhex(
    "9b"  # array of 11: tag + the 10 fields of GenerateRequest in declaration order
    "a867656e6572617465"  # "generate"
    "93010509"  # input_ids [1, 5, 9]
    "9b"  # sampling_params: array of its 11 fields
    "20"  # max_new_tokens 32
    "cb0000000000000000"  # temperature 0.0 (float64)
    "cb3ff0000000000000"  # top_p 1.0
    "ff"  # top_k -1
    "cb0000000000000000"  # min_p 0.0
    "07"  # seed 7
    "90"  # stop_token_ids []
    "c2"  # ignore_eos false
    "01"  # n 1
    "c0"  # allowed_token_ids nil
    "c0"  # disallowed_token_ids nil
    "c3"  # return_logprob true
    "c2"  # stream false
    "00"  # min_version 0
    "c0"  # session_id nil
    "c2"  # keep_stale_prefix false
    "a0"  # client "" (set only by the co-located SessionActor)
    "01"  # chunk_tokens 1
    "c2"  # restartable false
)
