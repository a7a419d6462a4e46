"""The OpenAI face over a rollout server that is SIGKILLed and started again at the same endpoints
(`rollwire serve` and `rollwire gateway` as processes, the real `openai` client): a session with
history goes on on the restarted server from the gateway's record, and a session whose first turn
died with the server is not left behind. Each test says what became of the turns in flight."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.gateway_stack import Stack, metric, stack, user


@pytest.fixture(scope="module")
def gw() -> Iterator[Stack]:
    with stack() as s:
        yield s


@pytest.fixture(scope="module")
def client(gw: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=120) as c:
        yield c


def get(gw: Stack, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(gw.root + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")




def restart_and_wait(gw: Stack) -> None:
    """Restart the server, then until the gateway's /health is 200 again (its client heard the
    restarted server, and with it the new session port)."""
    gw.restart_server()
    deadline = time.monotonic() + 120
    while get(gw, "/health")[0] != 200:
        assert time.monotonic() < deadline, "the restarted server was not heard"
        time.sleep(0.05)


def turn(client: openai.OpenAI, sid: str, messages: list[dict[str, Any]], n: int = 4) -> Any:
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=n,
                                          extra_headers={"X-Session-ID": sid}, extra_body={"ignore_eos": True})


def test_a_session_goes_on_over_a_restart_of_its_server_from_the_gateways_record(gw: Stack,
                                                                                client: openai.OpenAI) -> None:
    """Before: after the restart every turn of the session failed 503 ``shutting_down`` (its link
    to the old server's session port) until its TTL. Now the record is replayed into a new session
    on the restarted server: the turn succeeds and the trajectory keeps the first turn's tokens,
    masks and logprobs."""
    first = turn(client, "over-restart", user("hi"))
    assert first.choices[0].finish_reason == "length"
    status, before = get(gw, "/v1/sessions/over-restart/trajectory")
    assert status == 200 and before["moves"] == 0
    restart_and_wait(gw)
    messages = [*user("hi"), {"role": "assistant", "content": first.choices[0].message.content},
                *user("and again")]
    second = turn(client, "over-restart", messages)
    assert second.choices[0].finish_reason == "length" and second.usage is not None
    status, after = get(gw, "/v1/sessions/over-restart/trajectory")
    assert status == 200 and after["moves"] == 1
    n = len(before["token_ids"])
    assert after["token_ids"][:n] == before["token_ids"]
    assert after["loss_mask"][:n] == before["loss_mask"] and after["logprobs"][:n] == before["logprobs"]
    assert len(after["token_ids"]) == second.usage.prompt_tokens + second.usage.completion_tokens
    assert len(after["turns"]) == len(before["turns"]) + 2  # the new user turn, the new model turn
    assert after["turns"][-1]["role"] == "model" and sum(after["loss_mask"]) == 8  # two model turns of 4


def test_a_streamed_first_turn_cut_by_the_servers_death_leaves_no_session(gw: Stack, client: openai.OpenAI) -> None:
    """The stream's server is SIGKILLed after its first chunks: the stream ends with an error, and
    the session, which has no turn, is dropped (before: it stayed open and empty, and the retry on
    the restarted server failed 503 on its dead link first). The retry then gets its turn."""
    opened = metric(gw, "rollwire_gateway_sessions_opened_total")
    stream = client.chat.completions.create(model="tiny", messages=user("long"), max_tokens=3000, stream=True,
                                            extra_headers={"X-Session-ID": "cut-by-death"},
                                            extra_body={"ignore_eos": True})
    got = 0
    with pytest.raises(openai.APIError):  # the error event the gateway sends when the turn fails
        for _ in stream:
            got += 1
            if got == 2:
                gw.restart_server()
    assert got >= 2
    assert get(gw, "/v1/sessions/cut-by-death/trajectory")[0] == 404
    restart_and_wait(gw)
    r = turn(client, "cut-by-death", user("long"))
    assert r.choices[0].finish_reason == "length"
    assert metric(gw, "rollwire_gateway_sessions_opened_total") == opened + 2
