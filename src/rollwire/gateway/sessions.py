"""Exact trajectories: a conversation tagged with a session id runs in one rollwire session.

Turn 1 renders the messages with the chat template and sends the tokens as the turn's prompt.
Each later request must repeat the conversation so far (the messages the session consumed, then
the assistant message it returned: compared as the template renders them, ``same_message``) and
may add new messages. Only those are tokenized: the text the template puts after the last
assistant turn, rendered from the whole list, is appended as environment tokens (loss_mask 0),
after the ``glue`` the template writes behind an assistant turn that the model did not emit (the
newline after its end-of-turn token). Earlier assistant turns are never re-tokenized: the session
holds the model's own tokens, logprobs and weight versions.

An edited history (an earlier message changed, removed or reordered, or other tools) cannot
extend the session's tokens: the request gets 409 ``session_diverged`` naming the first message
that differs, and the session is left as it was (the agent may go on with the history it had, or
start a new session id for the edited one). A session is one trajectory; a branch is a new
session.

A session belongs to the API key that opened it: the table is keyed by (key, session id), so
another key's id is a different (new) session for that key, and its trajectory is not found.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from rollwire.clients.session import Session
from rollwire.fleet.session import FleetSession
from rollwire.gateway.chat import Canonical, ChatFormat, same_message
from rollwire.gateway.errors import APIError


@dataclass
class ChatSession:
    key: tuple[str, str]  # (owner, agent's session id)
    session: Session | FleetSession  # the rollwire session (its client-side mirror is the trajectory)
    tools: list[dict[str, Any]] | None
    messages: list[Canonical] = field(default_factory=list)  # consumed so far, the last assistant included
    rendered: str = ""  # the template's text of ``messages`` (no generation prompt)
    glue: str = ""  # template text after the last model turn that the model did not produce
    turn_messages: list[list[int]] = field(default_factory=list)  # per trajectory turn: message indices
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    diverged: int = 0  # requests refused with session_diverged
    replays: int = 0  # times its record was replayed into a new session on its restarted server

    def new_tokens(self, chat: ChatFormat, messages: list[Canonical], tools: list[dict[str, Any]] | None,
                   ) -> tuple[list[int], str]:
        """Tokens to append before the next model turn, and the full prompt text (for the record)."""
        prompt_text = chat.render(messages, tools, generation_prompt=True)
        if not self.messages:
            return chat.encode(prompt_text), prompt_text
        self._check_extends(messages, tools)
        if not prompt_text.startswith(self.rendered):
            raise APIError(409, "the chat template does not render this conversation as an extension of the "
                                "session's history (a template that rewrites earlier turns): start a new session",
                           type="conflict_error", param="messages", code="session_diverged")
        return chat.encode(self.glue + prompt_text[len(self.rendered):]), prompt_text

    def _check_extends(self, messages: list[Canonical], tools: list[dict[str, Any]] | None) -> None:
        if tools != self.tools:
            self.diverged += 1
            raise APIError(409, "tools differ from the ones this session started with: start a new session "
                                "(a session is one trajectory)",
                           type="conflict_error", param="tools", code="session_diverged")
        for i, had in enumerate(self.messages):
            if i >= len(messages) or not same_message(had, messages[i]):
                self.diverged += 1
                what = "is missing" if i >= len(messages) else f"differs from the session's ({had['role']})"
                raise APIError(409, f"messages[{i}] {what}: the conversation no longer extends this session's "
                                    f"history ({len(self.messages)} messages, whose assistant turns are the model's "
                                    "own tokens); send the history as it was, or use a new session id to branch",
                               type="conflict_error", param=f"messages.{i}", code="session_diverged")

    def record(self, chat: ChatFormat, messages: list[Canonical], assistant: Canonical, prompt_text: str,
               model_ids: list[int], prompt_turn: bool) -> None:
        """After a turn: the conversation now ends with ``assistant``, made of ``model_ids``."""
        first_new = len(self.messages)
        if prompt_turn:
            self.turn_messages.append(list(range(first_new, len(messages))))
        self.messages = [*messages, assistant]
        self.turn_messages.append([len(messages)])
        self.rendered = chat.render(self.messages, self.tools, generation_prompt=False)
        assistant_text = self.rendered[len(prompt_text):] if self.rendered.startswith(prompt_text) else ""
        self.glue = chat.glue(assistant_text, chat.decode(model_ids, skip_special=False))
        self.last_used = time.monotonic()


class SessionTable:
    def __init__(self, max_sessions: int, ttl_s: float) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.sessions: dict[tuple[str, str], ChatSession] = {}

    def get(self, owner: str, sid: str) -> ChatSession:
        s = self.sessions.get((owner, sid))
        if s is None:
            raise APIError(404, f"no session {sid!r} for this client", type="not_found_error", param="session_id",
                           code="unknown_session")
        return s

    def expired(self) -> list[ChatSession]:
        now = time.monotonic()
        gone = [s for s in self.sessions.values() if not s.lock.locked() and now - s.last_used > self.ttl_s]
        for s in gone:
            del self.sessions[s.key]
        return gone

    def check_room(self) -> None:
        if len(self.sessions) >= self.max_sessions:
            raise APIError(429, f"{len(self.sessions)} sessions are open on this gateway (its limit): close some "
                                "(DELETE /v1/sessions/{id})", type="rate_limit_error", code="too_many_sessions")
