"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for
anything the caller sent, 5xx only for what the servers behind the gateway could not do."""

from __future__ import annotations

from typing import Any

from rollwire.messages import ErrorCode, RollwireError


def printable(text: str) -> str:
    """``text`` as it can go out in JSON: a lone surrogate the caller sent (JSON allows "\\ud800"),
    echoed in a message, would fail to encode (a 500), so it goes out escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: float = 0.0) -> None:
        message, param = printable(message), None if param is None else printable(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


# rollwire's error codes -> (HTTP status, OpenAI error type)
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    **{c: (400, "invalid_request_error") for c in (
        ErrorCode.BAD_FIELD, ErrorCode.EMPTY_INPUT, ErrorCode.TOKEN_OUT_OF_RANGE, ErrorCode.BAD_SAMPLING_PARAMS,
        ErrorCode.TOO_LONG, ErrorCode.SESSION_LIMIT, ErrorCode.DUPLICATE_REQUEST)},
    **{c: (429, "rate_limit_error") for c in (
        ErrorCode.OVERLOADED, ErrorCode.CLIENT_LIMIT, ErrorCode.TOO_MANY_SESSIONS)},
    **{c: (404, "not_found_error") for c in (
        ErrorCode.UNKNOWN_SESSION, ErrorCode.SESSION_EXPIRED, ErrorCode.SESSION_CLOSED)},
    ErrorCode.SESSION_BUSY: (409, "conflict_error"),
    ErrorCode.UNAUTHORIZED: (403, "permission_error"),
    ErrorCode.TIMEOUT: (504, "timeout_error"),
    **{c: (503, "service_unavailable_error") for c in (
        ErrorCode.SERVER_UNAVAILABLE, ErrorCode.ENGINE_DEAD, ErrorCode.SHUTTING_DOWN, ErrorCode.ACTOR_RESTARTED)},
}


def from_rollwire(e: RollwireError) -> APIError:
    status, kind = _STATUS.get(e.code, (500, "internal_error"))
    return APIError(status, e.message, type=kind, code=e.code.value, retry_after_s=e.retry_after_s)
