"""The wire format: every struct round-trips through the codec, the bytes stay put, and any
frame that is not a valid message raises ``ProtocolError`` with a stable ``ErrorCode``.

Strategies are derived from ``msgspec.inspect`` so a struct added to ``rollwire.messages`` is
round-tripped without touching this file (and a field type the deriver does not know fails loudly).
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rollwire.messages as messages
from rollwire.messages import (
    PROTOCOL_VERSION,
    Codec,
    ErrorCode,
    GenerateChunk,
    GenerateDone,
    Header,
    HealthRequest,
    ProtocolError,
    RolloutRequest,
)
from tests.wire_cases import CODECS, GOLDEN_BODY, GOLDEN_REQUEST, HEADER, UNIONS, enc

DECODE_ERRORS = {ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_KIND, ErrorCode.BAD_FIELD, ErrorCode.UNSUPPORTED_PROTOCOL}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _members(union: Any) -> tuple[type[msgspec.Struct], ...]:
    return tuple(getattr(union, "__args__", (union,)))


def _wire_structs() -> set[type[msgspec.Struct]]:
    """Every Struct class defined in a module of ``rollwire.messages``."""
    found: set[type[msgspec.Struct]] = set()
    for info in pkgutil.iter_modules(messages.__path__):
        mod = importlib.import_module(f"{messages.__name__}.{info.name}")
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, msgspec.Struct) and obj.__module__ == mod.__name__:
                found.add(obj)
    return found


# -- strategies derived from the struct definitions ---------------------------------------------
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1  # what a msgpack integer can hold


def strategy_for(t: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    mi = msgspec.inspect
    if isinstance(t, mi.IntType):
        return st.integers(INT64_MIN, UINT64_MAX)
    if isinstance(t, mi.FloatType):
        return st.floats(allow_nan=False)  # NaN != NaN; infinities and -0.0 round-trip exactly
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.StrType):
        return st.text(max_size=20)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.EnumType):
        return st.sampled_from(list(t.cls))
    if isinstance(t, mi.ListType):
        return st.lists(strategy_for(t.item_type), max_size=5)
    if isinstance(t, mi.DictType):
        return st.dictionaries(strategy_for(t.key_type), strategy_for(t.value_type), max_size=4)
    if isinstance(t, mi.UnionType):
        return st.one_of([strategy_for(m) for m in t.types])
    if isinstance(t, mi.StructType):
        return struct_strategy(t.cls)
    raise NotImplementedError(f"no strategy for wire type {t!r}: teach tests/test_messages.py about it")


def struct_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy[msgspec.Struct]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    required = {f.name: strategy_for(f.type) for f in info.fields if f.required}
    optional = {f.name: strategy_for(f.type) for f in info.fields if not f.required}  # left out: the default
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: cls(**kw))


CASES = [(name, cls) for name, union in UNIONS.items() for cls in _members(union)]


# -- coverage of the test itself ------------------------------------------------------------------
def test_every_tagged_wire_struct_belongs_to_a_socket_union_that_is_round_tripped() -> None:
    tagged = {c for c in _wire_structs() if c.__struct_config__.tag is not None}
    covered = {cls for _, cls in CASES}
    assert tagged - covered == set(), "add the new union to UNIONS"


def test_every_wire_struct_is_frozen() -> None:
    assert [c.__name__ for c in _wire_structs() if not c.__struct_config__.frozen] == []


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("union", "cls"), CASES, ids=[f"{u}-{c.__name__}" for u, c in CASES])
@ROUND_TRIP
@given(data=st.data(), rid=st.integers(0, UINT64_MAX))
def test_every_message_round_trips_through_its_socket_codec(union: str, cls: type, data: st.DataObject,
                                                              rid: int) -> None:
    codec = CODECS[union]
    msg = data.draw(struct_strategy(cls))
    frames = codec.encode(rid, msg)
    assert len(frames) == 2
    got_rid, got, payload = codec.decode(frames)
    assert (got_rid, got, list(payload)) == (rid, msg, [])
    assert type(got) is cls
    assert codec.encode(rid, got) == frames  # canonical: re-encoding gives the same bytes


@pytest.mark.parametrize("union", list(UNIONS))
def test_payload_frames_pass_through_the_codec_untouched(union: str) -> None:
    codec = CODECS[union]
    msg = _minimal(_members(UNIONS[union])[0])
    blob, view = b"\x00\x01\x02", memoryview(bytearray(b"abc"))
    frames = codec.encode(9, msg, [blob, view])
    assert frames[2] is blob and frames[3] is view
    rid, got, payload = codec.decode(frames)
    assert rid == 9 and got == msg
    assert payload[0] is blob and payload[1] is view


def _zero(t: msgspec.inspect.Type) -> Any:
    """The simplest value of a wire type (deterministic, for tests that need just one message)."""
    mi = msgspec.inspect
    simple = {mi.IntType: 0, mi.FloatType: 0.0, mi.BoolType: False, mi.StrType: "", mi.NoneType: None}
    for kind, value in simple.items():
        if isinstance(t, kind):
            return value
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    if isinstance(t, mi.EnumType):
        return next(iter(t.cls))
    if isinstance(t, mi.ListType | mi.DictType):
        return [] if isinstance(t, mi.ListType) else {}
    if isinstance(t, mi.UnionType):
        return _zero(t.types[0])
    if isinstance(t, mi.StructType):
        return _minimal(t.cls)
    raise NotImplementedError(repr(t))


def _minimal(cls: type[msgspec.Struct]) -> msgspec.Struct:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return cls(**{f.name: _zero(f.type) for f in info.fields if f.required})


# -- decoding failures: typed, with the rid when the header decoded ----------------------------
def _decode_error(union: str, frames: list[bytes]) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        CODECS[union].decode(frames)
    return e.value


@pytest.mark.parametrize("frames", [[], [HEADER]], ids=["no-frames", "header-only"])
def test_fewer_than_two_frames_is_a_bad_frame_without_a_rid(frames: list[bytes]) -> None:
    err = _decode_error("RolloutRequest", frames)
    assert (err.code, err.rid) == (ErrorCode.BAD_FRAME, 0)


@pytest.mark.parametrize("header", [b"", b"\xc1", b"\x91\x01", b"\x92\x01\xa1x", b"\x92\x01", b"\x05"],
                         ids=["empty", "reserved-byte", "one-element", "rid-not-int", "truncated", "not-an-array"])
def test_a_header_that_does_not_decode_is_a_bad_frame_without_a_rid(header: bytes) -> None:
    err = _decode_error("RolloutRequest", [header, enc.encode(HealthRequest())])
    assert (err.code, err.rid) == (ErrorCode.BAD_FRAME, 0)


def test_another_protocol_version_is_unsupported_and_keeps_the_rid() -> None:
    err = _decode_error("RolloutRequest", [enc.encode(Header(2, 77)), enc.encode(HealthRequest())])
    assert (err.code, err.rid) == (ErrorCode.UNSUPPORTED_PROTOCOL, 77)
    assert "2" in err.message


def test_every_truncation_of_a_valid_body_is_a_bad_frame_that_keeps_the_rid() -> None:
    done = GenerateDone(output_ids=[1, 2, 3], output_logprobs=[-0.5, -1.0, -2.0], finish_reason="stop",
                        weight_version=3, weight_version_spans=[messages.VersionSpan(3, 0, 3)],
                        usage=messages.Usage(prompt_tokens=2, completion_tokens=3),
                        timings=messages.Timings(queued_s=0.0, first_token_s=0.1, total_s=0.2))
    for union, msg in [("RolloutRequest", GOLDEN_REQUEST), ("RolloutReply", done)]:
        body = enc.encode(msg)
        for cut in range(len(body)):
            err = _decode_error(union, [HEADER, body[:cut]])
            assert (err.code, err.rid) == (ErrorCode.BAD_FRAME, 5), (union, cut, err)


def test_every_truncation_of_the_header_is_a_bad_frame() -> None:
    header = enc.encode(Header(1, 1 << 40))
    for cut in range(len(header)):
        assert _decode_error("RolloutRequest", [header[:cut], GOLDEN_BODY]).code is ErrorCode.BAD_FRAME


HUGE = [
    ("array32", b"\x92\xa8generate\xdd\xff\xff\xff\xff"),  # input_ids declares 4 Gi items, holds none
    ("outer-array32", b"\xdd\xff\xff\xff\xff\xa8generate"),
    ("map32", b"\xdf\xff\xff\xff\xff"),
    ("str32", b"\x92\xa8generate\xdb\xff\xff\xff\xff"),
    ("bin32", b"\x92\xa8generate\xc6\xff\xff\xff\xff"),
    ("nested-array32", b"\x93\xa8generate\x91\x01\xdd\xff\xff\xff\xff"),
]


@pytest.mark.parametrize("body", [b for _, b in HUGE], ids=[n for n, _ in HUGE])
def test_a_huge_declared_length_is_refused_without_preallocating(body: bytes) -> None:
    # A decoder that trusted the length would try to allocate 4 Gi slots (tens of GiB) first.
    err = _decode_error("RolloutRequest", [HEADER, body])
    assert (err.code, err.rid) == (ErrorCode.BAD_FRAME, 5)


def test_a_huge_declared_length_in_the_header_is_a_bad_frame() -> None:
    assert _decode_error("RolloutRequest", [b"\xdd\xff\xff\xff\xff", GOLDEN_BODY]).code is ErrorCode.BAD_FRAME


def test_a_body_above_the_size_limit_is_refused_before_decoding() -> None:
    codec: Codec[Any] = Codec(RolloutRequest, max_body_bytes=16)
    with pytest.raises(ProtocolError) as e:
        codec.decode([HEADER, GOLDEN_BODY])
    assert (e.value.code, e.value.rid) == (ErrorCode.BAD_FRAME, 5)
    assert codec.decode([HEADER, enc.encode(HealthRequest())])[1] == HealthRequest()


@pytest.mark.parametrize(("body", "code"), [
    (enc.encode(["teleport", 1]), ErrorCode.UNKNOWN_KIND),
    (enc.encode(GenerateChunk(token_ids=[1])), ErrorCode.UNKNOWN_KIND),  # a reply sent to the request socket
    (enc.encode([]), ErrorCode.UNKNOWN_KIND),
    (enc.encode(5), ErrorCode.UNKNOWN_KIND),
    (enc.encode(["abort"]), ErrorCode.BAD_FIELD),  # required field missing
    (enc.encode(["abort", "seven"]), ErrorCode.BAD_FIELD),
    (enc.encode(["generate", "not a list"]), ErrorCode.BAD_FIELD),
    (enc.encode(["generate", [1, "x"]]), ErrorCode.BAD_FIELD),
    (enc.encode(["generate", [1], [16, 1.0, 1.0, -1, 0.0, None, [], False, True]]), ErrorCode.BAD_FIELD),
    (enc.encode({"type": "health"}), ErrorCode.BAD_FIELD),  # a map where the array form is required
    (b"\xc1", ErrorCode.BAD_FRAME),
], ids=["unknown-tag", "other-socket", "empty-array", "not-an-array", "missing-field", "wrong-type",
        "wrong-list", "wrong-item", "wrong-nested", "map-form", "reserved-byte"])
def test_a_body_that_is_not_a_request_gets_the_code_that_names_the_problem(body: bytes, code: ErrorCode) -> None:
    err = _decode_error("RolloutRequest", [HEADER, body])
    assert (err.code, err.rid) == (code, 5)
    assert err.message


def test_an_unknown_enum_or_literal_value_is_a_bad_field() -> None:
    err = _decode_error("RolloutReply", [HEADER, enc.encode(["error", "no_such_code", "x"])])
    assert err.code is ErrorCode.BAD_FIELD
    bad_done = ["done", 0, [1], None, "exploded", 1, [], [1, 1], [0.0, 0.0, 0.0]]
    assert _decode_error("RolloutReply", [HEADER, enc.encode(bad_done)]).code is ErrorCode.BAD_FIELD


@pytest.mark.parametrize("body", [enc.encode([[1]]), enc.encode([{"a": 1}]), enc.encode({"type": [1]})],
                         ids=["list-tag", "map-tag", "list-type-key"])
def test_a_body_whose_tag_is_not_a_string_is_an_unknown_kind_not_a_crash(body: bytes) -> None:
    err = _decode_error("RolloutRequest", [HEADER, body])
    assert (err.code, err.rid) == (ErrorCode.UNKNOWN_KIND, 5)


@pytest.mark.parametrize(("union", "body"), [
    ("RolloutRequest", b"\x91\xa1\x80"),  # the tag
    ("RolloutRequest", b"\xa1\x80"),  # a bare string
    ("RolloutReply", b"\x93\xa5error\xa9bad_frame\xa1\x80"),  # a str field
], ids=["tag", "bare-string", "str-field"])
def test_a_string_that_is_not_utf8_is_a_bad_frame_not_a_crash(union: str, body: bytes) -> None:
    err = _decode_error(union, [HEADER, body])
    assert (err.code, err.rid) == (ErrorCode.BAD_FRAME, 5)


# -- fuzz: nothing but ProtocolError comes out of a decoder ----------------------------------------
def _decodes_or_raises_a_protocol_error(union: str, frames: list[bytes]) -> None:
    try:
        CODECS[union].decode(frames)
    except ProtocolError as e:
        assert e.code in DECODE_ERRORS
        assert isinstance(e.rid, int)


@FUZZ
@given(union=st.sampled_from(list(UNIONS)), body=st.binary(max_size=64))
def test_random_body_bytes_decode_or_raise_a_protocol_error(union: str, body: bytes) -> None:
    _decodes_or_raises_a_protocol_error(union, [HEADER, body])


@FUZZ
@given(union=st.sampled_from(list(UNIONS)), frames=st.lists(st.binary(max_size=24), max_size=4))
def test_random_frames_decode_or_raise_a_protocol_error(union: str, frames: list[bytes]) -> None:
    _decodes_or_raises_a_protocol_error(union, frames)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(INT64_MIN, UINT64_MAX) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@FUZZ
@given(union=st.sampled_from(list(UNIONS)),
       tag=st.sampled_from(["generate", "abort", "health", "status", "done", "chunk", "error", "pause",
                            "apply_version", "register", "weights_ready", "bucket", "nope"]),
       fields=st.lists(_msgpack_values, max_size=6))
def test_well_formed_msgpack_with_a_plausible_tag_decodes_or_raises_a_protocol_error(
        union: str, tag: str, fields: list[Any]) -> None:
    _decodes_or_raises_a_protocol_error(union, [HEADER, enc.encode([tag, *fields])])


@FUZZ
@given(union=st.sampled_from(list(UNIONS)), value=_msgpack_values)
def test_any_well_formed_msgpack_value_decodes_or_raises_a_protocol_error(union: str, value: Any) -> None:
    _decodes_or_raises_a_protocol_error(union, [HEADER, enc.encode(value)])


@FUZZ
@given(protocol=st.integers(INT64_MIN, UINT64_MAX), rid=st.integers(INT64_MIN, UINT64_MAX))
def test_any_integer_header_yields_the_rid_or_unsupported_protocol(protocol: int, rid: int) -> None:
    frames = [enc.encode([protocol, rid]), enc.encode(HealthRequest())]
    if protocol == PROTOCOL_VERSION:
        assert CODECS["RolloutRequest"].decode(frames) == (rid, HealthRequest(), [])
    else:
        err = _decode_error("RolloutRequest", frames)
        assert (err.code, err.rid) == (ErrorCode.UNSUPPORTED_PROTOCOL, rid)


def test_floats_keep_their_bits_across_the_wire() -> None:
    codec = CODECS["RolloutReply"]
    chunk = GenerateChunk(token_ids=[1, 2], logprobs=[-0.0, -math.inf, 5e-324, -1.2345678901234567])
    got = codec.decode(codec.encode(1, chunk))[1]
    assert [math.copysign(1.0, x) for x in got.logprobs] == [math.copysign(1.0, x) for x in chunk.logprobs]
    assert got == chunk


@pytest.mark.parametrize("depth", [1_000, 1_000_000])
@pytest.mark.parametrize("where", ["body", "field", "header"])
def test_deeply_nested_msgpack_is_a_bad_frame_with_the_rid_not_a_recursion_error(depth: int, where: str) -> None:
    codec = Codec(RolloutRequest)
    nested = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]
    header = msgspec.msgpack.encode([PROTOCOL_VERSION, 9])
    frames = {"body": [header, nested],
              "field": [header, b"\x92\xa8generate" + nested],  # a known tag, a nested first field
              "header": [nested, msgspec.msgpack.encode(["health"])]}[where]
    with pytest.raises(ProtocolError) as err:
        codec.decode(frames)
    assert err.value.code in (ErrorCode.BAD_FRAME, ErrorCode.BAD_FIELD)
    assert err.value.rid == (0 if where == "header" else 9)
