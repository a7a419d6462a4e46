"""Sessions: multi-turn rollouts whose history lives in the server (SessionActor).

A session is one trajectory: a token history built from prompt, model and environment turns.
``SessionGenerate`` runs a model turn on the whole history (the engine reuses its cached KV
prefix) and is answered with the usual ``GenerateDone``; ``AppendTokens`` adds an environment
turn (tool output, user message) that the trainer does not train on.
"""

from __future__ import annotations

import msgspec

from rollwire.messages.generate import SamplingParams


class OpenSession(msgspec.Struct, frozen=True, kw_only=True, tag="open_session", array_like=True):
    max_tokens: int = 8192  # history + a turn's max_new_tokens may not exceed this (SESSION_LIMIT)
    ttl_s: float = 600.0  # idle seconds before the server expires the session and frees its KV
    keep_stale_prefix: bool = False  # after a weight update, reuse KV computed by the older version


class SessionOpened(msgspec.Struct, frozen=True, kw_only=True, tag="session_opened", array_like=True):
    session_id: str
    max_tokens: int
    ttl_s: float


class AppendTokens(msgspec.Struct, frozen=True, kw_only=True, tag="append", array_like=True, gc=False):
    """An environment turn: tokens the model did not generate (loss_mask 0)."""

    session_id: str
    token_ids: list[int]


class Appended(msgspec.Struct, frozen=True, kw_only=True, tag="appended", array_like=True):
    session_id: str
    length: int  # tokens in the history now


class SessionGenerate(msgspec.Struct, frozen=True, kw_only=True, tag="session_generate", array_like=True,
                      gc=False):
    """A model turn on the whole history; ``input_ids`` (a prompt turn, loss_mask 0) is appended
    first. Answered with ``GenerateDone`` (``n`` must be 1: a session is one trajectory); with
    ``stream``, ``GenerateChunk`` deltas come first, as for a streamed ``GenerateRequest``."""

    session_id: str
    input_ids: list[int] = []
    sampling_params: SamplingParams = SamplingParams()
    return_logprob: bool = True
    min_version: int = 0
    stream: bool = False
    chunk_tokens: int = 1  # stream: a chunk once this many new tokens are pending (GenerateRequest's)


class CloseSession(msgspec.Struct, frozen=True, kw_only=True, tag="close_session", array_like=True):
    session_id: str


class SessionClosed(msgspec.Struct, frozen=True, kw_only=True, tag="session_closed", array_like=True):
    session_id: str
    length: int  # tokens in the final history
    turns: int


class ForgetSession(msgspec.Struct, frozen=True, kw_only=True, tag="forget_session", array_like=True):
    """SessionActor -> GenerationActor (control port): free the engine state of a closed or
    expired session (its cached KV prefix)."""

    session_id: str
