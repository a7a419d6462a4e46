"""Generation messages: what a rollout worker sends and what it gets back.

Only objects that cross a socket live here. Hot structs (one per request or per token) are
``array_like`` and ``omit_defaults`` so they encode as short msgpack arrays; ``gc=False`` is set
on structs that hold no reference cycles (they hold only scalars, lists and other structs).
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort"]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, array_like=True, omit_defaults=True, gc=False):
    """Per-request sampling. Defaults follow SGLang's ``SamplingParams``."""

    max_new_tokens: int = 128  # tokens to generate at most (must be >= 1 and <= the server's limit)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = -1  # keep the k most likely tokens; -1 keeps all
    min_p: float = 0.0  # drop tokens below min_p * p(max token)
    seed: int | None = None  # per-request RNG seed: same seed, same weights -> same tokens
    stop_token_ids: list[int] = []  # finish with "stop" after emitting any of these
    ignore_eos: bool = False  # keep generating past the model's EOS token
    n: int = 1  # independent samples of this prompt (seeds seed, seed+1, ...)
    allowed_token_ids: list[int] | None = None  # RL action mask: only these may be sampled
    disallowed_token_ids: list[int] | None = None  # these may never be sampled


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True, tag="generate", array_like=True,
                      omit_defaults=True, gc=False):
    """Generate from ``input_ids``. The request id is the envelope's ``rid``."""

    input_ids: list[int]  # prompt token ids, non-empty, each < vocab size
    sampling_params: SamplingParams = SamplingParams()
    return_logprob: bool = False  # report the logprob of every sampled token
    stream: bool = False  # send GenerateChunk deltas before the final GenerateDone
    min_version: int = 0  # wait until this weight version is live before starting
    # prefix reuse (set by the SessionActor): the engine may keep this request's KV under the key
    # and reuse it for the next request of the same session whose input_ids extend it
    session_id: str | None = None
    keep_stale_prefix: bool = False  # reuse a prefix computed by an older weight version
    # the public client a co-located actor (the SessionActor) forwards this request for: per-client
    # limits and batch-slot shares count it as that client's; ignored when a public peer sets it
    client: str = ""
    # stream: send a chunk once this many new tokens are pending (or the version changes); 1 sends
    # every engine step. A fleet client that streams only to know a request's tokens asks for more.
    chunk_tokens: int = 1
    # stream: the client takes chunks back when told (GenerateChunk.restarted), so a request too
    # stale under --max-staleness and the retract policy starts again from its prompt, as a
    # non-streamed one does, instead of being aborted (a fleet's non-streamed requests)
    restartable: bool = False


class AbortRequest(msgspec.Struct, frozen=True, kw_only=True, tag="abort", array_like=True, gc=False):
    """Abort the sender's request ``target_rid``; it finishes with finish_reason "abort"."""

    target_rid: int


class VersionSpan(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Output tokens [start, end) were generated under weight ``version`` (end exclusive)."""

    version: int
    start: int
    end: int


class Usage(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from a reused KV prefix


class Timings(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    queued_s: float  # from arrival to first scheduling
    first_token_s: float  # from arrival to first output token
    total_s: float  # from arrival to the terminal reply


class GenerateChunk(msgspec.Struct, frozen=True, kw_only=True, tag="chunk", array_like=True,
                    omit_defaults=True, gc=False):
    """Streamed delta: tokens produced since the previous chunk of sample ``index``."""

    index: int = 0  # which of the n samples
    token_ids: list[int]
    logprobs: list[float] | None = None
    weight_version: int = 0  # the version that produced these tokens
    # the sample started again from its prompt (a ``restartable`` request too stale): every earlier
    # chunk of this sample is void; this one carries no tokens
    restarted: bool = False


class GenerateDone(msgspec.Struct, frozen=True, kw_only=True, tag="done", array_like=True,
                   omit_defaults=True, gc=False):
    """Terminal reply of one sample: the whole output, whatever was streamed before."""

    index: int = 0  # which of the n samples
    output_ids: list[int]
    output_logprobs: list[float] | None = None
    finish_reason: FinishReason
    weight_version: int  # version that produced the last token (or the live one if none)
    weight_version_spans: list[VersionSpan] = []
    usage: Usage
    timings: Timings
