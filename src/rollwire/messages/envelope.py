"""The envelope: the first frame of every rollwire message, on every socket.

Frames of one message: ``[header, body, *payload]`` (a ROUTER socket sees the peer identity
before them). ``header`` is the msgpack array ``[protocol, rid]``; ``body`` is one msgpack
tagged struct of the socket's union; ``payload`` frames hold raw tensor bytes, referenced from
the body by ``TensorRef.frame`` (index into payload, 0-based).
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1


class Header(msgspec.Struct, frozen=True, array_like=True, gc=False):
    protocol: int  # PROTOCOL_VERSION of the sender
    rid: int  # request id chosen by the requester, echoed in every reply; 0 = none


class TensorRef(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A tensor whose bytes travel as payload frame ``frame`` (C-contiguous, little endian)."""

    frame: int  # index into the payload frames
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: list[int]
