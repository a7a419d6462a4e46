"""Tool calls in the Hermes / Qwen form: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

``parse`` splits a finished turn into content and calls. A block whose JSON does not parse (or
has no string ``name``) is not a call: its text stays in ``content`` and the message carries a
``tool_call_errors`` entry (OpenAI's error shape plus the raw ``text``), so an agent sees plainly
what the model wrote and why it was not run. ``StreamParser`` does the same on text deltas: content
is streamed as it comes (holding back what may be the start of a ``<tool_call>``), and each call is
streamed when its block closes, as OpenAI streams calls: a first delta with ``index``, ``id``,
``type`` and ``function.name`` (empty arguments), then the arguments.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _error(message: str, raw: str) -> dict[str, Any]:
    return {"message": message, "type": "invalid_tool_call", "param": None, "code": "tool_call_parse_error",
            "text": raw}


def parse_block(body: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """One block's inside -> (OpenAI tool call, None) or (None, error)."""
    raw = f"{OPEN}{body}{CLOSE}"
    try:
        obj = json.loads(body)
    except ValueError as e:
        return None, _error(f"the tool call is not valid JSON: {e}", raw)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None, _error('a tool call must be a JSON object with a string "name"', raw)
    args = obj.get("arguments", {})  # some models send the arguments as a JSON string already
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": obj["name"], "arguments": arguments}}, None


@dataclass
class Parsed:
    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def parse(text: str) -> Parsed:
    """A whole turn. Text outside blocks is the content (stripped when there are calls, as Qwen's
    parser does); an unclosed block (the turn hit max_tokens) is an error and stays in content."""
    out = Parsed(content="")
    kept: list[str] = []
    rest = text
    while OPEN in rest:
        before, _, after = rest.partition(OPEN)
        kept.append(before)
        body, closed, rest = after.partition(CLOSE)
        if not closed:
            out.errors.append(_error("the tool call was not closed (the turn ended first)", OPEN + body))
            kept.append(OPEN + body)
            rest = ""
            break
        call, err = parse_block(body)
        if call is not None:
            out.tool_calls.append(call)
        else:
            out.errors.append(err)  # type: ignore[arg-type]
            kept.append(f"{OPEN}{body}{CLOSE}")
    kept.append(rest)
    content = "".join(kept)
    out.content = content.strip() if out.tool_calls else content
    return out


class StreamParser:
    """Text deltas in, OpenAI delta dicts out (``{"content": ...}`` or ``{"tool_calls": [...]}``)."""

    def __init__(self) -> None:
        self._buf = ""  # text not yet emitted (a possible block start, or an open block)
        self._in_block = False
        self.calls: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self._content_seen = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buf += text
        out: list[dict[str, Any]] = []
        while True:
            if self._in_block:
                body, closed, rest = self._buf.partition(CLOSE)
                if not closed:
                    return out
                self._buf, self._in_block = rest, False
                out += self._block(body)
                continue
            head, opened, rest = self._buf.partition(OPEN)
            if opened:
                out += self._content(head)
                self._buf, self._in_block = rest, True
                continue
            keep = _partial_suffix(self._buf, OPEN)
            out += self._content(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return out

    def finish(self) -> list[dict[str, Any]]:
        """End of the turn: whatever is held back is content (an open block is an error)."""
        if self._in_block:
            self.errors.append(_error("the tool call was not closed (the turn ended first)", OPEN + self._buf))
            text, self._buf = OPEN + self._buf, ""
        else:
            text, self._buf = self._buf, ""
        self._in_block = False
        return self._content(text)

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text or (self.calls and not text.strip()):
            return []
        self._content_seen = True
        return [{"content": text}]

    def _block(self, body: str) -> list[dict[str, Any]]:
        call, err = parse_block(body)
        if call is None:
            self.errors.append(err)  # type: ignore[arg-type]
            return self._content(f"{OPEN}{body}{CLOSE}")
        index = len(self.calls)
        self.calls.append(call)
        fn = call["function"]
        return [{"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                 "function": {"name": fn["name"], "arguments": ""}}]},
                {"tool_calls": [{"index": index, "function": {"arguments": fn["arguments"]}}]}]


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``token``."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:n]):
            return n
    return 0
