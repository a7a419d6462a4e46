"""Experience: finished rollout groups that rollout workers hand to a trainer (the demo's loop).

Workers (DEALER) -> trainer (ROUTER at the experience endpoint). The trainer answers each
``SampleGroup`` with ``Ack`` so a worker never has more than its credit of groups unacknowledged.
"""

from __future__ import annotations

import msgspec

from rollwire.messages.generate import VersionSpan


class Sample(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    output_ids: list[int]
    output_logprobs: list[float]  # the server's logprobs: the "old policy" of the clipped loss
    finish_reason: str
    reward: float
    weight_version_spans: list[VersionSpan]


class SampleGroup(msgspec.Struct, frozen=True, kw_only=True, tag="sample_group", array_like=True, gc=False):
    """One prompt and its n samples (a GRPO group)."""

    worker: int
    prompt_ids: list[int]
    samples: list[Sample]
    generate_s: float  # wall time the group took to generate
