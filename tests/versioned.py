"""Versions whose outputs identify them: version v is the tiny model built with seed v.

``check_spans`` recomputes each span of a greedy output: the tokens of span (v, start, end) must be
exactly the greedy continuation of prompt + output[:start] under version v's weights. A token from
a half-loaded (or wrong) version would break that.
"""

from __future__ import annotations

import functools

import torch

from rollwire.messages import GenerateDone
from rollwire.models import tiny


@functools.cache
def version_model(version: int) -> torch.nn.Module:
    return tiny(seed=version)[0]


def version_state(version: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in version_model(version).state_dict().items()}


def greedy(version: int, prefix: list[int], n: int) -> list[int]:
    model = version_model(version)
    ids = torch.tensor([prefix])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    return out[0, len(prefix):].tolist()


def check_spans(prompt: list[int], done: GenerateDone) -> None:
    assert done.weight_version_spans, done
    assert done.weight_version_spans[0].start == 0
    assert done.weight_version_spans[-1].end == len(done.output_ids)
    for span in done.weight_version_spans:
        got = done.output_ids[span.start:span.end]
        want = greedy(span.version, prompt + done.output_ids[:span.start], span.end - span.start)
        assert got == want, f"span {span} does not match version {span.version}'s greedy continuation"
