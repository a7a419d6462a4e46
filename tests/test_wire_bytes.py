"""Golden bytes: the wire format may not drift silently, and docs/protocol.md shows what the
codec really writes."""

from __future__ import annotations

import pytest

import rollwire.messages as messages
from rollwire.messages import (
    PROTOCOL_VERSION,
    AbortRequest,
    ErrorCode,
    ErrorReply,
    GenerateChunk,
    GenerateDone,
    GenerateRequest,
    Header,
    HealthRequest,
    ProtocolError,
    SamplingParams,
)
from tests.wire_cases import CODECS, GOLDEN_BODY, GOLDEN_REQUEST, HEADER, enc


def test_the_envelope_header_is_the_msgpack_array_of_protocol_and_rid() -> None:
    assert PROTOCOL_VERSION == 1
    assert enc.encode(Header(1, 5)) == b"\x92\x01\x05"
    assert CODECS["RolloutRequest"].encode(5, HealthRequest())[0] == b"\x92\x01\x05"
    assert enc.encode(Header(1, 300)) == b"\x92\x01\xcd\x01\x2c"  # msgpack picks the shortest int form


def test_a_generate_request_body_encodes_to_the_documented_bytes() -> None:
    header, body = CODECS["RolloutRequest"].encode(5, GOLDEN_REQUEST)
    assert header == HEADER
    assert body == GOLDEN_BODY


def test_the_documented_generate_request_bytes_decode_to_the_request() -> None:
    assert CODECS["RolloutRequest"].decode([HEADER, GOLDEN_BODY]) == (5, GOLDEN_REQUEST, [])


DOC_EXAMPLE = GenerateRequest(input_ids=[1, 5, 9], return_logprob=True, stream=True,
                              sampling_params=SamplingParams(max_new_tokens=2, temperature=0.0, seed=7))


def test_the_worked_example_of_docs_protocol_md_is_what_the_codec_writes() -> None:
    reqs, reps = CODECS["RolloutRequest"], CODECS["RolloutReply"]
    assert reqs.encode(42, DOC_EXAMPLE) == [bytes.fromhex("92012a"), bytes.fromhex(
        "9ba867656e6572617465930105099b02cb0000000000000000cb3ff0000000000000ffcb00000000000000000790c201c0c0c3c300"
        "c0c2a001c2")]
    chunk = GenerateChunk(index=0, token_ids=[17], logprobs=[-0.5], weight_version=3)
    assert reps.encode(42, chunk)[1] == bytes.fromhex("96a56368756e6b00911191cbbfe000000000000003c2")
    done = GenerateDone(output_ids=[17, 4], output_logprobs=[-0.5, -1.25], finish_reason="length", weight_version=3,
                        weight_version_spans=[messages.VersionSpan(3, 0, 2)],
                        usage=messages.Usage(prompt_tokens=3, completion_tokens=2),
                        timings=messages.Timings(queued_s=0.0, first_token_s=0.25, total_s=0.5))
    assert reps.encode(42, done)[1] == bytes.fromhex(
        "99a4646f6e650092110492cbbfe0000000000000cbbff4000000000000a66c656e67746803919303000293030200"
        "93cb0000000000000000cb3fd0000000000000cb3fe0000000000000")
    assert reqs.encode(0, AbortRequest(target_rid=42)) == [b"\x92\x01\x00", b"\x92\xa5abort\x2a"]
    assert reps.encode(43, messages.HealthReply(weight_version=3, governor_state="SERVING", protocol=1))[1] == \
        bytes.fromhex("95a96865616c74685f6f6b03a753455256494e4701a0")


def test_the_shortened_request_of_docs_protocol_md_decodes_to_the_full_one() -> None:
    short = bytes.fromhex("95a867656e65726174659301050996020001ff0007c3c3")
    assert CODECS["RolloutRequest"].decode([b"\x92\x01\x2a", short]) == (42, DOC_EXAMPLE, [])


def test_the_encoder_writes_every_field_even_when_it_equals_its_default() -> None:
    # msgspec does not omit defaults of array_like structs (omit_defaults only shortens map-encoded
    # structs); docs/protocol.md says so, and this notices if a msgspec upgrade changes it.
    assert enc.encode(GenerateChunk(token_ids=[7])) == b"\x96\xa5chunk\x00\x91\x07\xc0\x00\xc2"
    assert enc.encode(AbortRequest(target_rid=3)) == b"\x92\xa5abort\x03"


def test_a_decoder_fills_omitted_trailing_fields_with_their_defaults() -> None:
    got = CODECS["RolloutRequest"].decode([HEADER, enc.encode(["generate", [1, 2]])])[1]
    assert got == GenerateRequest(input_ids=[1, 2])
    got = CODECS["RolloutRequest"].decode([HEADER, enc.encode(["generate", [1], [16, 0.5]])])[1]
    assert got == GenerateRequest(input_ids=[1], sampling_params=SamplingParams(max_new_tokens=16, temperature=0.5))
    got = CODECS["ControlReply"].decode([HEADER, enc.encode(["error", "bad_frame", "why"])])[1]
    assert got == ErrorReply(code=ErrorCode.BAD_FRAME, message="why")


def test_a_decoder_ignores_extra_trailing_elements_from_a_newer_sender() -> None:
    got = CODECS["RolloutRequest"].decode([HEADER, enc.encode(["abort", 4, "field from the future"])])[1]
    assert got == AbortRequest(target_rid=4)


def test_a_float_field_accepts_a_msgpack_integer_but_an_int_field_refuses_a_float() -> None:
    got = CODECS["RolloutRequest"].decode([HEADER, enc.encode(["generate", [1], [16, 0]])])[1]
    assert got.sampling_params.temperature == 0.0 and isinstance(got.sampling_params.temperature, float)
    with pytest.raises(ProtocolError) as e:
        CODECS["RolloutRequest"].decode([HEADER, enc.encode(["generate", [1], [16.0]])])
    assert e.value.code is ErrorCode.BAD_FIELD


