"""Fixtures of the engine contract suite: the same tests run against every engine backend.

``engine_kind`` is parametrized over the backends. ``hf`` runs anywhere; ``sglang`` is listed
so that its backend can be plugged in, and skips with the reason when it cannot run here.
Each test gets a started engine on the tiny model (a fresh hf engine; one sglang engine shared by
the session, as it takes a minute to start, put back after each test) and a reference copy of
that model (bit-identical weights, on the CPU) for direct forward passes.
``ROLLWIRE_TEST_DEVICE=cuda`` puts the hf engine's model on a GPU.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from rollwire.engines.base import Engine, EngineDelta, EngineRequest
from rollwire.messages.generate import FinishReason, SamplingParams
from rollwire.models import tiny

ENGINE_KINDS = ["hf", "sglang"]
TINY_SEED = 0


def _sglang_skip_reason() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed (pip install 'rollwire[sglang]')"
    if not torch.cuda.is_available():
        return "sglang needs a CUDA GPU"
    return None


@functools.cache
def tiny_checkpoint() -> str:
    """The tiny model saved as a local HF checkpoint (for engines that load from a directory)."""
    path = tempfile.mkdtemp(prefix="rollwire-tiny-")
    model, tokenizer = tiny(TINY_SEED)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reference_model() -> torch.nn.Module:
    """The tiny model (same seed as the engines'), for direct forward passes and generate()."""
    model, _ = tiny(TINY_SEED)
    return model


@pytest.fixture(params=ENGINE_KINDS)
def engine_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind == "sglang" and (reason := _sglang_skip_reason()) is not None:
        pytest.skip(reason)
    return kind


def make_engine(kind: str) -> Engine:
    if kind == "hf":
        from rollwire.engines.hf import HFEngine

        return HFEngine.from_spec(f"tiny:{TINY_SEED}", device=os.environ.get("ROLLWIRE_TEST_DEVICE", "cpu"))
    if kind == "sglang":  # float32 and deterministic, so outputs compare with the reference model's
        from rollwire.engines.sglang import SGLangEngine

        args = {"dtype": "float32", "enable_deterministic_inference": True, "mem_fraction_static": 0.3}
        return SGLangEngine(tiny_checkpoint(), engine_args=args)  # type: ignore[return-value]
    raise ValueError(f"unknown engine kind {kind!r}")


def originals(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


# -- engines: a fresh hf engine per test; one shared sglang engine ----------------------------------

_shared: dict[str, Any] = {}  # "sglang" -> the started ThreadedEngine


async def shared_sglang() -> Any:
    if "sglang" not in _shared:
        from tests.gpu.engine_thread import ThreadedEngine

        eng = ThreadedEngine(lambda: make_engine("sglang"))
        await eng.start()
        _shared["sglang"] = eng
    return _shared["sglang"]


def forget_shared_sglang() -> None:
    """The next test that asks for the shared sglang engine starts another (this one was shut down)."""
    _shared.pop("sglang")


async def _put_back(eng: Any, reference_model: torch.nn.Module) -> None:
    """Leave the shared engine as a fresh one: nothing live, running, original weights as v0."""
    async def reset(e: Any) -> None:
        for rid in list(e._live):
            await e.abort(rid)
        for _ in range(1000):
            if not e._live:
                break
            await asyncio.sleep(0.01)
        await e.pause("retract")
        reload = bool(e._released)
        if e._released:
            await e.resume_memory(list(e._released))
        if reload or e.info().weight_version != 0:
            await e.update_weights(originals(reference_model), version=0)
        await e.flush_cache()
        await e.resume()
    await eng.run(reset)


@pytest.fixture(scope="session", autouse=True)
def _shut_shared_engines() -> Iterator[None]:
    yield
    eng = _shared.pop("sglang", None)
    if eng is not None:
        asyncio.run(eng.shutdown())


@pytest.fixture
async def tiny_hf() -> AsyncIterator[Any]:
    """A started hf engine on the tiny model (seed 0), for the hf-only tests."""
    from rollwire.engines.hf import HFEngine
    from rollwire.models import tiny

    eng = HFEngine(tiny(0)[0], max_batch_size=8)
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest.fixture
async def engine(engine_kind: str, reference_model: torch.nn.Module) -> AsyncIterator[Engine]:
    if engine_kind != "sglang":
        eng = make_engine(engine_kind)
        await eng.start()
        yield eng
        await eng.shutdown()
        return
    shared = await shared_sglang()
    yield shared
    await _put_back(shared, reference_model)


@dataclass
class Result:
    """Everything a request streamed."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # weight version of each token
    finish_reason: FinishReason | None = None
    deltas: list[EngineDelta] = field(default_factory=list)


async def run_request(engine: Engine, rid: str, prompt: list[int], *, return_logprob: bool = False,
                      result: Result | None = None, **params: object) -> Result:
    """Stream one request to its end; ``result`` (if given) fills up as deltas arrive."""
    out = result if result is not None else Result()
    req = EngineRequest(rid=rid, input_ids=list(prompt), params=SamplingParams(**params),  # type: ignore[arg-type]
                        return_logprob=return_logprob)
    async for d in engine.generate(req):
        out.deltas.append(d)
        out.tokens += d.token_ids
        out.logprobs += d.logprobs or []
        out.versions += [d.weight_version] * len(d.token_ids)
        if d.finish_reason is not None:
            out.finish_reason = d.finish_reason
    return out
