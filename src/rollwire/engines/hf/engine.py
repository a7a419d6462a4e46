"""The embedded transformers engine: continuous batching of a ``PreTrainedModel`` on CPU or GPU.

A scheduler task on the event loop (``scheduler``) admits requests, runs one step at a time on a
single worker thread (torch releases the GIL, so the loop keeps answering) and hands each request
its new token through its own ``asyncio.Queue``. A step is: drop finished rows, decode the running batch
by one token, prefill the joiners together, concatenate, sample every row (``sampling``).
Step N+1 is launched as soon as step N's tokens are booked; N's deltas go out while N+1 runs.
State that the worker touches (``_batch``, ``_running``) is changed only between steps, on the
loop; ``_lock`` is held across a chain of steps, so ``pause`` returns only once none is in flight.

Fair sharing: waiting requests are admitted round-robin across clients (``EngineRequest.client``,
``requests.FairQueue``), and a full batch gives one row back (the newest of the client holding
the most above its share, ``max_batch_size`` // clients with work) for each client that waits with
fewer rows than its share; that row is re-prefilled when its turn comes again (``_fair_share``).

Failures: a step that raises is isolated (``_isolate``: each member probed alone; only a culprit
fails); a failure outside any one request (the worker gone) kills the engine (``_die``: engine_dead
to every request, the death callback). ``faults`` injects both, for tests only.

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

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from rollwire.engines.hf import batch as hf_batch
from rollwire.engines.hf import prefix as hf_prefix
from rollwire.engines.hf.faults import Faults
from rollwire.engines.hf.requests import FairQueue, Seq, eos_of, next_delta
from rollwire.engines.hf.sampling import make_row_sampler
from rollwire.engines.hf.scheduler import StepLoop
from rollwire.engines.hf.weights import WeightStore
from rollwire.engines.validation import check_request, check_tags
from rollwire.messages.control import ParamSpec


class HFEngine(StepLoop):
    """Engine on a transformers causal LM; see the module docstring and ``sampling``.

    ``max_batch_size`` rows decode together; ``max_model_len`` defaults to the model's
    max_position_embeddings; ``eos_token_ids`` to its generation config; ``device`` (where
    inputs go) to the device of its parameters; ``tokenizer`` is kept for callers only.
    """

    MAX_PREFILL_TOKENS = 16384  # padded prompt tokens prefilled in one step (one long prompt always fits)

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
        self._version = 0
        self._prefixes = hf_prefix.PrefixCache(prefix_cache_bytes)
        self._seqs: dict[str, Seq] = {}
        self._waiting = FairQueue()  # round-robin across clients
        self._running: list[Seq] = []  # row i of _batch
        self._batch: hf_batch.Batch | None = None
        self._paused = False
        self._stepping = False  # a step is on the worker
        self._launched: list[Seq] = []  # the requests of the last step launched
        self._closed = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rollwire-{name}")
        self._task: asyncio.Task[None] | None = None
        self._dead: str | None = None  # why the engine died (see _die); it serves nothing after
        self._on_death: Callable[[str], None] | None = None
        self._isolated = 0
        self._preempted = 0
        self._faults = Faults.parse()  # test hook (faults): None unless ROLLWIRE_HF_FAULTS is set

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu", dtype: str | None = None, **kw: Any) -> HFEngine:
        from rollwire.models import load_model

        model, tokenizer = load_model(spec, device=device, dtype=dtype)
        return cls(model, tokenizer=tokenizer, **kw)

    # -- protocol -------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._version

    def parameters(self) -> list[ParamSpec]:
        return self._weights.specs()

    def info(self) -> EngineInfo:
        weights = self._weights.resident_bytes()
        return EngineInfo(
            name=self.name, vocab_size=self.vocab_size, eos_token_ids=list(self.eos_token_ids),
            max_model_len=self.max_model_len, weight_version=self._version, device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            extra={
                "weights_bytes": weights, "kv_bytes": self._batch.nbytes() if self._batch else 0,
                "running": sum(not s.done for s in self._running), "waiting": len(self._waiting),
                "paused": self._paused, "weights_released": self._weights.released,
                "weights_undefined": self._weights.undefined,
                "max_batch_size": self.max_batch_size, "dead": self._dead is not None,
                "requests_failed_alone": self._isolated,
                "rows_preempted": self._preempted, "prefix_cache_bytes": self._prefixes.nbytes,
                "prefix_sessions": len(self._prefixes), "prefix_hits": self._prefixes.hits,
                "prefix_reused_tokens": self._prefixes.reused_tokens,
            },
        )

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._schedule(), name=f"{self.name}-scheduler")

    async def shutdown(self) -> None:
        self._closed = True
        async with self._lock:
            for s in [*self._running, *self._waiting]:
                self._finish(s, "abort")
            self._running, self._batch = [], None
            self._waiting.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._pool.shutdown(wait=False)

    def validate(self, req: EngineRequest) -> None:
        """Raise EngineError if ``req`` cannot be served; the actor may call it before streaming."""
        check_request(req, self.vocab_size, self.max_model_len)

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineDelta]:
        self.validate(req)
        if self._dead is not None:
            raise EngineError(ENGINE_DEAD, self._dead)
        if self._closed:
            raise EngineError("shutting_down", "engine is shut down")
        if req.rid in self._seqs:
            raise EngineError("duplicate_request", f"request {req.rid!r} is already live")
        await self.start()
        p = req.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
        seq = Seq(req=req, sampler=make_row_sampler(p, self.vocab_size, self.device, req.return_logprob),
                   stop_ids=frozenset(stops), limit=min(self.max_model_len, len(req.input_ids) + p.max_new_tokens))
        self._seqs[req.rid] = seq
        self._waiting.append(seq)
        self._wake.set()
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
                if self._seqs.get(req.rid) is seq:
                    del self._seqs[req.rid]

    async def abort(self, rid: str) -> None:
        seq = self._seqs.get(rid)
        if seq is None or seq.done:
            return
        if seq in self._waiting:
            self._waiting.remove(seq)
            self._finish(seq, "abort")
        elif self._stepping:
            seq.abort_requested = True  # the step in flight delivers its token, then "abort"
        else:
            self._finish(seq, "abort")  # its row is dropped at the next step

    async def pause(self, mode: PauseMode) -> None:
        """Stop stepping; returns once no step is in flight. ``abort`` also aborts requests queued
        before the pause (as SGLang's abort_all); requests arriving while paused wait."""
        if mode not in ("abort", "retract", "in_place"):
            raise EngineError("bad_pause_mode", f"unknown pause mode {mode!r}")
        self._paused = True
        async with self._lock:
            if mode == "abort":
                for s in [*self._running, *self._waiting]:
                    self._finish(s, "abort")
                self._waiting.clear()
                self._running, self._batch = [], None
            elif mode == "retract":
                self._retract()

    async def resume(self) -> None:
        self._paused = False
        self._wake.set()

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Validate every tensor, then copy all of them into the live parameters (storage kept)."""
        if self._dead is not None:
            raise EngineError(ENGINE_DEAD, self._dead)
        if not self._paused:
            raise EngineError("not_paused", "update_weights needs a paused engine")
        items = self._weights.check(named_tensors)
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._weights.copy, items)
            self._version = version
            for s in self._running:  # kept their KV across the load (in_place): mixed versions
                s.kv_version = hf_prefix.STALE

    async def release_memory(self, tags: Sequence[MemoryTag]) -> None:
        """``weights``: parameter storage is freed (contents are lost, as in SGLang; nothing is
        generated until they are resumed and re-sent). ``kv_cache``: all KV is dropped (paused
        only); running requests are re-prefilled on resume. ``cuda_graph``: nothing to free."""
        check_tags(tags)
        if "kv_cache" in tags and not self._paused:
            raise EngineError("not_paused", "release kv_cache needs a paused engine")
        async with self._lock:
            if "kv_cache" in tags:
                self._retract()
                self._prefixes.clear()
            if "weights" in tags:
                self._weights.release()

    async def resume_memory(self, tags: Sequence[MemoryTag]) -> None:
        """``weights``: storage of the right shapes is allocated again; contents are undefined
        until update_weights fills them."""
        check_tags(tags)
        if "weights" in tags and self._weights.released:
            async with self._lock:
                self._weights.restore()
            self._wake.set()

    async def flush_cache(self) -> None:
        """Drops every session's cached prefix; refuses (``busy``) while requests run unpaused."""
        if not self._paused and (any(not s.done for s in self._running) or self._waiting):
            raise EngineError("busy", "flush_cache while requests are running; pause first")
        self._prefixes.clear()

    async def close_session(self, session_id: str) -> None:
        self._prefixes.drop(session_id)

    def set_death_callback(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs once, on the loop, when the engine dies (see ``_die``)."""
        self._on_death = callback
        if self._dead is not None:
            asyncio.get_running_loop().call_soon(callback, self._dead)
