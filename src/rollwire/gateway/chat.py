"""The checkpoint's tokenizer and chat template, as the gateway uses them.

``ChatFormat`` renders messages (tools included) to text and tokens, knows the end-of-turn tokens
a chat turn stops at, and decodes model output incrementally (``Detokenizer``). Messages are
first put in one canonical form (``canonical``): that form is what the template sees and what a
session compares turn by turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rollwire.gateway.errors import APIError, bad_request
from rollwire.gateway.schemas import Message, Tool

Canonical = dict[str, Any]  # {"role", "content": str, "name"?, "tool_calls"?, "tool_call_id"?}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # chat templates' turn markers
MIN_CHARS_PER_TOKEN_BOUND = 64  # see ChatFormat.chars_per_token_bound


def load_tokenizer(model: str) -> Any:
    """``tiny``/``tiny:SEED``: the tiny model's tokenizer (with its chat template); else a local
    checkpoint directory's tokenizer (nothing is downloaded)."""
    if model == "tiny" or model.startswith("tiny:"):
        from rollwire.models import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    if not Path(model).is_dir():
        raise SystemExit(f"--model {model!r} is neither 'tiny[:SEED]' nor a local checkpoint directory")
    return AutoTokenizer.from_pretrained(model, local_files_only=True)


def _arguments(args: str | dict[str, Any]) -> str:
    return args if isinstance(args, str) else json.dumps(args)


def _unicode(text: str, param: str) -> str:
    """``text`` if it is text (a lone surrogate, which JSON allows as "\\ud800", is not): a session
    keeps every field of its messages, and one it could not send back out would lose its trajectory."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} is not valid Unicode: {e.reason} at position {e.start}", param) from None
    return text


def canonical(m: Message) -> Canonical:
    content = m.content if isinstance(m.content, str) or m.content is None else \
        "".join(p.text for p in m.content)
    role = "system" if m.role == "developer" else m.role
    out: Canonical = {"role": role, "content": _unicode(content or "", "messages.content")}
    if m.name is not None:
        out["name"] = _unicode(m.name, "messages.name")
    if m.tool_calls:
        if role != "assistant":
            raise bad_request("only assistant messages carry tool_calls", "messages")
        out["tool_calls"] = [{"id": _unicode(c.id, "messages.tool_calls.id"), "type": "function",
                              "function": {"name": _unicode(c.function.name, "messages.tool_calls.function.name"),
                                           "arguments": _unicode(_arguments(c.function.arguments),
                                                                 "messages.tool_calls.function.arguments")}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = _unicode(m.tool_call_id, "messages.tool_call_id")
    return out


def _args_key(args: str) -> Any:
    try:
        return json.dumps(json.loads(args), sort_keys=True)
    except ValueError:
        return args


def same_message(a: Canonical, b: Canonical) -> bool:
    """Equal as the template renders them: role, content, name and the calls (name + arguments as
    JSON values); tool call ids and tool_call_id are bookkeeping and may be renamed."""
    if (a["role"], a["content"], a.get("name")) != (b["role"], b["content"], b.get("name")):
        return False
    calls = [[(c["function"]["name"], _args_key(c["function"]["arguments"])) for c in m.get("tool_calls") or []]
             for m in (a, b)]
    return calls[0] == calls[1]


class ChatFormat:
    def __init__(self, tokenizer: Any) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise SystemExit("the tokenizer has no chat_template: /v1/chat/completions needs one")
        self.tok = tokenizer
        vocab = tokenizer.get_vocab()
        eos = tokenizer.eos_token_id
        self.end_markers = [t for t in END_OF_TURN if t in vocab]
        ids = {vocab[t] for t in self.end_markers} | ({eos} if isinstance(eos, int) else set())
        self.end_ids = sorted(ids)  # a chat turn stops at any of these
        self.stop_texts = [tokenizer.convert_ids_to_tokens(i) for i in self.end_ids]
        # no token of this vocabulary stands for more characters than this (4x its longest entry's
        # UTF-8 bytes, for normalizers that fold several characters into one): a text longer than
        # the context times this cannot fit, and is refused before a second is spent tokenizing it
        longest = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1)
        self.chars_per_token_bound = max(MIN_CHARS_PER_TOKEN_BOUND, 4 * longest)

    def check_fits(self, chars: int, max_model_len: int, param: str) -> None:
        """A 400 ``too_long`` for text that cannot fit ``max_model_len`` tokens (0: unknown)."""
        if max_model_len and chars > max_model_len * self.chars_per_token_bound:
            raise APIError(400, f"{param} has {chars} characters: more than {max_model_len} tokens of context can "
                                f"hold (a token stands for at most {self.chars_per_token_bound} here)",
                           param=param, code="too_long")

    def conversation(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None,
                     max_model_len: int) -> list[Canonical]:
        """The canonical messages, once they are known to be able to fit the context."""
        out = [canonical(m) for m in messages]
        chars = len(json.dumps(tools)) if tools else 0
        for m in out:  # every message renders to at least its role and its text; a session keeps the ids too
            chars += len(m["role"]) + len(m["content"]) + len(m.get("name") or "") + len(m.get("tool_call_id") or "")
            calls = m.get("tool_calls") or []
            chars += sum(len(c["id"]) + len(c["function"]["name"]) + len(c["function"]["arguments"]) for c in calls)
        self.check_fits(chars, max_model_len, "messages")
        return out

    def prompt_ids(self, messages: Sequence[Canonical], tools: list[dict[str, Any]] | None) -> list[int]:
        return self.encode(self.render(messages, tools, generation_prompt=True))

    def render(self, messages: Sequence[Canonical], tools: list[dict[str, Any]] | None, *,
               generation_prompt: bool) -> str:
        try:
            text = self.tok.apply_chat_template(list(messages), tools=tools or None, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as e:  # a template that refuses these messages (e.g. role order): the caller's input
            raise bad_request(f"the chat template cannot render these messages: {e}", "messages") from None
        return str(text)

    def encode(self, text: str) -> list[int]:
        try:  # a lone surrogate (JSON allows "\ud800") is no text a tokenizer can take
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"text is not valid Unicode: {e.reason} at position {e.start}") from None
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=skip_special))

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special=False)

    def glue(self, assistant_text: str, model_text: str) -> str:
        """Text the template puts after an assistant turn that the model did not produce itself
        (``assistant_text``: the template's rendering of the turn; ``model_text``: the model's
        output with its special tokens). Usually the newline after the end-of-turn marker; the
        whole marker too when the model stopped without it (max_tokens)."""
        if assistant_text.startswith(model_text):
            return assistant_text[len(model_text):]
        found = [(assistant_text.rfind(m), m) for m in self.stop_texts if m and m in assistant_text]
        if not found:
            return ""
        pos, marker = max(found)
        return assistant_text[pos + len(marker):] if model_text.endswith(marker) else assistant_text[pos:]


class Detokenizer:
    """Incremental decoding: text deltas for appended tokens, never a broken UTF-8 character
    (the prefix-window method of TGI and vLLM: decode a small window twice, not the whole output)."""

    def __init__(self, chat: ChatFormat) -> None:
        self.chat = chat
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        before = self.chat.decode(self.ids[self._prefix:self._read])
        now = self.chat.decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before):]
        return ""

    def text(self) -> str:
        return self.chat.decode(self.ids)


def tools_json(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None
