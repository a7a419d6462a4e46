"""Versions whose outputs identify them: version v is the tiny model built with seed v.

``check_spans`` recomputes each span of a greedy output: the tokens of span (v, start, end) must be
exactly the greedy continuation of prompt + output[:start] under version v's weights. A token from
a half-loaded (or wrong) version would break that.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache

from rollwire.actors.memory_governor import GOVERNOR
from rollwire.engines.hf.batch import cache_kwarg
from rollwire.messages import ControlReply, GenerateDone, LoadVersion
from rollwire.models import tiny
from rollwire.runtime import address
from rollwire.transports.rpc import RpcClient
from rollwire.weightsync.staged import STAGED, stage_tensors


@functools.cache
def version_model(version: int) -> torch.nn.Module:
    return tiny(seed=version)[0]


def version_state(version: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in version_model(version).state_dict().items()}


def greedy(version: int, prefix: list[int], n: int) -> list[int]:
    """Plain argmax decoding, EOS included (the engine runs with ignore_eos; generate()'s
    min_new_tokens would mask EOS instead, which is a different policy)."""
    model = version_model(version)
    out: list[int] = []
    with torch.no_grad():
        cache = DynamicCache()  # grown in place by each call
        step = model(torch.tensor([prefix]), **cache_kwarg(model, cache), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = model(torch.tensor([[out[-1]]]), **cache_kwarg(model, cache), use_cache=True)
    return out


def check_spans(prompt: list[int], done: GenerateDone) -> None:
    assert done.weight_version_spans, done
    assert done.weight_version_spans[0].start == 0
    assert done.weight_version_spans[-1].end == len(done.output_ids)
    for span in done.weight_version_spans:
        got = done.output_ids[span.start:span.end]
        want = greedy(span.version, prompt + done.output_ids[:span.start], span.end - span.start)
        assert got == want, f"span {span} does not match version {span.version}'s greedy continuation"


async def send_version(version: int, state: dict[str, torch.Tensor], timeout: float = 60) -> object:
    """Hand ``state`` to the governor's weights port exactly as the WeightReceiverActor does
    (the tensors staged in this process, one LoadVersion over inproc ZeroMQ); returns its reply
    message (a refusal raises RemoteError)."""
    key = stage_tensors(version, list(state.items()))
    client: RpcClient = RpcClient(address(GOVERNOR, "weights"), ControlReply)
    try:
        reply = await client.call(LoadVersion(version=version, step=version, staged=key), timeout=timeout)
    finally:
        STAGED.discard(key)
        await client.close()
    return reply.msg
