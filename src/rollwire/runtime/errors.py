"""Errors an actor handler raises on purpose; each becomes an ErrorReply to the sender. The
hierarchy lives in ``rollwire.messages.errors`` (the lowest layer, so every package shares it)."""

from __future__ import annotations

from rollwire.messages.errors import RemoteError, RollwireError

__all__ = ["RemoteError", "RollwireError"]
