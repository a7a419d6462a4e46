"""Request validation every engine shares: what a request must satisfy before any backend runs it.

Both backends call ``check_request`` first (SGLang adds its own refusals after it, e.g. a seed
without deterministic inference), so a request refused by one is refused by the other with the
same code and message, and the GenerationActor's ``n`` bound is the same number. The ranges
below are the widest every backend survives: SGLang's scheduler process dies, and torch raises
inside a batched step (taking the batch mates with it), on values beyond them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rollwire.engines.base import ALL_MEMORY_TAGS, EngineError, EngineRequest
from rollwire.messages.control import ParamSpec
from rollwire.messages.errors import ErrorCode
from rollwire.messages.generate import SamplingParams

# Ranges every engine accepts (SGLang's scheduler dies, and torch raises inside a batched step, on
# values beyond them): checked at validation, so no value that reaches an engine can overflow there.
MAX_TEMPERATURE = 1e4  # logits / T: above this every distribution is uniform to float precision
GREEDY_BELOW = 1e-6  # a temperature in (0, this) is greedy (SGLang's _SAMPLING_EPS); 1/T would overflow
MAX_TOP_K = 2**31 - 1  # SGLang keeps top_k as int32; above the vocabulary it keeps every token anyway
MAX_SEED = 2**63 - 1  # torch.Generator and SGLang take a signed 64-bit seed; seed + n - 1 must fit too
MAX_N = 64  # samples per request
MAX_STOP_IDS = 1024  # stop_token_ids per request


def check_request(req: EngineRequest, vocab_size: int, max_model_len: int) -> None:
    """What every engine refuses (EngineError): no input, ids outside the vocabulary, bad sampling
    parameters, prompt + max_new_tokens above the context length."""
    ids, p = req.input_ids, req.params
    if not ids:
        raise EngineError(ErrorCode.EMPTY_INPUT, "input_ids is empty")
    if (bad := check_params(p, vocab_size)) is not None:
        raise EngineError(ErrorCode.BAD_SAMPLING_PARAMS, bad)
    if len(ids) + p.max_new_tokens > max_model_len:  # before the scan of the ids: a huge prompt costs nothing
        raise EngineError(ErrorCode.TOO_LONG, f"{len(ids)} prompt + {p.max_new_tokens} new tokens exceed "
                                      f"max_model_len {max_model_len}")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise EngineError(ErrorCode.TOKEN_OUT_OF_RANGE, f"input ids must lie in [0, {vocab_size})")


def check_params(p: SamplingParams, vocab_size: int) -> str | None:
    """What is wrong with ``p`` (None if nothing): the engine refuses it as bad_sampling_params.
    Every number is range-checked (NaN and infinities refused), every id list is bounded and its
    ids lie in the vocabulary."""
    if p.max_new_tokens <= 0:
        return "max_new_tokens must be >= 1"
    if not 0 <= p.temperature <= MAX_TEMPERATURE:  # also catches NaN and inf
        return f"temperature must lie in [0, {MAX_TEMPERATURE:g}]"
    if not 0 < p.top_p <= 1:
        return "top_p must lie in (0, 1]"
    if not 0 <= p.min_p < 1:  # 1 would keep only the top token: ask for greedy
        return "min_p must lie in [0, 1)"
    if not (p.top_k == -1 or 1 <= p.top_k <= MAX_TOP_K):
        return f"top_k must be -1 (all) or in [1, {MAX_TOP_K}]"
    if not 1 <= p.n <= MAX_N:
        return f"n={p.n} must lie in [1, {MAX_N}]"
    if p.seed is not None and not 0 <= p.seed <= MAX_SEED - (p.n - 1):
        return f"seed must lie in [0, 2**63 - n] (n samples use seed .. seed + n - 1), got {p.seed}"
    if len(p.stop_token_ids) > MAX_STOP_IDS:
        return f"at most {MAX_STOP_IDS} stop_token_ids"
    if p.allowed_token_ids is not None and not p.allowed_token_ids:
        return "allowed_token_ids is empty"
    for name, ids in (("stop_token_ids", p.stop_token_ids), ("allowed_token_ids", p.allowed_token_ids),
                      ("disallowed_token_ids", p.disallowed_token_ids)):
        if ids and len(ids) > vocab_size:
            return f"{name} has {len(ids)} ids, more than the vocabulary ({vocab_size})"
        if ids and not (min(ids) >= 0 and max(ids) < vocab_size):
            return f"{name} must lie in [0, {vocab_size})"
    banned = set(p.disallowed_token_ids or ())
    left = vocab_size - len(banned) if p.allowed_token_ids is None else len(set(p.allowed_token_ids) - banned)
    return "the token mask leaves no token to sample" if left == 0 else None


def check_tags(tags: Sequence[str]) -> None:
    """Memory tags of release_memory / resume_memory: only the known ones."""
    bad = [t for t in tags if t not in ALL_MEMORY_TAGS]
    if bad:
        raise EngineError(ErrorCode.UNKNOWN_TAG, f"unknown memory tags {bad}; known: {list(ALL_MEMORY_TAGS)}")


def check_version_tensors(params: Sequence[ParamSpec], items: Sequence[tuple[str, Any]]) -> None:
    """Every named tensor against the engine's parameters (name, shape, dtype), before anything
    is paused for its load: a version the engine will refuse costs no request its progress.
    ``params`` empty (the engine cannot tell): nothing checked here, the engine's load checks. A
    name the list lacks is still let through when it is a tied alias the engine resolves itself
    (``lm_head.weight`` beside ``model.embed_tokens.weight``). The engine's own check stays the
    authority; this one refuses only what it would refuse too."""
    if not params:
        return
    known = {p.name: p for p in params}
    for name, t in items:
        p = known.get(name)
        if p is None and name == "lm_head.weight":
            p = known.get("model.embed_tokens.weight")
        if p is None:
            raise EngineError(ErrorCode.UNKNOWN_TENSOR, f"no parameter named {name!r}")
        if tuple(t.shape) != tuple(p.shape):
            raise EngineError(ErrorCode.SHAPE_MISMATCH, f"{name}: got {tuple(t.shape)}, want {tuple(p.shape)}")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != p.dtype:
            raise EngineError(ErrorCode.DTYPE_MISMATCH, f"{name}: got {dtype}, want {p.dtype}")
