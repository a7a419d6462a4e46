"""Responses in OpenAI's shapes: chat completions (JSON and server-sent events), legacy text
completions, usage, and the trajectory route's body."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from fastapi.responses import JSONResponse

from rollwire.fleet.session import FleetSession
from rollwire.gateway.choices import Choice
from rollwire.gateway.core import Gateway, session_endpoint
from rollwire.gateway.errors import APIError, from_rollwire
from rollwire.gateway.events import Events
from rollwire.gateway.schemas import ChatCompletionRequest, CompletionRequest
from rollwire.gateway.sessions import ChatSession
from rollwire.messages import RollwireError


def usage_body(choices: Sequence[Choice], prompt_tokens: int, session: bool = False) -> dict[str, Any]:
    """``session``: a session turn's prompt is its whole history, as its GenerateDone counts it."""
    if session and choices and choices[0].done is not None:
        prompt_tokens = choices[0].done.usage.prompt_tokens
    completion = sum(len(c.done.output_ids) if c.done is not None else len(c.ids) for c in choices)
    cached = max((c.done.usage.cached_tokens for c in choices if c.done is not None), default=0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def rollwire_info(choices: Sequence[Choice], session_id: str | None) -> dict[str, Any]:
    done = [c.done for c in choices if c.done is not None]
    return {"session_id": session_id,
            "weight_version": max((d.weight_version for d in done), default=None),
            "weight_version_spans": [[{"version": s.version, "start": s.start, "end": s.end}
                                      for s in d.weight_version_spans] for d in done]}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def error_event(e: BaseException) -> bytes:
    err = from_rollwire(e) if isinstance(e, RollwireError) else \
        e if isinstance(e, APIError) else APIError(500, f"internal error: {e!r}", type="internal_error")
    return sse(err.body())


def session_headers(sid: str | None) -> dict[str, str] | None:
    return {"X-Session-ID": sid} if sid is not None else None


def chat_message(c: Choice) -> dict[str, Any]:
    m = c.message()
    out: dict[str, Any] = {"role": "assistant", "content": m["content"] if m["content"] or not m.get("tool_calls")
                           else None}
    if m.get("tool_calls"):
        out["tool_calls"] = m["tool_calls"]
    if m.get("tool_call_errors"):
        out["tool_call_errors"] = m["tool_call_errors"]
    return out


async def chat_response(gw: Gateway, req: ChatCompletionRequest, choices: list[Choice],
                         events: Events, rid: str, created: int, prompt_tokens: int,
                         sid: str | None, prompt: list[int]) -> JSONResponse:
    try:
        async for _ in events:
            pass
    except RollwireError as e:
        raise from_rollwire(e) from None
    body_choices = []
    for c in choices:
        ch: dict[str, Any] = {"index": c.index, "message": chat_message(c), "finish_reason": c.finish_reason,
                              "logprobs": {"content": c.logprob_entries(c.ids, 0)} if req.logprobs else None}
        if req.return_token_ids:
            ch["token_ids"] = list(c.ids)
        body_choices.append(ch)
        gw.metrics.inc("tool_calls_total", len(ch["message"].get("tool_calls") or []))
        gw.metrics.inc("tool_call_errors_total", len(ch["message"].get("tool_call_errors") or []))
    usage = usage_body(choices, prompt_tokens, session=sid is not None)
    gw.metrics.inc("completion_tokens_total", usage["completion_tokens"])
    gw.metrics.inc("prompt_tokens_total", usage["prompt_tokens"])
    body: dict[str, Any] = {"id": rid, "object": "chat.completion", "created": created, "model": gw.name,
                            "choices": body_choices, "usage": usage, "rollwire": rollwire_info(choices, sid)}
    if req.return_token_ids:
        body["prompt_token_ids"] = prompt
    return JSONResponse(body, headers=session_headers(sid))


async def chat_stream(gw: Gateway, req: ChatCompletionRequest, choices: list[Choice], events: Events,
                       rid: str, created: int, prompt_tokens: int, sid: str | None,
                       prompt: list[int]) -> AsyncGenerator[bytes, None]:
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None,
              extra: dict[str, Any] | None = None) -> bytes:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": gw.name,
                     "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                                  **(extra or {})}]})

    try:
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async with contextlib.aclosing(events):
            async for index, deltas, taken, start in events:
                c = choices[index]
                lp = {"content": c.logprob_entries(taken, start)} if req.logprobs and taken else None
                extra = {"token_ids": taken} if req.return_token_ids and taken else {}
                if not deltas and (lp or extra):
                    yield chunk(index, {}, logprobs=lp, extra=extra)
                for k, d in enumerate(deltas):
                    yield chunk(index, d, logprobs=lp if k == 0 else None, extra=extra if k == 0 else None)
        for c in choices:
            m = c.message()
            extra = {"tool_call_errors": m["tool_call_errors"]} if m.get("tool_call_errors") else {}
            yield chunk(c.index, {}, c.finish_reason, extra=extra)
        usage = usage_body(choices, prompt_tokens, session=sid is not None)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": gw.name,
                        "choices": [], "usage": usage, "rollwire": rollwire_info(choices, sid)})
        gw.metrics.inc("completion_tokens_total", usage["completion_tokens"])
        gw.metrics.inc("prompt_tokens_total", usage["prompt_tokens"])
    except (RollwireError, APIError) as e:
        yield error_event(e)
    yield b"data: [DONE]\n\n"


def completion_choice(c: Choice, req: CompletionRequest, prompt: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                           "logprobs": legacy_logprobs(c, c.ids, 0) if req.logprobs is not None else None}
    if req.return_token_ids:
        out["token_ids"] = list(c.ids)
        out["prompt_token_ids"] = list(prompt)
    return out


def legacy_logprobs(c: Choice, ids: Sequence[int], start: int) -> dict[str, Any]:
    tokens = [c.chat.token_text(t) for t in ids]
    return {"tokens": tokens, "token_logprobs": c.logprobs[start:start + len(ids)], "top_logprobs": None,
            "text_offset": None}


def trajectory_body(gw: Gateway, cs: ChatSession) -> dict[str, Any]:
    traj = cs.session.trajectory()
    turns = []
    for k, t in enumerate(traj.turns):
        turns.append({"role": "model" if t.role == "model" else "env", "start": t.start, "end": t.end,
                      "messages": cs.turn_messages[k] if k < len(cs.turn_messages) else [],
                      "finish_reason": t.finish_reason, "weight_version": t.weight_version,
                      "weight_version_spans": [[s.version, s.start, s.end] for s in t.weight_version_spans],
                      "cached_tokens": t.cached_tokens})
    moves = cs.session.moves if isinstance(cs.session, FleetSession) else cs.replays
    return {"session_id": cs.key[1], "server": session_endpoint(gw, cs.session), "moves": moves,
            "token_ids": traj.token_ids, "loss_mask": traj.loss_mask,
            "logprobs": traj.logprobs, "weight_version_spans": [[s.version, s.start, s.end]
                                                                for s in traj.weight_version_spans],
            "turns": turns, "messages": [{k: v for k, v in m.items() if k != "tool_call_errors"}
                                         for m in cs.messages],
            "diverged_requests": cs.diverged}

