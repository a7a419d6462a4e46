"""Errors an actor handler raises on purpose; each becomes an ErrorReply to the sender."""

from __future__ import annotations

from rollwire.messages.errors import ErrorCode


class RollwireError(Exception):
    """An expected failure of one request: answered with a typed error, the actor keeps going."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
