"""What the tests of SGLangEngine against the SGLang stand-in (tests/gpu/fake_sglang) share: the
stand-in's path, a tiny checkpoint's shape, request helpers (the fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from rollwire.engines.base import EngineRequest
from rollwire.messages.generate import SamplingParams

FAKE = str(Path(__file__).parent / "fake_sglang")
SHAPE = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=False)


def weights(ckpt: str, scale: float = 1.0) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [(k, (v.float() * scale).to(v.dtype)) for k, v in load_file(f"{ckpt}/model.safetensors").items()]


async def run(e: object, rid: str, prompt: list[int], out: dict | None = None, **params: object) -> dict:
    res = out if out is not None else {}
    res.update(tokens=[], versions=[], finals=0, finish=None, lps=[])
    async for d in e.generate(EngineRequest(rid, prompt, SamplingParams(**params), return_logprob=True)):  # type: ignore[attr-defined]
        res["tokens"] += d.token_ids
        res["lps"] += d.logprobs or []
        res["versions"] += [d.weight_version] * len(d.token_ids)
        if d.finish_reason is not None:
            res["finals"] += 1
            res["finish"] = d.finish_reason
    return res


def start(e: object, rid: str, prompt: list[int], **params: object) -> tuple[dict, asyncio.Task]:
    res: dict = {"tokens": []}
    return res, asyncio.ensure_future(run(e, rid, prompt, res, **params))


async def until(res: dict, n: int) -> None:
    for _ in range(5000):
        if len(res["tokens"]) >= n or res.get("finish"):
            return
        await asyncio.sleep(0.001)
    raise TimeoutError


async def rounds(e: object, n: int = 10) -> None:
    """Until the stand-in's scheduler has gone round its loop ``n`` more times: a window in which a
    running request would have made tokens, measured in scheduler steps rather than wall time (a
    loaded machine stretches the time, not the count)."""
    tm = e._tm  # type: ignore[attr-defined]
    target = tm.fake_rounds + n
    for _ in range(20000):
        if tm.fake_rounds >= target:
            return
        await asyncio.sleep(0.001)
    raise TimeoutError


G = dict(max_new_tokens=40, temperature=0.0, ignore_eos=True)


async def run_batch(e: object, rid: str, prompt: list[int], chunk_tokens: int | None = None,
                    **params: object) -> dict:
    """A non-streamed request (EngineRequest.stream=False), or with ``chunk_tokens`` a stream whose
    consumer forwards chunks of that many: every delta it yields, as a list."""
    req = EngineRequest(rid, prompt, SamplingParams(**params), return_logprob=True, stream=chunk_tokens is not None,
                        chunk_tokens=chunk_tokens or 1)
    deltas = [d async for d in e.generate(req)]  # type: ignore[attr-defined]
    return {"deltas": deltas, "tokens": [t for d in deltas for t in d.token_ids],
            "versions": [d.weight_version for d in deltas for _ in d.token_ids],
            "lps": [x for d in deltas for x in d.logprobs or []],
            "finish": deltas[-1].finish_reason, "finals": sum(d.finish_reason is not None for d in deltas)}
