"""One codec for every socket: frames <-> (rid, message, payload frames).

Decoders are built once per socket type (msgspec's advice); encoding reuses one buffer.
Decoding is strict and every failure is a ``ProtocolError`` with a stable ``ErrorCode`` and the
request id when it could be read, so the receiver can answer the sender and keep serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec

from rollwire.messages.envelope import PROTOCOL_VERSION, Header
from rollwire.messages.errors import ErrorCode, RollwireError

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview

DEFAULT_MAX_BODY_BYTES = 64 << 20  # a body above this is refused before decoding


class ProtocolError(RollwireError):
    """Bytes that do not decode (``rid``: the request they named, when the header decoded)."""

    def __init__(self, code: ErrorCode, message: str, rid: int = 0) -> None:
        super().__init__(code, message)
        self.rid = rid


def _known_tags(union: Any) -> set[str]:
    members = getattr(union, "__args__", (union,))
    return {m.__struct_config__.tag for m in members}


_header_decoder = msgspec.msgpack.Decoder(Header)
_any_decoder = msgspec.msgpack.Decoder()


class Codec(Generic[T]):
    """Encoder for anything on the wire; strict decoder for the union ``T`` of one socket."""

    def __init__(self, union: Any, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(union)
        self._encoder = msgspec.msgpack.Encoder()
        self._tags = _known_tags(union)
        self._max_body = max_body_bytes

    def encode(self, rid: int, msg: msgspec.Struct, payload: Sequence[Buffer] = ()) -> list[Buffer]:
        """Frames for ``msg``; payload buffers are passed through untouched (zero-copy sends)."""
        header = self._encoder.encode(Header(PROTOCOL_VERSION, rid))
        return [header, self._encoder.encode(msg), *payload]

    def decode(self, frames: Sequence[Buffer]) -> tuple[int, T, Sequence[Buffer]]:
        if len(frames) < 2:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"expected >= 2 frames (header, body), got {len(frames)}")
        try:
            header = _header_decoder.decode(frames[0])
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:  # the 2nd: bad UTF-8
            raise ProtocolError(ErrorCode.BAD_FRAME, f"header does not decode: {e}") from None
        rid = header.rid
        if header.protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_PROTOCOL,
                f"protocol {header.protocol} not spoken here (server speaks {PROTOCOL_VERSION})",
                rid,
            )
        body = frames[1]
        if len(body) > self._max_body:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"body of {len(body)} bytes > {self._max_body}", rid)
        try:
            msg = self._decoder.decode(body)
        except msgspec.ValidationError as e:
            raise ProtocolError(self._classify(body), str(e), rid) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"body does not decode: {e}", rid) from None
        except RecursionError:  # msgspec's answer to deeply nested containers: a peer's bytes, not our bug
            raise ProtocolError(ErrorCode.BAD_FRAME, "body nests containers too deeply", rid) from None
        return rid, msg, frames[2:]

    def _classify(self, body: Buffer) -> ErrorCode:
        """Tell an unknown message kind from a wrong field (only on the error path)."""
        try:
            raw = _any_decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return ErrorCode.BAD_FRAME
        tag = raw[0] if isinstance(raw, list) and raw else raw.get("type") if isinstance(raw, dict) else None
        return ErrorCode.BAD_FIELD if isinstance(tag, str) and tag in self._tags else ErrorCode.UNKNOWN_KIND
