"""Typed errors that travel back to a sender. ``code`` is stable; ``message`` is for humans."""

from __future__ import annotations

from enum import Enum

import msgspec


class ErrorCode(str, Enum):
    # envelope and decoding
    BAD_FRAME = "bad_frame"  # frames missing, or a header/body that does not decode
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # envelope protocol version not spoken here
    UNKNOWN_KIND = "unknown_kind"  # a message tag this socket does not accept
    BAD_FIELD = "bad_field"  # a field of the wrong type, or a missing required field
    # request validation
    EMPTY_INPUT = "empty_input"
    TOKEN_OUT_OF_RANGE = "token_out_of_range"
    BAD_SAMPLING_PARAMS = "bad_sampling_params"
    TOO_LONG = "too_long"  # prompt + max_new_tokens above the model's context
    DUPLICATE_REQUEST = "duplicate_request"  # a rid that is already in flight for this sender
    # service state
    OVERLOADED = "overloaded"  # the server's in-flight limit is reached; retry after retry_after_s
    CLIENT_LIMIT = "client_limit"  # this client's own cap (in flight, waiting, sessions) is reached
    UNAUTHORIZED = "unauthorized"  # the sender's key or role may not do this (or it is not the owner)
    SERVER_UNAVAILABLE = "server_unavailable"  # client side: no traffic from the server within its liveness bound
    ENGINE_DEAD = "engine_dead"  # the engine process or worker died while the request was in flight
    ACTOR_RESTARTED = "actor_restarted"  # the actor holding the request crashed and was restarted
    SHUTTING_DOWN = "shutting_down"
    TIMEOUT = "timeout"
    # weights
    BAD_VERSION = "bad_version"
    BAD_CHECKSUM = "bad_checksum"
    UNKNOWN_TENSOR = "unknown_tensor"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    WEIGHTS_FAILED = "weights_failed"
    INCOMPLETE_VERSION = "incomplete_version"  # after a weights release, a load must send every tensor
    SUPERSEDED = "superseded"  # a queued version replaced by a newer one (--coalesce)
    NOT_PAUSED = "not_paused"  # weights may only be loaded while generation is paused
    # engine control (inside the server: the governor's requests to the engine)
    BAD_PAUSE_MODE = "bad_pause_mode"
    UNKNOWN_TAG = "unknown_tag"  # a memory tag the engine does not know
    BUSY = "busy"  # flush_cache while requests are running
    # sessions
    UNKNOWN_SESSION = "unknown_session"  # never opened here (or forgotten long ago)
    SESSION_EXPIRED = "session_expired"  # idle past its ttl_s; its state is freed
    SESSION_CLOSED = "session_closed"
    SESSION_BUSY = "session_busy"  # a turn of this session is still running
    SESSION_LIMIT = "session_limit"  # the turn would take the history past the session's max_tokens
    TOO_MANY_SESSIONS = "too_many_sessions"  # the server's session table is full
    # anything else
    INTERNAL = "internal"


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True, tag="error", array_like=True, gc=False):
    """Terminal reply to the request ``rid`` of the envelope (rid 0: not tied to a request)."""

    code: ErrorCode
    message: str
    origin: str = ""  # actor or component that raised it
    retry_after_s: float = 0.0  # OVERLOADED / CLIENT_LIMIT: when a retry (same rid allowed) may succeed


class RollwireError(Exception):
    """The one error hierarchy: every failure rollwire reports, local or remote, has a stable
    ``code`` and a human ``message``. Raised by an actor's handler, it becomes that request's
    ``ErrorReply`` and the actor goes on; a client raises it (``RemoteError`` when the peer
    answered with an error, ``ConnectionClosed`` / ``ServerUnavailable`` when it could not be
    reached, ``ProtocolError`` for bytes that do not decode)."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # overloaded / client_limit: when a retry (same rid) may succeed


class RemoteError(RollwireError):
    """The peer answered a request with an ``ErrorReply``."""

    @classmethod
    def of(cls, reply: ErrorReply) -> RemoteError:
        return cls(reply.code, reply.message, reply.retry_after_s)

