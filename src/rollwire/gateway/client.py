"""A trainer's side of the gateway: fetch (or close and fetch) a session's exact trajectory.

    traj = fetch_trajectory("http://127.0.0.1:8000", "episode-17", close=True)
    traj.token_ids, traj.loss_mask, traj.logprobs, traj.weight_version_spans, traj.turns, traj.messages

Standard library only (urllib), so a trainer process needs no HTTP client; ``afetch_trajectory``
runs it on a thread for asyncio code.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from rollwire.messages import VersionSpan


@dataclass
class ChatTurn:
    role: Literal["env", "model"]  # env: rendered messages (loss_mask 0); model: the model's tokens
    start: int  # positions [start, end) in token_ids
    end: int
    messages: list[int]  # indices into ChatTrajectory.messages
    finish_reason: str | None
    weight_version: int | None
    weight_version_spans: list[VersionSpan]  # trajectory positions
    cached_tokens: int


@dataclass
class ChatTrajectory:
    session_id: str
    token_ids: list[int]
    loss_mask: list[int]  # 1 exactly on tokens the model generated
    logprobs: list[float]  # aligned with token_ids; 0.0 where loss_mask is 0
    weight_version_spans: list[VersionSpan]  # over trajectory positions
    turns: list[ChatTurn]
    messages: list[dict[str, Any]]  # the conversation, the last assistant message included
    server: str = ""  # the rollout endpoint the session lives on now
    moves: int = 0  # servers it moved away from (over a fleet: its server died; the history was replayed)


class GatewayError(Exception):
    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}")
        self.status = status
        self.error = error


def _spans(rows: list[list[int]]) -> list[VersionSpan]:
    return [VersionSpan(version=v, start=s, end=e) for v, s, e in rows]


def trajectory_from_json(body: dict[str, Any]) -> ChatTrajectory:
    turns = [ChatTurn(role=t["role"], start=t["start"], end=t["end"], messages=t["messages"],
                      finish_reason=t["finish_reason"], weight_version=t["weight_version"],
                      weight_version_spans=_spans(t["weight_version_spans"]), cached_tokens=t["cached_tokens"])
             for t in body["turns"]]
    return ChatTrajectory(session_id=body["session_id"], token_ids=body["token_ids"], loss_mask=body["loss_mask"],
                          logprobs=body["logprobs"], weight_version_spans=_spans(body["weight_version_spans"]),
                          turns=turns, messages=body["messages"], server=body.get("server", ""),
                          moves=body.get("moves", 0))


def fetch_trajectory(base_url: str, session_id: str, *, api_key: str | None = None, close: bool = False,
                     timeout: float = 30.0) -> ChatTrajectory:
    """GET /v1/sessions/{id}/trajectory, or with ``close`` DELETE /v1/sessions/{id} (the session is
    freed on the gateway and the server; the answer is the final trajectory)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    sid = quote(session_id, safe="")
    url = f"{root}/v1/sessions/{sid}" if close else f"{root}/v1/sessions/{sid}/trajectory"
    req = urllib.request.Request(url, method="DELETE" if close else "GET")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return trajectory_from_json(json.loads(resp.read()))
    except urllib.error.HTTPError as e:
        try:
            error = json.loads(e.read())["error"]
        except (ValueError, KeyError, TypeError):
            error = {"message": str(e), "code": None}
        raise GatewayError(e.code, error) from None


async def afetch_trajectory(base_url: str, session_id: str, **kw: Any) -> ChatTrajectory:
    return await asyncio.to_thread(fetch_trajectory, base_url, session_id, **kw)
