"""The OpenAI face against careless and hostile callers (`rollwire serve` and `rollwire gateway` as
processes, the real `openai` client and raw HTTP): huge inputs are refused before they are
tokenized on the event loop, a refused batch leaves nothing running, sessions whose turns fail or
are cut are freed on the server, odd text, ids, keys and JSON get 4xx, never a 500. Each test says
what became of the requests in flight beside it."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.gateway_stack import Stack, metric, stack, user

KEY = "key-a"
MAX_CLIENT_SESSIONS = 4
MAX_CLIENT_IN_FLIGHT = 200  # samples the server lets the gateway run at once


@pytest.fixture(scope="module")
def gw() -> Iterator[Stack]:
    with stack(gateway_args=("--api-key", KEY), serve_args=("--max-client-sessions", str(MAX_CLIENT_SESSIONS),
                                                          "--max-client-in-flight", str(MAX_CLIENT_IN_FLIGHT))) as s:
        yield s


@pytest.fixture(scope="module")
def client(gw: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def post(gw: Stack, path: str, body: bytes, headers: dict[str, Any] | None = None) -> tuple[int, Any]:
    """A raw POST (header values may be bytes, sent as they are); the status and the decoded body."""
    conn = http.client.HTTPConnection("127.0.0.1", int(gw.root.rpartition(":")[2]), timeout=120)
    try:
        conn.putrequest("POST", path)
        for k, v in {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                     "Content-Length": str(len(body)), **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def chat_body(messages: list[dict[str, Any]], **kw: Any) -> bytes:
    return json.dumps({"model": "tiny", "messages": messages, **kw}).encode()


server_metric = metric  # the server's counters, as the gateway's /metrics shows them


def wait_for(what: Any, why: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {why}"
        time.sleep(0.02)


def test_huge_inputs_are_refused_at_once_and_the_streams_beside_them_go_on(gw: Stack, client: openai.OpenAI) -> None:
    """Two 200-token streams run while four oversized requests arrive: a 7 MB message, 200 000
    messages, a 7 MB completion prompt (each refused too_long by the size bound, untokenized) and a
    250 000-character message (tokenized on a worker thread, refused too_long by the server). Before,
    tokenizing the 7 MB text held the event loop for ~19 s, the server link missed its heartbeats,
    and every request in flight failed 503. Now both streams end with all their tokens."""
    results: list[Any] = [None, None]

    def stream(i: int) -> None:
        chunks = list(client.chat.completions.create(
            model="tiny", messages=user(f"stream {i}"), max_tokens=200, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        results[i] = (chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    huge = [
        ("/v1/chat/completions", chat_body(user("a" * (7 << 20)))),
        ("/v1/chat/completions", chat_body([{"role": "user", "content": "a"}] * 200_000)),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": "a" * (7 << 20)}).encode()),
        ("/v1/chat/completions", chat_body(user("a" * 250_000))),
    ]
    for path, body in huge:
        status, err = post(gw, path, body)
        assert (status, err["error"]["code"]) == (400, "too_long"), (path, len(body), err)
    for t in threads:
        t.join(timeout=300)
    assert results == [("length", 200), ("length", 200)]


def test_a_refused_batch_leaves_none_of_its_samples_running(gw: Stack, client: openai.OpenAI) -> None:
    """4 prompts x n=64 (256 choices, the gateway's bound) is over the gateway's per-client cap on the
    server (200 samples): the request gets 429, and the samples admitted before the refusal are
    aborted (before, they ran to their 4000 tokens, holding the gateway's whole share for minutes)."""
    aborts = server_metric(gw, "rollwire_server_finish_abort")
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="tiny", prompt=[f"p{i}" for i in range(4)], n=64, max_tokens=4000,
                                  extra_body={"ignore_eos": True})
    assert err.value.code == "client_limit"
    wait_for(lambda: server_metric(gw, "rollwire_server_in_flight") == 0, "the admitted samples aborted")
    assert server_metric(gw, "rollwire_server_finish_abort") > aborts  # ended by abort, not by running out
    r = client.completions.create(model="tiny", prompt="after", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"


def test_session_turns_that_fail_or_are_cut_leave_no_session_open_on_the_server(client: openai.OpenAI) -> None:
    """The server allows the gateway 4 sessions. Five first turns refused (max_tokens over the
    server's limit) and five first turns whose stream the client cuts: before, each left a session
    open on the server until its TTL, and the sixth session was refused client_limit. Now a new
    session still gets its turn."""
    for i in range(5):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=10**5,
                                           extra_headers={"X-Session-ID": f"refused-{i}"})
        s = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=3000, stream=True,
                                           extra_headers={"X-Session-ID": f"cut-{i}"}, extra_body={"ignore_eos": True})
        for got, _ in enumerate(s, 1):
            if got == 2:
                break
        s.close()
    deadline = time.monotonic() + 60
    while True:  # the cut sessions are closed in the background: a new one gets a slot once they are
        try:
            r = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=3,
                                               extra_headers={"X-Session-ID": "after"}, extra_body={"ignore_eos": True})
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the failed sessions still hold the server's slots"
            time.sleep(0.05)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("headers", "body_sid"), [
    ({"X-Session-ID": "a b"}, None),
    ({"X-Session-ID": "会话-7".encode()}, None),
    ({}, "run-1/episode-3"),
    ({"X-Session-ID": "one"}, "two"),
])
def test_session_ids_are_url_safe_and_header_and_body_agree(gw: Stack, headers: dict[str, Any],
                                                            body_sid: str | None) -> None:
    """Refused before any turn runs (before: a 500 after the turn had run, as the id went back out
    in a header, or a trajectory route that could never find it)."""
    extra = {"session_id": body_sid} if body_sid is not None else {}
    status, err = post(gw, "/v1/chat/completions", chat_body(user("hi"), max_tokens=2, **extra), headers)
    assert (status, err["error"]["param"]) == (400, "session_id"), err


@pytest.mark.parametrize(("path", "body", "code"), [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "invalid_value"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "invalid_value"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ab", "stop": ["\\udfff"]}', "invalid_value"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "invalid_json"),
    ("/v1/chat/completions", chat_body(user("hi"), top_k=10**30), "invalid_value"),
    ("/v1/chat/completions", chat_body(user("hi"), n="2"), "invalid_type"),
    ("/v1/chat/completions", chat_body(user("hi"), stream="yes"), "invalid_type"),
    ("/v1/chat/completions", chat_body(user("hi"), stream_options={"include_usage": True}), "invalid_value"),
    ("/v1/chat/completions", chat_body(user("hi"), stop=["x" * 2_000_000]), "invalid_value"),
    # a JSON value of the wrong kind is refused, not coerced
    ("/v1/chat/completions", chat_body(user("hi"), max_tokens="4"), "invalid_type"),
    ("/v1/chat/completions", chat_body(user("hi"), max_tokens=True), "invalid_type"),
    ("/v1/chat/completions", chat_body(user("hi"), logprobs="yes"), "invalid_type"),
    ("/v1/chat/completions", chat_body(user("hi"), top_logprobs="0"), "invalid_type"),
    ("/v1/completions", b'{"model": "tiny", "prompt": [true, false]}', "invalid_type"),
    ("/v1/completions", b'{"model": "tiny", "prompt": [1.0, 2.0]}', "invalid_type"),
])
def test_odd_text_deep_json_and_loose_types_get_400_not_500(gw: Stack, path: str, body: bytes, code: str) -> None:
    status, err = post(gw, path, body)
    assert (status, err["error"]["code"]) == (400, code), err


@pytest.mark.parametrize(("body", "param"), [
    (chat_body(user("hi"), stream="yes"), "stream"),
    (chat_body(user("hi"), stream=True, stream_options={"include_usage": "x"}), "stream_options.include_usage"),
    (chat_body(user("hi"), tools=[{"type": "function", "function": {"name": "f", "strict": "x"}}]),
     "tools.0.function.strict"),
    (chat_body(user("hi"), maxTokens=5), "maxTokens"),  # an unknown field, named as the caller wrote it
])
def test_a_400_names_the_field_even_where_its_name_starts_like_a_type(gw: Stack, body: bytes, param: str) -> None:
    """(before: "stream" and "strict" were cut as if they named a branch of a union, like "str";
    then for a while "maxTokens" was cut for not looking like a field name)"""
    status, err = post(gw, "/v1/chat/completions", body)
    assert (status, err["error"]["param"]) == (400, param), err
    assert param in err["error"]["message"]


def test_a_completion_asking_for_200000_choices_is_refused_before_any_is_made(gw: Stack, client: openai.OpenAI) -> None:
    """200,000 one-token prompts (a 1.4 MB body, under the size limit) would be 200,000 requests and
    tasks built on the gateway's event loop (it stalled for a minute and grew by 2.6 GB, missed its
    heartbeats, and the server dropped its sessions): refused at once, nothing reaches the server,
    and the gateway answers the next request."""
    served = server_metric(gw, "rollwire_server_requests")
    body = json.dumps({"model": "tiny", "prompt": [[5]] * 200_000, "max_tokens": 1}).encode()
    status, err = post(gw, "/v1/completions", body)
    assert (status, err["error"]["code"], err["error"]["param"]) == (400, "invalid_value", "prompt"), err
    assert "at most 256" in err["error"]["message"]
    status, err = post(gw, "/v1/completions", json.dumps({"model": "tiny", "prompt": ["a"] * 5, "n": 64}).encode())
    assert (status, err["error"]["param"]) == (400, "prompt"), err  # prompts x n counts
    assert server_metric(gw, "rollwire_server_requests") == served  # none of those reached the server
    r = client.completions.create(model="tiny", prompt=["a"] * 4, max_tokens=1, n=2)
    assert len(r.choices) == 8  # within the bound: served


def gateway_metric(gw: Stack, name: str) -> float:
    with urllib.request.urlopen(gw.root + "/metrics", timeout=30) as r:
        return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", chat_body(user("hang up"), max_tokens=4000, ignore_eos=True)),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": ["hang", "up"], "max_tokens": 4000, "n": 2,
                                    "ignore_eos": True}).encode()),
])
def test_a_caller_that_hangs_up_on_a_non_streamed_request_has_its_generation_aborted(
        gw: Stack, path: str, body: bytes) -> None:
    """Before: the request ran on to its 4000 tokens for nobody (a stream cut the same way was
    already aborted). Now every sample of it ends with abort on the server within the hang guard."""
    aborts = server_metric(gw, "rollwire_server_finish_abort")
    gone = gateway_metric(gw, "rollwire_gateway_client_disconnects_total")
    conn = http.client.HTTPConnection("127.0.0.1", int(gw.root.rpartition(":")[2]), timeout=120)
    conn.putrequest("POST", path)
    for k, v in {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                 "Content-Length": str(len(body))}.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    wait_for(lambda: server_metric(gw, "rollwire_server_in_flight") >= 1, "the request generating")
    conn.close()  # hang up without reading the answer
    wait_for(lambda: server_metric(gw, "rollwire_server_in_flight") == 0, "its samples aborted", timeout=15)
    assert server_metric(gw, "rollwire_server_finish_abort") >= aborts + (1 if "chat" in path else 4)
    assert gateway_metric(gw, "rollwire_gateway_client_disconnects_total") == gone + 1


def test_a_non_ascii_api_key_is_a_401(gw: Stack) -> None:
    status, err = post(gw, "/v1/chat/completions", chat_body(user("hi")),
                       {"Authorization": "Bearer clé".encode("latin-1")})
    assert (status, err["error"]["code"]) == (401, "invalid_api_key")


def gateway_500s(gw: Stack) -> float:
    with urllib.request.urlopen(gw.root + "/metrics", timeout=30) as r:
        return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                   if line.startswith("rollwire_gateway_http_requests_total{") and 'status="500"' in line)


@pytest.mark.parametrize(("path", "rest"), [("/v1/chat/completions", {"messages": user("hi")}),
                                            ("/v1/completions", {"prompt": "hi"})])
def test_a_model_name_that_is_no_text_is_a_404_not_a_500(gw: Stack, path: str, rest: dict[str, Any]) -> None:
    """(before: the name, echoed in the message, failed to encode: 500 UnicodeEncodeError)"""
    status, err = post(gw, path, json.dumps({"model": "\ud800", **rest}).encode())
    assert (status, err["error"]["code"]) == (404, "model_not_found"), err
    assert "\\ud800" in err["error"]["message"]


@pytest.mark.parametrize(("field", "value", "param"), [
    ("name", "\ud800", "messages.name"),
    ("tool_call_id", "\udc00", "messages.tool_call_id"),
    ("tool_call_id", "c" * 300_000, "messages"),  # kept by the session: counted against the context
])
def test_a_session_turn_with_a_field_no_session_can_keep_is_refused_and_the_trajectory_stays(
        gw: Stack, client: openai.OpenAI, field: str, value: str, param: str) -> None:
    """A name or tool_call_id the template never renders: before, the turn ran and the session
    stored it; its trajectory could not be read back (500), and DELETE dropped the session before
    failing. A 300,000-character id was not counted against the context (24 sessions of 7 MB ids
    grew the gateway by 190 MB). Now the turn is refused, the session keeps its first turn, and its
    trajectory is read and closed as before."""
    sid = f"kept-{field}-{len(value)}"
    first = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2,
                                           extra_headers={"X-Session-ID": sid}, extra_body={"ignore_eos": True})
    messages = [*user("hi"), {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "tool" if field == "tool_call_id" else "user", "content": "5", field: value}]
    status, err = post(gw, "/v1/chat/completions", chat_body(messages, max_tokens=2),
                       {"X-Session-ID": sid})
    assert status == 400 and err["error"]["param"] == param, err
    with urllib.request.urlopen(urllib.request.Request(
            f"{gw.root}/v1/sessions/{sid}", method="DELETE", headers={"Authorization": f"Bearer {KEY}"}),
            timeout=30) as r:
        closed = json.loads(r.read())
    assert len(closed["turns"]) == 2 and sum(closed["loss_mask"]) == 2  # the first turn, whole


def test_a_caller_that_hangs_up_during_its_upload_is_a_499_not_a_500(gw: Stack) -> None:
    """Half a body, then the connection closed: before, each was a 500 with two tracebacks in the
    log; now it counts as a client disconnect (499), as a hang-up after the body is in does."""
    gone, errors = gateway_metric(gw, "rollwire_gateway_client_disconnects_total"), gateway_500s(gw)
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", int(gw.root.rpartition(":")[2]), timeout=30)
        conn.putrequest("POST", "/v1/chat/completions")
        for k, v in {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                     "Content-Length": "100000"}.items():
            conn.putheader(k, v)
        conn.endheaders(b'{"model": "tiny", "messages": [' + b" " * 50_000)
        conn.close()
    wait_for(lambda: gateway_metric(gw, "rollwire_gateway_client_disconnects_total") >= gone + 3,
             "three client disconnects counted", timeout=30)
    assert gateway_500s(gw) == errors


def test_a_chat_without_max_tokens_gets_the_context_that_is_left(client: openai.OpenAI) -> None:
    """A 3500-token prompt without max_tokens: the turn fills the 4096-token context (before: 400
    too_long, 3500 + the default 1024 being over it)."""
    r = client.chat.completions.create(model="tiny", messages=user("a" * 3500), extra_body={"ignore_eos": True})
    assert r.usage is not None and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 4096


def test_the_gateway_kept_serving(client: openai.OpenAI) -> None:
    """(``ignore_eos``: a sampled turn may end on <|im_end|> within 3 tokens, seen once in CI.)"""
    r = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=3, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 3


def test_sigterm_stops_a_gateway_still_waiting_for_its_server() -> None:
    """No rollout server answers: SIGTERM ends the gateway at once (before, uvicorn's startup waited
    out the 120 s bound first, then printed a traceback)."""
    import signal
    import subprocess
    import sys

    from rollwire.transports.sockets import free_tcp_endpoint

    port = free_tcp_endpoint(span=1).rpartition(":")[2]
    proc = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "info", "gateway", "--port", port,
                             "--rollout-endpoint", free_tcp_endpoint()], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # bounded: the gateway logs this line, then waits
            if "gateway_waiting_for_servers" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0  # a hang guard; stopped by the signal, not served
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
