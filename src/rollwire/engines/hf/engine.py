"""The embedded transformers engine: continuous batching of a ``PreTrainedModel`` on CPU or GPU.

The engine owns a ``scheduler.Scheduler``: a task on the event loop that admits requests, runs one
step at a time on a single worker thread (torch releases the GIL, so the loop keeps answering)
and hands each request its new token through its own ``asyncio.Queue``. A step is: drop finished
rows, decode the running batch by one token, prefill the joiners together, concatenate, sample
every row (``sampling``). Step N+1 is launched as soon as step N's tokens are booked; N's deltas
go out while N+1 runs. State that the worker touches (the scheduler's ``batch``, ``running``) is
changed only between steps, on the loop; the scheduler's ``lock`` is held across a chain of
steps, so ``pause`` returns only once none is in flight. This class is the Engine protocol on
top: validation, weights, memory, the prefix cache, info.

Fair sharing: waiting requests are admitted round-robin across clients (``EngineRequest.client``,
``requests.FairQueue``), and a full batch gives one row back (the newest of the client holding
the most above its share, ``max_batch_size`` // clients with work) for each client that waits with
fewer rows than its share; that row is re-prefilled when its turn comes again
(``Scheduler._fair_share``).

Failures: a step that raises is isolated (``Scheduler._isolate``: each member probed alone; only a
culprit fails); a failure outside any one request (the worker gone) kills the engine
(``Scheduler._die``: engine_dead to every request, the death callback). ``faults`` injects both,
for tests only.

Float noise: a row's logits differ by ~1e-6 between running alone and in a batch (oneDNN/MKL
pick different GEMM kernels for 1, 2-3 and >= 4 rows, and SDPA blocks differently over a
left-padded key length), so equality of greedy tokens holds only where the top-2 logit gap is
above that (it is, by a wide margin, on the tiny model); logprobs agree to ~1e-5.

transformers' own ``ContinuousBatchingManager`` was not used: it has one ``do_sample`` for the
whole manager (no greedy and sampled requests side by side), one global seed (no per-request
generator), no min_p and no per-request token masks, logprobs taken after its top-k/top-p
processors, no retract or abort pause, and no weight version.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import torch

from rollwire.engines.base import (
    ENGINE_DEAD,
    EngineDelta,
    EngineError,
    EngineInfo,
    EngineRequest,
    MemoryTag,
    PauseMode,
)
from rollwire.engines.hf import prefix as hf_prefix
from rollwire.engines.hf.requests import Seq, eos_of, next_delta
from rollwire.engines.hf.sampling import make_row_sampler
from rollwire.engines.hf.scheduler import Scheduler
from rollwire.engines.hf.weights import WeightStore
from rollwire.engines.validation import check_request, check_tags
from rollwire.messages.control import ParamSpec
from rollwire.messages.errors import ErrorCode
from rollwire.weightsync.memcopy import ByteCheck


class HFEngine:
    """Engine on a transformers causal LM; see the module docstring and ``sampling``.

    ``max_batch_size`` rows decode together; ``max_model_len`` defaults to the model's
    max_position_embeddings; ``eos_token_ids`` to its generation config; ``device`` (where
    inputs go) to the device of its parameters; ``tokenizer`` is kept for callers only.
    """

    def __init__(self, model: Any, *, max_batch_size: int = 64, max_model_len: int | None = None,
                 eos_token_ids: Sequence[int] | None = None, device: str | torch.device | None = None,
                 name: str = "hf", tokenizer: Any = None, prefix_cache_bytes: int = 1 << 30) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        cfg: Any = model.config.get_text_config()
        self.vocab_size = int(cfg.vocab_size)
        self.max_model_len = max_model_len or int(getattr(cfg, "max_position_embeddings", 4096))
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else eos_of(model)
        pad = getattr(cfg, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self._weights = WeightStore(model, self.device)
        self._prefixes = hf_prefix.PrefixCache(prefix_cache_bytes)
        self._sched = Scheduler(model, device=self.device, pad_id=self.pad_id, max_batch_size=max_batch_size,
                                weights=self._weights, prefixes=self._prefixes, name=name)

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu", dtype: str | None = None, **kw: Any) -> HFEngine:
        from rollwire.models import load_model

        model, tokenizer = load_model(spec, device=device, dtype=dtype)
        return cls(model, tokenizer=tokenizer, **kw)

    # -- protocol -------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._sched.version

    def parameters(self) -> list[ParamSpec]:
        return self._weights.specs()

    def info(self) -> EngineInfo:
        weights = self._weights.resident_bytes()
        sched = self._sched
        return EngineInfo(
            name=self.name, vocab_size=self.vocab_size, eos_token_ids=list(self.eos_token_ids),
            max_model_len=self.max_model_len, weight_version=sched.version, device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            weights_complete=not (self._weights.undefined or self._weights.released),
            extra={
                "weights_bytes": weights, "kv_bytes": sched.batch.nbytes() if sched.batch else 0,
                "running": sum(not s.done for s in sched.running), "waiting": len(sched.waiting),
                "paused": sched.paused, "weights_released": self._weights.released,
                "weights_undefined": self._weights.undefined,
                "max_batch_size": self.max_batch_size,
                "requests_failed_alone": sched.isolated,
                "rows_preempted": sched.preempted, "prefix_cache_bytes": self._prefixes.nbytes,
                "prefix_sessions": len(self._prefixes), "prefix_hits": self._prefixes.hits,
                "prefix_reused_tokens": self._prefixes.reused_tokens,
            },
        )

    async def start(self) -> None:
        self._sched.start()

    async def shutdown(self) -> None:
        await self._sched.shutdown()

    def validate(self, req: EngineRequest) -> None:
        """Raise EngineError if ``req`` cannot be served; the actor may call it before streaming."""
        check_request(req, self.vocab_size, self.max_model_len)

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineDelta]:
        self.validate(req)
        sched = self._sched
        if sched.dead is not None:
            raise EngineError(ENGINE_DEAD, sched.dead)
        if sched.closed:
            raise EngineError(ErrorCode.SHUTTING_DOWN, "engine is shut down")
        if req.rid in sched.seqs:
            raise EngineError(ErrorCode.DUPLICATE_REQUEST, f"request {req.rid!r} is already live")
        await self.start()
        p = req.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
        seq = Seq(req=req, sampler=make_row_sampler(p, self.vocab_size, self.device, req.return_logprob),
                   stop_ids=frozenset(stops), limit=min(self.max_model_len, len(req.input_ids) + p.max_new_tokens))
        sched.submit(seq)
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                delta = next_delta(item, seq.queue)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not seq.done:  # the consumer went away: stop spending steps on it, free the rid
                await self.abort(req.rid)
                if sched.seqs.get(req.rid) is seq:
                    del sched.seqs[req.rid]

    async def abort(self, rid: str) -> None:
        self._sched.abort(rid)

    async def pause(self, mode: PauseMode) -> None:
        """Stop stepping; returns once no step is in flight. ``abort`` also aborts requests queued
        before the pause (as SGLang's abort_all); requests arriving while paused wait."""
        if mode not in ("abort", "retract", "in_place"):
            raise EngineError(ErrorCode.BAD_PAUSE_MODE, f"unknown pause mode {mode!r}")
        await self._sched.pause(mode)

    async def resume(self) -> None:
        self._sched.resume()

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Validate every tensor, then copy all of them into the live parameters (storage kept)."""
        await self.update_weights_verified(named_tensors, version, ())

    async def update_weights_verified(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                                      checks: Sequence[ByteCheck]) -> None:
        """``update_weights``, hashing the unverified buckets ``checks`` as their bytes are copied
        (``VerifyingLoader``)."""
        if self._sched.dead is not None:
            raise EngineError(ENGINE_DEAD, self._sched.dead)
        if not self._sched.paused:
            raise EngineError(ErrorCode.NOT_PAUSED, "update_weights needs a paused engine")
        items = self._weights.check(named_tensors)
        await self._sched.load(lambda: self._weights.copy(items, checks), version)

    async def release_memory(self, tags: Sequence[MemoryTag]) -> None:
        """``weights``: parameter storage is freed (contents are lost, as in SGLang; nothing is
        generated until they are resumed and re-sent). ``kv_cache``: all KV is dropped (paused
        only); running requests are re-prefilled on resume. ``cuda_graph``: nothing to free."""
        check_tags(tags)
        if "kv_cache" in tags and not self._sched.paused:
            raise EngineError(ErrorCode.NOT_PAUSED, "release kv_cache needs a paused engine")
        async with self._sched.lock:
            if "kv_cache" in tags:
                self._sched.retract()
                self._prefixes.clear()
            if "weights" in tags:
                self._weights.release()

    async def resume_memory(self, tags: Sequence[MemoryTag]) -> None:
        """``weights``: storage of the right shapes is allocated again; contents are undefined
        until update_weights fills them."""
        check_tags(tags)
        if "weights" in tags and self._weights.released:
            async with self._sched.lock:
                self._weights.restore()
            self._sched.wake()

    async def flush_cache(self) -> None:
        """Drops every session's cached prefix; refuses (``busy``) while requests run unpaused."""
        if not self._sched.paused and self._sched.busy():
            raise EngineError(ErrorCode.BUSY, "flush_cache while requests are running; pause first")
        self._prefixes.clear()

    async def close_session(self, session_id: str) -> None:
        self._prefixes.drop(session_id)

    def set_death_callback(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs once, on the loop, when the engine dies (``Scheduler._die``)."""
        self._sched.set_death_callback(callback)
