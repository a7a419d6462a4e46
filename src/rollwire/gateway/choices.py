"""One choice of a response, built from token deltas: text, stop strings, tool calls, logprobs.

Both paths feed it: a plain request's stream of ``GenerateChunk`` deltas, and a session turn's
one ``GenerateDone`` (fed as one delta). A stop string ends the choice where it starts (the stop
string is not part of the text); tokens after it are dropped from the choice (a plain request is
aborted once every choice has stopped; a session keeps what the model generated, see sessions.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rollwire.gateway import tools as toolcalls
from rollwire.gateway.chat import Canonical, ChatFormat, Detokenizer
from rollwire.messages import GenerateDone


class Choice:
    def __init__(self, chat: ChatFormat, index: int, *, stops: Sequence[str], tools: bool, chat_mode: bool) -> None:
        self.chat = chat
        self.index = index
        self.stops = list(stops)
        self._hold = max((len(s) for s in self.stops), default=1) - 1  # chars that may start a stop string
        self.detok = Detokenizer(chat)
        self.parser = toolcalls.StreamParser() if tools else None
        self.chat_mode = chat_mode
        self.ids: list[int] = []  # tokens of this choice (up to a stop string)
        self.logprobs: list[float] = []
        self.text = ""  # text released so far (stop strings cut)
        self._pending = ""  # decoded but held back (may be the start of a stop string)
        self.stopped = False  # a stop string ended it
        self.done: GenerateDone | None = None
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.stopped or self.done is not None

    def feed(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> tuple[list[dict[str, Any]], list[int]]:
        """New tokens -> (deltas, the tokens they cover). After a stop string nothing more is taken."""
        if self.stopped or not ids:
            return [], []
        taken: list[int] = []
        released = ""
        if not self.stops:  # no stop string to look for: decode the delta at once, not token by token
            taken = list(ids)
            self.ids += taken
            self.logprobs += [float(x) for x in logprobs] if logprobs is not None else [float("nan")] * len(taken)
            self._pending += self.detok.push(taken)
            ids = ()
        for k, t in enumerate(ids):
            taken.append(t)
            self.ids.append(t)
            self.logprobs.append(float(logprobs[k]) if logprobs is not None else float("nan"))
            self._pending += self.detok.push([t])
            cut = self._stop_at()
            if cut is not None:
                released += self._pending[:cut]
                self._pending = ""
                self.stopped = True
                self.finish_reason = "stop"
                break
        if not self.stopped and len(self._pending) > self._hold:
            keep = self._hold
            released += self._pending[:len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep:]
        deltas = self._release(released)
        if self.stopped:
            deltas += self._close()
            if self.parser is not None and self.parser.calls:
                self.finish_reason = "tool_calls"
        return deltas, taken

    def finish(self, done: GenerateDone) -> list[dict[str, Any]]:
        """The terminal reply: release what was held back (its tail decoded whole)."""
        self.done = done
        if self.stopped:
            return []
        full = self.detok.text()
        tail = full[len(self.text) + len(self._pending):] if full.startswith(self.text + self._pending) else ""
        self._pending += tail
        cut = self._stop_at()
        if cut is not None:
            self._pending = self._pending[:cut]
            self.stopped = True
        released, self._pending = self._pending, ""
        deltas = self._release(released) + self._close()
        # a turn that ended by itself (or at a stop string) with calls in it: "tool_calls"; one cut
        # at max_tokens stays "length" (its complete calls are still returned)
        self.finish_reason = "stop" if self.stopped or done.finish_reason == "stop" else done.finish_reason
        if self.parser is not None and self.parser.calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        return deltas

    def _stop_at(self) -> int | None:
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _release(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self.text += text
        if self.parser is not None:
            return self.parser.feed(text)
        return [{"content": text}] if self.chat_mode else [{"text": text}]

    def _close(self) -> list[dict[str, Any]]:
        return self.parser.finish() if self.parser is not None else []

    # -- the whole choice ----------------------------------------------------------------
    def message(self) -> Canonical:
        """The assistant message (also what a session records)."""
        if self.parser is None:
            return {"role": "assistant", "content": self.text}
        parsed = toolcalls.parse(self.text)  # the same calls the stream parser found (its ids were sent)
        msg: Canonical = {"role": "assistant", "content": parsed.content}
        if self.parser.calls:
            msg["tool_calls"] = [dict(c) for c in self.parser.calls]
        if self.parser.errors:
            msg["tool_call_errors"] = list(self.parser.errors)
        return msg

    def logprob_entries(self, ids: Sequence[int], start: int) -> list[dict[str, Any]]:
        out = []
        for k, t in enumerate(ids):
            text = self.chat.token_text(t)
            out.append({"token": text, "logprob": self.logprobs[start + k], "bytes": list(text.encode()),
                        "top_logprobs": []})
        return out
