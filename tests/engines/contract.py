"""What the engine contract tests share: prompts, request helpers, a float32 forward-pass reference
for logprobs, weights to push (tests/engines/test_engine_contract*.py)."""

from __future__ import annotations

import asyncio
import random

import torch

from rollwire.engines.base import Engine

from .conftest import Result, originals, run_request

__all__ = ["LOGPROB_ATOL", "PROMPTS", "forward_logprobs", "originals", "perturbed", "start", "wait_for_tokens"]

rng = random.Random(1234)
PROMPTS = [[rng.randrange(3, 103) for _ in range(n)] for n in (1, 3, 7, 12, 18, 25, 31, 40)]  # 8 mixed lengths


async def wait_for_tokens(result: Result, n: int) -> None:
    while len(result.tokens) < n and result.finish_reason is None:
        await asyncio.sleep(0.001)


def start(engine: Engine, rid: str, prompt: list[int], **params: object) -> tuple[Result, asyncio.Task[Result]]:
    res = Result()
    return res, asyncio.create_task(run_request(engine, rid, prompt, result=res, **params))


def forward_logprobs(model: torch.nn.Module, prompt: list[int], output: list[int], temperature: float = 1.0,
                     allowed: list[int] | None = None, disallowed: list[int] | None = None) -> torch.Tensor:
    """log_softmax(masked logits / T) of each output token, from one forward pass over prompt+output."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    logits = logits[len(prompt) - 1: len(prompt) + len(output) - 1]
    keep = torch.ones(logits.shape[-1], dtype=torch.bool)
    if allowed is not None:
        keep[:] = False
        keep[allowed] = True
    if disallowed:
        keep[disallowed] = False
    logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(output)[:, None])[:, 0]


# How close an engine's logprobs come to a float32 forward pass on the CPU. The sglang variant runs
# float32 with enable_deterministic_inference, whose batch-invariant matmuls (Triton tl.dot) and
# Triton attention compute in TF32: on an H100 its logprobs were 0.013-0.034 off (max abs) in these tests.
LOGPROB_ATOL = {"hf": 1e-4, "sglang": 5e-2}


def perturbed(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, (p.detach() * 1.5 + 0.01).clone()) for n, p in model.named_parameters()]



