"""A real stack for the OpenAI face: ``rollwire serve`` and ``rollwire gateway`` as processes, and a
tiny model taught a script so its tool calls are real model output.

The tiny model's weights are random, so it never writes ``<tool_call>...`` by itself. ``scripted()``
trains it (on CPU, about a second) to answer a few fixed conversations exactly, among them a
4-turn tool-using episode; the tests push those weights to the server as a version, as a trainer
would, and drive the gateway with the real ``openai`` client at temperature 0.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from rollwire.models import IM_END, tiny, tiny_tokenizer
from rollwire.transports.sockets import free_tcp_endpoint

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "add", "description": "a+b", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "mul", "description": "a*b", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
]
TASK = "(2+3+4)*2?"
BROKEN_TASK = "broken?"
BROKEN_CALL = '<tool_call>{"name": "add", "arguments": {"a": 2,</tool_call>'
PLAIN_TASK = "Say hi."
PLAIN_ANSWER = "Hi there, friend."


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def call(name: str, a: int, b: int) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{name}_{a}_{b}", "type": "function",
         "function": {"name": name, "arguments": json.dumps({"a": a, "b": b})}}]}


def tool(text: str, call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


# the 4-turn episode: three calls, then the answer
EPISODE: list[dict[str, Any]] = [
    {"role": "user", "content": TASK},
    call("add", 2, 3), tool("5", "call_add_2_3"),
    call("add", 5, 4), tool("9", "call_add_5_4"),
    call("mul", 9, 2), tool("18", "call_mul_9_2"),
    {"role": "assistant", "content": "It is 18."},
]
CONVERSATIONS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    (EPISODE, TOOLS),
    ([{"role": "user", "content": BROKEN_TASK}, {"role": "assistant", "content": BROKEN_CALL}], TOOLS),
    ([{"role": "user", "content": PLAIN_TASK}, {"role": "assistant", "content": PLAIN_ANSWER}], None),
]


def _example(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a mask of the assistant turns' tokens (their end-of-turn included)."""
    tok = tiny_tokenizer()
    ids = tok.encode(tok.apply_chat_template(messages, tools=tools, tokenize=False), add_special_tokens=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.encode(tok.apply_chat_template(messages[:i], tools=tools, tokenize=False,
                                                           add_generation_prompt=True), add_special_tokens=False))
            end = len(tok.encode(tok.apply_chat_template(messages[:i + 1], tools=tools, tokenize=False),
                                 add_special_tokens=False))
            assert tok.convert_ids_to_tokens(ids[end - 2]) == IM_END  # <|im_end|> then the template's newline
            for j in range(start, end - 1):
                mask[j] = 1
    return ids, mask


@functools.cache
def scripted_state() -> dict[str, torch.Tensor]:
    """The tiny model (seed 0) trained until it answers CONVERSATIONS greedily, with a margin."""
    torch.manual_seed(0)
    model, _ = tiny(0)
    model.requires_grad_(True)
    model.train()
    data = [_example(m, t) for m, t in CONVERSATIONS]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(500):  # converges in well under 100 steps; the bound keeps a failure finite
        total, worst = 0.0, float("inf")
        opt.zero_grad()
        for ids, mask in data:
            x = torch.tensor([ids])
            m = torch.tensor(mask[1:], dtype=torch.bool)
            logits = model(x).logits[0, :-1][m]
            target = x[0, 1:][m]
            loss = torch.nn.functional.cross_entropy(logits, target)
            loss.backward()
            total += float(loss.detach())
            with torch.no_grad():
                top2 = logits.topk(2, dim=-1).values
                margin = torch.where(logits.argmax(-1) == target, top2[:, 0] - top2[:, 1], -top2[:, 0])
            worst = min(worst, float(margin.min()))
        if worst > 1.0:  # every scripted token wins by > 1 nat: greedy decoding follows the script
            break
        opt.step()
    else:
        raise AssertionError(f"the script did not train (loss {total:.3f}, worst margin {worst:.2f})")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scripted_model() -> torch.nn.Module:
    model, _ = tiny(0)
    model.load_state_dict(scripted_state())
    return model


def model_logprobs(state: dict[str, torch.Tensor], token_ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of the model with ``state`` over the whole sequence, [len, vocab]
    (float64): the engines' logprob definition (engines/hf/sampling.py; T = 1 when greedy)."""
    model, _ = tiny(0)
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.double() / temperature, dim=-1)


async def push(trainer_endpoint: str, versions: list[tuple[int, dict[str, torch.Tensor]]]) -> None:
    from rollwire.weightsync.publisher import TrainerPublisher

    async with TrainerPublisher(trainer_endpoint) as tp:
        for version, state in versions:
            await tp.push_weights(version=version, tensors=state, transport="inline")


@dataclass
class Stack:
    rollout: str
    trainer: str
    base_url: str  # http://127.0.0.1:PORT/v1
    serve: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    serve_cmd: list[str]
    env: dict[str, str]
    logs: Any

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def restart_server(self) -> None:
        """SIGKILL ``rollwire serve`` and start it again at the same endpoints (as a supervisor or
        Ray would); returns once the old one is gone (the new one may still be starting)."""
        self.serve.kill()
        self.serve.wait(timeout=30)
        self.serve = subprocess.Popen(self.serve_cmd, env=self.env, stdout=self.logs, stderr=subprocess.STDOUT)


def metric(s: Stack, name: str) -> float:
    """The gateway's /metrics value of ``name`` (its first line: unlabelled, or the first label set); 0 if absent."""
    with urllib.request.urlopen(s.root + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Until ``url`` answers 200 (the gateway is up and has reached its server), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the gateway exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout}s"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@contextmanager
def stack(*, gateway_args: tuple[str, ...] = (), versions: list[tuple[int, dict[str, torch.Tensor]]] | None = None,
          serve_args: tuple[str, ...] = ()) -> Iterator[Stack]:
    """``rollwire serve`` (hf engine, tiny model, a trainer link) and ``rollwire gateway`` on free
    127.0.0.1 ports; ``versions`` are pushed before the stack is handed out."""
    rollout, trainer = free_tcp_endpoint(), free_tcp_endpoint()
    port = int(free_tcp_endpoint(span=1).rpartition(":")[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = tempfile.TemporaryFile()  # noqa: SIM115 (both processes' output, shown if the stack fails; closed below)
    serve_cmd = [sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "serve",
                 "--rollout-endpoint", rollout, "--trainer-endpoint", trainer, *serve_args]
    serve = subprocess.Popen(serve_cmd, env=env, stdout=logs, stderr=subprocess.STDOUT)
    gateway, s = None, None
    try:  # the gateway starts beside the server (it waits for it); the versions go in meanwhile
        gateway = subprocess.Popen([sys.executable, "-m", "rollwire.cli", "--log-level", "warning", "gateway",
                                    "--port", str(port), "--rollout-endpoint", rollout, *gateway_args],
                                   env=env, stdout=logs, stderr=subprocess.STDOUT)
        if versions:
            asyncio.run(push(trainer, versions))
        s = Stack(rollout, trainer, f"http://127.0.0.1:{port}/v1", serve, gateway, serve_cmd, env, logs)
        _wait_http(f"{s.root}/health", gateway)
        yield s
        assert s.serve.poll() is None and gateway.poll() is None, "a process of the stack died"
    except BaseException:
        logs.seek(0)
        sys.stderr.write(logs.read()[-8000:].decode(errors="replace"))
        raise
    finally:
        for p in (gateway, serve, s.serve if s is not None else None):
            if p is not None:
                _stop(p)
        logs.close()
